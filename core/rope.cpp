#include "core/rope.h"

#include "kernels/rotary.h"

namespace ssa::core {

RotaryTable rotary_table(const at::Tensor& positions, int64_t head_dim, double theta, double scaling) {
  const int64_t half = head_dim / 2;
  auto opts = at::TensorOptions().dtype(at::kFloat).device(positions.device());
  // inv_freq[i] = theta^(-2i/D), computed in double then rounded once.
  auto exponent = at::arange(0, half, opts.dtype(at::kDouble)) * (2.0 / static_cast<double>(head_dim));
  auto inv_freq = at::pow(theta, -exponent);
  auto angles = at::outer(positions.to(at::kDouble) / scaling, inv_freq);  // [S, D/2]
  return {angles.cos().to(at::kFloat), angles.sin().to(at::kFloat)};
}

at::Tensor apply_rotary(const at::Tensor& x, const RotaryTable& table) {
  return kernels::rotate_pairs(x, table.cos, table.sin);
}

}  // namespace ssa::core
