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

// Sets the entries of S [16 rows x 16 keys] (two C fragments) whose keys lie
// outside [cols.lo, cols.hi) to `masked`. cols is warp-uniform, and most tiles
// are full: they skip the mask.
__device__ __forceinline__ void mask_columns(float (&s)[2][4], const TileColumns& cols, int tig, float masked) {
  if (cols.full) return;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = nt * 8 + tig * 2 + (e & 1);
      if (c < cols.lo || c >= cols.hi) s[nt][e] = masked;
    }
}

// Visible columns packed into one register: lo | hi << 8.
__device__ __forceinline__ uint32_t packed_columns(const TileColumns& c) {
  return static_cast<uint32_t>(c.lo) | static_cast<uint32_t>(c.hi) << 8;
}

// Yields, in slot order, the tiles of the selected blocks that hold at least one
// key of the chunk [k_lo, k_hi) at or before q_max. Ids < 0 are skipped. Every
// lane of a warp walks the same sequence (warp-uniform branches). The ids are
// read 64 slots at a time, two per lane (slot w0 + i in lane i % 32 of ids_lo or
// ids_hi), and handed out with a shuffle.
struct TileWalker {
  const int32_t* ids;  // [top_k] block ids of this (token, kv head)
  int top_k;
  int block_size;
  int k_lo, k_hi;  // positions held by k/v
  int q_max;       // causal limit: last position any row may see
  int lane;
  int w0 = 0;           // first slot of the window in ids_lo, ids_hi
  int ids_lo, ids_hi;
  int slot = -1;
  int sub = 0, sub_end = 0;
  int block_start = 0, block_lo = 0, block_hi = 0;

  __device__ TileWalker(const int32_t* ids_, int top_k_, int block_size_, int k_lo_, int k_hi_, int q_max_, int lane_)
      : ids(ids_), top_k(top_k_), block_size(block_size_), k_lo(k_lo_), k_hi(k_hi_), q_max(q_max_), lane(lane_) {
    load_window();
  }
  __device__ void load_window() {
    ids_lo = w0 + lane < top_k ? ids[w0 + lane] : -1;
    ids_hi = w0 + lane + 32 < top_k ? ids[w0 + lane + 32] : -1;
  }

  // The next tile, and the columns of it the query sees (packed_columns).
  __device__ bool next(KeyTile& tile, uint32_t& packed) {
    if (!next(tile)) return false;
    packed = packed_columns(visible_columns(tile, q_max));
    return true;
  }
  __device__ bool next(KeyTile& tile) {
    while (sub >= sub_end) {
      if (++slot >= top_k) return false;
      if (slot - w0 == 64) {
        w0 = slot;
        load_window();
      }
      const int id = __shfl_sync(0xffffffffu, slot - w0 < 32 ? ids_lo : ids_hi, slot & 31);
      if (id < 0) continue;
      block_start = id * block_size;
      block_lo = max(block_start, k_lo);
      block_hi = min(block_start + block_size, k_hi);
      const int visible_hi = min(block_hi, q_max + 1);
      if (block_lo >= visible_hi) continue;
      sub = static_cast<unsigned>(block_lo - block_start) / kKeyTile;  // both >= 0
      sub_end = static_cast<unsigned>(visible_hi - block_start + kKeyTile - 1) / kKeyTile;
    }
    tile.start = block_start + sub * kKeyTile;
    tile.lo = block_lo;
    tile.hi = block_hi;
    ++sub;
    return true;
  }
};

// The walk of TileWalker when every block is one tile (block_size == kKeyTile) and
// top_k <= 32 (the paper's setting): lane i works out slot i's tile once (its
// start and the columns the query sees), a ballot marks the slots with a visible
// key, and each tile then costs a find-first-set and two shuffles instead of the
// general walk's per-slot bookkeeping. Same tiles in the same order.
struct SlotTiles {
  unsigned pending;  // slots with a visible tile not yet handed out
  int start;         // this lane's slot: first key position of its tile
  uint32_t packed;   // and the columns the query sees (packed_columns)

