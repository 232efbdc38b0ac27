#pragma once
// The seeded order of samples: a pseudo-random permutation of [0, N) per epoch,
// evaluated index by index in O(1) memory.
//
// A balanced Feistel network on 2h-bit integers (2^(2h) >= N) is a bijection
// for any round function; cycle walking (apply it again while the result is
// >= N) restricts it to a bijection of [0, N). 2^(2h) < 4N, so on average fewer
// than four network evaluations per index. Round keys mix the seed and the epoch,
// so every epoch has its own permutation.
#include <cstdint>

namespace ssa::data {

class SamplePermutation {
 public:
  SamplePermutation(uint64_t n, uint64_t seed, uint64_t epoch);
  uint64_t size() const { return n_; }
  // The sample at position i of this epoch's order; i < size().
  uint64_t operator()(uint64_t i) const;

 private:
  static constexpr int kRounds = 6;
  uint64_t encrypt(uint64_t x) const;

  uint64_t n_;
  int half_bits_ = 1;
  uint64_t half_mask_ = 1;
  uint64_t keys_[kRounds] = {};
};

// Where global sample index g (counted over epochs) lands: epoch g / N, sample
// perm_epoch(g % N).
struct SampleRef {
  int64_t epoch = 0;
  int64_t sample = 0;
};

class SampleOrder {
 public:
  SampleOrder(int64_t samples_per_epoch, uint64_t seed);
  int64_t samples_per_epoch() const { return n_; }
  SampleRef at(int64_t global_index);  // caches the current epoch's permutation

 private:
  int64_t n_;
  uint64_t seed_;
  SamplePermutation permutation_;
  int64_t epoch_ = 0;
};

// SplitMix64 finaliser: a well-mixed 64-bit hash.
uint64_t mix64(uint64_t x);

}  // namespace ssa::data
