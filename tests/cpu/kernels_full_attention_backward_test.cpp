// kernels::full_attention_backward against autograd of kernels::full_attention
// (fp64): for the whole key set, and for key chunks whose gradients, computed
// from the merged output and lse, must add up to the whole attention's
// gradients. Covers the same-positions (causal) chunk, past chunks, partial
// overlaps, rows without any key, GQA, query chunking and bad inputs.
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <ATen/core/grad_mode.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels_test_support.h"

namespace ssa::kernels {
namespace {

using test::expect_close;
using test::randn;

constexpr int64_t kBatch = 2, kHq = 4, kHkv = 2, kDim = 8;

struct Whole {
  AttentionResult result;  // detached out and lse
  at::Tensor dq, dk, dv;   // autograd of <dout, out>
};

// Autograd of sum(full_attention(q, k, v) * dout) over all of k.
Whole autograd_whole(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     int64_t q_start, int64_t k_start) {
  at::AutoGradMode grad_on(true);
  const at::Tensor qg = q.detach().requires_grad_(true), kg = k.detach().requires_grad_(true),
                   vg = v.detach().requires_grad_(true);
  const AttentionResult r = full_attention(qg, kg, vg, q_start, k_start);
  const auto g = torch::autograd::grad({(r.out * dout).sum()}, {qg, kg, vg}, {}, std::nullopt, false,
                                       /*allow_unused=*/true);
  auto or_zero = [](const at::Tensor& t, const at::Tensor& like) { return t.defined() ? t : at::zeros_like(like); };
  return {{r.out.detach(), r.lse.detach()}, or_zero(g[0], q), or_zero(g[1], k), or_zero(g[2], v)};
}

struct Case {
  const char* name;
  int64_t sq, sk, q_start, k_start;
  std::vector<int64_t> splits;  // key chunk boundaries (rows of k), ascending, inside (0, sk)
};

// - causal: q and k at the same positions; split into a past chunk and the
//   diagonal chunk (same positions as q, fused causal on GPU).
// - late: queries after all keys, split into past chunks (no mask).
// - partial: chunks overlapping the queries partly, keys after the last query.
// - future rows: the first queries precede every key (lse -inf, zero gradient).
// - zigzag: one diagonal chunk of 8 queries among past chunks, as in the ring.
const Case kCases[] = {
    {"causal", 16, 16, 0, 0, {}},
    {"causal split", 16, 32, 16, 0, {16}},
    {"late", 12, 20, 40, 0, {5, 13}},
    {"partial", 20, 40, 10, 0, {15, 27}},
    {"future rows", 8, 12, 0, 4, {6}},
    {"zigzag", 8, 32, 24, 0, {8, 24}},
};

std::string label(const Case& c, const char* what) { return std::string(c.name) + ": " + what; }

// Random inputs of a case and the autograd reference on them.
struct CaseRun {
  at::Tensor q, k, v, dout;
  Whole want;
};
CaseRun run_case(const Case& c) {
  CaseRun r{randn({kBatch, c.sq, kHq, kDim}), randn({kBatch, c.sk, kHkv, kDim}), randn({kBatch, c.sk, kHkv, kDim}),
            randn({kBatch, c.sq, kHq, kDim}), {}};
  r.want = autograd_whole(r.dout, r.q, r.k, r.v, c.q_start, c.k_start);
  return r;
}

TEST(FullAttentionBackward, WholeKeySetMatchesAutograd) {
  at::manual_seed(3);
  for (const Case& c : kCases) {
    const auto [q, k, v, dout, want] = run_case(c);
    // Not vacuous: the gradients are not all zero.
    ASSERT_GT(want.dk.abs().max().item<double>(), 1e-3) << c.name;
    const AttentionGrads got =
        full_attention_backward(dout, q, k, v, want.result.out, want.result.lse, c.q_start, c.k_start);
    EXPECT_EQ(got.dq.scalar_type(), at::kDouble);
    expect_close(got.dq, want.dq, 1e-10, 1e-10, label(c, "dq"));
    expect_close(got.dk, want.dk, 1e-10, 1e-10, label(c, "dk"));
    expect_close(got.dv, want.dv, 1e-10, 1e-10, label(c, "dv"));
  }
}

TEST(FullAttentionBackward, ChunkGradientsFromMergedResultAddUp) {
  at::manual_seed(4);
  for (const Case& c : kCases) {
    const auto [q, k, v, dout, want] = run_case(c);
    at::Tensor dq = at::zeros_like(q);
    std::vector<at::Tensor> dk_parts, dv_parts;
    std::vector<int64_t> bounds{0};
    bounds.insert(bounds.end(), c.splits.begin(), c.splits.end());
    bounds.push_back(c.sk);
    for (size_t i = 0; i + 1 < bounds.size(); ++i) {
      const int64_t lo = bounds[i], n = bounds[i + 1] - lo;
      // chunk_rows 3 crosses query-chunk boundaries of the matmul path.
      const AttentionGrads g =
          full_attention_backward(dout, q, k.narrow(1, lo, n), v.narrow(1, lo, n), want.result.out,
                                  want.result.lse, c.q_start, c.k_start + lo, /*chunk_rows=*/3);
      ASSERT_EQ(g.dk.sizes(), k.narrow(1, lo, n).sizes()) << c.name;
      dq.add_(g.dq);
      dk_parts.push_back(g.dk);
      dv_parts.push_back(g.dv);
    }
    expect_close(dq, want.dq, 1e-10, 1e-10, label(c, "summed dq"));
    expect_close(at::cat(dk_parts, 1), want.dk, 1e-10, 1e-10, label(c, "chunked dk"));
    expect_close(at::cat(dv_parts, 1), want.dv, 1e-10, 1e-10, label(c, "chunked dv"));
    EXPECT_FALSE(at::isnan(dq).any().item<bool>()) << c.name;
  }
}

TEST(FullAttentionBackward, Fp32MatchesFp64) {
  at::manual_seed(5);
  const Case c{"partial fp32", 20, 40, 10, 0, {}};
  const at::Tensor q = randn({kBatch, c.sq, kHq, kDim}), k = randn({kBatch, c.sk, kHkv, kDim}),
                   v = randn({kBatch, c.sk, kHkv, kDim}), dout = randn({kBatch, c.sq, kHq, kDim});
  const Whole want = autograd_whole(dout, q, k, v, c.q_start, c.k_start);
  auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
  const AttentionGrads got = full_attention_backward(f(dout), f(q), f(k), f(v), f(want.result.out),
                                                     f(want.result.lse), c.q_start, c.k_start);
  EXPECT_EQ(got.dk.scalar_type(), at::kFloat);
  expect_close(got.dq, want.dq, 1e-5, 1e-4, "fp32 dq");
  expect_close(got.dk, want.dk, 1e-5, 1e-4, "fp32 dk");
  expect_close(got.dv, want.dv, 1e-5, 1e-4, "fp32 dv");
}

TEST(FullAttentionBackward, RejectsBadInputs) {
  const at::Tensor q = randn({1, 4, 2, 8}), k = randn({1, 4, 1, 8}), v = randn({1, 4, 1, 8});
  const at::Tensor out = randn({1, 4, 2, 8}), lse = randn({1, 2, 4});
  EXPECT_THROW(full_attention_backward(out, q, k, v, out, randn({1, 4, 2})), std::runtime_error);   // lse layout
  EXPECT_THROW(full_attention_backward(randn({1, 4, 2, 4}), q, k, v, out, lse), std::runtime_error);  // dout shape
  EXPECT_THROW(full_attention_backward(out, q, k, v, randn({1, 3, 2, 8}), lse), std::runtime_error);  // out shape
  EXPECT_THROW(full_attention_backward(out, q, k, v, out, lse, -1, 0), std::runtime_error);          // position
  EXPECT_THROW(full_attention_backward(out, q, k, v, out, lse, 0, 0, -2), std::runtime_error);       // chunk_rows
  EXPECT_NO_THROW(full_attention_backward(out, q, k, v, out, lse));
}

}  // namespace
}  // namespace ssa::kernels
