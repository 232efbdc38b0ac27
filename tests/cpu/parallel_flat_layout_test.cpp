// FlatLayout: buckets tile the flat index space in order, none larger than the
// target, the first (reduced last, after the backward) at most a quarter of it;
// pieces tile every parameter exactly once; owned ranges split each bucket.
#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <vector>

#include "parallel/flat_layout.h"

namespace ssa::parallel {
namespace {

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

void check_layout(const std::vector<int64_t>& numels, int64_t bucket_numel, int64_t shards) {
  SCOPED_TRACE(testing::Message() << "bucket_numel " << bucket_numel << ", shards " << shards);
  const int64_t total = std::accumulate(numels.begin(), numels.end(), int64_t{0});
  const int64_t target = round_up(bucket_numel, shards);
  std::vector<int64_t> covered(numels.size(), 0);
  for (int64_t rank = 0; rank < shards; ++rank) {
    const FlatLayout layout(numels, bucket_numel, shards, rank);
    const auto& buckets = layout.buckets();
    ASSERT_EQ(layout.numel(), total);
    if (total == 0) {
      EXPECT_TRUE(buckets.empty());
      continue;
    }
    ASSERT_FALSE(buckets.empty());
    EXPECT_LE(buckets.front().numel, round_up(std::max<int64_t>(1, target / 4), shards));
    int64_t next = 0;
    for (size_t i = 0; i < buckets.size(); ++i) {
      const FlatBucket& b = buckets[i];
      EXPECT_EQ(b.start, next) << "bucket " << i;
      EXPECT_GT(b.numel, 0) << "bucket " << i;
      EXPECT_LE(b.numel, target) << "bucket " << i;
      // Only the first bucket and the one after it may be short.
      if (i >= 2) EXPECT_EQ(b.numel, target) << "bucket " << i;
      EXPECT_EQ(b.padded % shards, 0);
      EXPECT_EQ(b.shard_numel * shards, b.padded);
      EXPECT_EQ(b.own_begin, std::min(b.numel, rank * b.shard_numel));
      EXPECT_EQ(b.own_end, std::min(b.numel, (rank + 1) * b.shard_numel));
      int64_t in_bucket = 0;
      for (const FlatPiece& p : b.pieces) {
        EXPECT_EQ(p.bucket_offset, in_bucket);
        EXPECT_EQ(b.start + p.bucket_offset, layout.param_offset(p.param) + p.param_offset);
        in_bucket += p.numel;
        if (rank == 0) covered[static_cast<size_t>(p.param)] += p.numel;
      }
      EXPECT_EQ(in_bucket, b.numel) << "bucket " << i;
      next += b.numel;
    }
    EXPECT_EQ(next, total);
  }
  for (size_t p = 0; p < numels.size(); ++p) EXPECT_EQ(covered[p], numels[p]) << "parameter " << p;
}

TEST(FlatLayout, BucketsTileTheParametersWithASmallFirstBucket) {
  const std::vector<int64_t> model{264 * 16, 16, 16 * 16, 16 * 64, 64 * 16, 16, 264 * 16};  // 9760 elements
  for (const int64_t shards : {1, 2, 4}) {
    for (const int64_t bucket : {1, 7, 100, 1000, 2440, 9760, 20000}) check_layout(model, bucket, shards);
  }
  check_layout({5}, 100, 1);   // everything fits the first bucket
  check_layout({0, 0}, 8, 2);  // nothing to cut
  check_layout({3, 0, 9}, 4, 2);
}

TEST(FlatLayout, TheFirstBucketIsAQuarterWhenTheRestDividesEvenly) {
  // 4096 elements in buckets of 1024: three full ones from the end, then 768
  // and the 256-element first bucket.
  const FlatLayout layout({4096}, 1024, 1, 0);
  std::vector<int64_t> sizes;
  for (const FlatBucket& b : layout.buckets()) sizes.push_back(b.numel);
  EXPECT_EQ(sizes, (std::vector<int64_t>{256, 768, 1024, 1024, 1024}));
}

TEST(FlatLayout, BadArgumentsAreRefused) {
  EXPECT_THROW(FlatLayout({4}, 0, 1, 0), std::invalid_argument);
  EXPECT_THROW(FlatLayout({4}, 4, 2, 2), std::invalid_argument);
  EXPECT_THROW(FlatLayout({-1}, 4, 1, 0), std::invalid_argument);
}

}  // namespace
}  // namespace ssa::parallel
