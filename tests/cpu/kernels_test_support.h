#pragma once
// Independent references for the attention tests: a dense masked attention over
// an explicit [B, Sq, Hq, Sk] mask (einsum + softmax in fp64), masks built with
// plain loops, and a central-difference gradient check.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "kernels/attention.h"

namespace ssa::kernels::test {

inline at::Tensor randn(std::vector<int64_t> shape, at::ScalarType dtype = at::kDouble) {
  return at::randn(shape, at::TensorOptions().dtype(dtype));
}

// mask[b, i, h, j]: key j visible to query i (causal on global positions).
inline at::Tensor causal_mask(int64_t b, int64_t sq, int64_t hq, int64_t sk, int64_t q_start, int64_t k_start) {
  at::Tensor mask = at::zeros({b, sq, hq, sk}, at::kBool);
  auto m = mask.accessor<bool, 4>();
  for (int64_t n = 0; n < b; ++n)
    for (int64_t i = 0; i < sq; ++i)
      for (int64_t h = 0; h < hq; ++h)
        for (int64_t j = 0; j < sk; ++j) m[n][i][h][j] = k_start + j <= q_start + i;
  return mask;
}

// mask from block ids [B, Sq, Hkv, top_k]: key j (global k_start + j) visible to
// query i of head h when its block is listed for (i, h / G) and it is causal.
inline at::Tensor block_mask(const at::Tensor& block_ids, int64_t hq, int64_t sk, int64_t block_size, int64_t q_start,
                             int64_t k_start) {
  const int64_t b = block_ids.size(0), sq = block_ids.size(1), hkv = block_ids.size(2);
  const int64_t group = hq / hkv;
  at::Tensor mask = at::zeros({b, sq, hq, sk}, at::kBool);
  auto m = mask.accessor<bool, 4>();
  const at::Tensor ids_cpu = block_ids.cpu().contiguous();
  auto ids = ids_cpu.accessor<int32_t, 4>();
  for (int64_t n = 0; n < b; ++n)
    for (int64_t i = 0; i < sq; ++i)
      for (int64_t h = 0; h < hq; ++h)
        for (int64_t s = 0; s < block_ids.size(3); ++s) {
          const int64_t id = ids[n][i][h / group][s];
          if (id < 0) continue;
          for (int64_t p = id * block_size; p < (id + 1) * block_size; ++p) {
            const int64_t j = p - k_start;
            if (j >= 0 && j < sk && p <= q_start + i) m[n][i][h][j] = true;
          }
        }
  return mask;
}

// Dense attention under mask [B, Sq, Hq, Sk], computed in fp64 with kv heads
// mapped by index (head h reads kv head h / G). Rows with no key: out 0, lse -inf.
inline AttentionResult dense_masked_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& mask) {
  const int64_t hq = q.size(2), group = hq / k.size(2);
  std::vector<int64_t> map;
  for (int64_t h = 0; h < hq; ++h) map.push_back(h / group);
  const at::Tensor head_map = at::tensor(map, at::kLong);
  const at::Tensor ke = k.to(at::kDouble).index_select(2, head_map);
  const at::Tensor ve = v.to(at::kDouble).index_select(2, head_map);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  // scores [B, Sq, Hq, Sk]
  const at::Tensor scores = at::einsum("bihd,bjhd->bihj", {q.to(at::kDouble), ke}) * scale;
  const at::Tensor row_any = mask.any(-1, true);
  // Rows with no key are given one fake visible key and zeroed afterwards.
  const at::Tensor mask_safe = mask | (row_any.logical_not() & (at::arange(mask.size(3)) == 0));
  const at::Tensor s = scores.masked_fill(mask_safe.logical_not(), -std::numeric_limits<double>::infinity());
  const at::Tensor probs = s.softmax(-1);
  at::Tensor out = at::einsum("bihj,bjhd->bihd", {probs, ve}) * row_any;
  at::Tensor lse = at::where(row_any.squeeze(-1), s.logsumexp(-1),
                             at::full({}, -std::numeric_limits<double>::infinity(), at::kDouble));
  return {out, lse.permute({0, 2, 1})};
}

inline void expect_close(const at::Tensor& got, const at::Tensor& want, double atol, double rtol,
                         const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  // -inf entries must agree exactly; finite ones within tolerance.
  const at::Tensor both_inf = at::isinf(g) & at::isinf(w) & (g == w);
  ASSERT_TRUE(at::equal(at::isinf(g), at::isinf(w))) << what << ": -inf entries differ";
  const at::Tensor diff = at::where(both_inf, at::zeros_like(g), (g - w).abs());
  const at::Tensor bound = atol + rtol * at::where(both_inf, at::zeros_like(w), w.abs());
  const double worst = (diff - bound).max().item<double>();
  EXPECT_LE(worst, 0.0) << what << ": max |got - want| = " << diff.max().item<double>();
}

using LossFn = std::function<at::Tensor(const std::vector<at::Tensor>&)>;

// Compares autograd gradients of the scalar loss(inputs) with central
// differences on every element (fp64 inputs, tiny shapes).
inline void expect_gradients_match_fd(const LossFn& loss, const std::vector<at::Tensor>& inputs, double tol,
                                      const std::string& what) {
  std::vector<at::Tensor> leaves;
  for (const auto& t : inputs) leaves.push_back(t.detach().clone().set_requires_grad(true));
  const at::Tensor value = loss(leaves);
  const auto grads = torch::autograd::grad({value}, leaves, {}, std::nullopt, false, /*allow_unused=*/true);
  const double eps = 1e-6;
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < leaves.size(); ++i) {
    const at::Tensor analytic = grads[i].defined() ? grads[i] : at::zeros_like(leaves[i]);
    ASSERT_FALSE(at::isnan(analytic).any().item<bool>()) << what << ": NaN gradient of input " << i;
    at::Tensor numeric = at::zeros_like(leaves[i]);
    auto flat = numeric.view({-1});
    for (int64_t e = 0; e < leaves[i].numel(); ++e) {
      std::vector<at::Tensor> plus, minus;
      for (const auto& t : leaves) {
        plus.push_back(t.detach().clone());
        minus.push_back(t.detach().clone());
      }
      plus[i].view({-1})[e] += eps;
      minus[i].view({-1})[e] -= eps;
      flat[e] = (loss(plus).item<double>() - loss(minus).item<double>()) / (2 * eps);
    }
    expect_close(analytic, numeric, tol, tol, what + ": gradient of input " + std::to_string(i));
  }
}

// A scalar that weighs every output and every finite lse entry with fixed
// random weights, so each gradient entry is exercised.
struct WeightedLoss {
  at::Tensor w_out;
  at::Tensor w_lse;
  bool use_lse = true;
  at::Tensor operator()(const AttentionResult& r) const {
    at::Tensor l = (r.out.to(at::kDouble) * w_out).sum();
    if (use_lse) {
      const at::Tensor lse = r.lse.to(at::kDouble);
      l = l + at::where(at::isinf(lse), at::zeros_like(lse), lse * w_lse).sum();
    }
    return l;
  }
};

inline WeightedLoss make_loss(const at::Tensor& q, bool use_lse) {
  return {randn({q.size(0), q.size(1), q.size(2), q.size(3)}), randn({q.size(0), q.size(2), q.size(1)}), use_lse};
}

}  // namespace ssa::kernels::test
