// CUDA block-sparse attention (forward and backward) against the reference backend
// on fp32 copies of the same inputs, over the supported shape classes: head dims 64
// and 128, GQA groups 1..32, block sizes 16..128, partial last blocks, batch > 1,
// q/k offsets with -1 slots and rows that see no key, and many queries selecting
// the same blocks. The bound for each tensor is a multiple of the reference's own
// bf16-vs-fp32 spread (the reference run on the bf16 inputs), with a floor.
#include <gtest/gtest.h>

#include <string>

#include "kernels/attention.h"
#include "kernels_gpu_support.h"
#ifdef SSA_WITH_CUDA
#include <algorithm>
#include <map>
#include <vector>

#include "kernels/cuda_launch.h"
#include "kernels/cuda_sparse_index.h"
#endif

namespace ssa::kernels {
namespace {

using gpu_test::gpu;
using gpu_test::make_block_ids;
using gpu_test::max_abs_error;
using gpu_test::relative_error;
using gpu_test::run_sparse;
using gpu_test::SparseRun;

struct Case {
  std::string name;
  int64_t b, sq, sk, hq, hkv, d, block_size, top_k;
  int64_t q_start = 0, k_start = 0;
  int64_t shared = 0;  // slots every query spends on blocks 0, 1, ...
};

void expect_matches_reference(const Case& c, bool deterministic) {
  at::manual_seed(1234);
  const at::Tensor q = at::randn({c.b, c.sq, c.hq, c.d}, gpu());
  const at::Tensor k = at::randn({c.b, c.sk, c.hkv, c.d}, gpu());
  const at::Tensor v = at::randn({c.b, c.sk, c.hkv, c.d}, gpu());
  const at::Tensor ids = make_block_ids(c.b, c.sq, c.hkv, c.top_k, c.block_size, c.q_start, c.shared);
  const at::Tensor w_out = at::randn({c.b, c.sq, c.hq, c.d}, gpu(at::kFloat));
  const at::Tensor w_lse = at::randn({c.b, c.hq, c.sq}, gpu(at::kFloat));

  SparseOptions opt;
  opt.block_size = c.block_size;
  opt.top_k = c.top_k;
  opt.deterministic = deterministic;
  opt.backend = Backend::kCuda;
  const SparseRun got = run_sparse(q, k, v, ids, opt, c.q_start, c.k_start, w_out, w_lse);
  opt.backend = Backend::kReference;
  const SparseRun want =
      run_sparse(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), ids, opt, c.q_start, c.k_start, w_out, w_lse);
  const SparseRun spread = run_sparse(q, k, v, ids, opt, c.q_start, c.k_start, w_out, w_lse);

  // -inf lse (rows without a visible key) must match exactly.
  ASSERT_TRUE(at::equal(at::isinf(got.lse), at::isinf(want.lse))) << c.name << ": rows without keys differ";
  ASSERT_FALSE(at::isnan(got.out).any().item<bool>()) << c.name;
  const std::vector<std::pair<std::string, std::pair<at::Tensor, std::pair<at::Tensor, at::Tensor>>>> checks = {
      {"out", {got.out, {want.out, spread.out}}}, {"lse", {got.lse, {want.lse, spread.lse}}},
      {"dq", {got.dq, {want.dq, spread.dq}}},     {"dk", {got.dk, {want.dk, spread.dk}}},
      {"dv", {got.dv, {want.dv, spread.dv}}}};
  for (const auto& [what, t] : checks) {
    const at::Tensor& g = t.first;
    const at::Tensor& w = t.second.first;
    const at::Tensor& s = t.second.second;
    ASSERT_FALSE(at::isnan(g).any().item<bool>()) << c.name << " " << what << " has NaN";
    const double rel = relative_error(g, w), rel_spread = relative_error(s, w);
    const double abs = max_abs_error(g, w), abs_spread = max_abs_error(s, w);
    const double scale = at::where(at::isfinite(w), w.abs(), at::zeros_like(w)).max().item<double>();
    EXPECT_LE(rel, std::max(4 * rel_spread, 5e-3))
        << c.name << " " << what << ": relative error " << rel << " vs reference bf16 spread " << rel_spread;
    EXPECT_LE(abs, std::max(8 * abs_spread, 1e-2 * scale))
        << c.name << " " << what << ": max abs error " << abs << " vs spread " << abs_spread << " (max |ref| "
        << scale << ")";
  }
}

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      // name, B, Sq, Sk, Hq, Hkv, D, block, top_k, q_start, k_start, shared
      {"paper-like D64 G16 bs16 partial block", 1, 1000, 1000, 32, 2, 64, 16, 16},
      {"D128 G1 bs32 batch 2", 2, 300, 300, 8, 8, 128, 32, 4},
      {"D64 G32 bs64", 1, 517, 517, 32, 1, 64, 64, 3},
      {"D128 G4 bs128 batch 2", 2, 700, 700, 12, 3, 128, 128, 2},
      {"D64 G6 bs16 (group not a multiple of 16)", 1, 333, 333, 12, 2, 64, 16, 5},
      {"D64 G16 bs16, every query on blocks 0-5", 1, 2048, 2048, 32, 2, 64, 16, 8, 0, 0, 6},
      {"D64 G16 bs64 batch 2 partial block", 2, 700, 700, 32, 2, 64, 64, 4},
      {"D64 G16 bs32, q chunk at 512, k chunk [256, 640), -1 slots", 1, 256, 384, 32, 2, 64, 32, 24, 512, 256},
      {"D128 G8 bs32, every query on blocks 0-2", 2, 640, 640, 16, 2, 128, 32, 4, 0, 0, 3},
      {"q chunk at 512, k chunk [256, 640), -1 slots", 1, 256, 384, 16, 2, 64, 32, 24, 512, 256},
      {"k chunk after the first queries (rows with no key)", 1, 192, 128, 8, 2, 64, 16, 4, 0, 64, 1},
  };
  return all;
}

