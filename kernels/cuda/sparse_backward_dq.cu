// Block-sparse attention backward, steps 1 and 2:
//  - prep: delta = rowsum(o * do) - dlse and lse * log2(e), per (token, head);
//  - dq: one warp per (batch, token, kv head, tile of 16 query heads), walking the
//    selected key tiles as the forward does: P = exp2(S - lse), dP = dO V^T,
//    dS = P (dP - delta), dQ += dS K. Each dq row is owned by one warp: no atomics.
#include <cuda_bf16.h>

#include <cmath>

#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/params.cuh"
#include "kernels/cuda/sparse_tiles.cuh"

namespace ssa::kernels::cuda {
namespace {

using device::KeyTile;
using device::TileWalker;

constexpr int kWarps = 4;

// 8 lanes per (b, token, head) row; each lane reads kD / 8 elements of o and do.
template <int kD>
__global__ void __launch_bounds__(256) backward_prep_kernel(const BackwardPrepParams p) {
  const Shape& s = p.shape;
  const int64_t rows = static_cast<int64_t>(s.batch) * s.sq * s.hq;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 3;
  const int part = threadIdx.x & 7;
  if (row >= rows) return;  // whole 8-lane groups leave together (blockDim % 8 == 0)
  constexpr int kPer = kD / 8;
  const __nv_bfloat16* o = p.out + row * kD + part * kPer;
  const __nv_bfloat16* d = p.dout + row * kD + part * kPer;
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < kPer; c += 8) {
    const uint4 ov = *reinterpret_cast<const uint4*>(o + c);
    const uint4 dv = *reinterpret_cast<const uint4*>(d + c);
    const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(&ov);
    const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(&dv);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 of = __bfloat1622float2(o2[i]);
      const float2 df = __bfloat1622float2(d2[i]);
      sum += of.x * df.x + of.y * df.y;
    }
  }
  const unsigned mask = 0xffu << (threadIdx.x & 24);
  sum += __shfl_xor_sync(mask, sum, 1);
  sum += __shfl_xor_sync(mask, sum, 2);
  sum += __shfl_xor_sync(mask, sum, 4);
  if (part == 0) {
    // row = (b * Sq + t) * Hq + h
    const int h = static_cast<int>(row % s.hq);
    const int64_t bt = row / s.hq;
    const int t = static_cast<int>(bt % s.sq);
    const int64_t b = bt / s.sq;
    const int64_t lse_index = (b * s.hq + h) * s.sq + t;
    const float lse = p.lse[lse_index];
    p.delta[row] = sum - (p.dlse != nullptr ? p.dlse[lse_index] : 0.f);
    p.lse_log2[row] = lse * device::kLog2e;
  }
}

template <int kD>
__host__ __device__ constexpr int tile_bytes() {
  return kKeyTile * kD * 2;
}
template <int kD>
__host__ __device__ constexpr int dq_stages() {
  return kD == 64 ? 3 : 2;
}
template <int kD>
__host__ __device__ constexpr int dq_smem_bytes() {
  return kWarps * dq_stages<kD>() * 2 * tile_bytes<kD>();
}

