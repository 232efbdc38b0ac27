#include "kernels/attention_checks.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <stdexcept>

namespace ssa::kernels {
namespace {

void check_rank4(const char* fn, const char* name, const at::Tensor& t) {
  if (!t.defined() || t.dim() != 4) {
    throw std::runtime_error(
        fmt::format("kernels::{}: {} must be a 4-D tensor [B, S, H, D], got shape {}", fn, name, shape_string(t)));
  }
  if (!at::isFloatingType(t.scalar_type())) {
    throw std::runtime_error(
        fmt::format("kernels::{}: {} must be a floating tensor, got {}", fn, name, c10::toString(t.scalar_type())));
  }
}

}  // namespace

std::string shape_string(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  return fmt::format("[{}]", fmt::join(t.sizes(), ", "));
}

void check_qk(const char* fn, const at::Tensor& q, const at::Tensor& k) {
  check_rank4(fn, "q", q);
  check_rank4(fn, "k", k);
  if (q.size(0) != k.size(0) || q.size(3) != k.size(3)) {
    throw std::runtime_error(fmt::format("kernels::{}: q {} and k {} must agree in batch (dim 0) and head dim (dim 3)",
                                         fn, shape_string(q), shape_string(k)));
  }
  if (k.size(2) == 0 || q.size(2) % k.size(2) != 0) {
    throw std::runtime_error(fmt::format(
        "kernels::{}: query heads Hq = {} must be a multiple of kv heads Hkv = {} (GQA)", fn, q.size(2), k.size(2)));
  }
  if (q.size(3) == 0) throw std::runtime_error(fmt::format("kernels::{}: head dim D must be > 0", fn));
  if (q.device() != k.device()) {
    throw std::runtime_error(
        fmt::format("kernels::{}: q is on {} but k on {}", fn, q.device().str(), k.device().str()));
  }
  if (q.scalar_type() != k.scalar_type()) {
    throw std::runtime_error(fmt::format("kernels::{}: q is {} but k is {}; they must have one dtype", fn,
                                         c10::toString(q.scalar_type()), c10::toString(k.scalar_type())));
  }
}

void check_qkv(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_qk(fn, q, k);
  check_rank4(fn, "v", v);
  if (v.sizes() != k.sizes()) {
    throw std::runtime_error(
        fmt::format("kernels::{}: v {} must have the shape of k {}", fn, shape_string(v), shape_string(k)));
  }
  if (v.device() != k.device() || v.scalar_type() != k.scalar_type()) {
    throw std::runtime_error(fmt::format("kernels::{}: v ({}, {}) must have the device and dtype of k ({}, {})", fn,
                                         v.device().str(), c10::toString(v.scalar_type()), k.device().str(),
                                         c10::toString(k.scalar_type())));
  }
}

void check_pooled(const char* fn, const at::Tensor& q, const at::Tensor& pooled) {
  check_rank4(fn, "q", q);
  check_rank4(fn, "pooled", pooled);
  if (q.size(0) != pooled.size(0) || q.size(3) != pooled.size(3)) {
    throw std::runtime_error(
        fmt::format("kernels::{}: q {} and pooled {} must agree in batch (dim 0) and head dim (dim 3)", fn,
                    shape_string(q), shape_string(pooled)));
  }
  if (pooled.size(2) == 0 || q.size(2) % pooled.size(2) != 0) {
    throw std::runtime_error(fmt::format("kernels::{}: query heads Hq = {} must be a multiple of pooled kv heads {}",
                                         fn, q.size(2), pooled.size(2)));
  }
  if (q.device() != pooled.device()) {
    throw std::runtime_error(
        fmt::format("kernels::{}: q is on {} but pooled on {}", fn, q.device().str(), pooled.device().str()));
  }
}

void check_options(const char* fn, const SparseOptions& options) {
  if (options.block_size <= 0) {
    throw std::runtime_error(fmt::format("kernels::{}: block_size must be > 0, got {}", fn, options.block_size));
  }
  if (options.top_k <= 0) {
    throw std::runtime_error(fmt::format("kernels::{}: top_k must be > 0, got {}", fn, options.top_k));
  }
}

void check_starts(const char* fn, int64_t q_start, int64_t k_start) {
  if (q_start < 0 || k_start < 0) {
    throw std::runtime_error(
        fmt::format("kernels::{}: q_start ({}) and k_start ({}) must be >= 0", fn, q_start, k_start));
  }
}

void check_block_ids(const char* fn, const at::Tensor& block_ids, const at::Tensor& q, int64_t hkv,
                     bool check_values) {
  if (!block_ids.defined() || block_ids.dim() != 4 || block_ids.size(0) != q.size(0) ||
      block_ids.size(1) != q.size(1) || block_ids.size(2) != hkv || block_ids.size(3) == 0) {
    throw std::runtime_error(
        fmt::format("kernels::{}: block_ids must be [B, Sq, Hkv, top_k] = [{}, {}, {}, >0], got {}", fn, q.size(0),
                    q.size(1), hkv, shape_string(block_ids)));
  }
  if (block_ids.scalar_type() != at::kInt) {
    throw std::runtime_error(
        fmt::format("kernels::{}: block_ids must be int32, got {}", fn, c10::toString(block_ids.scalar_type())));
  }
  if (block_ids.device() != q.device()) {
    throw std::runtime_error(
        fmt::format("kernels::{}: block_ids is on {} but q on {}", fn, block_ids.device().str(), q.device().str()));
  }
  if (!check_values || block_ids.numel() == 0) return;
  // One reduction, one sync: a value < -1, a valid id not above its left
  // neighbour, or a valid id after a -1 slot breaks the layout.
  const at::Tensor left = block_ids.narrow(3, 0, block_ids.size(3) - 1);
  const at::Tensor right = block_ids.narrow(3, 1, block_ids.size(3) - 1);
  const at::Tensor bad_order = (right != -1) & ((left == -1) | (right <= left));
  const bool bad = ((block_ids < -1).any() | bad_order.any()).item<bool>();
  if (bad) {
    throw std::runtime_error(fmt::format(
        "kernels::{}: block_ids rows must hold ids >= 0 in strictly ascending order followed by -1 slots", fn));
  }
}

void check_merged_grad_inputs(const char* fn, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  check_qkv(fn, q, k, v);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"dout", dout}, {"out", out}}) {
    if (!t.defined() || t.sizes() != q.sizes()) {
      throw std::runtime_error(fmt::format("kernels::{}: {} must have the shape of q {}, got {}", fn, name,
                                           shape_string(q), shape_string(t)));
    }
    if (!at::isFloatingType(t.scalar_type()) || t.device() != q.device()) {
      throw std::runtime_error(fmt::format("kernels::{}: {} must be a floating tensor on q's device {}, got {} on {}",
                                           fn, name, q.device().str(), c10::toString(t.scalar_type()),
                                           t.device().str()));
    }
  }
  if (!lse.defined() || lse.dim() != 3 || lse.size(0) != q.size(0) || lse.size(1) != q.size(2) ||
      lse.size(2) != q.size(1)) {
    throw std::runtime_error(fmt::format("kernels::{}: lse must be [B, Hq, Sq] = [{}, {}, {}], got {}", fn, q.size(0),
                                         q.size(2), q.size(1), shape_string(lse)));
  }
  if (!at::isFloatingType(lse.scalar_type()) || lse.device() != q.device()) {
    throw std::runtime_error(fmt::format("kernels::{}: lse must be a floating tensor on q's device {}, got {} on {}",
                                         fn, q.device().str(), c10::toString(lse.scalar_type()),
                                         lse.device().str()));
  }
}

}  // namespace ssa::kernels
