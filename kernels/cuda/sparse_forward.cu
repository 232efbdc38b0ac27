// Block-sparse attention forward. One warp per (batch, token, kv head, tile of 16
// query heads): the G heads of the kv group are the M dimension of the mma, the
// selected blocks are walked in tiles of 16 keys (each tile: S = Q K^T [16 x 16],
// online softmax, O += P V), with a private cp.async pipeline of kStages tiles of
// K and V in shared memory. fp32 accumulation; o in bf16, lse in fp32 (natural log).
#include <cuda_bf16.h>

#include <cmath>

#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/params.cuh"
#include "kernels/cuda/sparse_tiles.cuh"

namespace ssa::kernels::cuda {
namespace {


constexpr int kWarps = 4;

template <int kD>
__host__ __device__ constexpr int stages_for() {
  return kD == 64 ? 3 : 2;
}
template <int kD>
__host__ __device__ constexpr int tile_bytes() {
  return kKeyTile * kD * 2;
}
template <int kD>
__host__ __device__ constexpr int smem_bytes() {
  return kWarps * stages_for<kD>() * 2 * tile_bytes<kD>();
}

// Walker: the tile walk (device::TileWalker, or device::SlotTiles where it fits).
template <int kD, typename Walker>
__global__ void __launch_bounds__(kWarps * 32) sparse_forward_kernel(const ForwardParams p) {
  constexpr int kStages = stages_for<kD>();
  constexpr int kStageBytes = 2 * tile_bytes<kD>();  // K tile then V tile
  extern __shared__ __align__(1024) unsigned char smem[];
  const Shape& s = p.shape;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group_size = s.hq / s.hkv, mtiles = (group_size + 15) / 16;

  // Warp -> (b, kv head, token, head tile); neighbouring warps share kv head and
  // neighbouring tokens, which select mostly the same blocks (L2 reuse).
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
  const float scale_log2 = device::kLog2e / sqrtf(static_cast<float>(kD));

  uint32_t qf[kD / 16][4];
  device::load_a_rows<kD>(qf, p.q + ((static_cast<int64_t>(b) * s.sq + t) * s.hq + head0) * kD, rows_valid, lane);

  device::SelectedKvPipeline<kD, kStages, Walker> pipe(p.k, p.v, p.block_ids, s, b, t, kvh, qpos,
                                                       device::smem_address(smem) + warp * kStages * kStageBytes,
                                                       lane);

  float acc[kD / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
  // Reference max (log2 domain; up to kSlack below the true one) of rows group,
  // group + 8, and this thread's part of their sums.
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};

  device::TileColumns cols;  // the keys of the tile the query sees
  uint32_t k_tile, v_tile;
  while (pipe.next(cols, k_tile, v_tile)) {
    float sc[2][4];
    device::mma_a_tile_t_at<kD>(sc, qf, pipe.rows_as_n(k_tile));
    float tile_max[2] = {-INFINITY, -INFINITY};  // of the raw scores (the scale is positive)
    device::mask_columns(sc, cols, tig, -INFINITY);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) tile_max[e >> 1] = fmaxf(tile_max[e >> 1], sc[nt][e]);
    // A row's reference m moves only when a tile's max exceeds it by more than
    // kSlack (log2 units), so P stays <= 2^kSlack and the rescale of acc and l
    // (kD / 4 multiplies per thread) runs on a few tiles only.
    constexpr float kSlack = 8.f;
    float tmax[2];
    bool grow[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tmax[r] = device::quad_max(tile_max[r]) * scale_log2;
      grow[r] = tmax[r] > m[r] + kSlack;  // false while every score so far is masked
    }
    if (__any_sync(0xffffffffu, grow[0] || grow[1])) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float alpha = grow[r] ? exp2f(m[r] - tmax[r]) : 1.f;  // 0 from m = -inf
        if (grow[r]) m[r] = tmax[r];
        l[r] *= alpha;
#pragma unroll
        for (int i = 0; i < kD / 8; ++i) {
          acc[i][2 * r] *= alpha;
          acc[i][2 * r + 1] *= alpha;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_use = m[r] == -INFINITY ? 0.f : m[r];  // no (-inf) - (-inf)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        sc[nt][2 * r] = exp2f(fmaf(sc[nt][2 * r], scale_log2, -m_use));
        sc[nt][2 * r + 1] = exp2f(fmaf(sc[nt][2 * r + 1], scale_log2, -m_use));
        l[r] += sc[nt][2 * r] + sc[nt][2 * r + 1];
      }
    }
    uint32_t pa[4];
    device::c_to_a(pa, sc[0], sc[1]);
    device::mma_p_tile_at<kD>(acc, pa, pipe.rows_as_k(v_tile));
  }
  device::cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = group + 8 * r;
    if (row >= rows_valid) continue;
    const float sum = device::quad_sum(l[r]);  // all lanes of the quad take part (row test is per quad)
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    __nv_bfloat16* o_row = p.out + ((static_cast<int64_t>(b) * s.sq + t) * s.hq + head0 + row) * kD + tig * 2;
#pragma unroll
    for (int i = 0; i < kD / 8; ++i) {
      *reinterpret_cast<uint32_t*>(o_row + i * 8) = device::pack_bf16(acc[i][2 * r] * inv, acc[i][2 * r + 1] * inv);
    }
    if (tig == 0) {
      p.lse[(static_cast<int64_t>(b) * s.hq + head0 + row) * s.sq + t] =
          sum > 0.f ? (m[r] + log2f(sum)) * device::kLn2 : -INFINITY;
    }
  }
}

template <int kD, typename Walker>
cudaError_t launch(const ForwardParams& p, cudaStream_t stream) {
  const Shape& s = p.shape;
  const int64_t warps = static_cast<int64_t>(s.batch) * s.hkv * s.sq * ((s.group() + 15) / 16);
  if (warps == 0) return cudaSuccess;
  const int64_t blocks = (warps + kWarps - 1) / kWarps;
  cudaError_t err = cudaFuncSetAttribute(sparse_forward_kernel<kD, Walker>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<kD>());
  if (err != cudaSuccess) return err;
  sparse_forward_kernel<kD, Walker><<<static_cast<unsigned>(blocks), kWarps * 32, smem_bytes<kD>(), stream>>>(p);
  return cudaGetLastError();
}

template <int kD>
cudaError_t launch(const ForwardParams& p, cudaStream_t stream) {
  return device::slot_tiles_fit(p.shape.block_size, p.shape.top_k) ? launch<kD, device::SlotTiles>(p, stream)
                                                                    : launch<kD, device::TileWalker>(p, stream);
}

}  // namespace

cudaError_t launch_sparse_forward(const ForwardParams& p, cudaStream_t stream) {
  switch (p.shape.head_dim) {
    case 64: return launch<64>(p, stream);
    case 128: return launch<128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ssa::kernels::cuda
