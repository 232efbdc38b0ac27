#pragma once
// Shared by the LibTorch wrappers of the CUDA kernels (kernels/cuda_*.cpp): the
// CUDA return-code check and the checks of what the kernels support. Compiled only
// with SSA_WITH_CUDA.
#ifdef SSA_WITH_CUDA
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <fmt/format.h>

#include <cstdint>
#include <limits>
#include <stdexcept>

#include "kernels/attention.h"
#include "kernels/cuda/params.cuh"

// Throws std::runtime_error naming the call, the CUDA error, file and line.
#define SSA_CUDA_CHECK(expr)                                                                                   \
  do {                                                                                                         \
    const cudaError_t ssa_cuda_err_ = (expr);                                                                  \
    if (ssa_cuda_err_ != cudaSuccess) {                                                                        \
      throw std::runtime_error(fmt::format("CUDA error {} ({}) in {} at {}:{}", cudaGetErrorName(ssa_cuda_err_), \
                                           cudaGetErrorString(ssa_cuda_err_), #expr, __FILE__, __LINE__));     \
    }                                                                                                          \
  } while (0)

namespace ssa::kernels::cuda {

// Sizes go into 32-bit kernel fields: refuse anything larger.
inline int to_int(const char* fn, const char* what, int64_t value) {
  if (value < 0 || value > std::numeric_limits<int32_t>::max()) {
    throw std::runtime_error(fmt::format("kernels::cuda::{}: {} = {} does not fit the kernels' 32-bit sizes", fn,
                                         what, value));
  }
  return static_cast<int>(value);
}

// q [B, Sq, Hq, D] and k [B, Sk, Hkv, D] as the kernels take them.
inline Shape make_shape(const char* fn, const at::Tensor& q, const at::Tensor& k, int64_t top_k, int64_t block_size,
                        QueryRows q_rows, int64_t k_start) {
  Shape s;
  s.batch = to_int(fn, "batch", q.size(0));
  s.sq = to_int(fn, "Sq", q.size(1));
  s.hq = to_int(fn, "Hq", q.size(2));
  s.head_dim = to_int(fn, "head dim", q.size(3));
  s.sk = to_int(fn, "Sk", k.size(1));
  s.hkv = to_int(fn, "Hkv", k.size(2));
  s.top_k = to_int(fn, "top_k", top_k);
  s.block_size = to_int(fn, "block_size", block_size);
  s.q_start = q_rows.start;
  s.k_start = k_start;
  if (q_rows.two()) {
    s.q_split = q_rows.split;
    s.q_start_late = q_rows.late_start;
  }
  const int64_t q_end = s.sq > 0 ? q_rows.position(s.sq - 1) + 1 : q_rows.start;
  if (!head_dim_supported(s.head_dim)) {
    throw std::runtime_error(
        fmt::format("kernels::cuda::{}: head dim {} has no CUDA kernel (supported: 64, 128)", fn, s.head_dim));
  }
  if (s.group() > kMaxGroup) {
    throw std::runtime_error(fmt::format("kernels::cuda::{}: {} query heads per kv head; the kernels take at most {}",
                                         fn, s.group(), kMaxGroup));
  }
  if (q_rows.start < 0 || k_start < 0 || q_end > std::numeric_limits<int>::max() ||
      k_start + s.sk > std::numeric_limits<int>::max()) {
    throw std::runtime_error(fmt::format(
        "kernels::cuda::{}: positions q [{}, {}) and k [{}, {}) must lie in [0, 2^31) for the CUDA kernels", fn,
        q_rows.start, q_end, k_start, k_start + s.sk));
  }
  if (block_size % kKeyTile != 0) {
    throw std::runtime_error(fmt::format(
        "kernels::cuda::{}: block_size {} must be a multiple of {} for the CUDA kernels", fn, block_size, kKeyTile));
  }
  return s;
}

// The kernels read bf16 only; other dtypes would be silently rounded, so refuse.
inline void require_bf16(const char* fn, const char* name, const at::Tensor& t) {
  if (t.scalar_type() != at::kBFloat16) {
    throw std::runtime_error(fmt::format("kernels::cuda::{}: {} must be bf16 for the CUDA kernels, got {}", fn, name,
                                         c10::toString(t.scalar_type())));
  }
  if (!t.is_cuda()) {
    throw std::runtime_error(fmt::format("kernels::cuda::{}: {} must be on a CUDA device, got {}", fn, name,
                                         t.device().str()));
  }
}

inline const __nv_bfloat16* bf16_ptr(const at::Tensor& t) {
  return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr<at::BFloat16>());
}
inline __nv_bfloat16* bf16_mut(at::Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.data_ptr<at::BFloat16>()); }

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
