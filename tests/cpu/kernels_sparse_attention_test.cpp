// Block-sparse attention against full attention, a dense masked fp64 reference
// (mask from the block ids, built with loops) and central differences.
#include <gtest/gtest.h>

#include <limits>
#include <stdexcept>

#include "kernels/attention.h"
#include "kernels_test_support.h"

namespace ssa::kernels {
namespace {

using test::block_mask;
using test::dense_masked_attention;
using test::expect_close;
using test::randn;

SparseOptions options_of(int64_t block_size, int64_t top_k) {
  SparseOptions o;
  o.block_size = block_size;
  o.top_k = top_k;
  return o;
}

// Random block ids [B, Sq, Hkv, top_k] in the layout of select_blocks (distinct,
// ascending, -1 after) drawn among the causal blocks of each query.
at::Tensor random_block_ids(int64_t b, int64_t sq, int64_t hkv, int64_t top_k, int64_t block_size, int64_t q_start) {
  at::Tensor ids = at::full({b, sq, hkv, top_k}, -1, at::kInt);
  auto a = ids.accessor<int32_t, 4>();
  for (int64_t n = 0; n < b; ++n)
    for (int64_t i = 0; i < sq; ++i)
      for (int64_t h = 0; h < hkv; ++h) {
        const int64_t causal = (q_start + i) / block_size + 1;
        const at::Tensor pick = at::randperm(causal).narrow(0, 0, std::min(top_k, causal));
        const at::Tensor sorted = std::get<0>(pick.sort());
        for (int64_t s = 0; s < pick.size(0); ++s) a[n][i][h][s] = static_cast<int32_t>(sorted[s].item<int64_t>());
      }
  return ids;
}

TEST(SparseAttention, EqualsFullWhenEveryBlockIsSelected) {
  at::manual_seed(11);
  // 37 keys in blocks of 8: 5 blocks, the last with 5 keys; top_k 8 >= 5.
  for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
    const at::Tensor q = randn({2, 37, 4, 8}, dtype), k = randn({2, 37, 2, 8}, dtype), v = randn({2, 37, 2, 8}, dtype);
    const SparseOptions opt = options_of(8, 8);
    const at::Tensor ids = select_blocks(q, pool_keys(k, 8), opt);
    const AttentionResult sparse = sparse_attention(q, k, v, ids, opt);
    const AttentionResult full = full_attention(q, k, v);
    const double tol = dtype == at::kDouble ? 1e-10 : 1e-5;
    expect_close(sparse.out, full.out, tol, tol, std::string("out ") + c10::toString(dtype));
    expect_close(sparse.lse, full.lse, tol, tol, std::string("lse ") + c10::toString(dtype));
    // A query chunk [16, 37) against all keys, ids selected at its offset.
    const at::Tensor qc = q.narrow(1, 16, 21);
    const at::Tensor ids_c = select_blocks(qc, pool_keys(k, 8), opt, 16);
    const AttentionResult sparse_c = sparse_attention(qc, k, v, ids_c, opt, 16, 0);
    const AttentionResult full_c = full_attention(qc, k, v, 16, 0);
    expect_close(sparse_c.out, full_c.out, tol, tol, "chunk out");
    expect_close(sparse_c.lse, full_c.lse, tol, tol, "chunk lse");
  }
}

TEST(SparseAttention, MatchesDenseMaskedReference) {
  at::manual_seed(12);
  // Random ids (some rows with fewer causal blocks than slots, so -1 slots), a
  // partial last block (45 = 5 * 8 + 5), GQA group 2, and a query offset.
  const at::Tensor q = randn({2, 29, 4, 8}), k = randn({2, 45, 2, 8}), v = randn({2, 45, 2, 8});
  const at::Tensor ids = random_block_ids(2, 29, 2, 3, 8, 16);
  const AttentionResult got = sparse_attention(q, k, v, ids, options_of(8, 3), 16, 0);
  const AttentionResult want = dense_masked_attention(q, k, v, block_mask(ids, 4, 45, 8, 16, 0));
  expect_close(got.out, want.out, 1e-10, 1e-10, "out");
  expect_close(got.lse, want.lse, 1e-10, 1e-10, "lse");
}

TEST(SparseAttention, GradientsMatchFiniteDifferences) {
  at::manual_seed(13);
  // 11 keys in blocks of 4 (the last holds 3), top_k 2, GQA group 2; out and lse
  // both enter the loss.
  const at::Tensor q = randn({1, 11, 4, 3}), k = randn({1, 11, 2, 3}), v = randn({1, 11, 2, 3});
  const SparseOptions opt = options_of(4, 2);
  const at::Tensor ids = select_blocks(q, pool_keys(k, 4), opt);
  ASSERT_TRUE((ids.select(3, 1) == -1).any().item<bool>());  // early rows have one causal block
  ASSERT_TRUE((ids.select(3, 0) != 2).logical_and(ids.select(3, 1) == 2).any().item<bool>());
  const test::WeightedLoss weights = test::make_loss(q, true);
  test::expect_gradients_match_fd(
      [&](const std::vector<at::Tensor>& x) { return weights(sparse_attention(x[0], x[1], x[2], ids, opt)); },
      {q, k, v}, 1e-6, "sparse");
}

TEST(SparseAttention, BlockSelectedByEveryQueryGetsDenseGradients) {
  at::manual_seed(14);
  // Every query selects block 0 and its own block: block 0's keys receive
  // gradient from all 64 queries. Compare dk, dv (and dq) with autograd through
  // the dense masked reference.
  const int64_t s = 64, bs = 8;
  const at::Tensor q = randn({2, s, 4, 8}), k = randn({2, s, 2, 8}), v = randn({2, s, 2, 8});
  at::Tensor ids = at::full({2, s, 2, 2}, -1, at::kInt);
  for (int64_t i = 0; i < s; ++i) {
    ids.select(1, i).select(2, 0).fill_(0);
    if (i / bs > 0) ids.select(1, i).select(2, 1).fill_(i / bs);
  }
  const at::Tensor w = randn({2, s, 4, 8});
  std::vector<at::Tensor> got_in, want_in;
  for (const auto& t : {q, k, v}) {
    got_in.push_back(t.clone().set_requires_grad(true));
    want_in.push_back(t.clone().set_requires_grad(true));
  }
  const AttentionResult got = sparse_attention(got_in[0], got_in[1], got_in[2], ids, options_of(bs, 2));
  const AttentionResult want =
      dense_masked_attention(want_in[0], want_in[1], want_in[2], block_mask(ids, 4, s, bs, 0, 0));
  expect_close(got.out, want.out, 1e-10, 1e-10, "out");
  const auto g = torch::autograd::grad({(got.out * w).sum() + got.lse.sum()}, got_in);
  const auto r = torch::autograd::grad({(want.out * w).sum() + want.lse.sum()}, want_in);
  expect_close(g[0], r[0], 1e-9, 1e-9, "dq");
  expect_close(g[1], r[1], 1e-9, 1e-9, "dk");
  expect_close(g[2], r[2], 1e-9, 1e-9, "dv");
}

TEST(SparseAttention, KeyChunksMergedEqualConcatenatedKeys) {
  at::manual_seed(15);
  // A query chunk at [32, 64) with global ids; keys [0, 32) and [32, 64): ids
  // outside a chunk are skipped there, and the merge restores the whole.
  const at::Tensor q = randn({1, 32, 4, 8}), k = randn({1, 64, 2, 8}), v = randn({1, 64, 2, 8});
  const SparseOptions opt = options_of(8, 3);
  const at::Tensor ids = select_blocks(q, pool_keys(k, 8), opt, 32);
  std::vector<at::Tensor> in_whole, in_parts;
  for (const auto& t : {q, k, v}) {
    in_whole.push_back(t.clone().set_requires_grad(true));
    in_parts.push_back(t.clone().set_requires_grad(true));
  }
  const AttentionResult whole = sparse_attention(in_whole[0], in_whole[1], in_whole[2], ids, opt, 32, 0);
  const AttentionResult first =
      sparse_attention(in_parts[0], in_parts[1].narrow(1, 0, 32), in_parts[2].narrow(1, 0, 32), ids, opt, 32, 0);
  const AttentionResult second =
      sparse_attention(in_parts[0], in_parts[1].narrow(1, 32, 32), in_parts[2].narrow(1, 32, 32), ids, opt, 32, 32);
  const AttentionResult merged = merge_partials(first, second);
  expect_close(merged.out, whole.out, 1e-10, 1e-10, "out");
  expect_close(merged.lse, whole.lse, 1e-10, 1e-10, "lse");
  const at::Tensor w = randn({1, 32, 4, 8});
  const auto gw = torch::autograd::grad({(whole.out * w).sum() + whole.lse.sum()}, in_whole);
  const auto gp = torch::autograd::grad({(merged.out * w).sum() + merged.lse.sum()}, in_parts);
  for (size_t i = 0; i < 3; ++i) expect_close(gp[i], gw[i], 1e-9, 1e-9, "gradient " + std::to_string(i));
}

// sparse_attention_backward per key chunk, from the merged out and lse, adds up
// to autograd of the whole (fp64): three chunks, one of them the queries' own
// positions, one that no query sees fully, one before every query.
TEST(SparseAttention, BackwardFromMergedResultAddsUpToTheWhole) {
  at::manual_seed(16);
  const int64_t q_start = 40;
  const at::Tensor q = randn({2, 24, 4, 8}), k = randn({2, 64, 2, 8}), v = randn({2, 64, 2, 8});
  const at::Tensor dout = randn({2, 24, 4, 8});
  const SparseOptions opt = options_of(8, 3);
  const at::Tensor ids = random_block_ids(2, 24, 2, 3, 8, q_start);
  std::vector<at::Tensor> in;
  for (const auto& t : {q, k, v}) in.push_back(t.clone().set_requires_grad(true));
  const AttentionResult whole = sparse_attention(in[0], in[1], in[2], ids, opt, q_start, 0);
  const auto want = torch::autograd::grad({(whole.out * dout).sum()}, in);
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  for (const auto& [row, len] : {std::pair<int64_t, int64_t>{0, 24}, {24, 16}, {40, 24}}) {
    const AttentionGrads g = sparse_attention_backward(dout, q, k.narrow(1, row, len), v.narrow(1, row, len),
                                                       whole.out.detach(), whole.lse.detach(), ids, opt, q_start, row);
    EXPECT_EQ(g.dk.sizes(), k.narrow(1, row, len).sizes());
    dq += g.dq;
    dk.narrow(1, row, len) += g.dk;
    dv.narrow(1, row, len) += g.dv;
  }
  ASSERT_GT(want[1].abs().max().item<double>(), 1e-3);
  expect_close(dq, want[0], 1e-9, 1e-9, "dq");
  expect_close(dk, want[1], 1e-9, 1e-9, "dk");
  expect_close(dv, want[2], 1e-9, 1e-9, "dv");
  EXPECT_THROW(sparse_attention_backward(dout.narrow(1, 0, 8), q, k, v, whole.out, whole.lse, ids, opt, q_start, 0),
               std::runtime_error);
}

TEST(SparseAttention, RowsWithoutVisibleKeysAreEmptyWithFiniteGradients) {
  at::manual_seed(16);
  // Keys [16, 24) only; queries [0, 8) select block 0 (not in this chunk) or nothing.
  const at::Tensor q = randn({1, 8, 2, 4}).set_requires_grad(true);
  const at::Tensor k = randn({1, 8, 2, 4}).set_requires_grad(true), v = randn({1, 8, 2, 4}).set_requires_grad(true);
  at::Tensor ids = at::full({1, 8, 2, 2}, -1, at::kInt);
  ids.narrow(1, 0, 4).select(3, 0).fill_(0);
  const AttentionResult r = sparse_attention(q, k, v, ids, options_of(8, 2), 0, 16);
  EXPECT_TRUE((r.lse == -std::numeric_limits<double>::infinity()).all().item<bool>());
  EXPECT_EQ(r.out.abs().max().item<double>(), 0.0);
  const AttentionResult m = merge_partials(r, r);
  const auto g =
      torch::autograd::grad({m.out.sum() + at::where(at::isinf(m.lse), at::zeros_like(m.lse), m.lse).sum()}, {q, k, v});
  for (const auto& t : g) EXPECT_FALSE(at::isnan(t).any().item<bool>());
}

// Two runs of query positions in one call (a context-parallel rank's zigzag
// chunks) equal one call per run: selection, output, lse and gradients; a split
// outside the rows or a late run starting inside the early one is refused.
TEST(SparseAttention, TwoQueryRunsEqualOneCallPerRun) {
  const int64_t c = 8, sk = 32, bs = 4;
  const SparseOptions opt = options_of(bs, 3);
  const at::Tensor q = randn({2, 2 * c, 4, 8}), k = randn({2, sk, 2, 8}), v = randn({2, sk, 2, 8});
  const QueryRows rows = QueryRows::two_runs(c, c, 2 * c);  // chunks 1 and 2 of 4
  const at::Tensor pooled = pool_keys(k, bs);
  const at::Tensor ids = select_blocks(q, pooled, opt, rows);
  const at::Tensor early_ids = select_blocks(q.narrow(1, 0, c), pooled, opt, c);
  const at::Tensor late_ids = select_blocks(q.narrow(1, c, c), pooled, opt, 2 * c);
  EXPECT_TRUE(at::equal(ids, at::cat({early_ids, late_ids}, 1)));

  const at::Tensor ql = q.clone().requires_grad_(true), kl = k.clone().requires_grad_(true);
  const AttentionResult both = sparse_attention(ql, kl, v, ids, opt, rows, 0);
  const AttentionResult early = sparse_attention(q.narrow(1, 0, c), k, v, early_ids, opt, c, 0);
  const AttentionResult late = sparse_attention(q.narrow(1, c, c), k, v, late_ids, opt, 2 * c, 0);
  expect_close(both.out, at::cat({early.out, late.out}, 1), 1e-6, 1e-6, "out");
  expect_close(both.lse, at::cat({early.lse, late.lse}, 2), 1e-6, 1e-6, "lse");

  // The merged-result backward over both runs equals autograd through the call.
  const at::Tensor dout = randn({2, 2 * c, 4, 8});
  (both.out * dout).sum().backward();
  const AttentionGrads g = sparse_attention_backward(dout, q, k, v, both.out.detach(), both.lse.detach(), ids, opt,
                                                     rows, 0);
  expect_close(g.dq, ql.grad(), 1e-5, 1e-5, "dq");
  expect_close(g.dk, kl.grad(), 1e-5, 1e-5, "dk");
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  sparse_attention_backward_into(dout, q, k, v, both.out.detach(), both.lse.detach(), ids, opt, rows, 0, dq, dk, dv);
  expect_close(dq, g.dq, 1e-6, 1e-6, "dq into");
  expect_close(dv, g.dv, 1e-6, 1e-6, "dv into");

  EXPECT_THROW(select_blocks(q, pooled, opt, QueryRows::two_runs(c, 2 * c + 1, 4 * c)), std::runtime_error);
  EXPECT_THROW(sparse_attention(q, k, v, ids, opt, QueryRows::two_runs(c, c, c + 2)), std::runtime_error);
  SparseOptions by_block = opt;
  by_block.mode = SelectionMode::kQueryBlock;
  EXPECT_NO_THROW(select_blocks(q, pooled, by_block, rows));
  EXPECT_THROW(select_blocks(q, pooled, by_block, QueryRows::two_runs(c, c, 2 * c + 2)), std::runtime_error);
}

TEST(SparseAttention, RejectsBadBlockIds) {
  const at::Tensor q = randn({1, 4, 2, 4}), k = randn({1, 4, 2, 4}), v = randn({1, 4, 2, 4});
  const SparseOptions opt = options_of(2, 2);
  at::Tensor good = at::full({1, 4, 2, 2}, -1, at::kInt);
  EXPECT_NO_THROW(sparse_attention(q, k, v, good, opt));
  EXPECT_THROW(sparse_attention(q, k, v, good.to(at::kLong), opt), std::runtime_error);                    // dtype
  EXPECT_THROW(sparse_attention(q, k, v, good.narrow(1, 0, 3), opt), std::runtime_error);                  // rows
  EXPECT_THROW(sparse_attention(q, k, v, at::full({1, 4, 1, 2}, -1, at::kInt), opt), std::runtime_error);  // heads
  at::Tensor descending = good.clone();
  descending.select(3, 0).fill_(1);
  descending.select(3, 1).fill_(0);
  EXPECT_THROW(sparse_attention(q, k, v, descending, opt), std::runtime_error);
  at::Tensor hole = good.clone();
  hole.select(3, 1).fill_(1);  // a valid id after a -1 slot
  EXPECT_THROW(sparse_attention(q, k, v, hole, opt), std::runtime_error);
  at::Tensor below = good.clone();
  below.select(3, 0).fill_(-2);
  EXPECT_THROW(sparse_attention(q, k, v, below, opt), std::runtime_error);
  EXPECT_THROW(sparse_attention(q, k, v, good, options_of(0, 2)), std::runtime_error);
  SparseOptions cuda = opt;
  cuda.backend = Backend::kCuda;
  EXPECT_THROW(sparse_attention(q, k, v, good, cuda), std::runtime_error);  // CPU tensors
}

}  // namespace
}  // namespace ssa::kernels
