#pragma once
// Input checks shared by every attention backend (reference and CUDA): each throws
// std::runtime_error naming the function, the argument, the value and the rule.
#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "kernels/attention.h"

namespace ssa::kernels {

// "[2, 16, 4, 8]" for messages; "undefined" for an undefined tensor.
std::string shape_string(const at::Tensor& t);

// Shapes of q [B, Sq, Hq, D] against k, v [B, Sk, Hkv, D]: ranks, equal batch and
// head dim, k and v alike, Hq % Hkv == 0, one device and one floating dtype.
void check_qkv(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// q against k only (selection and statistics need no values).
void check_qk(const char* fn, const at::Tensor& q, const at::Tensor& k);

// pooled [B, Nb, Hkv, D] floating, on q's device, matching q's batch and head dim,
// Hq % Hkv == 0.
void check_pooled(const char* fn, const at::Tensor& q, const at::Tensor& pooled);

// block_size > 0, top_k > 0.
void check_options(const char* fn, const SparseOptions& options);

// block_ids: int32 [B, Sq, Hkv, top_k] on q's device. With check_values also
// every value >= -1, the valid ids of a row strictly ascending and the -1 slots
// after them; that part reads the values back (a device sync).
void check_block_ids(const char* fn, const at::Tensor& block_ids, const at::Tensor& q, int64_t hkv,
                     bool check_values = true);

// Inputs of a backward from a merged result (full_attention_backward,
// sparse_attention_backward): q, k, v as check_qkv; dout and out the shape of q,
// floating, on q's device; lse [B, Hq, Sq] floating on q's device.
void check_merged_grad_inputs(const char* fn, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse);

// Positions must not be negative.
void check_starts(const char* fn, int64_t q_start, int64_t k_start);

}  // namespace ssa::kernels