  __device__ SlotTiles(const int32_t* ids, int top_k, int /*block_size*/, int k_lo, int k_hi, int q_max, int lane) {
    const int id = lane < top_k ? ids[lane] : -1;
    KeyTile tile;
    tile.start = id * kKeyTile;
    tile.lo = max(tile.start, k_lo);
    tile.hi = min(tile.start + kKeyTile, k_hi);
    const bool visible = id >= 0 && tile.lo < min(tile.hi, q_max + 1);
    start = tile.start;
    packed = visible ? packed_columns(visible_columns(tile, q_max)) : 0u;
    pending = __ballot_sync(0xffffffffu, visible);
  }
  __device__ bool next(KeyTile& tile, uint32_t& packed_out) {
    if (pending == 0) return false;
    const int src = __ffs(pending) - 1;
    pending &= pending - 1;
    tile.start = __shfl_sync(0xffffffffu, start, src);
    packed_out = __shfl_sync(0xffffffffu, packed, src);
    return true;
  }
};
// The tile walk a kernel launch uses: SlotTiles where it applies.
__host__ __device__ constexpr bool slot_tiles_fit(int block_size, int top_k) {
  return block_size == kKeyTile && top_k <= 32;
}

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

// S [16 rows x 16 keys] = A (fragments a) x tile^T, tile rows are keys. at: this
// lane's ldmatrix address of k-step 0 (ldm_rows_as_n), the later ones one xor on.
template <int kD>
__device__ __forceinline__ void mma_a_tile_t_at(float (&s)[2][4], const uint32_t (&a)[kD / 16][4], uint32_t at) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    uint32_t b[4];
    ldmatrix_x4(b, at ^ (ks << 5));
    mma_bf16(s[0], a[ks], b[0], b[1]);
    mma_bf16(s[1], a[ks], b[2], b[3]);
  }
}
template <int kD>
__device__ __forceinline__ void mma_a_tile_t(float (&s)[2][4], const uint32_t (&a)[kD / 16][4], uint32_t tile,
                                             int lane) {
  mma_a_tile_t_at<kD>(s, a, ldm_rows_as_n<kD>(tile, lane, 0));
}

// acc [16 x kD] += P (A fragment over the 16 keys) x tile, tile rows are keys. at:
// this lane's ldmatrix address of the first 16 columns (ldm_rows_as_k).
template <int kD>
__device__ __forceinline__ void mma_p_tile_at(float (&acc)[kD / 8][4], const uint32_t (&p)[4], uint32_t at) {
#pragma unroll
  for (int dn = 0; dn < kD / 16; ++dn) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, at ^ (dn << 5));
    mma_bf16(acc[2 * dn], p, b[0], b[1]);
    mma_bf16(acc[2 * dn + 1], p, b[2], b[3]);
  }
}
template <int kD>
__device__ __forceinline__ void mma_p_tile(float (&acc)[kD / 8][4], const uint32_t (&p)[4], uint32_t tile, int lane) {
  mma_p_tile_at<kD>(acc, p, ldm_rows_as_k<kD>(tile, lane, 0));
}

// The K and V tiles of one (batch, token, kv head)'s selected blocks, streamed
// through a warp's private cp.async ring of kStages shared-memory stages (each
// stage: the K tile, then the V tile). Shared by the forward and dq kernels.
// Only the loader walks the selection; the columns each staged tile shows the
// query travel to the reader in a small register queue, and the lane's source
// addresses are set up once, so a tile costs a few address steps.
template <int kD, int kStages, typename Walker = TileWalker>
struct SelectedKvPipeline {
  static constexpr int kTileBytes = kKeyTile * kD * 2;  // one bf16 [kKeyTile, kD] tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  static_assert(kStages >= 2, "one tile in flight while one is read");

  Walker loader;               // runs kStages - 1 tiles ahead of the reader
  RowCopier<kD> rows;
  const __nv_bfloat16* k_lane;  // this lane's first row at position k_lo in k, and in v
  const __nv_bfloat16* v_lane;
  int64_t row_stride;
  int k_lo, k_hi;
  uint32_t stage0;              // this warp's first stage
  int staged = 0, read = 0;     // tiles staged and handed out so far
  int load_slot = 0, read_slot = 0;
  uint32_t queue[kStages - 1];  // packed visible columns of the staged tiles not yet read
  // This lane's ldmatrix offsets in a tile (ldm_rows_as_n, ldm_rows_as_k), worked
  // out once: passed through a shuffle, so the compiler keeps them in registers
  // instead of recomputing them from the thread index for every tile.
  uint32_t ldm_n, ldm_k;

