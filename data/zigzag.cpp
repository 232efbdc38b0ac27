// Context-parallel zigzag slicing of a sequence (declared in token_reader.h).
#include <fmt/format.h>

#include <stdexcept>

#include "data/token_reader.h"

namespace ssa::data {

std::vector<int64_t> zigzag_positions(int64_t seq_len, int64_t cp_size, int64_t cp_rank) {
  if (cp_size < 1 || cp_rank < 0 || cp_rank >= cp_size) {
    throw std::invalid_argument(fmt::format("zigzag: cp_rank {} is outside [0, cp_size {})", cp_rank, cp_size));
  }
  if (seq_len < 1) throw std::invalid_argument(fmt::format("zigzag: seq_len {} must be >= 1", seq_len));
  std::vector<int64_t> positions;
  if (cp_size == 1) {
    positions.resize(static_cast<size_t>(seq_len));
    for (int64_t i = 0; i < seq_len; ++i) positions[static_cast<size_t>(i)] = i;
    return positions;
  }
  if (seq_len % (2 * cp_size) != 0) {
    throw std::invalid_argument(
        fmt::format("zigzag: seq_len {} is not divisible by 2 * cp_size = {}", seq_len, 2 * cp_size));
  }
  // Rank r holds chunks r and 2cp-1-r: an early and a late chunk, so causal
  // attention work is the same on every rank.
  int64_t chunk = seq_len / (2 * cp_size);
  positions.reserve(static_cast<size_t>(2 * chunk));
  for (int64_t c : {cp_rank, 2 * cp_size - 1 - cp_rank}) {
    for (int64_t i = 0; i < chunk; ++i) positions.push_back(c * chunk + i);
  }
  return positions;
}

}  // namespace ssa::data
