#pragma once
// Rotary position embedding (Llama convention: the two halves of each head are
// the rotated pairs) at global token positions, so context-parallel chunks and
// single-process runs rotate identically.
#include <ATen/ATen.h>

namespace ssa::core {

struct RotaryTable {
  at::Tensor cos;  // [S_local, D/2] fp32
  at::Tensor sin;  // [S_local, D/2] fp32
};

// positions: [S_local] int64 global positions. scaling > 1 interpolates positions
// (position / scaling), the RoPE scaling used for continual training at 32K.
RotaryTable rotary_table(const at::Tensor& positions, int64_t head_dim, double theta, double scaling);

// x: [B, S_local, H, D] -> same shape and dtype, rotated.
at::Tensor apply_rotary(const at::Tensor& x, const RotaryTable& table);

}  // namespace ssa::core
