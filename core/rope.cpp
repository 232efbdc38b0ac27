#include "core/rope.h"

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
  const int64_t half = x.size(-1) / 2;
  auto xf = x.to(at::kFloat);
  auto x1 = xf.narrow(-1, 0, half);
  auto x2 = xf.narrow(-1, half, half);
  // cos/sin: [S, D/2] -> [1, S, 1, D/2] to broadcast over batch and heads.
  auto cos = table.cos.unsqueeze(0).unsqueeze(2);
  auto sin = table.sin.unsqueeze(0).unsqueeze(2);
  return at::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1).to(x.scalar_type());
}

}  // namespace ssa::core
