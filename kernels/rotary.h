#pragma once
// Rotation of the two halves of each head by per-position angles (the rotary
// position embedding's arithmetic; core/rope.h builds the angles).
#include <ATen/ATen.h>

namespace ssa::kernels {

// x [B, S, H, D] (D even), cos/sin [S, D/2] fp32 -> x's shape and dtype:
//   y[..., :D/2] = x1 cos - x2 sin,  y[..., D/2:] = x2 cos + x1 sin
// computed in fp32 (x1, x2 the halves). Differentiable in x. CUDA bf16/fp32:
// one fused kernel forward and one backward (the inverse rotation); otherwise
// the same formula in ATen ops.
at::Tensor rotate_pairs(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// The ATen formula (the reference the fused kernel is tested against).
at::Tensor rotate_pairs_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace ssa::kernels
