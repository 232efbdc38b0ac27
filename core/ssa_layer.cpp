#include "core/ssa_layer.h"

#include <fmt/format.h>

#include <stdexcept>

#include "kernels/alignment.h"
#include "parallel/context_attention.h"

namespace ssa::core {

AttentionMode parse_attention_mode(const std::string& name) {
  if (name == "ssa") return AttentionMode::kSsa;
  if (name == "full") return AttentionMode::kFull;
  if (name == "sparse") return AttentionMode::kSparse;
  throw std::invalid_argument(fmt::format("attention.mode '{}': must be one of ssa, full, sparse", name));
}

LayerAttention ssa_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gate,
                             const StreamSettings& settings, parallel::AttentionMemo* memo) {
  parallel::StreamRequest request;
  request.full = settings.mode != AttentionMode::kSparse;
  request.sparse = settings.mode != AttentionMode::kFull;
  auto streams =
      parallel::attention_streams(q, k, v, settings.seq_len, settings.sparse, request, settings.cp_group, {}, memo);

  LayerAttention result;
  result.bytes_full = streams.bytes_full;
  result.bytes_sparse = streams.bytes_sparse;
  if (settings.mode != AttentionMode::kSsa) {  // one stream, no alignment
    result.out = (settings.mode == AttentionMode::kFull ? streams.full : streams.sparse) * gate;
    result.sparsity_loss = at::zeros({}, q.options().dtype(at::kFloat));
    result.commitment_loss = result.sparsity_loss;
    return result;
  }
  // Gated streams, the drawn one passed on, and the alignment losses between the
  // per-head outputs before o_proj, after (default) or before the output gate.
  const kernels::GatedAlignment aligned = kernels::gate_and_align(
      streams.full, streams.sparse, gate, settings.pass_full, settings.align_after_gate, settings.smooth_l1_beta);
  result.sparsity_loss = aligned.sparsity_loss;
  result.commitment_loss = aligned.commitment_loss;
  result.out = aligned.out;
  return result;
}

}  // namespace ssa::core
