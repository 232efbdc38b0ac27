#pragma once
// Zigzag placement of a sequence over the cp ranks of one replica: 2*cp chunks of
// `chunk` tokens; rank r holds global chunks r and 2cp-1-r as its local slots 0
// and 1 (rows [0, chunk) and [chunk, 2*chunk) of its tensors).
#include <cstdint>

namespace ssa::parallel {

struct ZigzagLayout {
  int64_t cp = 1;
  int64_t rank = 0;
  int64_t chunk = 0;  // tokens per chunk: S / (2 cp)

  // Global chunk held in local slot `slot` (0 or 1) by cp rank `owner`.
  int64_t global_chunk(int64_t owner, int64_t slot) const { return slot == 0 ? owner : 2 * cp - 1 - owner; }
  int64_t global_chunk(int64_t slot) const { return global_chunk(rank, slot); }
  // First global position of my local slot.
  int64_t position(int64_t slot) const { return global_chunk(slot) * chunk; }
  // Which rank holds global chunk g, and in which slot.
  int64_t owner(int64_t g) const { return g < cp ? g : 2 * cp - 1 - g; }
  int64_t slot(int64_t g) const { return g < cp ? 0 : 1; }
  int64_t chunks() const { return 2 * cp; }
};

}  // namespace ssa::parallel
