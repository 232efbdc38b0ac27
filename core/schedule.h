#pragma once
// Learning-rate schedule: linear warmup, then cosine decay to final_fraction * lr.
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace ssa::core {

// lr at optimizer step `step` (0-based) of `total` steps.
inline double cosine_lr(double peak, int64_t step, int64_t total, double warmup_fraction, double final_fraction) {
  const int64_t warmup = static_cast<int64_t>(std::ceil(warmup_fraction * static_cast<double>(total)));
  if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double span = static_cast<double>(std::max<int64_t>(total - warmup, 1));
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / span);
  const double floor = peak * final_fraction;
  return floor + (peak - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

}  // namespace ssa::core
