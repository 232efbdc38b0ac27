#pragma once
// The LibTorch reference backend behind kernels/attention.h: plain ATen ops on any
// device, differentiable through autograd. attention.cpp checks the inputs and
// dispatches here; these functions assume checked inputs. Layouts as attention.h.
#include <ATen/ATen.h>

#include <cstdint>

#include "kernels/attention.h"

namespace ssa::kernels::reference {

// Arithmetic type of the reference: fp64 inputs stay fp64 (finite-difference
// tests), everything else (fp32, bf16, fp16) is computed in fp32.
at::ScalarType compute_type(at::ScalarType input);

// Whether the fused full attention (forward and full_attention_backward) runs on
// cuDNN: CUDA bf16/fp16, head dim a multiple of 8 up to 128, query and key
// lengths multiples of kCudnnLengthMultiple (the lengths it was checked on
// against fp32; training lengths and ring chunks are). On Hopper it is ~1.6x
// LibTorch's flash kernel at head dim 64 and takes GQA without repeating K/V;
// everything else keeps the flash / efficient kernels.
constexpr int64_t kCudnnLengthMultiple = 64;
bool cudnn_attention_usable(const at::Tensor& q, const at::Tensor& k);

// Softmax over the last dim of scores restricted to the `valid` entries
// (broadcastable bool). A row with no valid entry gets probs 0 and lse -inf, with
// finite gradients (no NaN) in both outputs.
//   scores [..., L] -> probs [..., L], lse [...]
struct MaskedSoftmax {
  at::Tensor probs;
  at::Tensor lse;
};
MaskedSoftmax masked_softmax(const at::Tensor& scores, const at::Tensor& valid);

AttentionResult full_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_start,
                               int64_t k_start);

AttentionResult sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& block_ids, int64_t block_size, int64_t q_start, int64_t k_start);

// sparse_attention_backward (attention.h): recomputes the part under autograd.
AttentionGrads sparse_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                         const at::Tensor& block_ids, int64_t block_size, int64_t q_start,
                                         int64_t k_start);

AttentionResult merge_partials(const AttentionResult& a, const AttentionResult& b);
void merge_into(at::Tensor& acc_out, at::Tensor& acc_lse, const AttentionResult& part);

at::Tensor pool_keys(const at::Tensor& k, int64_t block_size);

// chunk_rows: queries per chunk (0: sized so a chunk's scores take ~64 MiB);
// select_blocks rounds it up to whole query blocks. Tests pass small values to
// cross chunk boundaries.
at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& pooled, const SparseOptions& options, int64_t q_start,
                         int64_t chunk_rows = 0);

AttentionStats attention_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& block_ids,
                               int64_t block_size, int64_t chunk_rows = 0);

}  // namespace ssa::kernels::reference
