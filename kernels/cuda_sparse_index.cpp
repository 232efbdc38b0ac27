// Inverted index of a block selection (see cuda_sparse_index.h): the CUDA kernels of
// kernels/cuda/inverted_index.cu with LibTorch cumsums for the two scans.
#include "kernels/cuda_sparse_index.h"

#ifdef SSA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>

#include "kernels/cuda_launch.h"

namespace ssa::kernels::cuda {
namespace {

// Queries per token chunk. Work items are ordered (b, head, chunk, block), so the
// warps running at one time read the q/do rows of about one chunk (16 MiB per kv
// head at 16 query heads of 64 dims, in L2) instead of rows from the whole
// sequence. Longer chunks mean fewer, fuller items (each reloads its K/V tile,
// fills its pipeline and adds its sums atomically): at 32K tokens the dK/dV kernel
// took 972 / 897 / 836 / 796 / 798 / 809 us with chunks of 1K / 2K / 4K / 8K /
// 16K / 32K tokens.
constexpr int kTokenChunk = 8192;
// Queries per placement warp (a chunk has kTokenChunk / kSubChunk of them). A
// warp's placements are a serial chain (top_k per 32 queries), so smaller runs
// mean more warps at once; each costs one counter per bucket (zeroed, scanned).
constexpr int kSubChunk = 64;

}  // namespace

InvertedIndex build_inverted_index(const at::Tensor& block_ids, const Shape& s, bool exact_count) {
  const char* fn = "sparse_attention backward";
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  InvertedIndex index;
  const int64_t bs = s.block_size;
  index.tiles_per_block = static_cast<int>((bs + kKeyTile - 1) / kKeyTile);
  index.token_chunk = kTokenChunk;
  index.n_token_chunks = static_cast<int>((s.sq + kTokenChunk - 1) / kTokenChunk);
  const int64_t block_first = s.k_start / bs;
  const int64_t block_end = (s.k_start + s.sk + bs - 1) / bs;
  index.block_first = to_int(fn, "first key block", block_first);
  index.blocks_per_chunk = to_int(fn, "key blocks", block_end - block_first);
  const int64_t n_buckets = static_cast<int64_t>(s.batch) * s.hkv * index.n_token_chunks * index.blocks_per_chunk;
  const int64_t subs = kTokenChunk / kSubChunk;
  const int64_t n_entries = static_cast<int64_t>(s.batch) * s.sq * s.hkv * s.top_k;
  to_int(fn, "index counters", n_buckets * subs);
  to_int(fn, "index entries", n_entries);
  // Items: ceil(n / C) per non-empty bucket, so at most entries / C + non-empty buckets.
  const int64_t max_items = n_entries / kMaxEntriesPerItem + std::min(n_buckets, n_entries);
  to_int(fn, "work items", (max_items + 1) * index.tiles_per_block);

  const auto int_opts = block_ids.options().dtype(at::kInt);
  at::Tensor counts = at::zeros({n_buckets * subs}, int_opts);
  index.entry_token = at::empty({n_entries}, int_opts);
  at::Tensor item_count = at::empty({n_buckets}, int_opts);
  // Without buckets nothing writes it: its one element must read 0.
  index.bucket_item_begin = n_buckets > 0 ? at::empty({n_buckets + 1}, int_opts) : at::zeros({1}, int_opts);
  index.item_bucket = at::empty({max_items}, int_opts);
  index.item_begin = at::empty({max_items}, int_opts);
  index.item_end = at::empty({max_items}, int_opts);

  InvertedIndexParams p;
  p.shape = s;
  p.block_ids = block_ids.data_ptr<int32_t>();
  p.token_chunk = kTokenChunk;
  p.sub_chunk = kSubChunk;
  p.subs_per_chunk = static_cast<int>(subs);
  p.n_token_chunks = index.n_token_chunks;
  p.block_first = index.block_first;
  p.blocks_per_chunk = index.blocks_per_chunk;
  p.n_buckets = n_buckets;
  p.counts = counts.data_ptr<int32_t>();
  p.entry_token = index.entry_token.data_ptr<int32_t>();
  p.item_count = item_count.data_ptr<int32_t>();
  p.item_bucket = index.item_bucket.data_ptr<int32_t>();
  p.item_begin = index.item_begin.data_ptr<int32_t>();
  p.item_end = index.item_end.data_ptr<int32_t>();
  p.bucket_item_begin = index.bucket_item_begin.data_ptr<int32_t>();
  SSA_CUDA_CHECK(launch_index_count(p, stream));
  const at::Tensor inclusive = at::cumsum(counts, 0, at::kInt);
  p.inclusive = inclusive.data_ptr<int32_t>();
  SSA_CUDA_CHECK(launch_index_place(p, stream));
  SSA_CUDA_CHECK(launch_index_items(p, stream));
  if (n_buckets > 0) {
    at::Tensor item_inclusive = index.bucket_item_begin.narrow(0, 1, n_buckets);
    at::cumsum_out(item_inclusive, item_count, 0, at::kInt);
  }
  SSA_CUDA_CHECK(launch_index_fill(p, stream));

  index.n_items_device = index.bucket_item_begin.narrow(0, n_buckets, 1);
  index.n_items = exact_count ? index.n_items_device.item<int64_t>() : max_items;
  return index;
}

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
