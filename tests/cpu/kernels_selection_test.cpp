// Block selection, key pooling and the eval statistics against brute-force
// references written with plain loops (and closed forms).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "kernels/attention.h"
#include "kernels/reference_attention.h"
#include "kernels_test_support.h"

namespace ssa::kernels {
namespace {

using test::expect_close;
using test::randn;

SparseOptions options_of(int64_t block_size, int64_t top_k, SelectionMode mode = SelectionMode::kToken) {
  SparseOptions o;
  o.block_size = block_size;
  o.top_k = top_k;
  o.mode = mode;
  return o;
}

// kbar[b][j][h][:] = mean of the keys of block j (a last partial block: of the keys it has).
at::Tensor loop_pool(const at::Tensor& k, int64_t bs) {
  const int64_t b = k.size(0), sk = k.size(1), hkv = k.size(2), d = k.size(3), nb = (sk + bs - 1) / bs;
  at::Tensor out = at::zeros({b, nb, hkv, d}, at::kDouble);
  auto o = out.accessor<double, 4>();
  const at::Tensor kd = k.to(at::kDouble);
  auto a = kd.accessor<double, 4>();
  for (int64_t n = 0; n < b; ++n)
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t h = 0; h < hkv; ++h)
        for (int64_t x = 0; x < d; ++x) {
          double sum = 0;
          int64_t count = 0;
          for (int64_t p = j * bs; p < std::min(sk, (j + 1) * bs); ++p, ++count) sum += a[n][p][h][x];
          o[n][j][h][x] = sum / static_cast<double>(count);
        }
  return out;
}

// The selection rule of ssa-method.md spelled out with loops: per query head a
// softmax over the causal blocks, summed over the GQA group, the own block
// forced, best scores first (ties to the lower id), kept ids ascending, -1 after.
at::Tensor brute_select(const at::Tensor& q, const at::Tensor& k, int64_t bs, int64_t top_k, int64_t q_start,
                        bool per_block) {
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), d = q.size(3), hkv = k.size(2);
  const int64_t group = hq / hkv;
  const at::Tensor kbar = loop_pool(k, bs);
  auto kb = kbar.accessor<double, 4>();
  const at::Tensor qd = q.to(at::kDouble);
  auto qa = qd.accessor<double, 4>();
  at::Tensor ids = at::full({b, sq, hkv, top_k}, -1, at::kInt);
  auto out = ids.accessor<int32_t, 4>();
  for (int64_t n = 0; n < b; ++n)
    for (int64_t h = 0; h < hkv; ++h) {
      // score[i][j] for j <= own block of query i
      std::vector<std::vector<double>> score(sq);
      for (int64_t i = 0; i < sq; ++i) {
        const int64_t cur = (q_start + i) / bs;
        score[i].assign(cur + 1, 0.0);
        for (int64_t g = 0; g < group; ++g) {
          std::vector<double> logits(cur + 1);
          for (int64_t j = 0; j <= cur; ++j) {
            double dot = 0;
            for (int64_t x = 0; x < d; ++x) dot += qa[n][i][h * group + g][x] * kb[n][j][h][x];
            logits[j] = dot / std::sqrt(static_cast<double>(d));
          }
          const double mx = *std::max_element(logits.begin(), logits.end());
          double z = 0;
          for (double l : logits) z += std::exp(l - mx);
          for (int64_t j = 0; j <= cur; ++j) score[i][j] += std::exp(logits[j] - mx) / z;
        }
      }
      for (int64_t i = 0; i < sq; ++i) {
        const int64_t cur = (q_start + i) / bs;
        std::vector<double> s = score[i];
        if (per_block) {  // mean over the queries of this chunk in the same query block
          std::fill(s.begin(), s.end(), 0.0);
          int64_t members = 0;
          for (int64_t m = 0; m < sq; ++m) {
            if ((q_start + m) / bs != cur) continue;
            ++members;
            for (int64_t j = 0; j <= cur; ++j) s[j] += score[m][j];
          }
          for (double& x : s) x /= static_cast<double>(members);
        }
        std::vector<int64_t> order(cur + 1);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
          if (x == cur || y == cur) return x == cur && y != cur;
          return s[x] > s[y];
        });
        order.resize(std::min<int64_t>(top_k, cur + 1));
        std::sort(order.begin(), order.end());
        for (size_t slot = 0; slot < order.size(); ++slot) out[n][i][h][slot] = static_cast<int32_t>(order[slot]);
      }
    }
  return ids;
}