  // k/v: [B, Sk, Hkv, kD]; block_ids: [B, Sq, Hkv, top_k]; warp_smem: this warp's
  // kStages * kStageBytes of shared memory. Issues the first kStages - 1 tiles.
  __device__ SelectedKvPipeline(const __nv_bfloat16* k, const __nv_bfloat16* v, const int32_t* block_ids,
                                const Shape& s, int b, int t, int kvh, int qpos_, uint32_t warp_smem, int lane)
      : loader(block_ids + ((static_cast<int64_t>(b) * s.sq + t) * s.hkv + kvh) * s.top_k, s.top_k, s.block_size,
               static_cast<int>(s.k_start), static_cast<int>(s.k_start) + s.sk, qpos_, lane),
        rows(lane), row_stride(static_cast<int64_t>(s.hkv) * kD), k_lo(static_cast<int>(s.k_start)),
        k_hi(static_cast<int>(s.k_start) + s.sk), stage0(warp_smem) {
    const int64_t head_offset = static_cast<int64_t>(b) * s.sk * row_stride + static_cast<int64_t>(kvh) * kD;
    k_lane = k + head_offset + rows.row0 * row_stride + rows.col;
    v_lane = v + head_offset + rows.row0 * row_stride + rows.col;
    ldm_n = __shfl_sync(0xffffffffu, ldm_rows_as_n<kD>(0, lane, 0), lane);
    ldm_k = __shfl_sync(0xffffffffu, ldm_rows_as_k<kD>(0, lane, 0), lane);
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) {
      KeyTile tile;
      if (loader.next(tile, queue[i])) stage(tile);
      cp_async_commit();
    }
  }

  __device__ void stage(const KeyTile& tile) {
    const uint32_t base = stage0 + load_slot * kStageBytes;
    load_slot = load_slot + 1 == kStages ? 0 : load_slot + 1;
    ++staged;
    const int64_t offset = static_cast<int64_t>(tile.start - k_lo) * row_stride;
    const int64_t step = RowCopier<kD>::kRowStep * row_stride;
    if (tile.start >= k_lo && tile.start + kKeyTile <= k_hi) {  // the usual case: every row is there
#pragma unroll
      for (int i = 0; i < RowCopier<kD>::kPerLane; ++i) {
        cp_async_16(base + rows.dst[i], k_lane + offset + i * step, true);
        cp_async_16(base + kTileBytes + rows.dst[i], v_lane + offset + i * step, true);
      }
    } else {
      const int64_t to_head = -(rows.row0 * row_stride + rows.col);  // row k_lo, column 0: always mapped
#pragma unroll
      for (int i = 0; i < RowCopier<kD>::kPerLane; ++i) {
        const int pos = tile.start + rows.row0 + i * RowCopier<kD>::kRowStep;
        const bool valid = pos >= k_lo && pos < k_hi;
        const int64_t at = valid ? offset + i * step : to_head;
        cp_async_16(base + rows.dst[i], k_lane + at, valid);
        cp_async_16(base + kTileBytes + rows.dst[i], v_lane + at, valid);
      }
    }
  }

  // This lane's ldmatrix addresses in a staged tile, for mma_a_tile_t_at (tile
  // rows as n) and mma_p_tile_at (tile rows as k).
  __device__ uint32_t rows_as_n(uint32_t tile) const { return tile + ldm_n; }
  __device__ uint32_t rows_as_k(uint32_t tile) const { return tile + ldm_k; }

  // The next selected tile: waits until its stage has landed, issues the tile
  // kStages - 1 ahead, and gives the columns the query sees and the stage's K and
  // V shared-memory addresses. False after the last tile.
  __device__ bool next(TileColumns& cols, uint32_t& k_tile, uint32_t& v_tile) {
    if (read == staged) return false;
    cp_async_wait<kStages - 2>();
    __syncwarp();
    const uint32_t c = queue[0];
    cols.lo = static_cast<int>(c & 0xffu);
    cols.hi = static_cast<int>(c >> 8);
    cols.full = c == static_cast<uint32_t>(kKeyTile) << 8;
#pragma unroll
    for (int i = 0; i + 1 < kStages - 1; ++i) queue[i] = queue[i + 1];
    KeyTile tile;
    if (loader.next(tile, queue[kStages - 2])) stage(tile);  // the loader was kStages - 1 ahead until now
    cp_async_commit();
    k_tile = stage0 + read_slot * kStageBytes;
    v_tile = k_tile + kTileBytes;
    read_slot = read_slot + 1 == kStages ? 0 : read_slot + 1;
    ++read;
    return true;
  }
};

}  // namespace ssa::kernels::cuda::device
