#include "data/sample_order.h"

#include <fmt/format.h>

#include <stdexcept>

namespace ssa::data {

uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

SamplePermutation::SamplePermutation(uint64_t n, uint64_t seed, uint64_t epoch) : n_(n) {
  if (n == 0) throw std::invalid_argument("sample permutation: the number of samples must be >= 1");
  // Smallest h >= 1 with 2^(2h) >= n.
  while (half_bits_ < 32 && (uint64_t{1} << (2 * half_bits_)) < n) ++half_bits_;
  half_mask_ = (uint64_t{1} << half_bits_) - 1;
  uint64_t key = mix64(mix64(seed) ^ mix64(epoch + 0x632be59bd9b4e019ULL));
  for (int r = 0; r < kRounds; ++r) {
    key = mix64(key + static_cast<uint64_t>(r));
    keys_[r] = key;
  }
}

uint64_t SamplePermutation::encrypt(uint64_t x) const {
  uint64_t left = x >> half_bits_, right = x & half_mask_;
  for (uint64_t key : keys_) {
    uint64_t next = left ^ (mix64(right ^ key) & half_mask_);
    left = right;
    right = next;
  }
  return (left << half_bits_) | right;
}

uint64_t SamplePermutation::operator()(uint64_t i) const {
  if (i >= n_) throw std::out_of_range(fmt::format("sample permutation: index {} is not < {}", i, n_));
  uint64_t x = encrypt(i);
  while (x >= n_) x = encrypt(x);
  return x;
}

SampleOrder::SampleOrder(int64_t samples_per_epoch, uint64_t seed)
    : n_(samples_per_epoch), seed_(seed), permutation_(static_cast<uint64_t>(samples_per_epoch), seed, 0) {}

SampleRef SampleOrder::at(int64_t global_index) {
  if (global_index < 0) throw std::out_of_range(fmt::format("sample order: index {} is negative", global_index));
  int64_t epoch = global_index / n_;
  if (epoch != epoch_) {
    permutation_ = SamplePermutation(static_cast<uint64_t>(n_), seed_, static_cast<uint64_t>(epoch));
    epoch_ = epoch;
  }
  return {epoch, static_cast<int64_t>(permutation_(static_cast<uint64_t>(global_index % n_)))};
}

}  // namespace ssa::data
