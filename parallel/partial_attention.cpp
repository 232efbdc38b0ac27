#include "parallel/partial_attention.h"

#include <cmath>
#include <limits>

namespace ssa::parallel {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// [B, H, S] row statistics -> [B, S, H, 1] to scale outputs.
at::Tensor per_row(const at::Tensor& stat) { return stat.transpose(1, 2).unsqueeze(-1); }

}  // namespace

at::ScalarType accumulation_type(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

PartialSum::PartialSum(int64_t batch, int64_t rows, int64_t heads, int64_t head_dim,
                       const at::TensorOptions& options) {
  out_ = at::zeros({batch, rows, heads, head_dim}, options);
  lse_ = at::full({batch, heads, rows}, -kInf, options);
}

void PartialSum::add(int64_t row, const kernels::AttentionResult& part) {
  const int64_t n = part.out.size(1);
  at::Tensor out = out_.narrow(1, row, n);  // views: updated in place
  at::Tensor lse = lse_.narrow(2, row, n);
  const at::Tensor lp = part.lse.to(lse_.scalar_type());
  // Shift by the larger lse; rows empty in both keep lse -inf and out 0.
  const at::Tensor m = at::maximum(lse, lp);
  const at::Tensor m_safe = at::where(m == -kInf, at::zeros_like(m), m);
  const at::Tensor wa = (lse - m_safe).exp();
  const at::Tensor wb = (lp - m_safe).exp();
  const at::Tensor total = wa + wb;
  const at::Tensor empty = total == 0;
  const at::Tensor total_safe = at::where(empty, at::ones_like(total), total);
  const at::Tensor merged = at::where(empty, at::full_like(total, -kInf), total_safe.log() + m_safe);
  out.mul_(per_row(wa / total_safe)).add_(part.out.to(out_.scalar_type()) * per_row(wb / total_safe));
  lse.copy_(merged);
}

}  // namespace ssa::parallel
