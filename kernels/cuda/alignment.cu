// kernels::gate_and_align as two kernels (params.cuh, AlignParams): one warp per
// row of head_dim elements, two elements per lane step (bf16x2). The gated
// values are rounded to bf16 as the separate multiply would round them, so the
// losses see what the unfused formula sees; everything after is fp32.
#include <cuda_bf16.h>

#include "kernels/cuda/params.cuh"

namespace ssa::kernels::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kMaxBlocks = 132 * 8;  // grid-stride beyond this (fixed partial count)
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16(x)); }

__device__ __forceinline__ float smooth_l1(float d, float beta) {
  const float a = fabsf(d);
  return beta > 0.f && a < beta ? 0.5f * d * d / beta : a - 0.5f * beta;
}
__device__ __forceinline__ float smooth_l1_grad(float d, float beta) {
  if (beta > 0.f) return fminf(fmaxf(d / beta, -1.f), 1.f);
  return d > 0.f ? 1.f : d < 0.f ? -1.f : 0.f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

__device__ __forceinline__ float2 load2(const __nv_bfloat16* p, int64_t i) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p + i));
}
__device__ __forceinline__ void store2(__nv_bfloat16* p, int64_t i, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p + i) = __floats2bfloat162_rn(a, b);
}

__global__ void __launch_bounds__(kWarps * 32) align_forward_kernel(const AlignParams p) {
  __shared__ float warp_part[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float acc = 0.f;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const float g = __bfloat162float(p.gate[row]);
    const int64_t base = row * p.head_dim;
    for (int i = lane * 2; i < p.head_dim; i += 64) {
      const float2 f = load2(p.full, base + i), s = load2(p.sparse, base + i);
      const float gf0 = round_bf16(f.x * g), gf1 = round_bf16(f.y * g);
      const float gs0 = round_bf16(s.x * g), gs1 = round_bf16(s.y * g);
      if (p.pass_full) {
        store2(p.out, base + i, gf0, gf1);
      } else {
        store2(p.out, base + i, gs0, gs1);
      }
      const float d0 = p.after_gate ? gf0 - gs0 : f.x - s.x;
      const float d1 = p.after_gate ? gf1 - gs1 : f.y - s.y;
      acc += smooth_l1(d0, p.beta) + smooth_l1(d1, p.beta);
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) warp_part[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += warp_part[w];
    p.partial[blockIdx.x] = total * p.inv_count;
  }
}

__global__ void __launch_bounds__(kWarps * 32) align_backward_kernel(const AlignParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  const float g = __bfloat162float(p.gate[row]);
  const float ls = p.grad_ls ? *p.grad_ls * p.inv_count : 0.f;
  const float lc = p.grad_lc ? *p.grad_lc * p.inv_count : 0.f;
  const int64_t base = row * p.head_dim;
  float dg = 0.f;
  for (int i = lane * 2; i < p.head_dim; i += 64) {
    const float2 f = load2(p.full, base + i), s = load2(p.sparse, base + i);
    const float2 go = p.grad_out ? load2(p.grad_out, base + i) : make_float2(0.f, 0.f);
    float df[2], ds[2];
    const float fv[2] = {f.x, f.y}, sv[2] = {s.x, s.y}, gv[2] = {go.x, go.y};
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float d = p.after_gate ? round_bf16(fv[e] * g) - round_bf16(sv[e] * g) : fv[e] - sv[e];
      const float psi = smooth_l1_grad(d, p.beta);
      const float a = ls * psi, c = lc * psi;  // dL_s / dh_full, -dL_c / dh_sparse
      const float passed = gv[e] * g;
      df[e] = (p.pass_full ? passed : 0.f) + (p.after_gate ? g * a : a);
      ds[e] = (p.pass_full ? 0.f : passed) - (p.after_gate ? g * c : c);
      dg += gv[e] * (p.pass_full ? fv[e] : sv[e]) + (p.after_gate ? fv[e] * a - sv[e] * c : 0.f);
    }
    store2(p.grad_full, base + i, df[0], df[1]);
    store2(p.grad_sparse, base + i, ds[0], ds[1]);
  }
  dg = warp_sum(dg);
  if (lane == 0) p.grad_gate[row] = __float2bfloat16(dg);
}

}  // namespace

int align_blocks(int64_t rows) {
  const int64_t needed = (rows + kWarps - 1) / kWarps;
  return static_cast<int>(needed < kMaxBlocks ? (needed > 0 ? needed : 1) : kMaxBlocks);
}

cudaError_t launch_align_forward(const AlignParams& p, cudaStream_t stream) {
  if (p.head_dim % 2 != 0) return cudaErrorInvalidValue;
  align_forward_kernel<<<align_blocks(p.rows), kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_align_backward(const AlignParams& p, cudaStream_t stream) {
  if (p.head_dim % 2 != 0) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  align_backward_kernel<<<static_cast<unsigned>((p.rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ssa::kernels::cuda
