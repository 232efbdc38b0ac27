// The rotary embedding of kernels::rotate_pairs as one elementwise kernel
// (params.cuh, RotaryParams): each thread rotates one (x1, x2) pair in fp32.
#include <cuda_bf16.h>

#include "kernels/cuda/params.cuh"

namespace ssa::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__device__ inline float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ inline float load(const float* p, int64_t i) { return p[i]; }
__device__ inline void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }
__device__ inline void store(float* p, int64_t i, float v) { p[i] = v; }

template <typename T>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t pairs = p.tokens * p.heads * p.half;
  if (pair >= pairs) return;
  const int i = static_cast<int>(pair % p.half);
  const int64_t token_head = pair / p.half;  // b * S * H + s * H + h
  const int64_t token = token_head / p.heads;
  const int s = static_cast<int>(token % p.seq);
  const float c = p.cos[static_cast<int64_t>(s) * p.half + i];
  const float sn = p.inverse ? -p.sin[static_cast<int64_t>(s) * p.half + i] : p.sin[static_cast<int64_t>(s) * p.half + i];
  const int64_t first = token_head * 2 * p.half + i;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const float x1 = load(x, first), x2 = load(x, first + p.half);
  store(y, first, x1 * c - x2 * sn);
  store(y, first + p.half, x2 * c + x1 * sn);
}

}  // namespace

cudaError_t launch_rotary(const RotaryParams& p, cudaStream_t stream) {
  const int64_t pairs = p.tokens * p.heads * p.half;
  if (pairs == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>((pairs + kThreads - 1) / kThreads);
  if (p.bf16) {
    rotary_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    rotary_kernel<float><<<blocks, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace ssa::kernels::cuda
