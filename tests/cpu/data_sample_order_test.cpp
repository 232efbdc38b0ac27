// The per-epoch sample permutation and the zigzag cp slicing.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>
#include <vector>

#include "data/sample_order.h"
#include "data/token_reader.h"

using namespace ssa::data;

namespace {

std::vector<uint64_t> order_of(uint64_t n, uint64_t seed, uint64_t epoch) {
  SamplePermutation permutation(n, seed, epoch);
  std::vector<uint64_t> order(n);
  for (uint64_t i = 0; i < n; ++i) order[i] = permutation(i);
  return order;
}

}  // namespace

TEST(SamplePermutation, IsABijectionForManySizes) {
  for (uint64_t n : {1, 2, 3, 4, 5, 7, 16, 17, 100, 255, 256, 257, 1000, 4097, 65537, 300001}) {
    for (uint64_t seed : {0, 1, 12345}) {
      std::vector<uint64_t> order = order_of(n, seed, 3);
      std::vector<char> seen(n, 0);
      for (uint64_t value : order) {
        ASSERT_LT(value, n) << "n=" << n;
        ASSERT_FALSE(seen[value]) << "n=" << n << " value " << value << " appears twice";
        seen[value] = 1;
      }
    }
  }
}

TEST(SamplePermutation, SeedAndEpochDecideTheOrder) {
  const uint64_t n = 5000;
  EXPECT_EQ(order_of(n, 7, 0), order_of(n, 7, 0));
  EXPECT_NE(order_of(n, 7, 0), order_of(n, 8, 0));
  EXPECT_NE(order_of(n, 7, 0), order_of(n, 7, 1));
  // Different seeds should agree on about one position in n, not on many.
  std::vector<uint64_t> a = order_of(n, 7, 0), b = order_of(n, 8, 0);
  int same = 0;
  for (uint64_t i = 0; i < n; ++i) same += a[i] == b[i];
  EXPECT_LT(same, 20);
}

TEST(SamplePermutation, LooksShuffled) {
  const uint64_t n = 10000;
  std::vector<uint64_t> order = order_of(n, 42, 0);
  int fixed = 0, ascending = 0;
  for (uint64_t i = 0; i < n; ++i) {
    fixed += order[i] == i;
    if (i > 0) ascending += order[i] > order[i - 1];
  }
  EXPECT_LT(fixed, 20);  // a random permutation has about one fixed point
  // About half of neighbouring pairs ascend in a random order (sd ~ 29 here).
  EXPECT_NEAR(ascending, n / 2, 300);
  // The first tenth of the order samples all tenths of the data evenly.
  std::vector<int> deciles(10, 0);
  for (uint64_t i = 0; i < n / 10; ++i) ++deciles[order[i] * 10 / n];
  for (int count : deciles) EXPECT_NEAR(count, 100, 45);
}

TEST(SampleOrder, EveryEpochCoversEverySampleOnceInItsOwnOrder) {
  const int64_t n = 777;
  SampleOrder order(n, 99);
  std::vector<std::vector<int64_t>> epochs(3);
  for (int64_t g = 0; g < 3 * n; ++g) {
    SampleRef ref = order.at(g);
    ASSERT_EQ(ref.epoch, g / n);
    epochs[static_cast<size_t>(ref.epoch)].push_back(ref.sample);
  }
  for (auto& epoch : epochs) {
    std::vector<int64_t> sorted = epoch;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> all(n);
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(sorted, all);
  }
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_NE(epochs[1], epochs[2]);
  // Going back to an earlier epoch gives the same samples again.
  SampleOrder again(n, 99);
  EXPECT_EQ(again.at(2 * n + 5).sample, epochs[2][5]);
  EXPECT_EQ(again.at(5).sample, epochs[0][5]);
}

TEST(Zigzag, ChunksOfEachRank) {
  EXPECT_EQ(zigzag_positions(5, 1, 0), (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(zigzag_positions(8, 2, 0), (std::vector<int64_t>{0, 1, 6, 7}));
  EXPECT_EQ(zigzag_positions(8, 2, 1), (std::vector<int64_t>{2, 3, 4, 5}));
  EXPECT_EQ(zigzag_positions(16, 4, 1), (std::vector<int64_t>{2, 3, 12, 13}));
}

TEST(Zigzag, RanksPartitionTheSequence) {
  for (int64_t cp : {1, 2, 3, 4, 8}) {
    const int64_t seq_len = 48;
    std::vector<int> hits(seq_len, 0);
    for (int64_t rank = 0; rank < cp; ++rank) {
      std::vector<int64_t> positions = zigzag_positions(seq_len, cp, rank);
      EXPECT_EQ(static_cast<int64_t>(positions.size()), seq_len / cp);
      for (int64_t p : positions) ++hits[static_cast<size_t>(p)];
    }
    for (int h : hits) EXPECT_EQ(h, 1) << "cp=" << cp;
  }
}

TEST(Zigzag, RejectsBadShapes) {
  EXPECT_THROW(zigzag_positions(10, 2, 0), std::invalid_argument);  // 10 % 4 != 0
  EXPECT_THROW(zigzag_positions(8, 2, 2), std::invalid_argument);
  EXPECT_THROW(zigzag_positions(0, 1, 0), std::invalid_argument);
}
