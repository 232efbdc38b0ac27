#pragma once
// Shared by the two block-selection kernels (select_blocks.cu with mma.sync,
// select_blocks_wgmma.cu with warpgroup mma): the warp's running top-k and the
// double-buffered stream of pooled-key chunks through shared memory.
#include <cuda_bf16.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/params.cuh"

namespace ssa::kernels::cuda::device {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kChunk = kSelectChunk;  // pooled blocks per shared-memory chunk

// The normaliser pass of both selection kernels sums 2^(x - m) (x: a logit in
// log2 units, the chunk images being scaled) against a reference m raised per
// chunk to |q| * (the chunk's largest key norm), a bound on the chunk's logits
// (Cauchy-Schwarz).
__device__ __forceinline__ void raise_reference(float& m, float& l, float bound) {
  if (bound > m) {
    l *= exp2f(m - bound);
    m = bound;
  }
}
// A row's final sum below this means its bounds lay so far above its logits that
// terms underflowed: the CTA redoes the pass against the exact maximum.
constexpr float kUnderflowSum = 0x1p-80f;

// A selection CTA's share of the launch: CTA -> (b, kv head, tile of tile_tokens
// query tokens), the latest (heaviest) tiles first; the causal blocks any of its
// tokens sees and their chunks; its (b, kv head)'s chunk images and chunk norms.
template <int kD>
struct SelectTile {
  int b, kvh, tile, t_begin, t_end, n_blocks, n_chunks;
  const __nv_bfloat16* tiles;  // chunk images (SplitParams)
  const float* chunk_norm;

  __device__ SelectTile(const SelectParams& p, int tile_tokens) {
    const Shape& s = p.shape;
    const int n_tiles = (s.sq + tile_tokens - 1) / tile_tokens;
    int64_t cta = blockIdx.x;
    tile = n_tiles - 1 - static_cast<int>(cta % n_tiles);
    cta /= n_tiles;
    kvh = static_cast<int>(cta % s.hkv);
    b = static_cast<int>(cta / s.hkv);
    t_begin = tile * tile_tokens;
    t_end = min(s.sq, t_begin + tile_tokens);
    n_blocks = min(p.n_blocks, static_cast<int>(s.q_pos(t_end - 1) / s.block_size) + 1);  // positions grow with rows
    n_chunks = (n_blocks + kChunk - 1) / kChunk;
    const int64_t bh = static_cast<int64_t>(b) * s.hkv + kvh;
    const int all_chunks = (p.n_blocks + kChunk - 1) / kChunk;
    tiles = p.pooled_tiles + bh * all_chunks * 2 * kChunk * kD;
    chunk_norm = p.chunk_norm + bh * all_chunks;
  }
};

// Running top-k of one query over the warp, sorted by descending score; equal
// scores keep the earlier (lower) block id first.
struct TopK {
  float s0, s1;  // scores of entries lane and lane + 32
  int i0, i1;    // their block ids (-1: empty)

