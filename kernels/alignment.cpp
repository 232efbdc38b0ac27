#include "kernels/alignment.h"

#include <torch/csrc/autograd/custom_function.h>

#include <fmt/format.h>

#include <stdexcept>

#include "kernels/cuda_attention.h"

namespace ssa::kernels {

GatedAlignment gate_and_align_reference(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& gate,
                                        bool pass_full, bool after_gate, double beta) {
  const at::Tensor gated_full = full * gate, gated_sparse = sparse * gate;
  // Loss math in fp32.
  const at::Tensor h_full = (after_gate ? gated_full : full).to(at::kFloat);
  const at::Tensor h_sparse = (after_gate ? gated_sparse : sparse).to(at::kFloat);
  const auto mean = at::Reduction::Mean;
  GatedAlignment r;
  r.sparsity_loss = at::smooth_l1_loss(h_full, h_sparse.detach(), mean, beta);
  r.commitment_loss = at::smooth_l1_loss(h_full.detach(), h_sparse, mean, beta);
  r.out = pass_full ? gated_full : gated_sparse;
  return r;
}

#ifdef SSA_WITH_CUDA
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Outputs {out, L_s, L_c}; L_s and L_c hold the same value and differ in which
// stream their gradient reaches.
class GateAlignFunction : public torch::autograd::Function<GateAlignFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& full, const at::Tensor& sparse,
                               const at::Tensor& gate, bool pass_full, bool after_gate, double beta) {
    auto [out, loss] = cuda::align_forward(full, sparse, gate, pass_full, after_gate, beta);
    ctx->save_for_backward({full, sparse, gate});
    ctx->saved_data["pass_full"] = pass_full;
    ctx->saved_data["after_gate"] = after_gate;
    ctx->saved_data["beta"] = beta;
    return {out, loss, loss.clone()};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [df, ds, dg] = cuda::align_backward(saved[0], saved[1], saved[2], grads[0], grads[1], grads[2],
                                             ctx->saved_data["pass_full"].toBool(),
                                             ctx->saved_data["after_gate"].toBool(), ctx->saved_data["beta"].toDouble());
    return {df, ds, dg, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace
#endif

GatedAlignment gate_and_align(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& gate,
                              bool pass_full, bool after_gate, double beta) {
  if (!full.defined() || !sparse.defined() || !gate.defined() || full.dim() != 4 || sparse.sizes() != full.sizes() ||
      gate.dim() != 4 || gate.size(3) != 1 || gate.sizes().slice(0, 3) != full.sizes().slice(0, 3)) {
    throw std::invalid_argument(
        "kernels::gate_and_align: need full and sparse [B, S, H, D] of one shape and gate [B, S, H, 1]");
  }
  if (!(beta >= 0)) {
    throw std::invalid_argument(fmt::format("kernels::gate_and_align: beta must be >= 0, got {}", beta));
  }
#ifdef SSA_WITH_CUDA
  if (cuda::align_fits(full, sparse, gate)) {
    const variable_list r = GateAlignFunction::apply(full, sparse, gate, pass_full, after_gate, beta);
    return {r[0], r[1], r[2]};
  }
#endif
  return gate_and_align_reference(full, sparse, gate, pass_full, after_gate, beta);
}

}  // namespace ssa::kernels
