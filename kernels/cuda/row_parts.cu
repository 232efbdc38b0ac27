// Combining parts that cover row ranges of a whole in one pass (params.cuh):
// - merge_rows: partial attention results over disjoint key sets, merged by
//   log-sum-exp straight into the output dtype (a context-parallel rank's full
//   stream: its causal call on its own chunks plus its calls on earlier chunks);
// - sum_rows: an fp32 sum plus bf16 terms on their rows, written in the output
//   dtype (the rank's dq: the sparse kernels' fp32 sum plus the fused calls' dq).
#include <cuda_bf16.h>

#include <cmath>

#include "kernels/cuda/params.cuh"

namespace ssa::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void store8(float* out, const float (&v)[8]) {
  reinterpret_cast<float4*>(out)[0] = {v[0], v[1], v[2], v[3]};
  reinterpret_cast<float4*>(out)[1] = {v[4], v[5], v[6], v[7]};
}
__device__ __forceinline__ void store8(__nv_bfloat16* out, const float (&v)[8]) {
  uint4 packed;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(out) = packed;
}

// Adds w * (8 bf16 at x) to v.
__device__ __forceinline__ void add8(float (&v)[8], const __nv_bfloat16* x, float w) {
  const uint4 raw = *reinterpret_cast<const uint4*>(x);
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(pairs[j]);
    v[2 * j] += w * f.x;
    v[2 * j + 1] += w * f.y;
  }
}

// Eight consecutive elements of one (batch, row, head) per thread (D % 8 == 0):
// the threads of a head read its parts' lse (cached) and weigh 16-byte loads.
template <typename OutT>
__global__ void __launch_bounds__(kThreads) merge_rows_kernel(const RowMergeParams p) {
  const int per_head = p.head_dim / 8;
  const int64_t total = static_cast<int64_t>(p.batch) * p.rows * p.heads * per_head;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int d = static_cast<int>(g % per_head) * 8;
    const int64_t item = g / per_head;  // (b, t, h)
    const int h = static_cast<int>(item % p.heads);
    const int t = static_cast<int>((item / p.heads) % p.rows);
    const int64_t b = item / (static_cast<int64_t>(p.heads) * p.rows);
    float lse[kMaxRowParts];
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kMaxRowParts; ++i) {
      lse[i] = -INFINITY;
      const int r = t - p.row[i];
      if (i < p.count && r >= 0 && r < p.rows_of[i]) {
        lse[i] = p.part_lse[i][(b * p.heads + h) * p.rows_of[i] + r];
        m = fmaxf(m, lse[i]);
      }
    }
    float w[kMaxRowParts];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxRowParts; ++i) {
      w[i] = m == -INFINITY ? 0.f : expf(lse[i] - m);  // 0 for parts not covering the row
      sum += w[i];
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < kMaxRowParts; ++i) {
      if (w[i] == 0.f) continue;
      add8(v, p.part_out[i] + ((b * p.rows_of[i] + (t - p.row[i])) * p.heads + h) * p.head_dim + d, w[i] * inv);
    }
    store8(static_cast<OutT*>(p.out) + item * p.head_dim + d, v);
    if (d == 0) p.lse[(b * p.heads + h) * p.rows + t] = m == -INFINITY ? -INFINITY : m + logf(sum);
  }
}

// Eight consecutive elements per thread (one row never splits a group: width % 8 == 0).
template <typename OutT>
__global__ void __launch_bounds__(kThreads) sum_rows_kernel(const RowSumParams p) {
  const int64_t total = p.batch * p.rows * p.width / 8;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t e = g * 8, line = e / p.width, col = e % p.width;
    const int64_t t = line % p.rows, b = line / p.rows;
    float v[8];
    const float4 lo = reinterpret_cast<const float4*>(p.base + e)[0];
    const float4 hi = reinterpret_cast<const float4*>(p.base + e)[1];
    v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
#pragma unroll
    for (int i = 0; i < kMaxRowParts; ++i) {
      const int64_t r = t - p.row[i];
      if (i >= p.count || r < 0 || r >= p.rows_of[i]) continue;
      add8(v, p.term[i] + (b * p.rows_of[i] + r) * p.width + col, 1.f);
    }
    store8(static_cast<OutT*>(p.out) + e, v);
  }
}

// Grid for `groups` work items of kThreads per block, capped (the kernels stride).
unsigned grid_for(int64_t groups) {
  const int64_t wanted = (groups + kThreads - 1) / kThreads;
  return static_cast<unsigned>(wanted < (int64_t{1} << 20) ? wanted : (int64_t{1} << 20));
}

}  // namespace

cudaError_t launch_merge_rows(const RowMergeParams& p, cudaStream_t stream) {
  const int64_t groups = static_cast<int64_t>(p.batch) * p.rows * p.heads * (p.head_dim / 8);
  if (groups == 0) return cudaSuccess;
  if (p.out_bf16) {
    merge_rows_kernel<__nv_bfloat16><<<grid_for(groups), kThreads, 0, stream>>>(p);
  } else {
    merge_rows_kernel<float><<<grid_for(groups), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_sum_rows(const RowSumParams& p, cudaStream_t stream) {
  const int64_t groups = p.batch * p.rows * p.width / 8;
  if (groups == 0) return cudaSuccess;
  if (p.out_bf16) {
    sum_rows_kernel<__nv_bfloat16><<<grid_for(groups), kThreads, 0, stream>>>(p);
  } else {
    sum_rows_kernel<float><<<grid_for(groups), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace ssa::kernels::cuda