TEST(CudaSparseAttention, MatchesReferenceWithAtomics) {
  SSA_REQUIRE_GPU();
  for (const Case& c : cases()) expect_matches_reference(c, /*deterministic=*/false);
}

TEST(CudaSparseAttention, MatchesReferenceDeterministic) {
  SSA_REQUIRE_GPU();
  for (const Case& c : cases()) expect_matches_reference(c, /*deterministic=*/true);
}

TEST(CudaSparseAttention, DeterministicModeRepeatsBitForBit) {
  SSA_REQUIRE_GPU();
  at::manual_seed(7);
  const int64_t b = 1, s = 2048, hq = 32, hkv = 2, d = 64, bs = 16, top_k = 16;
  const at::Tensor q = at::randn({b, s, hq, d}, gpu()), k = at::randn({b, s, hkv, d}, gpu()),
                   v = at::randn({b, s, hkv, d}, gpu());
  const at::Tensor ids = make_block_ids(b, s, hkv, top_k, bs, 0, 8);
  const at::Tensor w_out = at::randn({b, s, hq, d}, gpu(at::kFloat));
  const at::Tensor w_lse = at::randn({b, hq, s}, gpu(at::kFloat));
  SparseOptions opt;
  opt.block_size = bs;
  opt.top_k = top_k;
  opt.backend = Backend::kCuda;
  opt.deterministic = true;
  const SparseRun a = gpu_test::run_sparse(q, k, v, ids, opt, 0, 0, w_out, w_lse);
  const SparseRun c = gpu_test::run_sparse(q, k, v, ids, opt, 0, 0, w_out, w_lse);
  EXPECT_TRUE(at::equal(a.out, c.out));
  EXPECT_TRUE(at::equal(a.lse, c.lse));
  EXPECT_TRUE(at::equal(a.dq, c.dq));
  EXPECT_TRUE(at::equal(a.dk, c.dk));
  EXPECT_TRUE(at::equal(a.dv, c.dv));
}

TEST(CudaSparseAttention, RejectsWhatItCannotRun) {
  SSA_REQUIRE_GPU();
  const at::Tensor q = at::randn({1, 32, 4, 64}, gpu()), k = at::randn({1, 32, 2, 64}, gpu());
  const at::Tensor ids = make_block_ids(1, 32, 2, 2, 16, 0, 0);
  SparseOptions opt;
  opt.block_size = 16;
  opt.top_k = 2;
  opt.backend = Backend::kCuda;
  EXPECT_THROW(sparse_attention(q.to(at::kFloat), k.to(at::kFloat), k.to(at::kFloat), ids, opt), std::runtime_error);
  const at::Tensor q96 = at::randn({1, 32, 4, 96}, gpu()), k96 = at::randn({1, 32, 2, 96}, gpu());
  EXPECT_THROW(sparse_attention(q96, k96, k96, ids, opt), std::runtime_error);
  opt.block_size = 8;
  EXPECT_THROW(sparse_attention(q, k, k, make_block_ids(1, 32, 2, 2, 8, 0, 0), opt), std::runtime_error);
}

