#pragma once
// The flat index space of a list of parameters (concatenated in order, no gaps:
// global offsets of checkpoint shards refer to it), cut into buckets, and the
// part of each bucket a dp rank owns. With ZeRO a bucket is padded to a multiple
// of dp and rank d owns its d-th 1/dp; without ZeRO every rank owns everything.
#include <cstddef>
#include <cstdint>
#include <vector>

namespace ssa::parallel {

// A piece of one parameter inside one bucket.
struct FlatPiece {
  int64_t param = 0;         // index into the parameter list
  int64_t param_offset = 0;  // first element within the parameter (flattened)
  int64_t bucket_offset = 0; // first element within the bucket
  int64_t numel = 0;
};

struct FlatBucket {
  int64_t start = 0;        // global offset of the bucket's first element
  int64_t numel = 0;        // elements of parameters in the bucket
  int64_t padded = 0;       // numel rounded up to a multiple of the shard count
  int64_t shard_numel = 0;  // padded / shards: what a reduce-scatter hands each rank
  int64_t own_begin = 0;    // my owned range in bucket coordinates [own_begin, own_end), clipped to numel
  int64_t own_end = 0;
  std::vector<FlatPiece> pieces;
  int64_t own_numel() const { return own_end - own_begin; }
};

class FlatLayout {
 public:
  // numels: elements of each parameter. shards: dp when ZeRO, else 1 (every rank
  // owns the whole bucket). bucket_numel: target bucket size (rounded up to a
  // multiple of shards); cut from the end, the first bucket at most a quarter of it.
  FlatLayout(const std::vector<int64_t>& numels, int64_t bucket_numel, int64_t shards, int64_t shard_rank);

  int64_t numel() const { return numel_; }
  int64_t shards() const { return shards_; }
  const std::vector<FlatBucket>& buckets() const { return buckets_; }
  int64_t param_offset(int64_t param) const { return param_offsets_[static_cast<size_t>(param)]; }

  // The pieces of `bucket` that intersect bucket-coordinate range [begin, end),
  // clipped to it (bucket_offset stays in bucket coordinates).
  static std::vector<FlatPiece> pieces_in(const FlatBucket& bucket, int64_t begin, int64_t end);

 private:
  int64_t numel_ = 0;
  int64_t shards_ = 1;
  std::vector<int64_t> param_offsets_;
  std::vector<FlatBucket> buckets_;
};

}  // namespace ssa::parallel