  __device__ void init(int lane, int forced) {
    s0 = lane == 0 ? INFINITY : -1.f;
    i0 = lane == 0 ? forced : -1;
    s1 = -1.f;
    i1 = -1;
  }
  __device__ float threshold(int k) const {
    const float v = k - 1 < 32 ? s0 : s1;
    return __shfl_sync(kFull, v, (k - 1) & 31);
  }
  // Inserts after every entry with score >= s (the list shifts down by one).
  // wide (k > 32, warp-uniform): the second list (entries 32..63) shifts too.
  __device__ void insert(float s, int id, int lane, bool wide) {
    float pa = __shfl_up_sync(kFull, s0, 1);
    int ia = __shfl_up_sync(kFull, i0, 1);
    if (lane == 0) pa = INFINITY;
    if (wide) {
      float pb = __shfl_up_sync(kFull, s1, 1);
      int ib = __shfl_up_sync(kFull, i1, 1);
      const float a31 = __shfl_sync(kFull, s0, 31);
      const int ia31 = __shfl_sync(kFull, i0, 31);
      if (lane == 0) {
        pb = a31;
        ib = ia31;
      }
      if (!(s1 >= s)) {
        i1 = pb >= s ? id : ib;
        s1 = pb >= s ? s : pb;
      }
    }
    if (!(s0 >= s)) {
      i0 = pa >= s ? id : ia;
      s0 = pa >= s ? s : pa;
    }
  }
  // Entry order of the list: a higher score first, equal scores by lower id (the
  // order the insertions keep, as candidates arrive by ascending id). Empty
  // entries are (-1, -1).
  static __device__ __forceinline__ bool before(float sa, int ia, float sb, int ib) {
    return sa > sb || (sa == sb && ia < ib);
  }
  // One compare-exchange step between lanes lane and lane ^ j of a bitonic
  // network: the lane for which `first` holds keeps the entry that comes first.
  static __device__ __forceinline__ void exchange(float& s, int& id, int j, bool first) {
    const float ps = __shfl_xor_sync(kFull, s, j);
    const int pid = __shfl_xor_sync(kFull, id, j);
    if (first == before(ps, pid, s, id)) {
      s = ps;
      id = pid;
    }
  }
  // Sorts two lists of one entry per lane each (s[r], id[r]) into list order
  // across the warp (bitonic sort, the two lists side by side).
  static __device__ void sort_pair(float (&s)[2], int (&id)[2], int lane) {
#pragma unroll
    for (int k = 2; k <= 32; k <<= 1)
#pragma unroll
      for (int j = k >> 1; j > 0; j >>= 1) {
        const bool first = ((lane & j) == 0) == ((lane & k) == 0);
#pragma unroll
        for (int r = 0; r < 2; ++r) exchange(s[r], id[r], j, first);
      }
  }
  // Merges a sorted list of one entry per lane (bs, bid) into entries 0..31
  // (k <= 32 only: the second list is left alone). Afterwards entries 0..31 are
  // the best 32 of both, so the first k are what inserting each of b's entries
  // above the threshold would give: b's i-th entry meets the list's (31 - i)-th,
  // the better of each pair forms a bitonic sequence holding the best 32, and a
  // bitonic merge sorts it.
  __device__ void merge_sorted(float bs, int bid, int lane) {
    const float rs = __shfl_xor_sync(kFull, bs, 31);
    const int rid = __shfl_xor_sync(kFull, bid, 31);
    if (before(rs, rid, s0, i0)) {
      s0 = rs;
      i0 = rid;
    }
#pragma unroll
    for (int j = 16; j > 0; j >>= 1) exchange(s0, i0, j, (lane & j) == 0);
  }
  // Takes a lane's two candidates (scores <= the threshold may be anything below
  // it; they are dropped) at once: sorts them and merges. For k <= 32, when many
  // candidates pass the threshold (a token's first chunks), where inserting them
  // one by one is a long serial chain of shuffles.
  __device__ void merge_candidates(const float (&cand)[2], const int (&cand_id)[2], float thr, int lane) {
    float cs[2];
    int ci[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool in = cand[e] > thr;
      cs[e] = in ? cand[e] : -1.f;
      ci[e] = in ? cand_id[e] : -1;
    }
    sort_pair(cs, ci, lane);
    merge_sorted(cs[0], ci[0], lane);
    merge_sorted(cs[1], ci[1], lane);
  }
  // The first k entries' ids in ascending order, -1 slots last.
  __device__ void write_sorted(int32_t* out, int k, int lane) const {
    const int key0 = lane < k && i0 >= 0 ? i0 : INT_MAX;
    const int key1 = lane + 32 < k && i1 >= 0 ? i1 : INT_MAX;
    int rank0 = 0, rank1 = 0;
    for (int j = 0; j < 32 && j < k; ++j) {
      const int kj = __shfl_sync(kFull, key0, j);
      rank0 += kj < key0 || (kj == key0 && j < lane);
      rank1 += kj < key1 || kj == key1;  // entry j (< 32) precedes entry lane + 32
    }
    for (int j = 32; j < k; ++j) {
      const int kj = __shfl_sync(kFull, key1, j - 32);
      rank0 += kj < key0;
      rank1 += kj < key1 || (kj == key1 && j < lane + 32);
    }
    if (lane < k) out[rank0] = key0 == INT_MAX ? -1 : key0;
    if (lane + 32 < k) out[rank1] = key1 == INT_MAX ? -1 : key1;
  }
};

// Shared-memory buffers of the chunk stream (by default), and the bytes of
// kBuffers of them (each: hi then lo tile).
constexpr int kChunkBuffers = 3;
template <int kD, int kBuffers = kChunkBuffers>
__host__ __device__ constexpr int chunk_stream_bytes() {
  return kBuffers * 2 * kChunk * kD * 2;
}

// Which tiles of each chunk image a pass streams (SplitParams): the first (hi or
// scaled), the second (lo or exact), or both.
enum ChunkParts { kFirstTile = 1, kSecondTile = 2, kBothTiles = 3 };

// Streams chunks [0, n_chunks) of chunk images (the tiles named by `parts`)
// through kBuffers (2 or 3) shared-memory buffers (1024-byte aligned when
// `buffers` is, as wgmma needs); f(chunk, first_tile, second_tile) runs after a
// CTA barrier (a tile not streamed holds stale bytes). One barrier per chunk:
// chunk c + kBuffers - 1 is staged right after the barrier of chunk c, into the
// buffer every thread finished with before it, so kBuffers - 1 chunks are in
// flight while one is read. Ends with a barrier, so the buffers can be refilled.
// kAsyncProxy: the tiles are read by wgmma, so each thread fences its copies for
// the async proxy before the barrier.
template <int kD, int kThreads, bool kAsyncProxy = false, int kBuffers = kChunkBuffers, typename F>
__device__ void stream_chunks(int n_chunks, ChunkParts parts, const __nv_bfloat16* tiles, uint32_t buffers, F&& f) {
  constexpr int kTileElems = kChunk * kD;
  constexpr int kChunkBytes = kTileElems * 2;
  // The images are the tiles' bytes in order: thread i copies 16-byte pieces
  // i, i + kThreads, ... of each tile, to the same offsets.
  constexpr int kPasses = kTileElems / 8 / kThreads;
  static_assert(kTileElems / 8 % kThreads == 0, "a tile's pieces split evenly over the threads");
  auto stage = [&](int c) {  // always commits one group (empty past the end)
    if (c < n_chunks) {
      const uint32_t dst = buffers + (c % kBuffers) * 2 * kChunkBytes + threadIdx.x * 16;
      const __nv_bfloat16* src = tiles + static_cast<int64_t>(c) * 2 * kTileElems + threadIdx.x * 8;
#pragma unroll
      for (int j = 0; j < kPasses; ++j) {
        if (parts & kFirstTile) cp_async_16(dst + j * kThreads * 16, src + j * kThreads * 8);
        if (parts & kSecondTile) {
          cp_async_16(dst + kChunkBytes + j * kThreads * 16, src + kTileElems + j * kThreads * 8);
        }
      }
    }
    cp_async_commit();
  };
  static_assert(kBuffers == 2 || kBuffers == 3, "one or two chunks in flight while one is read");
#pragma unroll
  for (int c = 0; c < kBuffers - 1; ++c) stage(c);
  for (int c = 0; c < n_chunks; ++c) {
    cp_async_wait<kBuffers - 2>();  // chunk c has landed (only later ones may be pending)
    if (kAsyncProxy) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    stage(c + kBuffers - 1);
    const uint32_t base = buffers + (c % kBuffers) * 2 * kChunkBytes;
    f(c, base, base + kChunkBytes);
  }
  __syncthreads();
}

}  // namespace ssa::kernels::cuda::device
