#pragma once
// Cross-entropy over a tied output projection, computed in chunks of tokens so
// the [tokens, vocab] logits never exist at once (forward and backward both
// recompute one chunk's logits at a time).
#include <ATen/ATen.h>

namespace ssa::core {

// hidden: [N, H] (model dtype), weight: [V, H] (the tied embedding), labels: [N] int64.
// Returns the mean over the N tokens of -log softmax(hidden @ weight^T)[label],
// as an fp32 scalar differentiable w.r.t. hidden and weight. Logits are fp32.
at::Tensor chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                 int64_t chunk_tokens);

}  // namespace ssa::core
