#pragma once
// Shared by the GPU kernel tests: the skip rule, random inputs on the GPU, block-id
// patterns (random causal sets, and sets where every query selects the same
// blocks), the reference run on fp32 copies, and norm-relative error checks.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cuda_attention.h"

namespace ssa::kernels::gpu_test {

// Skips the test unless this build carries the CUDA kernels and sees a GPU.
#define SSA_REQUIRE_GPU()                                                             \
  do {                                                                                \
    if (!::ssa::kernels::cuda::available()) {                                         \
      GTEST_SKIP() << "no GPU visible or built without the CUDA kernels (SSA_WITH_CUDA)"; \
    }                                                                                 \
  } while (0)

inline at::TensorOptions gpu(at::ScalarType dtype = at::kBFloat16) {
  return at::TensorOptions().device(at::kCUDA).dtype(dtype);
}

// Block ids [B, Sq, Hkv, top_k] in select_blocks' layout. Each query keeps its own
// block; `shared` of its other slots go to the blocks 0, 1, ... (the same for every
// query: many queries on one block), the rest are random causal blocks; -1 after.
inline at::Tensor make_block_ids(int64_t b, int64_t sq, int64_t hkv, int64_t top_k, int64_t block_size,
                                 int64_t q_start, int64_t shared) {
  at::Tensor ids = at::full({b, sq, hkv, top_k}, -1, at::kInt);
  auto a = ids.accessor<int32_t, 4>();
  for (int64_t n = 0; n < b; ++n)
    for (int64_t i = 0; i < sq; ++i)
      for (int64_t h = 0; h < hkv; ++h) {
        const int64_t own = (q_start + i) / block_size;
        std::vector<int64_t> chosen{own};
        for (int64_t j = 0; j < std::min(shared, own) && static_cast<int64_t>(chosen.size()) < top_k; ++j) {
          chosen.push_back(j);
        }
        const at::Tensor perm = at::randperm(own + 1);
        for (int64_t r = 0; r < perm.size(0) && static_cast<int64_t>(chosen.size()) < top_k; ++r) {
          const int64_t j = perm[r].item<int64_t>();
          if (std::find(chosen.begin(), chosen.end(), j) == chosen.end()) chosen.push_back(j);
        }
        std::sort(chosen.begin(), chosen.end());
        for (size_t s = 0; s < chosen.size(); ++s) a[n][i][h][s] = static_cast<int32_t>(chosen[s]);
      }
  return ids.to(at::kCUDA);
}

// ||got - want|| / ||want|| over all elements (fp64), finite entries only.
inline double relative_error(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  const at::Tensor finite = at::isfinite(w);
  const at::Tensor diff = at::where(finite, g - w, at::zeros_like(w));
  const double denom = at::where(finite, w, at::zeros_like(w)).norm().item<double>();
  return diff.norm().item<double>() / std::max(denom, 1e-30);
}

inline double max_abs_error(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  const at::Tensor finite = at::isfinite(w);
  return at::where(finite, (g - w).abs(), at::zeros_like(w)).max().item<double>();
}

// Outputs and gradients of one sparse attention call under a fixed weighted loss.
struct SparseRun {
  at::Tensor out, lse, dq, dk, dv;
};

// loss = sum(out * w_out) + sum(lse * w_lse) over finite lse, so dlse is exercised.
inline SparseRun run_sparse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ids,
                            const SparseOptions& options, int64_t q_start, int64_t k_start, const at::Tensor& w_out,
                            const at::Tensor& w_lse) {
  at::Tensor ql = q.detach().clone().requires_grad_(true);
  at::Tensor kl = k.detach().clone().requires_grad_(true);
  at::Tensor vl = v.detach().clone().requires_grad_(true);
  const AttentionResult r = sparse_attention(ql, kl, vl, ids, options, q_start, k_start);
  const at::Tensor lse = r.lse.to(at::kFloat);
  const at::Tensor loss = (r.out.to(at::kFloat) * w_out).sum() +
                          at::where(at::isfinite(lse), lse * w_lse, at::zeros_like(lse)).sum();
  const auto grads = torch::autograd::grad({loss}, {ql, kl, vl});
  return {r.out.detach(), r.lse.detach(), grads[0], grads[1], grads[2]};
}

}  // namespace ssa::kernels::gpu_test