TEST(PoolKeys, MeansOfBlocksWithPartialLastBlock) {
  at::manual_seed(21);
  const at::Tensor k = randn({2, 21, 3, 5});  // blocks of 8: 8, 8, 5 keys
  const at::Tensor pooled = pool_keys(k, 8);
  EXPECT_EQ(pooled.sizes(), (std::vector<int64_t>{2, 3, 3, 5}));
  expect_close(pooled, loop_pool(k, 8), 1e-12, 1e-12, "pooled fp64");
  // Means of bf16 keys come back in bf16: the mean rounded once, so within a bf16
  // step of the fp64 mean.
  const at::Tensor kb = k.to(at::kBFloat16);
  const at::Tensor pooled16 = pool_keys(kb, 8);
  EXPECT_EQ(pooled16.scalar_type(), at::kBFloat16);
  expect_close(pooled16, loop_pool(kb, 8).to(at::kBFloat16), 0, 1.0 / 256, "pooled from bf16");
  EXPECT_EQ(pool_keys(k.to(at::kFloat), 8).scalar_type(), at::kFloat);
}

TEST(SelectBlocks, TokenModeMatchesBruteForce) {
  at::manual_seed(22);
  // 45 positions in blocks of 8 (last block holds 5), GQA group 2; whole
  // sequence, an offset query chunk, and top_k beyond the block count (-1 padding).
  const at::Tensor q = randn({2, 45, 4, 8}), k = randn({2, 45, 2, 8});
  for (int64_t top_k : {1, 3, 10}) {
    const SparseOptions opt = options_of(8, top_k);
    const at::Tensor got = select_blocks(q, pool_keys(k, 8), opt);
    EXPECT_EQ(got.scalar_type(), at::kInt);
    EXPECT_TRUE(at::equal(got, brute_select(q, k, 8, top_k, 0, false))) << "top_k " << top_k;
    const at::Tensor qc = q.narrow(1, 13, 32);
    const at::Tensor got_c = select_blocks(qc, pool_keys(k, 8), opt, 13);
    EXPECT_TRUE(at::equal(got_c, brute_select(qc, k, 8, top_k, 13, false))) << "offset, top_k " << top_k;
    // Small chunks of queries give the same ids.
    EXPECT_TRUE(at::equal(reference::select_blocks(q, pool_keys(k, 8), opt, 0, 5), got)) << "chunked";
  }
  // fp32 inputs select the same blocks as fp64 on this data.
  EXPECT_TRUE(at::equal(select_blocks(q.to(at::kFloat), pool_keys(k.to(at::kFloat), 8), options_of(8, 3)),
                        brute_select(q, k, 8, 3, 0, false)));
}

TEST(SelectBlocks, QueryBlockModeMatchesBruteForce) {
  at::manual_seed(23);
  // The last query block holds 5 queries; an offset chunk starting at block 2.
  const at::Tensor q = randn({2, 45, 4, 8}), k = randn({2, 45, 2, 8});
  const SparseOptions opt = options_of(8, 3, SelectionMode::kQueryBlock);
  const at::Tensor got = select_blocks(q, pool_keys(k, 8), opt);
  EXPECT_TRUE(at::equal(got, brute_select(q, k, 8, 3, 0, true)));
  // One set per query block.
  for (int64_t i = 0; i < 45; ++i) EXPECT_TRUE(at::equal(got.select(1, i), got.select(1, i / 8 * 8)));
  const at::Tensor qc = q.narrow(1, 16, 29);
  EXPECT_TRUE(at::equal(select_blocks(qc, pool_keys(k, 8), opt, 16), brute_select(qc, k, 8, 3, 16, true)));
  EXPECT_TRUE(at::equal(reference::select_blocks(q, pool_keys(k, 8), opt, 0, 9), got)) << "chunked";
  // It differs from per-token selection on this data (else the test proves little).
  EXPECT_FALSE(at::equal(got, select_blocks(q, pool_keys(k, 8), options_of(8, 3))));
}

