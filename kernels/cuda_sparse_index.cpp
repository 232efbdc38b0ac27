// Inverted index of a block selection (see cuda_sparse_index.h), in LibTorch ops.
#include "kernels/cuda_sparse_index.h"

#ifdef SSA_WITH_CUDA
#include <algorithm>

#include "kernels/cuda_launch.h"

namespace ssa::kernels::cuda {
namespace {

// Queries per token chunk. Work items are ordered (b, head, chunk, block), so the
// warps running at one time read the q/do rows of about one chunk (a few MiB, in
// L2) instead of rows from the whole sequence.
constexpr int64_t kTokenChunk = 4096;

}  // namespace

InvertedIndex build_inverted_index(const at::Tensor& block_ids, const Shape& s) {
  const char* fn = "sparse_attention backward";
  InvertedIndex index;
  const int64_t b = s.batch, sq = s.sq, hkv = s.hkv, top_k = s.top_k, bs = s.block_size;
  index.tiles_per_block = static_cast<int>((bs + kKeyTile - 1) / kKeyTile);
  index.token_chunk = static_cast<int>(std::min<int64_t>(kTokenChunk, std::max<int64_t>(sq, 1)));
  index.n_token_chunks = static_cast<int>((sq + index.token_chunk - 1) / index.token_chunk);
  const int64_t block_first = s.k_start / bs;
  const int64_t block_end = (s.k_start + s.sk + bs - 1) / bs;
  index.block_first = to_int(fn, "first key block", block_first);
  index.blocks_per_chunk = to_int(fn, "key blocks", block_end - block_first);
  const int64_t n_buckets = b * hkv * index.n_token_chunks * index.blocks_per_chunk;
  to_int(fn, "index buckets", n_buckets + 1);
  to_int(fn, "index entries", b * sq * hkv * top_k);

  const auto long_opts = block_ids.options().dtype(at::kLong);
  const auto int_opts = block_ids.options().dtype(at::kInt);
  const at::Tensor ids = block_ids.to(at::kLong);  // [B, Sq, Hkv, K]
  const at::Tensor rows = at::arange(sq, long_opts).view({1, sq, 1, 1});
  // The block's first key inside this chunk must be visible to the query.
  const at::Tensor first_key = at::clamp_min(ids * bs, s.k_start);
  const at::Tensor valid = (ids >= block_first) & (ids < block_end) & (first_key <= rows + s.q_start);
  const at::Tensor bh = (at::arange(b, long_opts).view({b, 1, 1, 1}) * hkv + at::arange(hkv, long_opts).view({1, 1, hkv, 1}));
  const at::Tensor bucket = ((bh * index.n_token_chunks + at::div(rows, index.token_chunk, "floor")) *
                                 index.blocks_per_chunk +
                             (ids - block_first));
  const at::Tensor keys = at::where(valid, bucket, n_buckets).to(at::kInt).reshape({-1});

  // Entries are laid out (b, t, head, slot): a stable sort keeps ascending t per bucket.
  auto [sorted, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  index.entry_token = at::remainder(at::div(order, hkv * top_k, "floor"), sq).to(at::kInt);
  const at::Tensor counts = at::bincount(sorted.to(at::kLong), {}, n_buckets + 1).narrow(0, 0, n_buckets);
  const at::Tensor entry_begin = at::cumsum(counts, 0) - counts;
  const at::Tensor chunks = at::div(counts + (kMaxEntriesPerItem - 1), kMaxEntriesPerItem, "floor");
  const at::Tensor item_end_cum = at::cumsum(chunks, 0);
  index.n_items = n_buckets > 0 ? item_end_cum[-1].item<int64_t>() : 0;
  to_int(fn, "work items", index.n_items * index.tiles_per_block);
  index.bucket_item_begin = at::cat({at::zeros({1}, long_opts), item_end_cum}).to(at::kInt);
  if (index.n_items == 0) {
    index.item_bucket = index.item_begin = index.item_end = at::empty({0}, int_opts);
    return index;
  }
  const at::Tensor item_bucket = at::repeat_interleave(at::arange(n_buckets, long_opts), chunks, 0, index.n_items);
  const at::Tensor item_in_bucket = at::arange(index.n_items, long_opts) - (item_end_cum - chunks).index_select(0, item_bucket);
  const at::Tensor begin = entry_begin.index_select(0, item_bucket) + item_in_bucket * kMaxEntriesPerItem;
  const at::Tensor end = at::minimum(begin + kMaxEntriesPerItem,
                                     entry_begin.index_select(0, item_bucket) + counts.index_select(0, item_bucket));
  index.item_bucket = item_bucket.to(at::kInt);
  index.item_begin = begin.to(at::kInt);
  index.item_end = end.to(at::kInt);
  return index;
}

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
