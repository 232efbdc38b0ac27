#include "core/ssa_layer.h"

#include <fmt/format.h>

#include <stdexcept>

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
  auto zero = at::zeros({}, q.options().dtype(at::kFloat));
  result.sparsity_loss = zero;
  result.commitment_loss = zero;
  if (settings.mode == AttentionMode::kFull) {
    result.out = streams.full * gate;
    return result;
  }
  if (settings.mode == AttentionMode::kSparse) {
    result.out = streams.sparse * gate;
    return result;
  }
  auto full = streams.full * gate;
  auto sparse = streams.sparse * gate;
  // Aligned representations: per-head outputs before o_proj, after (default) or
  // before the output gate. Loss math in fp32.
  auto h_full = (settings.align_after_gate ? full : streams.full).to(at::kFloat);
  auto h_sparse = (settings.align_after_gate ? sparse : streams.sparse).to(at::kFloat);
  const auto mean = at::Reduction::Mean;
  result.sparsity_loss = at::smooth_l1_loss(h_full, h_sparse.detach(), mean, settings.smooth_l1_beta);
  result.commitment_loss = at::smooth_l1_loss(h_full.detach(), h_sparse, mean, settings.smooth_l1_beta);
  result.out = settings.pass_full ? full : sparse;
  return result;
}

}  // namespace ssa::core
