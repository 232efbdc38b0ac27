// The inverted index of a block selection (params.cuh, InvertedIndexParams): for
// each (b, kv head, token chunk, key block) bucket the query rows that selected the
// block, split into work items of at most kMaxEntriesPerItem rows. Counting uses
// integer atomics (exact); the placement order is fixed: one warp per sub-chunk
// walks its tokens 32 at a time, slot by slot, with __match_any_sync ranking lanes
// that picked the same block, so the index (and every sum over it) is the same on
// every run (within a bucket, by sub-chunk, then 32-token group, slot and lane).
#include <cstdint>

#include "kernels/cuda/params.cuh"

namespace ssa::kernels::cuda {
namespace {

// The entry's counter slot (bucket * subs_per_chunk + sub) or -1 when its block
// holds no key of the chunk visible to the query.
__device__ __forceinline__ int64_t counter_slot(const InvertedIndexParams& p, int b, int t, int h, int id) {
  const Shape& s = p.shape;
  const int64_t first_key = static_cast<int64_t>(id) * s.block_size;
  const int64_t visible_from = first_key > s.k_start ? first_key : s.k_start;
  const int jr = id - p.block_first;
  if (id < 0 || jr < 0 || jr >= p.blocks_per_chunk || visible_from > s.q_pos(t)) return -1;
  const int sub = t / p.sub_chunk;
  const int tc = sub / p.subs_per_chunk, sub_in_chunk = sub % p.subs_per_chunk;
  const int64_t bucket = ((static_cast<int64_t>(b) * s.hkv + h) * p.n_token_chunks + tc) * p.blocks_per_chunk + jr;
  return bucket * p.subs_per_chunk + sub_in_chunk;
}

__global__ void index_count_kernel(const InvertedIndexParams p) {
  const Shape& s = p.shape;
  int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= static_cast<int64_t>(s.batch) * s.sq * s.hkv * s.top_k) return;
  const int id = p.block_ids[e];
  e /= s.top_k;
  const int h = static_cast<int>(e % s.hkv);
  e /= s.hkv;
  const int t = static_cast<int>(e % s.sq);
  const int b = static_cast<int>(e / s.sq);
  const int64_t slot = counter_slot(p, b, t, h, id);
  if (slot >= 0) atomicAdd(p.counts + slot, 1);
}

// One warp per (b, kv head, sub-chunk); lane = token of a 32-token group.
__global__ void index_place_kernel(const InvertedIndexParams p) {
  const Shape& s = p.shape;
  const int lane = threadIdx.x & 31;
  const int n_subs = (s.sq + p.sub_chunk - 1) / p.sub_chunk;
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (w >= static_cast<int64_t>(s.batch) * s.hkv * n_subs) return;
  const int sub = static_cast<int>(w % n_subs);
  const int h = static_cast<int>((w / n_subs) % s.hkv);
  const int b = static_cast<int>(w / n_subs / s.hkv);
  const int t_end = min(s.sq, (sub + 1) * p.sub_chunk);
  for (int t0 = sub * p.sub_chunk; t0 < t_end; t0 += 32) {
    const int t = t0 + lane;
    const int32_t* ids = p.block_ids + ((static_cast<int64_t>(b) * s.sq + t) * s.hkv + h) * s.top_k;
    for (int slot = 0; slot < s.top_k; ++slot) {
      const int64_t c = t < t_end ? counter_slot(p, b, t, h, ids[slot]) : -1;
      // Lanes with the same counter rank by lane; an invalid lane matches only itself.
      const unsigned same = __match_any_sync(0xffffffffu, c >= 0 ? c : -1 - lane);
      // counts[c] holds what counter c has still to place: its next entry goes to
      // inclusive[c] - counts[c] (the exclusive scan, then onwards).
      const int base = c >= 0 ? p.inclusive[c] - p.counts[c] : 0;
      __syncwarp();
      if (c >= 0) {
        const unsigned below = same & ((1u << lane) - 1u);
        p.entry_token[base + __popc(below)] = t;
        if (below == 0) p.counts[c] -= __popc(same);  // the lowest lane advances the counter
      }
      __syncwarp();
    }
  }
}

// Entries of a bucket: its counter range in the inclusive scan.
__device__ __forceinline__ void bucket_range(const InvertedIndexParams& p, int64_t bucket, int& begin, int& end) {
  const int64_t first = bucket * p.subs_per_chunk;
  begin = first > 0 ? p.inclusive[first - 1] : 0;
  end = p.inclusive[first + p.subs_per_chunk - 1];
}

__global__ void index_items_kernel(const InvertedIndexParams p) {
  const int64_t bucket = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bucket >= p.n_buckets) return;
  if (bucket == 0) p.bucket_item_begin[0] = 0;  // the scan of item_count fills the rest
  int begin, end;
  bucket_range(p, bucket, begin, end);
  p.item_count[bucket] = (end - begin + kMaxEntriesPerItem - 1) / kMaxEntriesPerItem;
}

__global__ void index_fill_kernel(const InvertedIndexParams p) {
  const int64_t bucket = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bucket >= p.n_buckets) return;
  int begin, end;
  bucket_range(p, bucket, begin, end);
  const int n = p.item_count[bucket];
  const int first_item = p.bucket_item_begin[bucket + 1] - n;
  for (int i = 0; i < n; ++i) {
    p.item_bucket[first_item + i] = static_cast<int32_t>(bucket);
    p.item_begin[first_item + i] = begin + i * kMaxEntriesPerItem;
    p.item_end[first_item + i] = min(end, begin + (i + 1) * kMaxEntriesPerItem);
  }
}

unsigned blocks_for(int64_t threads, int per_block) {
  return static_cast<unsigned>((threads + per_block - 1) / per_block);
}

}  // namespace

cudaError_t launch_index_count(const InvertedIndexParams& p, cudaStream_t stream) {
  const Shape& s = p.shape;
  const int64_t n = static_cast<int64_t>(s.batch) * s.sq * s.hkv * s.top_k;
  if (n == 0) return cudaSuccess;
  index_count_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_index_place(const InvertedIndexParams& p, cudaStream_t stream) {
  const Shape& s = p.shape;
  const int64_t warps = static_cast<int64_t>(s.batch) * s.hkv * ((s.sq + p.sub_chunk - 1) / p.sub_chunk);
  if (warps == 0) return cudaSuccess;
  index_place_kernel<<<blocks_for(warps * 32, 128), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_index_items(const InvertedIndexParams& p, cudaStream_t stream) {
  if (p.n_buckets == 0) return cudaSuccess;
  index_items_kernel<<<blocks_for(p.n_buckets, 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_index_fill(const InvertedIndexParams& p, cudaStream_t stream) {
  if (p.n_buckets == 0) return cudaSuccess;
  index_fill_kernel<<<blocks_for(p.n_buckets, 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ssa::kernels::cuda
