#include "parallel/flat_layout.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

namespace ssa::parallel {

FlatLayout::FlatLayout(const std::vector<int64_t>& numels, int64_t bucket_numel, int64_t shards, int64_t shard_rank)
    : shards_(shards) {
  if (shards < 1 || shard_rank < 0 || shard_rank >= shards || bucket_numel < 1) {
    throw std::invalid_argument(fmt::format("parallel::FlatLayout: shards {} / shard rank {} / bucket_numel {} invalid",
                                            shards, shard_rank, bucket_numel));
  }
  for (int64_t n : numels) {
    if (n < 0) throw std::invalid_argument(fmt::format("parallel::FlatLayout: negative parameter size {}", n));
    param_offsets_.push_back(numel_);
    numel_ += n;
  }
  const int64_t target = (bucket_numel + shards - 1) / shards * shards;
  for (int64_t start = 0; start < numel_; start += target) {
    FlatBucket b;
    b.start = start;
    b.numel = std::min(target, numel_ - start);
    b.padded = (b.numel + shards - 1) / shards * shards;
    b.shard_numel = b.padded / shards;
    b.own_begin = std::min(b.numel, shard_rank * b.shard_numel);
    b.own_end = std::min(b.numel, (shard_rank + 1) * b.shard_numel);
    buckets_.push_back(b);
  }
  // Cut every parameter at bucket boundaries.
  size_t bucket = 0;
  for (size_t p = 0; p < numels.size(); ++p) {
    int64_t offset = 0;
    while (offset < numels[p]) {
      const int64_t global = param_offsets_[p] + offset;
      while (buckets_[bucket].start + buckets_[bucket].numel <= global) ++bucket;
      FlatBucket& b = buckets_[bucket];
      const int64_t n = std::min(numels[p] - offset, b.start + b.numel - global);
      b.pieces.push_back({static_cast<int64_t>(p), offset, global - b.start, n});
      offset += n;
    }
  }
}

std::vector<FlatPiece> FlatLayout::pieces_in(const FlatBucket& bucket, int64_t begin, int64_t end) {
  std::vector<FlatPiece> out;
  for (const FlatPiece& piece : bucket.pieces) {
    const int64_t lo = std::max(begin, piece.bucket_offset);
    const int64_t hi = std::min(end, piece.bucket_offset + piece.numel);
    if (lo >= hi) continue;
    out.push_back({piece.param, piece.param_offset + (lo - piece.bucket_offset), lo, hi - lo});
  }
  return out;
}

}  // namespace ssa::parallel
