// Block-sparse attention backward, step 1 (dq): one warp per (batch, token, kv
// head, tile of 16 query heads). It forms its rows' delta = rowsum(o * do) - dlse
// and lse * log2(e) (written out for the dk/dv kernel), then walks the selected
// key tiles as the forward does: P = exp2(S - lse), dP = dO V^T,
// dS = P (dP - delta), dQ += dS K. Each dq row is owned by one warp: no atomics.
#include <cuda_bf16.h>

#include <cmath>

#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/params.cuh"
#include "kernels/cuda/sparse_tiles.cuh"

namespace ssa::kernels::cuda {
namespace {


constexpr int kWarps = 4;

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

// Walker: the tile walk (device::TileWalker, or device::SlotTiles where it fits).
// Head dim 64: four CTAs (16 warps) per SM, as many as its shared memory allows.
template <int kD, typename Walker>
__global__ void __launch_bounds__(kWarps * 32, kD == 64 ? 4 : 1) backward_dq_kernel(const BackwardDqParams p) {
  constexpr int kStages = dq_stages<kD>();
  constexpr int kStageBytes = 2 * tile_bytes<kD>();
  extern __shared__ __align__(1024) unsigned char smem[];
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
  const int qpos = static_cast<int>(s.q_pos(t));
  const int head0 = kvh * group_size + mt * 16;
  const int rows_valid = min(16, group_size - mt * 16);
  const int group = lane >> 2, tig = lane & 3;
  const float scale = 1.f / sqrtf(static_cast<float>(kD));
  const float scale_log2 = device::kLog2e * scale;

  const int64_t row0 = (static_cast<int64_t>(b) * s.sq + t) * s.hq + head0;  // [B, Sq, Hq] row of head0
  uint32_t qf[kD / 16][4], dof[kD / 16][4];
  device::load_a_rows<kD>(qf, p.q + row0 * kD, rows_valid, lane);
  device::load_a_rows<kD>(dof, p.dout + row0 * kD, rows_valid, lane);
  // delta of rows group (r = 0) and group + 8 (r = 1): o and do in the same
  // fragment layout (registers 0, 2 hold row group, 1, 3 row group + 8), summed
  // over the thread's columns, then over the quad.
  float dot[2] = {0.f, 0.f};
  {
    uint32_t of[kD / 16][4];
    device::load_a_rows<kD>(of, p.out + row0 * kD, rows_valid, lane);
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 o2 = device::unpack_bf16(of[ks][i]), d2 = device::unpack_bf16(dof[ks][i]);
        dot[i & 1] = fmaf(o2.x, d2.x, fmaf(o2.y, d2.y, dot[i & 1]));
      }
  }
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 1);
    dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 2);
    const int row = group + 8 * r;
    const bool ok = row < rows_valid;
    const int64_t lse_index = (static_cast<int64_t>(b) * s.hq + head0 + row) * s.sq + t;  // [B, Hq, Sq]
    lse2[r] = ok ? p.lse[lse_index] * device::kLog2e : INFINITY;  // padded rows: p = 0
    delta[r] = ok ? dot[r] - (p.dlse != nullptr ? p.dlse[lse_index] : 0.f) : 0.f;
    if (ok && tig == 0) {
      p.delta[row0 + row] = delta[r];
      p.lse_log2[row0 + row] = lse2[r];
    }
  }

  device::SelectedKvPipeline<kD, kStages, Walker> pipe(p.k, p.v, p.block_ids, s, b, t, kvh, qpos,
                                                       device::smem_address(smem) + warp * kStages * kStageBytes,
                                                       lane);

  float dq[kD / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[i][e] = 0.f;

  device::TileColumns cols;  // the keys of the tile the query sees
  uint32_t k_tile, v_tile;
  while (pipe.next(cols, k_tile, v_tile)) {
    float sc[2][4], dp[2][4];
    device::mma_a_tile_t_at<kD>(sc, qf, pipe.rows_as_n(k_tile));
    device::mma_a_tile_t_at<kD>(dp, dof, pipe.rows_as_n(v_tile));
    float prob[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) prob[nt][e] = exp2f(fmaf(sc[nt][e], scale_log2, -lse2[e >> 1]));
    device::mask_columns(prob, cols, tig, 0.f);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nt][e] = prob[nt][e] * (dp[nt][e] - delta[e >> 1]);  // dS
    uint32_t ds[4];
    device::c_to_a(ds, sc[0], sc[1]);
    device::mma_p_tile_at<kD>(dq, ds, pipe.rows_as_k(k_tile));
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

template <int kD, typename Walker>
cudaError_t launch_dq(const BackwardDqParams& p, cudaStream_t stream) {
  const Shape& s = p.shape;
  const int64_t warps = static_cast<int64_t>(s.batch) * s.hkv * s.sq * ((s.group() + 15) / 16);
  if (warps == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(backward_dq_kernel<kD, Walker>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         dq_smem_bytes<kD>());
  if (err != cudaSuccess) return err;
  backward_dq_kernel<kD, Walker>
      <<<static_cast<unsigned>((warps + kWarps - 1) / kWarps), kWarps * 32, dq_smem_bytes<kD>(), stream>>>(p);
  return cudaGetLastError();
}

template <int kD>
cudaError_t launch_dq(const BackwardDqParams& p, cudaStream_t stream) {
  return device::slot_tiles_fit(p.shape.block_size, p.shape.top_k) ? launch_dq<kD, device::SlotTiles>(p, stream)
                                                                    : launch_dq<kD, device::TileWalker>(p, stream);
}

}  // namespace

cudaError_t launch_backward_dq(const BackwardDqParams& p, cudaStream_t stream) {
  switch (p.shape.head_dim) {
    case 64: return launch_dq<64>(p, stream);
    case 128: return launch_dq<128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ssa::kernels::cuda
