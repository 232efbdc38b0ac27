#pragma once
// The inverted index of a block selection for the dk/dv backward kernel: for each
// (batch, kv head, token chunk, key block) bucket, the query rows that selected the
// block, in a fixed order, split into work items of at most kMaxEntriesPerItem
// queries. Built by the kernels of kernels/cuda/inverted_index.cu (deterministic).
#ifdef SSA_WITH_CUDA
#include <ATen/ATen.h>

#include <cstdint>

#include "kernels/cuda/params.cuh"

namespace ssa::kernels::cuda {

struct InvertedIndex {
  at::Tensor entry_token;        // int32 [B * Sq * Hkv * top_k]: query row per entry, by bucket
  at::Tensor item_bucket;        // int32 [n_items]
  at::Tensor item_begin;         // int32 [n_items]: first entry of the item
  at::Tensor item_end;           // int32 [n_items]: one past its last entry
  at::Tensor bucket_item_begin;  // int32 [n_buckets + 1]: first item of each bucket
  at::Tensor n_items_device;     // int32 [1]: the exact item count, on the GPU
  int64_t n_items = 0;           // upper bound (exact when exact_count was asked for)
  int tiles_per_block = 0;   // key tiles of kKeyTile per block
  int token_chunk = 0;       // queries per token chunk
  int n_token_chunks = 0;
  int block_first = 0;       // first block holding keys of this chunk
  int blocks_per_chunk = 0;  // blocks holding keys of this chunk
};

// block_ids [B, Sq, Hkv, top_k] int32 on the GPU. Entries whose block holds no key
// of [k_start, k_start + Sk) visible to the query are left out. Runs on the current
// stream without host syncs, except one for the exact item count when exact_count.
InvertedIndex build_inverted_index(const at::Tensor& block_ids, const Shape& shape, bool exact_count);

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
