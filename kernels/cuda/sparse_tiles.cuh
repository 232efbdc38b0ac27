#pragma once
// Walking the selected key blocks of one (token, kv head) in tiles of kKeyTile
// keys, and staging those tiles into a warp's shared memory. Shared by the sparse
// forward and the dq backward kernel.
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/params.cuh"

namespace ssa::kernels::cuda::device {

// One tile of kKeyTile consecutive key positions [start, start + 16); the keys in
// [lo, hi) belong to the selected block and to this k chunk, the others are masked.
// Positions are int: make_shape checks that they fit.
struct KeyTile {
  int start = 0;
  int lo = 0;
  int hi = 0;
};

// Columns [lo, hi) of a tile (relative to its start) that a query at qpos sees.
// full: all 16, so the per-element mask can be skipped (most tiles).
struct TileColumns {
  int lo, hi;
  bool full;
};
__device__ __forceinline__ TileColumns visible_columns(const KeyTile& t, int qpos) {
  const int end = min(t.hi, qpos + 1);
  TileColumns c;
  c.lo = max(t.lo - t.start, 0);
  c.hi = min(end - t.start, kKeyTile);
  c.full = c.lo == 0 && c.hi == kKeyTile;
  return c;
}

// Yields, in slot order, the tiles of the selected blocks that hold at least one
// key of the chunk [k_lo, k_hi) at or before q_max. Ids < 0 are skipped. Every
// lane of a warp walks the same sequence (warp-uniform loads and branches).
struct TileWalker {
  const int32_t* ids;  // [top_k] block ids of this (token, kv head)
  int top_k;
  int block_size;
  int k_lo, k_hi;  // positions held by k/v
  int q_max;       // causal limit: last position any row may see
  int slot = -1;
  int sub = 0, sub_end = 0;
  int block_start = 0, block_lo = 0, block_hi = 0;

  __device__ bool next(KeyTile& tile) {
    while (sub >= sub_end) {
      if (++slot >= top_k) return false;
      const int id = ids[slot];
      if (id < 0) continue;
      block_start = id * block_size;
      block_lo = max(block_start, k_lo);
      block_hi = min(block_start + block_size, k_hi);
      const int visible_hi = min(block_hi, q_max + 1);
      if (block_lo >= visible_hi) continue;
      sub = (block_lo - block_start) / kKeyTile;
      sub_end = (visible_hi - block_start + kKeyTile - 1) / kKeyTile;
    }
    tile.start = block_start + sub * kKeyTile;
    tile.lo = block_lo;
    tile.hi = block_hi;
    ++sub;
    return true;
  }
};

// This lane's share of copying a [16, kD] tile of rows into the swizzled layout
// (cp.async): 16-byte chunk lane % (kD / 8) of rows lane / (kD / 8) + i * kRowStep.
// The tile-side offsets are fixed per lane, so a copy costs one address per row.
template <int kD>
struct RowCopier {
  static constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  static constexpr int kRowStep = 32 / kChunks;
  static constexpr int kPerLane = kKeyTile / kRowStep;
  int row0, col;             // first row, element offset of the chunk
  uint32_t dst[kPerLane];    // byte offsets in the tile

  __device__ explicit RowCopier(int lane) : row0(lane / kChunks), col((lane % kChunks) * 8) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dst[i] = tile_offset<kD>(row0 + i * kRowStep, lane % kChunks);
  }

  // Rows [start, start + 16) of one head of k-like memory (head_base: the row at
  // position k_lo; rows row_stride elements apart). Rows outside [k_lo, k_hi) are
  // zero-filled. One cp.async group per call site.
  __device__ __forceinline__ void copy(uint32_t tile, const __nv_bfloat16* head_base, int64_t row_stride,
                                       int64_t start, int64_t k_lo, int64_t k_hi) const {
    const __nv_bfloat16* src = head_base + (start - k_lo + row0) * row_stride + col;
    const int64_t step = kRowStep * row_stride;
    if (start >= k_lo && start + kKeyTile <= k_hi) {  // the usual case: every row is there
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) cp_async_16(tile + dst[i], src + i * step, true);
    } else {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t pos = start + row0 + i * kRowStep;
        const bool valid = pos >= k_lo && pos < k_hi;
        cp_async_16(tile + dst[i], valid ? src + i * step : head_base, valid);
      }
    }
  }
};

// Copies 16 consecutive rows of kD elements (row r at rows + r * kD, the G heads
// of one token) into a swizzled [16, kD] tile; rows >= rows_valid are zero-filled.
template <int kD>
__device__ __forceinline__ void stage_head_rows(const RowCopier<kD>& copier, uint32_t tile,
                                                const __nv_bfloat16* rows, int rows_valid) {
  copier.copy(tile, rows, kD, 0, 0, rows_valid);
}

