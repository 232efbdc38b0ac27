#pragma once
// The SSA attention step of one layer (ssa-method.md): from one q, k, v compute
// the stream(s) the mode asks for, gate them, pass on the drawn stream and, in
// ssa mode, return the two alignment losses:
//   L_s = SmoothL1(h_full, sg(h_sparse))   (full imitates sparse)
//   L_c = SmoothL1(sg(h_full), h_sparse)   (sparse stays near full)
#include <ATen/ATen.h>

#include <string>

#include "kernels/attention.h"

namespace ssa::parallel {
class Communicator;
struct AttentionMemo;
}

namespace ssa::core {

enum class AttentionMode { kSsa, kFull, kSparse };
AttentionMode parse_attention_mode(const std::string& name);  // "ssa" | "full" | "sparse"

struct StreamSettings {
  AttentionMode mode = AttentionMode::kSsa;
  bool pass_full = true;           // ssa: the stream drawn for this forward pass
  bool align_after_gate = true;    // compare gated outputs (reference code) or raw ones
  double smooth_l1_beta = 1.0;
  kernels::SparseOptions sparse;
  int64_t seq_len = 0;             // global sequence length (context parallel)
  parallel::Communicator* cp_group = nullptr;  // nullptr: one rank holds the sequence
};

struct LayerAttention {
  at::Tensor out;              // [B, S_local, Hq, D] gated output passed on to o_proj
  at::Tensor sparsity_loss;    // fp32 scalar L_s (zero unless ssa)
  at::Tensor commitment_loss;  // fp32 scalar L_c
  int64_t bytes_full = 0;      // bytes moved over cp by each stream (0 on one rank)
  int64_t bytes_sparse = 0;
};

// q: [B, S_local, Hq, D] (rotated), k/v: [B, S_local, Hkv, D] (k rotated),
// gate: [B, S_local, Hq, 1] sigmoid output gate.
// memo: see parallel::attention_streams (filled by a call without gradients,
// replayed by the layer's re-run for its backward).
LayerAttention ssa_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gate,
                             const StreamSettings& settings, parallel::AttentionMemo* memo = nullptr);

}  // namespace ssa::core
