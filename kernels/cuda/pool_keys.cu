// The selection's inputs in two small kernels (instead of ~10 elementwise ATen
// kernels per call): block means of the keys, and their bf16 hi + lo split in the
// layout the selection kernel streams (params.cuh, PoolParams / SplitParams).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/params.cuh"

namespace ssa::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// One thread per pooled element (b, block, head, d), threads of a warp on
// consecutive d: each row of the block is one coalesced read.
template <typename T>
__global__ void __launch_bounds__(kThreads) pool_kernel(const PoolParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t per_batch = static_cast<int64_t>(p.n_blocks) * p.heads * p.head_dim;
  if (i >= per_batch * p.batch) return;
  const int64_t b = i / per_batch;
  const int64_t within = i % per_batch;  // (block, head, d)
  const int64_t hd = within % (static_cast<int64_t>(p.heads) * p.head_dim);
  const int64_t block = within / (static_cast<int64_t>(p.heads) * p.head_dim);
  const int64_t first = block * p.block_size;
  const int64_t end = min(static_cast<int64_t>(p.keys), first + p.block_size);
  const T* src = static_cast<const T*>(p.k) + b * p.k_batch_stride + first * p.k_row_stride + hd;
  float sum = 0.f;
  for (int64_t r = first; r < end; ++r, src += p.k_row_stride) sum += to_float(*src);
  p.pooled[i] = sum / static_cast<float>(end - first);
}

// One thread per output element of hi/lo [B, Hkv, Nb, D].
__global__ void __launch_bounds__(kThreads) split_kernel(const SplitParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t per_head = static_cast<int64_t>(p.n_blocks) * p.head_dim;
  if (i >= per_head * p.heads * p.batch) return;
  const int64_t d = i % p.head_dim;
  const int64_t block = (i / p.head_dim) % p.n_blocks;
  const int64_t bh = i / per_head;
  const int64_t h = bh % p.heads, b = bh / p.heads;
  const float x = p.pooled[b * p.pooled_batch_stride + (block * p.heads + h) * p.head_dim + d];
  const __nv_bfloat16 hi = __float2bfloat16_rn(x);
  p.hi[i] = hi;
  p.lo[i] = __float2bfloat16_rn(x - __bfloat162float(hi));
}

unsigned grid_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t launch_pool(const PoolParams& p, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(p.batch) * p.n_blocks * p.heads * p.head_dim;
  if (n == 0) return cudaSuccess;
  switch (p.dtype) {
    case PoolParams::kF32: pool_kernel<float><<<grid_for(n), kThreads, 0, stream>>>(p); break;
    case PoolParams::kBF16: pool_kernel<__nv_bfloat16><<<grid_for(n), kThreads, 0, stream>>>(p); break;
    case PoolParams::kF16: pool_kernel<__half><<<grid_for(n), kThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_split(const SplitParams& p, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(p.batch) * p.n_blocks * p.heads * p.head_dim;
  if (n == 0) return cudaSuccess;
  split_kernel<<<grid_for(n), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ssa::kernels::cuda