// The backward from a merged result (the context-parallel ring's path): per key
// chunk with the whole call's out and lse, the CUDA gradients summed over the
// chunks equal the reference's on fp32 copies, within the bf16 spread.
TEST(CudaSparseAttention, BackwardFromMergedResultPerKeyChunk) {
  SSA_REQUIRE_GPU();
  at::manual_seed(21);
  const int64_t b = 2, sq = 256, sk = 512, hq = 16, hkv = 2, d = 64, bs = 16, top_k = 8, q_start = 256;
  const at::Tensor q = at::randn({b, sq, hq, d}, gpu()), k = at::randn({b, sk, hkv, d}, gpu()),
                   v = at::randn({b, sk, hkv, d}, gpu()), dout = at::randn({b, sq, hq, d}, gpu());
  const at::Tensor ids = make_block_ids(b, sq, hkv, top_k, bs, q_start, 2);
  struct Sum {
    at::Tensor dq, dk, dv;
  };
  auto chunked = [&](Backend backend, at::ScalarType dtype) {
    SparseOptions opt;
    opt.block_size = bs;
    opt.top_k = top_k;
    opt.backend = backend;
    const at::Tensor qd = q.to(dtype), kd = k.to(dtype), vd = v.to(dtype), dd = dout.to(dtype);
    at::NoGradGuard no_grad;
    const AttentionResult whole = sparse_attention(qd, kd, vd, ids, opt, q_start, 0);
    Sum s{at::zeros(q.sizes(), gpu(at::kFloat)), at::zeros(k.sizes(), gpu(at::kFloat)),
          at::zeros(v.sizes(), gpu(at::kFloat))};
    for (const int64_t row : {0, 128, 256, 384}) {
      const AttentionGrads g = sparse_attention_backward(dd, qd, kd.narrow(1, row, 128), vd.narrow(1, row, 128),
                                                         whole.out, whole.lse, ids, opt, q_start, row);
      s.dq += g.dq.to(at::kFloat);
      s.dk.narrow(1, row, 128) += g.dk.to(at::kFloat);
      s.dv.narrow(1, row, 128) += g.dv.to(at::kFloat);
    }
    return s;
  };
  const Sum got = chunked(Backend::kCuda, at::kBFloat16);
  const Sum want = chunked(Backend::kReference, at::kFloat);
  EXPECT_GT(want.dk.abs().max().item<double>(), 1e-2);
  EXPECT_LT(relative_error(got.dq, want.dq), 2e-2);
  EXPECT_LT(relative_error(got.dk, want.dk), 2e-2);
  EXPECT_LT(relative_error(got.dv, want.dv), 2e-2);
}

// A context-parallel rank's two zigzag chunks in one call (two runs of query
// positions) give what one call per chunk gives: the same selection, output and
// lse, and gradients (dK/dV up to the atomics' order), with the dK/dV join
// deferred to a SideJoin.
// Run with groups of 8 and of 16 (16 and 32 query heads over two kv heads).
class CudaSparseTwoRuns : public ::testing::TestWithParam<int64_t> {};