// A fragments of 16 rows (row r at rows + r * kD, rows >= rows_valid are zero)
// read straight from global memory: [kD / 16 k-steps][4 registers].
template <int kD>
__device__ __forceinline__ void load_a_rows(uint32_t (&f)[kD / 16][4], const __nv_bfloat16* rows, int rows_valid,
                                            int lane) {
  const int group = lane >> 2, tig = lane & 3;
  const bool lo_ok = group < rows_valid, hi_ok = group + 8 < rows_valid;
  const uint32_t* r0 = reinterpret_cast<const uint32_t*>(rows + group * kD + tig * 2);
  const uint32_t* r1 = reinterpret_cast<const uint32_t*>(rows + (group + 8) * kD + tig * 2);
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    f[ks][0] = lo_ok ? __ldg(r0 + ks * 8) : 0u;
    f[ks][1] = hi_ok ? __ldg(r1 + ks * 8) : 0u;
    f[ks][2] = lo_ok ? __ldg(r0 + ks * 8 + 4) : 0u;
    f[ks][3] = hi_ok ? __ldg(r1 + ks * 8 + 4) : 0u;
  }
}

// S [16 rows x 16 keys] = A (fragments a) x tile^T, tile rows are keys.
template <int kD>
__device__ __forceinline__ void mma_a_tile_t(float (&s)[2][4], const uint32_t (&a)[kD / 16][4], uint32_t tile,
                                             int lane) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    uint32_t b[4];
    ldmatrix_x4(b, ldm_rows_as_n<kD>(tile, lane, ks));
    mma_bf16(s[0], a[ks], b[0], b[1]);
    mma_bf16(s[1], a[ks], b[2], b[3]);
  }
}

// acc [16 x kD] += P (A fragment over the 16 keys) x tile, tile rows are keys.
template <int kD>
__device__ __forceinline__ void mma_p_tile(float (&acc)[kD / 8][4], const uint32_t (&p)[4], uint32_t tile, int lane) {
#pragma unroll
  for (int dn = 0; dn < kD / 16; ++dn) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, ldm_rows_as_k<kD>(tile, lane, dn));
    mma_bf16(acc[2 * dn], p, b[0], b[1]);
    mma_bf16(acc[2 * dn + 1], p, b[2], b[3]);
  }
}

// The K and V tiles of one (batch, token, kv head)'s selected blocks, streamed
// through a warp's private cp.async ring of kStages shared-memory stages (each
// stage: the K tile, then the V tile). Shared by the forward and dq kernels.
template <int kD, int kStages>
struct SelectedKvPipeline {
  static constexpr int kTileBytes = kKeyTile * kD * 2;  // one bf16 [kKeyTile, kD] tile
  static constexpr int kStageBytes = 2 * kTileBytes;

  const __nv_bfloat16* k_head;
  const __nv_bfloat16* v_head;
  int64_t row_stride;
  int k_lo, k_hi;
  TileWalker loader;  // runs kStages - 1 tiles ahead of walker
  TileWalker walker;
  RowCopier<kD> rows;
  uint32_t stage0;    // this warp's first stage
  int lane;
  KeyTile next_tile;

  // k/v: [B, Sk, Hkv, kD]; block_ids: [B, Sq, Hkv, top_k]; warp_smem: this warp's
  // kStages * kStageBytes of shared memory. Issues the first kStages - 1 tiles.
  __device__ SelectedKvPipeline(const __nv_bfloat16* k, const __nv_bfloat16* v, const int32_t* block_ids,
                                const Shape& s, int b, int t, int kvh, int qpos, uint32_t warp_smem, int lane_)
      : row_stride(static_cast<int64_t>(s.hkv) * kD), k_lo(static_cast<int>(s.k_start)),
        k_hi(static_cast<int>(s.k_start) + s.sk),
        loader{block_ids + ((static_cast<int64_t>(b) * s.sq + t) * s.hkv + kvh) * s.top_k, s.top_k, s.block_size,
               k_lo, k_hi, qpos},
        walker(loader), rows(lane_), stage0(warp_smem), lane(lane_) {
    const int64_t head_offset = static_cast<int64_t>(b) * s.sk * row_stride + static_cast<int64_t>(kvh) * kD;
    k_head = k + head_offset;
    v_head = v + head_offset;
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) {
      if (loader.next(next_tile)) stage(i, next_tile);
      cp_async_commit();
    }
  }

  __device__ void stage(int slot, const KeyTile& tile) {
    const uint32_t base = stage0 + slot * kStageBytes;
    rows.copy(base, k_head, row_stride, tile.start, k_lo, k_hi);
    rows.copy(base + kTileBytes, v_head, row_stride, tile.start, k_lo, k_hi);
  }

  // The it-th selected tile (it counts from 0): waits until its stage has
  // landed, issues the tile kStages - 1 ahead, and gives the stage's K and V
  // shared-memory addresses. False after the last tile.
  __device__ bool next(int it, KeyTile& tile, uint32_t& k_tile, uint32_t& v_tile) {
    if (!walker.next(tile)) return false;
    cp_async_wait<kStages - 2>();
    __syncwarp();
    if (loader.next(next_tile)) stage((it + kStages - 1) % kStages, next_tile);
    cp_async_commit();
    k_tile = stage0 + (it % kStages) * kStageBytes;
    v_tile = k_tile + kTileBytes;
    return true;
  }
};

}  // namespace ssa::kernels::cuda::device
