#pragma once
// The running log-sum-exp merge of partial attention results (fp32; fp64 for
// fp64 inputs) on row ranges of the local sequence, for context parallelism. The
// gradients of each part's share come from kernels::full_attention_backward and
// kernels::sparse_attention_backward, given the merged output and lse.
#include <ATen/ATen.h>

#include "kernels/attention.h"

namespace ssa::parallel {

// Accumulates out [B, S, H, D] and lse [B, H, S] over disjoint key sets.
class PartialSum {
 public:
  // An empty sum: out 0, lse -inf (a row that never gets a key stays so).
  PartialSum(int64_t batch, int64_t rows, int64_t heads, int64_t head_dim, const at::TensorOptions& options);
  // Merges `part` (out [B, n, H, D], lse [B, H, n]) into rows [row, row + n).
  void add(int64_t row, const kernels::AttentionResult& part);
  const at::Tensor& out() const { return out_; }  // accumulation dtype (fp32 / fp64)
  const at::Tensor& lse() const { return lse_; }

 private:
  at::Tensor out_;
  at::Tensor lse_;
};

// fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (finite-difference tests).
at::ScalarType accumulation_type(at::ScalarType input);

}  // namespace ssa::parallel