TEST_P(CudaSparseTwoRuns, MatchOneCallPerRun) {
  SSA_REQUIRE_GPU();
  at::manual_seed(23);
  // cp = 2, rank 0: chunks 0 and 3 of 4 (64 rows each) over all 256 keys.
  const int64_t c = 64, sk = 256, hq = GetParam(), hkv = 2, d = 64, bs = 16, top_k = 4;
  const at::Tensor q = at::randn({1, 2 * c, hq, d}, gpu()), k = at::randn({1, sk, hkv, d}, gpu()),
                   v = at::randn({1, sk, hkv, d}, gpu()), dout = at::randn({1, 2 * c, hq, d}, gpu());
  SparseOptions opt;
  opt.block_size = bs;
  opt.top_k = top_k;
  opt.backend = Backend::kCuda;
  const QueryRows rows = QueryRows::two_runs(0, c, 3 * c);
  at::NoGradGuard no_grad;
  const at::Tensor pooled = pool_keys(k, bs);
  const at::Tensor ids = select_blocks(q, pooled, opt, rows);
  const at::Tensor ids_early = select_blocks(q.narrow(1, 0, c), pooled.narrow(1, 0, c / bs), opt, 0);
  const at::Tensor ids_late = select_blocks(q.narrow(1, c, c), pooled, opt, 3 * c);
  EXPECT_TRUE(at::equal(ids, at::cat({ids_early, ids_late}, 1)));

  const AttentionResult both = sparse_attention(q, k, v, ids, opt, rows, 0);
  const AttentionResult early = sparse_attention(q.narrow(1, 0, c), k.narrow(1, 0, c), v.narrow(1, 0, c),
                                                 ids.narrow(1, 0, c), opt, 0, 0);
  const AttentionResult late = sparse_attention(q.narrow(1, c, c), k, v, ids.narrow(1, c, c), opt, 3 * c, 0);
  EXPECT_TRUE(at::equal(both.out, at::cat({early.out, late.out}, 1)));
  EXPECT_TRUE(at::equal(both.lse, at::cat({early.lse, late.lse}, 2)));

  auto zeros_like_f32 = [](const at::Tensor& t) { return at::zeros(t.sizes(), gpu(at::kFloat)); };
  at::Tensor dq = zeros_like_f32(q), dk = zeros_like_f32(k), dv = zeros_like_f32(v);
  {
    SideJoin join;
    sparse_attention_backward_into(dout, q, k, v, both.out, both.lse, ids, opt, rows, 0, dq, dk, dv, &join);
  }
  at::Tensor dq1 = zeros_like_f32(q), dk1 = zeros_like_f32(k), dv1 = zeros_like_f32(v);
  for (int64_t a = 0; a < 2; ++a) {
    auto r = [&](const at::Tensor& t, int64_t dim) { return t.narrow(dim, a * c, c); };
    at::Tensor dq_rows = r(dq1, 1);
    sparse_attention_backward_into(r(dout, 1), r(q, 1), k, v, r(both.out, 1), r(both.lse, 2), r(ids, 1), opt,
                                   a == 0 ? 0 : 3 * c, 0, dq_rows, dk1, dv1);
  }
  EXPECT_GT(dk1.abs().max().item<double>(), 1e-2);
  EXPECT_TRUE(at::equal(dq, dq1));
  EXPECT_LT(relative_error(dk, dk1), 1e-5);
  EXPECT_LT(relative_error(dv, dv1), 1e-5);
  EXPECT_THROW(select_blocks(q, pooled, opt, QueryRows::two_runs(0, c, c / 2)), std::runtime_error);
}
INSTANTIATE_TEST_SUITE_P(Groups, CudaSparseTwoRuns, ::testing::Values(16, 32));

// "auto" uses the kernels where they take the inputs and the reference elsewhere:
// fp32, head dim 96, block 8 and a top-k above the selection kernel's limit all run
// (and give the reference's answer) instead of throwing as Backend::kCuda does.
TEST(CudaSparseAttention, AutoFallsBackOutsideTheKernels) {
  SSA_REQUIRE_GPU();
  const Backend automatic = resolve_backend("auto", at::Device(at::kCUDA, 0));
  ASSERT_EQ(automatic, Backend::kAuto);
  struct Input {
    std::string name;
    at::ScalarType dtype;
    int64_t d, block_size, top_k;
    bool select_cuda, attend_cuda;  // where auto runs selection and attention
  };
  for (const Input& in : {Input{"bf16 d64", at::kBFloat16, 64, 16, 4, true, true},
                          Input{"fp32", at::kFloat, 64, 16, 4, false, false},
                          Input{"d96", at::kBFloat16, 96, 16, 4, false, false},
                          Input{"block 8", at::kBFloat16, 64, 8, 4, false, false},
                          Input{"top-k 80", at::kBFloat16, 64, 16, 80, false, true}}) {
    at::manual_seed(3);
    const int64_t s = 16 * 96;
    const at::Tensor q = at::randn({1, s, 4, in.d}, gpu(in.dtype)), k = at::randn({1, s, 2, in.d}, gpu(in.dtype)),
                     v = at::randn({1, s, 2, in.d}, gpu(in.dtype));
    SparseOptions opt;
    opt.block_size = in.block_size;
    opt.top_k = in.top_k;
    opt.backend = automatic;
    const at::Tensor pooled = pool_keys(k, in.block_size);
    EXPECT_EQ(runs_on_cuda(automatic, q, pooled, in.top_k, in.block_size), in.select_cuda) << in.name;
    EXPECT_EQ(runs_on_cuda(automatic, q, k, 0, in.block_size), in.attend_cuda) << in.name;
    const at::Tensor ids = select_blocks(q, pooled, opt);
    const AttentionResult got = sparse_attention(q, k, v, ids, opt);
    opt.backend = Backend::kReference;
    const at::Tensor ref_ids = select_blocks(q, pooled, opt);
    const AttentionResult want = sparse_attention(q, k, v, ids, opt);
    if (in.select_cuda) {
      EXPECT_GT(ids.eq(ref_ids).to(at::kFloat).mean().item<double>(), 0.99) << in.name;
    } else {
      EXPECT_TRUE(at::equal(ids, ref_ids)) << in.name;
    }
    if (in.attend_cuda) {
      EXPECT_LT(max_abs_error(got.out, want.out), 0.05) << in.name;
    } else {
      EXPECT_TRUE(at::equal(got.out, want.out)) << in.name;
    }
    const AttentionStats st = attention_stats(q, k, ids, in.block_size);
    EXPECT_GT(st.sparsity, 0.0) << in.name;
  }
}

