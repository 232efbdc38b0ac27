#include "parallel/partial_attention.h"

#include <ATen/core/grad_mode.h>

#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <limits>

namespace ssa::parallel {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// [B, H, S] row statistics -> [B, S, H, 1] to scale outputs.
at::Tensor per_row(const at::Tensor& stat) { return stat.transpose(1, 2).unsqueeze(-1); }

at::Tensor or_zeros(const at::Tensor& grad, const at::Tensor& like, at::ScalarType type) {
  return grad.defined() ? grad.to(type) : at::zeros(like.sizes(), like.options().dtype(type));
}

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

PairGradients pair_gradients(const Attend& attend, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse) {
  const at::ScalarType acc = accumulation_type(q.scalar_type());
  // Recomputation and autograd::grad need grad mode (backward runs without it);
  // the arithmetic on the results below runs without it again.
  at::Tensor qg, kg, vg;
  kernels::AttentionResult part;
  {
    at::AutoGradMode grad_on(true);
    qg = q.detach().requires_grad_(true);
    kg = k.detach().requires_grad_(true);
    vg = v.detach().requires_grad_(true);
    part = attend(qg, kg, vg);
  }
  at::NoGradGuard no_grad;
  if (!part.out.requires_grad()) {  // no key of this part is visible: no gradient
    return {at::zeros(q.sizes(), q.options().dtype(acc)), at::zeros(k.sizes(), k.options().dtype(acc)),
            at::zeros(v.sizes(), v.options().dtype(acc))};
  }
  const at::Tensor dout = grad_out.to(acc);
  const at::Tensor lse_merged = lse.to(acc);
  const at::Tensor lse_part = part.lse.detach().to(acc);
  // w = exp(lse_p - lse); 0 where the merged row is empty (then lse_p is -inf too).
  const at::Tensor merged_empty = lse_merged == -kInf;
  const at::Tensor w = at::where(merged_empty, at::zeros_like(lse_merged),
                                 (lse_part - at::where(merged_empty, at::zeros_like(lse_merged), lse_merged)).exp());
  const at::Tensor grad_part_out = (per_row(w) * dout).to(part.out.scalar_type());
  // dL/dlse_p = w * (<dO, o_p> - <dO, O>): [B, Sq, H] dot products -> [B, H, Sq].
  const at::Tensor dot_part = (dout * part.out.detach().to(acc)).sum(-1);
  const at::Tensor dot_merged = (dout * out.to(acc)).sum(-1);
  const at::Tensor grad_part_lse = w * (dot_part - dot_merged).transpose(1, 2);

  const bool lse_has_grad = part.lse.requires_grad();
  std::vector<at::Tensor> grads;
  {
    at::AutoGradMode grad_on(true);
    if (lse_has_grad) {
      grads = torch::autograd::grad({part.out, part.lse}, {qg, kg, vg},
                                    {grad_part_out, grad_part_lse.to(part.lse.scalar_type())},
                                    /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
    } else {
      grads = torch::autograd::grad({part.out}, {qg, kg, vg}, {grad_part_out}, /*retain_graph=*/false,
                                    /*create_graph=*/false, /*allow_unused=*/true);
    }
  }
  PairGradients g;
  g.dq = or_zeros(grads[0], q, acc).clone();
  g.dk = or_zeros(grads[1], k, acc).clone();
  g.dv = or_zeros(grads[2], v, acc).clone();
  if (lse_has_grad) return g;

  // The lse term, dS = P * dlse (row-wise): with K as values the same softmax P
  // gives P K for dq, and its value-gradient under dlse * q gives P^T (dlse q).
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  const at::Tensor dlse_rows = per_row(grad_part_lse);  // [B, Sq, H, 1]
  at::Tensor k_as_values;
  kernels::AttentionResult pk;
  std::vector<at::Tensor> dk_extra;
  {
    at::AutoGradMode grad_on(true);
    k_as_values = k.detach().requires_grad_(true);
    pk = attend(q.detach(), k.detach(), k_as_values);
    if (pk.out.requires_grad()) {
      dk_extra = torch::autograd::grad({pk.out}, {k_as_values}, {(dlse_rows * q.to(acc)).to(pk.out.scalar_type())},
                                       /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
    }
  }
  g.dq.add_(dlse_rows * pk.out.detach().to(acc), scale);
  if (!dk_extra.empty() && dk_extra[0].defined()) g.dk.add_(dk_extra[0].to(acc), scale);
  return g;
}

}  // namespace ssa::parallel
