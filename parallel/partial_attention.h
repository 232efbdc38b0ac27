#pragma once
// Building blocks of context-parallel attention over partial key sets:
// - PartialSum: the running log-sum-exp merge of partial results (fp32; fp64 for
//   fp64 inputs) on row ranges of the local sequence.
// - pair_gradients: the exact gradients w.r.t. q, k, v of one partial result's
//   share in the merged output, from the merged output and lse.
#include <ATen/ATen.h>

#include <functional>

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

// One kernel call on a part of the keys: (q, k, v) -> out, lse.
using Attend = std::function<kernels::AttentionResult(const at::Tensor&, const at::Tensor&, const at::Tensor&)>;

struct PairGradients {
  at::Tensor dq, dk, dv;  // accumulation dtype, shapes of q, k, v
};

// The part p = attend(q, k, v) entered the merged result as
//   O = sum_p w_p o_p, w_p = exp(lse_p - lse), lse = logsumexp_p lse_p,
// so given dO: dL/do_p = w_p dO and dL/dlse_p = w_p (<dO, o_p> - <dO, O>) per row
// and head. Recomputes the part with autograd and backpropagates both. When the
// kernel's lse carries no gradient (LibTorch's fused SDPA), the lse term
// (dS = P * dlse, row-wise) is applied explicitly: dq += scale * dlse * (P K),
// and dk += scale * P^T (dlse * q), the latter as the value-gradient of a second
// call that uses K as values.
//   grad_out, out: [B, Sq, Hq, D]; lse: [B, Hq, Sq] (the merged result's rows).
PairGradients pair_gradients(const Attend& attend, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse);

}  // namespace ssa::parallel
