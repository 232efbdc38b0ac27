// The selection's inputs in two small kernels (instead of ~10 elementwise ATen
// kernels per call): block means of the keys, in the keys' dtype, and the chunk
// images the selection kernels stream (scaled to give logits in log2 units), with
// each chunk's largest key norm (params.cuh, PoolParams / SplitParams).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/cuda/params.cuh"

namespace ssa::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

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
  static_cast<T*>(p.pooled)[i] = from_float<T>(sum / static_cast<float>(end - first));
}

// One CTA per (b, head, chunk of kSelectChunk pooled blocks), one warp per row at a
// time, lanes over d: writes the chunk's two tiles (zero rows past Nb) and its
// largest key norm. T: float (hi + lo tiles) or __nv_bfloat16 (exact images, one
// tile: the second is left unwritten).
template <typename T>
__global__ void __launch_bounds__(kThreads) split_kernel(const SplitParams p) {
  constexpr bool kExact = std::is_same_v<T, __nv_bfloat16>;
  __shared__ float warp_max[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_chunks = (p.n_blocks + kSelectChunk - 1) / kSelectChunk;
  const int chunk = static_cast<int>(blockIdx.x % n_chunks);
  const int64_t bh = blockIdx.x / n_chunks;
  const int64_t h = bh % p.heads, b = bh / p.heads;
  const int64_t tile_elems = static_cast<int64_t>(kSelectChunk) * p.head_dim;
  __nv_bfloat16* const first_tile = p.tiles + (bh * n_chunks + chunk) * 2 * tile_elems;
  __nv_bfloat16* const second_tile = first_tile + tile_elems;
  const int first = chunk * kSelectChunk;
  float largest = 0.f;  // squared norm
  for (int row = warp; row < kSelectChunk; row += kThreads / 32) {
    const int block = first + row;
    const bool real = block < p.n_blocks;
    const T* src = static_cast<const T*>(p.pooled) + b * p.pooled_batch_stride +
                   (static_cast<int64_t>(block) * p.heads + h) * p.head_dim;
    float sq = 0.f;
    for (int d = lane; d < p.head_dim; d += 32) {
      const float key = real ? to_float(src[d]) : 0.f;
      const float x = key * p.logit_scale;
      // tile_offset (mma.cuh): 8-element piece d / 8 of row `row` sits at piece (d / 8) ^ (row & 7).
      const int at = row * p.head_dim + ((((d >> 3) ^ (row & 7)) << 3) | (d & 7));
      if (kExact) {
        first_tile[at] = __float2bfloat16_rn(key);  // a bf16 value: exact
      } else {
        const __nv_bfloat16 xh = __float2bfloat16_rn(x);
        first_tile[at] = xh;
        second_tile[at] = __float2bfloat16_rn(x - __bfloat162float(xh));
      }
      sq = fmaf(x, x, sq);
    }
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    largest = fmaxf(largest, sq);
  }
  if (lane == 0) warp_max[warp] = largest;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) largest = fmaxf(largest, warp_max[w]);
    p.chunk_norm[bh * n_chunks + chunk] = sqrtf(largest);
  }
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
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.heads * ((p.n_blocks + kSelectChunk - 1) / kSelectChunk);
  if (ctas == 0 || p.head_dim == 0) return cudaSuccess;
  if (p.exact) {
    split_kernel<__nv_bfloat16><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(p);
  } else {
    split_kernel<float><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace ssa::kernels::cuda
