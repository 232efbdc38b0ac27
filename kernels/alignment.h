#pragma once
// The end of the SSA attention step (ssa-method.md): both streams gated, the
// drawn one passed on, and the two alignment losses between them
//   L_s = SmoothL1(h_full, sg(h_sparse)),  L_c = SmoothL1(sg(h_full), h_sparse)
// (means over all elements; h = the gated streams, or the raw ones when
// after_gate is false). On a GPU with bf16 streams: one fused kernel forward and
// one backward, losses summed in fp32 in a fixed order; otherwise ATen ops.
#include <ATen/ATen.h>

namespace ssa::kernels {

struct GatedAlignment {
  at::Tensor out;              // [B, S, H, D] (pass_full ? full : sparse) * gate, dtype of the streams
  at::Tensor sparsity_loss;    // fp32 scalar L_s
  at::Tensor commitment_loss;  // fp32 scalar L_c (same value, other gradient)
};

// full, sparse [B, S, H, D] of one dtype, gate [B, S, H, 1]; beta >= 0 (0: L1).
// Differentiable in full, sparse and gate.
GatedAlignment gate_and_align(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& gate,
                              bool pass_full, bool after_gate, double beta);

// The ATen formula (what the fused kernels are tested against).
GatedAlignment gate_and_align_reference(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& gate,
                                        bool pass_full, bool after_gate, double beta);

}  // namespace ssa::kernels
