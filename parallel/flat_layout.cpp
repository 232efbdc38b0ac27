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
  auto round_up = [shards](int64_t n) { return (n + shards - 1) / shards * shards; };
  const int64_t target = round_up(bucket_numel);
  // The backward produces the last parameters' gradients first and the first
  // ones (the embedding) last, so buckets are cut from the end: the remainder
  // lands at the start, and that first bucket, whose reduction starts when the
  // backward is over and cannot overlap it, holds at most a quarter of a bucket.
  const int64_t first_cap = round_up(std::max<int64_t>(1, target / 4));
  std::vector<int64_t> starts;  // descending
  for (int64_t end = numel_; end > 0;) {
    int64_t start = std::max<int64_t>(0, end - target);
    if (start < first_cap && end > first_cap) start = first_cap;
    starts.push_back(start);
    end = start;
  }
  std::reverse(starts.begin(), starts.end());
  for (size_t i = 0; i < starts.size(); ++i) {
    FlatBucket b;
    b.start = starts[i];
    b.numel = (i + 1 < starts.size() ? starts[i + 1] : numel_) - b.start;
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