template <int kD>
__global__ void __launch_bounds__(kWarps * 32) backward_dq_kernel(const BackwardDqParams p) {
  constexpr int kStages = dq_stages<kD>();
  constexpr int kStageBytes = 2 * tile_bytes<kD>();
  extern __shared__ __align__(128) unsigned char smem[];
  const Shape& s = p.shape;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group_size = s.hq / s.hkv, mtiles = (group_size + 15) / 16;
  int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (w >= static_cast<int64_t>(s.batch) * s.hkv * s.sq * mtiles) return;
  const int mt = static_cast<int>(w % mtiles);
  w /= mtiles;
  const int t = static_cast<int>(w % s.sq);
  w /= s.sq;
  const int kvh = static_cast<int>(w % s.hkv);
  const int b = static_cast<int>(w / s.hkv);
  const int64_t qpos = s.q_start + t;
  const int head0 = kvh * group_size + mt * 16;
  const int rows_valid = min(16, group_size - mt * 16);
  const int group = lane >> 2, tig = lane & 3;
  const float scale = 1.f / sqrtf(static_cast<float>(kD));
  const float scale_log2 = device::kLog2e * scale;

  const int64_t row0 = (static_cast<int64_t>(b) * s.sq + t) * s.hq + head0;  // [B, Sq, Hq] row of head0
  uint32_t qf[kD / 16][4], dof[kD / 16][4];
  device::load_a_rows<kD>(qf, p.q + row0 * kD, rows_valid, lane);
  device::load_a_rows<kD>(dof, p.dout + row0 * kD, rows_valid, lane);
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = group + 8 * r;
    const bool ok = row < rows_valid;
    lse2[r] = ok ? p.lse_log2[row0 + row] : INFINITY;  // padded rows: p = 0
    delta[r] = ok ? p.delta[row0 + row] : 0.f;
  }

  device::SelectedKvPipeline<kD, kStages> pipe(p.k, p.v, p.block_ids, s, b, t, kvh, qpos,
                                               device::smem_address(smem) + warp * kStages * kStageBytes, lane);

  float dq[kD / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[i][e] = 0.f;

  KeyTile tile;
  uint32_t k_tile, v_tile;
  for (int it = 0; pipe.next(it, tile, k_tile, v_tile); ++it) {

    float sc[2][4], dp[2][4];
    device::mma_a_tile_t<kD>(sc, qf, k_tile, lane);
    device::mma_a_tile_t<kD>(dp, dof, v_tile, lane);
    const device::TileColumns cols = device::visible_columns(tile, qpos);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int c = nt * 8 + tig * 2 + (e & 1);
        const bool valid = cols.full || (c >= cols.lo && c < cols.hi);
        const float prob = valid ? exp2f(fmaf(sc[nt][e], scale_log2, -lse2[r])) : 0.f;
        sc[nt][e] = prob * (dp[nt][e] - delta[r]);  // dS
      }
    uint32_t ds[4];
    device::c_to_a(ds, sc[0], sc[1]);
    device::mma_p_tile<kD>(dq, ds, k_tile, lane);
  }
  device::cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = group + 8 * r;
    if (row >= rows_valid) continue;
    if (p.dq_acc != nullptr) {  // each row has one owner warp: a plain read-add-write
      const int64_t within = (static_cast<int64_t>(t) * s.hq + head0 + row) * kD + tig * 2;
      float* acc = p.dq_acc + b * p.dq_acc_batch_stride + within;
#pragma unroll
      for (int i = 0; i < kD / 8; ++i) {
        float2* cell = reinterpret_cast<float2*>(acc + i * 8);
        const float2 old = *cell;
        *cell = make_float2(old.x + dq[i][2 * r] * scale, old.y + dq[i][2 * r + 1] * scale);
      }
      continue;
    }
    __nv_bfloat16* out = p.dq + (row0 + row) * kD + tig * 2;
#pragma unroll
    for (int i = 0; i < kD / 8; ++i) {
      *reinterpret_cast<uint32_t*>(out + i * 8) = device::pack_bf16(dq[i][2 * r] * scale, dq[i][2 * r + 1] * scale);
    }
  }
}

template <int kD>
cudaError_t launch_prep(const BackwardPrepParams& p, cudaStream_t stream) {
  const Shape& s = p.shape;
  const int64_t threads = static_cast<int64_t>(s.batch) * s.sq * s.hq * 8;
  if (threads == 0) return cudaSuccess;
  backward_prep_kernel<kD><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

template <int kD>
cudaError_t launch_dq(const BackwardDqParams& p, cudaStream_t stream) {
  const Shape& s = p.shape;
  const int64_t warps = static_cast<int64_t>(s.batch) * s.hkv * s.sq * ((s.group() + 15) / 16);
  if (warps == 0) return cudaSuccess;
  cudaError_t err =
      cudaFuncSetAttribute(backward_dq_kernel<kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, dq_smem_bytes<kD>());
  if (err != cudaSuccess) return err;
  backward_dq_kernel<kD>
      <<<static_cast<unsigned>((warps + kWarps - 1) / kWarps), kWarps * 32, dq_smem_bytes<kD>(), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_backward_prep(const BackwardPrepParams& p, cudaStream_t stream) {
  switch (p.shape.head_dim) {
    case 64: return launch_prep<64>(p, stream);
    case 128: return launch_prep<128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_backward_dq(const BackwardDqParams& p, cudaStream_t stream) {
  switch (p.shape.head_dim) {
    case 64: return launch_dq<64>(p, stream);
    case 128: return launch_dq<128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ssa::kernels::cuda
