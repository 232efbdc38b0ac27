#pragma once
// The CUDA implementations behind kernels/attention.h, used when the tensors are
// on a GPU and the build links the CUDA runtime (SSA_WITH_CUDA). Same layouts,
// semantics and autograd behaviour as the reference; attention.cpp dispatches here.
#include <array>

#include "kernels/attention.h"

namespace ssa::kernels::cuda {

// True when this binary carries the CUDA kernels and a GPU is visible.
bool available();

#ifdef SSA_WITH_CUDA
// Whether the kernels take these inputs (see Backend::kAuto); top_k 0: no
// selection, so no top-k limit; any_float: q and k are converted to bf16 by the call.
bool supports(const at::Tensor& q, const at::Tensor& k, int64_t top_k, int64_t block_size, bool any_float);
at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& pooled, const SparseOptions& options,
                         QueryRows q_rows);
// kernels::pool_keys in one kernel (result in k's dtype, no autograd); undefined when k
// does not fit it (not a CUDA bf16/fp16/fp32 tensor, or it needs a gradient).
at::Tensor pool_keys(const at::Tensor& k, int64_t block_size);
AttentionResult sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& block_ids, const SparseOptions& options, QueryRows q_rows,
                                 int64_t k_start);
AttentionGrads sparse_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                         const at::Tensor& block_ids, const SparseOptions& options, QueryRows q_rows,
                                         int64_t k_start);
// sparse_attention_backward adding its dq, dk, dv into fp32 accumulators shaped
// like q, k, v (dims 1-3 contiguous, any batch stride); false (nothing done) when
// they or the options (deterministic) do not fit, then the caller adds the results.
bool sparse_attention_backward_into(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                    const at::Tensor& block_ids, const SparseOptions& options, QueryRows q_rows,
                                    int64_t k_start, at::Tensor& dq_acc, at::Tensor& dk_acc, at::Tensor& dv_acc,
                                    SideJoin* join = nullptr);
AttentionStats attention_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& block_ids,
                               int64_t block_size);
// kernels::merge_into for fp32 CUDA accumulators; false (nothing done) when the
// inputs do not fit the kernel (then the caller uses the ATen formula).
bool merge_into(at::Tensor& acc_out, at::Tensor& acc_lse, const AttentionResult& part);
// kernels::merge_row_partials and kernels::add_row_terms in one kernel; an
// undefined result (nothing done) when the inputs do not fit it.
AttentionResult merge_row_partials(int64_t rows, const std::vector<RowPartial>& parts, at::ScalarType out_type);
at::Tensor add_row_terms(const at::Tensor& base, const std::vector<RowTerm>& terms, at::ScalarType out_type);
// kernels::gate_and_align's kernels: whether they take these inputs (CUDA bf16
// streams [B, S, H, D] with D even, gate [B, S, H, 1]); the forward -> {out, the
// loss}; the backward -> {d_full, d_sparse, d_gate} (grad_out, grad_ls, grad_lc
// may be undefined: zero).
bool align_fits(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& gate);
std::array<at::Tensor, 2> align_forward(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& gate,
                                        bool pass_full, bool after_gate, double beta);
std::array<at::Tensor, 3> align_backward(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& gate,
                                         const at::Tensor& grad_out, const at::Tensor& grad_ls,
                                         const at::Tensor& grad_lc, bool pass_full, bool after_gate, double beta);
// x rotated by cos/sin as kernels::rotate_pairs (inverse: the other way), with
// no autograd; undefined when the inputs do not fit the kernel.
at::Tensor rotate_pairs(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse);
#endif

}  // namespace ssa::kernels::cuda
