// CUDA block selection against a brute-force fp64 scoring of every causal block
// (per-head softmax, GQA sum) and against the reference backend; CUDA attention
// statistics against the reference backend.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "kernels/attention.h"
#include "kernels/reference_attention.h"
#include "kernels_gpu_support.h"

namespace ssa::kernels {
namespace {

using gpu_test::gpu;

struct Case {
  std::string name;
  int64_t b, sq, hq, hkv, d, block_size, top_k;
  int64_t q_start = 0;
  SelectionMode mode = SelectionMode::kToken;
  // >= 0: the keys of this block get 5000 in dim 0, which q does not use, so the
  // chunk's norm bound lies far above every logit and the kernel's normaliser
  // pass must fall back to a running max.
  int64_t spike = -1;
  // q times this: at 30 |q| times the largest key norm bounds the logits above
  // what the wgmma kernel's plain sums (no reference) allow, while the sums
  // against that bound stay far from underflow, so its bounded pass runs.
  float q_scale = 1.f;
  // Keys in bf16, so the pooled keys are bf16 (as in training): the wgmma kernel
  // ranks on them exactly (exact chunk images), the mma.sync one on hi + lo.
  bool bf16_keys = false;
};

// Group scores [B, Sq, Hkv, Nb] in fp64: per head softmax over the causal blocks of
// q . kbar / sqrt(D), summed over the group; non-causal blocks -inf. Query-block
// mode: the mean over the queries of each block.
at::Tensor brute_force_scores(const at::Tensor& q, const at::Tensor& pooled, const Case& c) {
  const int64_t nb = pooled.size(1), g = c.hq / c.hkv;
  const at::Tensor qd = q.to(at::kDouble).view({c.b, c.sq, c.hkv, g, c.d});
  const at::Tensor logits = at::einsum("bshgd,bnhd->bshgn", {qd, pooled.to(at::kDouble)}) / std::sqrt(double(c.d));
  const at::Tensor pos = at::arange(c.q_start, c.q_start + c.sq, gpu(at::kLong));
  const at::Tensor causal = at::arange(nb, gpu(at::kLong)).view({1, nb}) <= at::div(pos, c.block_size, "floor").view({-1, 1});
  const at::Tensor masked = logits.masked_fill(causal.logical_not().view({1, c.sq, 1, 1, nb}), -INFINITY);
  at::Tensor score = masked.softmax(-1).sum(3);  // [B, Sq, Hkv, Nb]
  if (c.mode == SelectionMode::kQueryBlock) {
    const at::Tensor block_of = at::div(at::arange(c.sq, gpu(at::kLong)), c.block_size, "floor");
    const int64_t nqb = (c.sq + c.block_size - 1) / c.block_size;
    at::Tensor sums = at::zeros({c.b, nqb, c.hkv, nb}, score.options()).index_add_(1, block_of, score);
    const at::Tensor counts = at::zeros({nqb}, score.options()).index_add_(0, block_of, at::ones({c.sq}, score.options()));
    score = (sums / counts.view({1, nqb, 1, 1})).index_select(1, block_of);
  }
  return score.masked_fill(causal.logical_not().view({1, c.sq, 1, nb}), -INFINITY);
}

// The set is a valid top-k: layout, size, own block, and no left-out causal block
// scoring above a kept one by more than tol.
void expect_valid_top_k(const at::Tensor& ids, const at::Tensor& score, const Case& c, double tol) {
  const int64_t nb = score.size(-1);
  const at::Tensor pos = at::arange(c.q_start, c.q_start + c.sq, gpu(at::kLong));
  const at::Tensor own = at::div(pos, c.block_size, "floor").view({1, c.sq, 1});
  const at::Tensor n_causal = own + 1;
  const at::Tensor idl = ids.to(at::kLong);
  const at::Tensor valid = idl >= 0;
  EXPECT_TRUE(at::equal(valid.sum(-1), at::clamp_max(n_causal, c.top_k).expand({c.b, c.sq, c.hkv})))
      << c.name << ": wrong number of kept blocks";
  EXPECT_TRUE(((idl == own.unsqueeze(-1)).sum(-1) == 1).all().item<bool>()) << c.name << ": own block missing";
  const at::Tensor left = idl.narrow(3, 0, c.top_k - 1), right = idl.narrow(3, 1, c.top_k - 1);
  EXPECT_FALSE(((right != -1) & ((left == -1) | (right <= left))).any().item<bool>()) << c.name << ": bad order";
  // kept mask over blocks [B, Sq, Hkv, Nb]
  const at::Tensor slot = at::where(valid, idl, at::full_like(idl, nb));
  const at::Tensor kept = at::zeros({c.b, c.sq, c.hkv, nb + 1}, gpu(at::kBool)).scatter_(3, slot, true).narrow(3, 0, nb);
  const at::Tensor is_own = at::arange(nb, gpu(at::kLong)).view({1, 1, 1, nb}) == own.unsqueeze(-1);
  const at::Tensor kept_min = at::where(kept & is_own.logical_not(), score, at::full_like(score, INFINITY)).amin(-1);
  const at::Tensor out_max = at::where(kept.logical_not() & at::isfinite(score), score, at::full_like(score, -INFINITY)).amax(-1);
  const double worst = (out_max - kept_min).max().item<double>();
  EXPECT_LE(worst, tol) << c.name << ": a left-out block scores " << worst << " above a kept one";
}

void check_case(const Case& c) {
  at::manual_seed(99);
  const int64_t nb = (c.q_start + c.sq + c.block_size - 1) / c.block_size;
  const at::Tensor q = at::randn({c.b, c.sq, c.hq, c.d}, gpu()) * c.q_scale;
  const at::Tensor k = at::randn({c.b, nb * c.block_size, c.hkv, c.d}, gpu());
  if (c.spike >= 0) {
    k.narrow(1, c.spike * c.block_size, c.block_size).select(3, 0).fill_(5000.f);
    q.select(3, 0).zero_();
  }
  const at::Tensor pooled = pool_keys(c.bf16_keys ? k.to(at::kBFloat16) : k, c.block_size);
  SparseOptions opt;
  opt.block_size = c.block_size;
  opt.top_k = c.top_k;
  opt.mode = c.mode;
  opt.backend = Backend::kCuda;
  const at::Tensor got = select_blocks(q, pooled, opt, c.q_start);
  opt.backend = Backend::kReference;
  const at::Tensor want = select_blocks(q.to(at::kFloat), pooled, opt, c.q_start);
  const at::Tensor score = brute_force_scores(q, pooled, c);
  const double g = static_cast<double>(c.hq / c.hkv);
  // The kernels' normaliser pass reads the pooled keys in bf16, so where logits
  // are large (peaked softmax) scores may move by as much as bf16 keys move the
  // fp64 scores; on small logits that spread is below 2e-5 per head.
  const at::Tensor bf16_score = brute_force_scores(q, pooled.to(at::kBFloat16).to(at::kFloat), c);
  const double spread = at::nan_to_num(score - bf16_score, 0.0, 0.0, 0.0).abs().max().item<double>();
  expect_valid_top_k(got, score, c, std::max(2e-5 * g, spread));
  const double agree = (got == want).all(-1).to(at::kDouble).mean().item<double>();
  EXPECT_GE(agree, 0.98) << c.name << ": only " << agree << " of the rows equal the reference's";
  if (c.mode == SelectionMode::kQueryBlock) {
    const at::Tensor first = got.index_select(
        1, at::div(at::arange(c.sq, gpu(at::kLong)), c.block_size, "floor") * c.block_size);
    EXPECT_TRUE(at::equal(got, first)) << c.name << ": queries of one block got different sets";
  }
}

TEST(CudaSelection, ValidTopKAndAgreesWithReference) {
  SSA_REQUIRE_GPU();
  const std::vector<Case> cases = {
      // name, B, Sq, Hq, Hkv, D, block, top_k, q_start, mode
      // D64 with groups of 8 or 16 in token mode runs the wgmma kernel, the rest mma.sync.
      {"paper-like D64 G16 bs16 top16", 2, 2048, 32, 2, 64, 16, 16},
      {"D64 G16 top40 (wide list), q chunk at 640, partial tile", 1, 1000, 16, 1, 64, 16, 40, 640},
      {"D64 G8 bs64 top4", 2, 900, 16, 2, 64, 64, 4},
      {"D128 G1 bs32 top8", 1, 1500, 8, 8, 128, 32, 8},
      {"D64 G8 bs16 top16 (two tokens per mma unit), partial tile", 2, 1000, 16, 2, 64, 16, 16},
      {"D64 G32 bs16 top64 (-1 slots)", 1, 1200, 32, 1, 64, 16, 64},
      {"D128 G20 bs16 top12", 1, 700, 40, 2, 128, 16, 12},
      {"q chunk at 1024, top 1", 1, 512, 16, 2, 64, 16, 1, 1024},
      {"D64 G6 q chunk at 96", 1, 900, 12, 2, 64, 16, 5, 96},
      {"query blocks of 64, partial last", 1, 1000, 32, 2, 64, 64, 4, 0, SelectionMode::kQueryBlock},
      {"query blocks of 16, D128 G4", 2, 800, 8, 2, 128, 16, 8, 128, SelectionMode::kQueryBlock},
      {"huge key norm: exact normaliser fallback", 1, 1500, 32, 2, 64, 16, 16, 0, SelectionMode::kToken, 40},
      {"large logits: normaliser against the chunks' bounds", 1, 1500, 32, 2, 64, 16, 16, 0, SelectionMode::kToken, -1,
       30.f},
      {"large logits, D64 G8", 1, 900, 16, 2, 64, 16, 8, 0, SelectionMode::kToken, -1, 30.f},
      {"huge key norm, D128 G8 query blocks", 1, 700, 16, 2, 128, 16, 8, 0, SelectionMode::kQueryBlock, 3},
      // bf16 keys (exact images where the wgmma kernel runs)
      {"bf16 keys: paper-like D64 G16", 2, 2048, 32, 2, 64, 16, 16, 0, SelectionMode::kToken, -1, 1.f, true},
      {"bf16 keys: D64 G8 two tokens per unit, top40, partial tile", 1, 1000, 16, 2, 64, 16, 40, 640,
       SelectionMode::kToken, -1, 1.f, true},
      {"bf16 keys: large logits", 1, 1500, 32, 2, 64, 16, 16, 0, SelectionMode::kToken, -1, 30.f, true},
      {"bf16 keys: huge key norm fallback", 1, 1500, 32, 2, 64, 16, 16, 0, SelectionMode::kToken, 40, 1.f, true},
      {"bf16 keys: D128 G20 (mma.sync, hi + lo)", 1, 700, 40, 2, 128, 16, 12, 0, SelectionMode::kToken, -1, 1.f,
       true},
  };
  for (const Case& c : cases) check_case(c);
}

TEST(CudaSelection, TiesGoToTheLowerBlockId) {
  SSA_REQUIRE_GPU();
  // q = 0: every causal block scores the same; the own block plus the lowest ids
  // win. 8 heads: the mma.sync kernel; 32 heads (groups of 16): the wgmma one,
  // whose top-k takes a chunk with many candidates by sorting and merging (2048
  // tokens: 128 blocks, all above the threshold in the first chunk) and a few by
  // single insertions (256 tokens: 16 blocks).
  for (const int64_t tokens : {256, 2048})
    for (const int64_t heads : {8, 32})
      for (const int64_t top_k : {4, 16}) {
        const std::string name =
            std::to_string(tokens) + " tokens, " + std::to_string(heads) + " heads, top " + std::to_string(top_k);
        const at::Tensor q = at::zeros({1, tokens, heads, 64}, gpu());
        const at::Tensor k = at::randn({1, tokens, 2, 64}, gpu());
        SparseOptions opt;
        opt.block_size = 16;
        opt.top_k = top_k;
        opt.backend = Backend::kCuda;
        const at::Tensor got = select_blocks(q, pool_keys(k, 16), opt);
        opt.backend = Backend::kReference;
        const at::Tensor want = select_blocks(q.to(at::kFloat), pool_keys(k, 16), opt);
        EXPECT_TRUE(at::equal(got, want)) << name;
        const at::Tensor last = got[0][tokens - 1][1].cpu();
        for (int64_t i = 0; i + 1 < top_k; ++i) EXPECT_EQ(last[i].item<int>(), i) << name;
        EXPECT_EQ(last[top_k - 1].item<int>(), tokens / 16 - 1) << name;
      }
}

// The one-kernel block means against the ATen formula, for each dtype the model
// may hand it, a partial last block, and k / pooled keys that are row slices of a
// longer sequence (batch strides of the longer one), as the ring passes them.
TEST(CudaPooling, MatchesReferenceAndFeedsSelection) {
  SSA_REQUIRE_GPU();
  for (const at::ScalarType t : {at::kBFloat16, at::kHalf, at::kFloat}) {
    const at::Tensor whole = at::randn({2, 1200, 3, 64}, gpu(t));
    for (const at::Tensor& k : {whole, whole.narrow(1, 96, 1000)}) {
      for (const int64_t bs : {16, 64}) {
        const at::Tensor got = pool_keys(k, bs);
        const at::Tensor want = reference::pool_keys(k.cpu(), bs);
        ASSERT_EQ(got.scalar_type(), t);
        ASSERT_EQ(got.sizes(), want.sizes());
        // Both sum in fp32 and round the mean once to k's dtype: at most a step of it apart.
        const double step = t == at::kFloat ? 1e-6 : t == at::kHalf ? 1.0 / 1024 : 1.0 / 128;
        EXPECT_TRUE(at::allclose(got.cpu().to(at::kFloat), want.to(at::kFloat), step, 1e-6))
            << t << " block " << bs << " rows " << k.size(1);
      }
    }
  }
  // A k that needs a gradient takes the differentiable formula.
  const at::Tensor kg = at::randn({1, 64, 2, 64}, gpu(at::kFloat)).requires_grad_(true);
  EXPECT_TRUE(pool_keys(kg, 16).requires_grad());

  // Selection on a slice of the pooled keys (batch-strided) equals selection on a copy.
  const at::Tensor q = at::randn({2, 512, 8, 64}, gpu());
  const at::Tensor pooled = pool_keys(at::randn({2, 1024, 2, 64}, gpu()), 16).narrow(1, 0, 32);
  SparseOptions opt;
  opt.block_size = 16;
  opt.top_k = 6;
  opt.backend = Backend::kCuda;
  EXPECT_TRUE(at::equal(select_blocks(q, pooled, opt), select_blocks(q, pooled.contiguous(), opt)));
}

TEST(CudaStats, MatchesReference) {
  SSA_REQUIRE_GPU();
  struct StatsCase {
    int64_t b, s, hq, hkv, d, block_size, top_k;
  };
  for (const StatsCase& c : {StatsCase{1, 1000, 8, 2, 64, 16, 8}, StatsCase{2, 700, 8, 8, 128, 64, 3}}) {
    at::manual_seed(5);
    const at::Tensor q = at::randn({c.b, c.s, c.hq, c.d}, gpu()) * 2;
    const at::Tensor k = at::randn({c.b, c.s, c.hkv, c.d}, gpu());
    SparseOptions opt;
    opt.block_size = c.block_size;
    opt.top_k = c.top_k;
    const at::Tensor ids = select_blocks(q.to(at::kFloat), pool_keys(k, c.block_size), opt);
    const AttentionStats got = attention_stats(q, k, ids, c.block_size, Backend::kCuda);
    const AttentionStats want = attention_stats(q.to(at::kFloat), k.to(at::kFloat), ids, c.block_size, Backend::kReference);
    EXPECT_EQ(got.count, want.count);
    EXPECT_NEAR(got.sparsity, want.sparsity, 1e-4) << "D " << c.d;
    EXPECT_NEAR(got.entropy_bits, want.entropy_bits, 1e-3) << "D " << c.d;
    EXPECT_GT(want.sparsity, 0.05);  // the case is not degenerate
  }
}

}  // namespace
}  // namespace ssa::kernels