TEST(SelectBlocks, TiesGoToTheLowerBlock) {
  // Identical keys: every causal block scores the same.
  const at::Tensor q = randn({1, 40, 2, 4}), k = randn({1, 1, 1, 4}).expand({1, 40, 1, 4}).contiguous();
  const at::Tensor got = select_blocks(q, pool_keys(k, 8), options_of(8, 3));
  EXPECT_TRUE(at::equal(got, brute_select(q, k, 8, 3, 0, false)));
  const std::vector<int32_t> last = {0, 1, 4};  // query 39 in block 4: blocks 0, 1 and its own
  EXPECT_TRUE(at::equal(got[0][39][0], at::tensor(last, at::kInt)));
}

TEST(SelectBlocks, RejectsBadInputs) {
  const at::Tensor q = randn({1, 16, 4, 8}), k = randn({1, 16, 2, 8});
  const at::Tensor pooled = pool_keys(k, 8);
  EXPECT_THROW(select_blocks(q, pool_keys(k.narrow(1, 0, 8), 8), options_of(8, 2)),
               std::runtime_error);  // too few blocks
  EXPECT_THROW(select_blocks(q.narrow(1, 0, 8), pooled, options_of(8, 2, SelectionMode::kQueryBlock), 4),
               std::runtime_error);  // misaligned query block
  EXPECT_THROW(select_blocks(q, pooled, options_of(8, 0)), std::runtime_error);
  EXPECT_THROW(select_blocks(q, pool_keys(randn({1, 16, 3, 8}), 8), options_of(8, 2)), std::runtime_error);
  EXPECT_THROW(select_blocks(q, pool_keys(randn({1, 16, 2, 4}), 8), options_of(8, 2)), std::runtime_error);
  EXPECT_THROW(pool_keys(k, 0), std::runtime_error);
  SparseOptions cuda = options_of(8, 2);
  cuda.backend = Backend::kCuda;
  EXPECT_THROW(select_blocks(q, pooled, cuda), std::runtime_error);
}

// Direct statistics: the full causal softmax matrix, then loops.
AttentionStats direct_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& ids, int64_t bs) {
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), sk = k.size(1), group = hq / k.size(2);
  const at::Tensor mask = test::causal_mask(b, sq, hq, sk, 0, 0);
  const at::Tensor ke = k.to(at::kDouble).repeat_interleave(group, 2);
  const at::Tensor scores = at::einsum("bihd,bjhd->bihj", {q.to(at::kDouble), ke}) / std::sqrt(double(q.size(3)));
  const at::Tensor p = scores.masked_fill(mask.logical_not(), -INFINITY).softmax(-1).contiguous();
  auto pa = p.accessor<double, 4>();
  auto ia = ids.accessor<int32_t, 4>();
  AttentionStats s;
  for (int64_t n = 0; n < b; ++n)
    for (int64_t i = 0; i < sq; ++i)
      for (int64_t h = 0; h < hq; ++h) {
        double mass = 0, entropy = 0;
        for (int64_t j = 0; j < sk; ++j) {
          const double x = pa[n][i][h][j];
          if (x > 0) entropy -= x * std::log2(x);
          for (int64_t slot = 0; slot < ids.size(3); ++slot)
            if (ia[n][i][h / group][slot] == j / bs) mass += x;
        }
        s.sparsity += mass;
        s.entropy_bits += entropy;
        ++s.count;
      }
  s.sparsity /= static_cast<double>(s.count);
  s.entropy_bits /= static_cast<double>(s.count);
  return s;
}