#ifdef SSA_WITH_CUDA
// The dK/dV index lists under each bucket (b, kv head, token chunk, block) exactly
// the queries that selected its block (a plain CPU walk over the ids), and is the
// same when built twice.
TEST(CudaSparseIndex, ListsEachBlocksQueries) {
  SSA_REQUIRE_GPU();
  struct IndexCase {
    int64_t b, sq, hkv, top_k, block_size, shared;
  };
  // 9000 queries: two token chunks; shared slots: many queries on blocks 0, 1, ...
  for (const IndexCase& c : {IndexCase{2, 3000, 2, 16, 16, 4}, IndexCase{1, 9000, 1, 8, 64, 2}}) {
    const std::string name = std::to_string(c.sq) + " queries";
    at::manual_seed(5);
    const at::Tensor ids = make_block_ids(c.b, c.sq, c.hkv, c.top_k, c.block_size, 0, c.shared);
    const at::Tensor q = at::empty({c.b, c.sq, c.hkv, 64}, gpu()), k = at::empty({c.b, c.sq, c.hkv, 64}, gpu());
    const cuda::Shape shape = cuda::make_shape("index test", q, k, c.top_k, c.block_size, 0, 0);
    const cuda::InvertedIndex index = cuda::build_inverted_index(ids, shape, true);
    const cuda::InvertedIndex again = cuda::build_inverted_index(ids, shape, true);
    ASSERT_GT(index.n_items, 0) << name;
    const at::Tensor begin = index.item_begin.narrow(0, 0, index.n_items).cpu();
    const at::Tensor end = index.item_end.narrow(0, 0, index.n_items).cpu();
    const at::Tensor bucket = index.item_bucket.narrow(0, 0, index.n_items).cpu();
    const int64_t entries = end[index.n_items - 1].item<int64_t>();
    EXPECT_TRUE(at::equal(index.entry_token.narrow(0, 0, entries), again.entry_token.narrow(0, 0, entries))) << name;

    std::map<int64_t, std::vector<int32_t>> want;
    const at::Tensor idc = ids.cpu();
    const auto a = idc.accessor<int32_t, 4>();
    for (int64_t n = 0; n < c.b; ++n)
      for (int64_t t = 0; t < c.sq; ++t)
        for (int64_t h = 0; h < c.hkv; ++h)
          for (int64_t s = 0; s < c.top_k; ++s) {
            if (a[n][t][h][s] < 0) continue;
            const int64_t chunk = t / index.token_chunk;
            want[((n * c.hkv + h) * index.n_token_chunks + chunk) * index.blocks_per_chunk + a[n][t][h][s]].push_back(
                static_cast<int32_t>(t));
          }
    std::map<int64_t, std::vector<int32_t>> got;
    const at::Tensor tokens = index.entry_token.narrow(0, 0, entries).cpu();
    const auto tok = tokens.accessor<int32_t, 1>();
    const auto ib = begin.accessor<int32_t, 1>(), ie = end.accessor<int32_t, 1>(), bk = bucket.accessor<int32_t, 1>();
    for (int64_t i = 0; i < index.n_items; ++i)
      for (int64_t e = ib[i]; e < ie[i]; ++e) got[bk[i]].push_back(tok[e]);
    for (auto& [key, list] : got) std::sort(list.begin(), list.end());  // the order is fixed, not by token
    EXPECT_TRUE(got == want) << name << ": " << got.size() << " buckets listed, " << want.size() << " expected";
  }
}
#endif

}  // namespace
}  // namespace ssa::kernels