TEST(AttentionStats, MatchesDirectComputation) {
  at::manual_seed(24);
  const at::Tensor q = randn({2, 45, 4, 8}) * 2, k = randn({2, 45, 2, 8});
  const at::Tensor ids = select_blocks(q, pool_keys(k, 8), options_of(8, 2));
  const AttentionStats want = direct_stats(q, k, ids, 8);
  for (const AttentionStats& got : {attention_stats(q, k, ids, 8), reference::attention_stats(q, k, ids, 8, 7),
                                    attention_stats(q.to(at::kFloat), k.to(at::kFloat), ids, 8, Backend::kReference)}) {
    EXPECT_EQ(got.count, 2 * 45 * 4);
    EXPECT_NEAR(got.sparsity, want.sparsity, 1e-6);
    EXPECT_NEAR(got.entropy_bits, want.entropy_bits, 1e-5);
  }
  EXPECT_GT(want.sparsity, 0.3);
  EXPECT_LT(want.sparsity, 0.999);
}

TEST(AttentionStats, AllBlocksSelectedGiveSparsityOneAndUniformEntropyIsLog2) {
  at::manual_seed(25);
  const at::Tensor q = randn({1, 30, 4, 8}), k = randn({1, 30, 2, 8});
  const at::Tensor all = select_blocks(q, pool_keys(k, 8), options_of(8, 4));  // 4 blocks
  EXPECT_NEAR(attention_stats(q, k, all, 8).sparsity, 1.0, 1e-9);
  // q = 0: query i attends uniformly to i + 1 keys, entropy log2(i + 1).
  double want = 0;
  for (int64_t i = 0; i < 30; ++i) want += std::log2(static_cast<double>(i + 1));
  EXPECT_NEAR(attention_stats(at::zeros_like(q), k, all, 8).entropy_bits, want / 30, 1e-9);
  // Only the own block of each query: sparsity = mean of (i % 8 + 1) / (i + 1).
  at::Tensor own = at::full({1, 30, 2, 1}, -1, at::kInt);
  for (int64_t i = 0; i < 30; ++i) own.select(1, i).fill_(static_cast<int32_t>(i / 8));
  double want_own = 0;
  for (int64_t i = 0; i < 30; ++i) want_own += static_cast<double>(i % 8 + 1) / static_cast<double>(i + 1);
  EXPECT_NEAR(attention_stats(at::zeros_like(q), k, own, 8).sparsity, want_own / 30, 1e-9);
}

TEST(AttentionStats, RejectsBadInputs) {
  const at::Tensor q = randn({1, 8, 2, 4}), k = randn({1, 8, 2, 4});
  EXPECT_THROW(attention_stats(q, k, at::full({1, 8, 2, 1}, 1, at::kInt), 8), std::runtime_error);  // id >= blocks
  EXPECT_THROW(attention_stats(q, k, at::full({1, 8, 2, 1}, 0, at::kInt), 0), std::runtime_error);
  EXPECT_THROW(attention_stats(q, k, at::full({1, 7, 2, 1}, 0, at::kInt), 8), std::runtime_error);
  EXPECT_THROW(attention_stats(q, k, at::full({1, 8, 2, 1}, 0, at::kInt), 8, Backend::kCuda), std::runtime_error);
}

TEST(Backends, ResolveAndParse) {
  EXPECT_EQ(parse_selection_mode("token"), SelectionMode::kToken);
  EXPECT_EQ(parse_selection_mode("query_block"), SelectionMode::kQueryBlock);
  EXPECT_THROW(parse_selection_mode("block"), std::runtime_error);
  EXPECT_EQ(resolve_backend("reference", at::kCPU), Backend::kReference);
  EXPECT_EQ(resolve_backend("auto", at::kCPU), Backend::kReference);
  EXPECT_THROW(resolve_backend("cuda", at::kCPU), std::runtime_error);
  EXPECT_THROW(resolve_backend("triton", at::kCPU), std::runtime_error);
  // CPU tensors never run on the kernels; insisting on them names the problem.
  const at::Tensor q = at::randn({1, 32, 4, 64}), k = at::randn({1, 32, 2, 64});
  EXPECT_FALSE(runs_on_cuda(Backend::kAuto, q, k, 4, 16));
  EXPECT_FALSE(runs_on_cuda(Backend::kReference, q, k, 4, 16));
  EXPECT_THROW(runs_on_cuda(Backend::kCuda, q, k, 4, 16), std::runtime_error);
}

}  // namespace
}  // namespace ssa::kernels
