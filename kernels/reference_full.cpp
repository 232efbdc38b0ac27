// Reference full causal attention (fused SDPA where it fits, else matmul/softmax),
// the masked softmax with log-sum-exp shared with the sparse path, and the
// log-sum-exp merge of partial results.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <tuple>

#include "kernels/attention_checks.h"
#include "kernels/reference_attention.h"

namespace ssa::kernels::reference {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// k, v [B, Sk, Hkv, D] -> [B, Sk, Hq, D]: kv head h serves query heads
// [h*G, (h+1)*G), so each head is repeated G times in place (autograd sums back).
at::Tensor repeat_kv(const at::Tensor& t, int64_t group) {
  if (group == 1) return t;
  return t.repeat_interleave(group, 2);
}

// Output of an empty or fully masked attention: out 0, lse -inf, no graph.
AttentionResult empty_result(const at::Tensor& q) {
  return {at::zeros_like(q, at::MemoryFormat::Contiguous),
          at::full({q.size(0), q.size(2), q.size(1)}, -kInf, q.options().dtype(compute_type(q.scalar_type())))};
}

// Fused SDPA through the ATen entry points that also return the log-sum-exp.
// causal: key j visible to query i iff j <= i (top-left aligned, Sq == Sk here);
// otherwise every key is visible. nullopt when no fused kernel takes the input.
std::optional<AttentionResult> fused_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               bool causal) {
  const int64_t group = q.size(2) / k.size(2);
  const int64_t sq = q.size(1);
  const int64_t d = q.size(3);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const at::ScalarType dtype = q.scalar_type();
  // [B, S, H, D] -> [B, H, S, D] views; the kernels take strided inputs with a unit last stride.
  const at::Tensor qh = q.transpose(1, 2);
  at::Tensor out;  // [B, Hq, Sq, D]
  at::Tensor lse;  // [B, Hq, >= Sq] (cuDNN: [B, Hq, Sq, 1])
  if (cudnn_attention_usable(q, k)) {
    // cuDNN takes the kv heads as they are (GQA without repeating K/V).
    auto res = at::_scaled_dot_product_cudnn_attention(qh, k.transpose(1, 2), v.transpose(1, 2), std::nullopt,
                                                       /*compute_log_sumexp=*/true, 0.0, causal, false, scale);
    return AttentionResult{std::get<0>(res).transpose(1, 2).contiguous(),
                           std::get<1>(res).reshape({q.size(0), q.size(2), sq}).to(at::kFloat).contiguous()};
  }
  const at::Tensor kh = repeat_kv(k, group).transpose(1, 2);
  const at::Tensor vh = repeat_kv(v, group).transpose(1, 2);
  if (q.is_cpu()) {
    if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kBFloat16 && dtype != at::kHalf) {
      return std::nullopt;
    }
    std::tie(out, lse) = at::_scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, std::nullopt, scale);
  } else if (q.is_cuda()) {
    if ((dtype == at::kBFloat16 || dtype == at::kHalf) && d % 8 == 0 && d <= 256) {
      auto res = at::_scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, false, scale);
      out = std::get<0>(res);
      lse = std::get<1>(res);
    } else if (dtype == at::kFloat && d % 8 == 0 && d <= 256) {
      // Memory-efficient kernel: the fused fp32 path; its lse is padded along Sq.
      auto res = at::_scaled_dot_product_efficient_attention(qh, kh, vh, std::nullopt, true, 0.0, causal, scale);
      out = std::get<0>(res);
      lse = std::get<1>(res);
    } else {
      return std::nullopt;
    }
  } else {
    return std::nullopt;
  }
  return AttentionResult{out.transpose(1, 2).contiguous(), lse.narrow(2, 0, sq).to(compute_type(dtype)).contiguous()};
}

// Matmul/softmax attention with an explicit position mask; any offsets. Memory
// O(Sq * Sk) per head.
AttentionResult matmul_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_start,
                                 int64_t k_start) {
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t sk = k.size(1), hkv = k.size(2), group = hq / hkv;
  const at::ScalarType ct = compute_type(q.scalar_type());
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  // qh [B, Hkv, G*Sq, D]: the G heads of a kv head stacked so one matmul serves them.
  const at::Tensor qh =
      q.to(ct).reshape({b, sq, hkv, group, d}).permute({0, 2, 3, 1, 4}).reshape({b, hkv, group * sq, d});
  const at::Tensor kh = k.to(ct).permute({0, 2, 1, 3});  // [B, Hkv, Sk, D]
  const at::Tensor vh = v.to(ct).permute({0, 2, 1, 3});  // [B, Hkv, Sk, D]
  const at::Tensor scores = at::matmul(qh, kh.transpose(-1, -2)).mul_(scale).view({b, hkv, group, sq, sk});
  const auto opts = q.options().dtype(at::kLong);
  const at::Tensor qpos = at::arange(q_start, q_start + sq, opts);
  const at::Tensor kpos = at::arange(k_start, k_start + sk, opts);
  const at::Tensor valid = kpos.unsqueeze(0) <= qpos.unsqueeze(1);  // [Sq, Sk]
  const MaskedSoftmax sm = masked_softmax(scores, valid);
  // probs [B, Hkv, G, Sq, Sk] @ v -> [B, Hkv, G*Sq, D]
  const at::Tensor out = at::matmul(sm.probs.reshape({b, hkv, group * sq, sk}), vh);
  return {out.view({b, hkv, group, sq, d}).permute({0, 3, 1, 2, 4}).reshape({b, sq, hq, d}).to(q.scalar_type()),
          sm.lse.reshape({b, hq, sq})};
}

}  // namespace

bool cudnn_attention_usable(const at::Tensor& q, const at::Tensor& k) {
  const at::ScalarType dtype = q.scalar_type();
  return q.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf) && q.size(3) % 8 == 0 && q.size(3) <= 128 &&
         q.size(1) % kCudnnLengthMultiple == 0 && k.size(1) % kCudnnLengthMultiple == 0;
}

at::ScalarType compute_type(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

MaskedSoftmax masked_softmax(const at::Tensor& scores, const at::Tensor& valid) {
  const at::Tensor s = scores.masked_fill(valid.logical_not(), -kInf);
  // The row max only shifts the exponent; it is taken without gradient (the
  // result does not depend on it) and replaced by 0 on empty rows so no
  // (-inf) - (-inf) appears.
  const at::Tensor m = std::get<0>(s.detach().max(-1, true));
  const at::Tensor m_safe = at::where(m == -kInf, at::zeros_like(m), m);
  const at::Tensor e = (s - m_safe).exp();
  const at::Tensor l = e.sum(-1, true);
  const at::Tensor empty = l == 0;
  const at::Tensor l_safe = at::where(empty, at::ones_like(l), l);
  const at::Tensor lse = at::where(empty, at::full_like(l, -kInf), l_safe.log() + m_safe);
  return {e / l_safe, lse.squeeze(-1)};
}

AttentionResult full_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_start,
                               int64_t k_start) {
  const int64_t sq = q.size(1), q_last = q_start + sq - 1;
  if (sq == 0 || k.size(1) == 0 || k_start > q_last) return empty_result(q);  // no key visible to any row
  // Keys after the last query are masked for every row: drop them (their
  // gradient is zero either way), so q_start == k_start with Sk > Sq is fused too.
  const int64_t sk = std::min(k.size(1), q_last - k_start + 1);
  const at::Tensor kt = k.narrow(1, 0, sk), vt = v.narrow(1, 0, sk);
  std::optional<AttentionResult> fused;
  if (q_start == k_start && sq == sk) {
    fused = fused_attention(q, kt, vt, /*causal=*/true);
  } else if (k_start + sk - 1 <= q_start) {
    fused = fused_attention(q, kt, vt, /*causal=*/false);  // every key precedes every query
  }
  if (fused) return *fused;
  return matmul_attention(q, kt, vt, q_start, k_start);
}

void merge_into(at::Tensor& acc_out, at::Tensor& acc_lse, const AttentionResult& part) {
  at::NoGradGuard no_grad;
  const at::Tensor lp = part.lse.to(acc_lse.scalar_type());
  // Shift by the larger lse; rows empty in both keep lse -inf and out 0.
  const at::Tensor m = at::maximum(acc_lse, lp);
  const at::Tensor m_safe = at::where(m == -kInf, at::zeros_like(m), m);
  const at::Tensor wa = (acc_lse - m_safe).exp();
  const at::Tensor wb = (lp - m_safe).exp();
  const at::Tensor total = wa + wb;
  const at::Tensor empty = total == 0;
  const at::Tensor total_safe = at::where(empty, at::ones_like(total), total);
  const at::Tensor merged = at::where(empty, at::full_like(total, -kInf), total_safe.log() + m_safe);
  // [B, H, n] weights as [B, n, H, 1] to scale rows of out.
  auto per_row = [](const at::Tensor& w) { return w.transpose(1, 2).unsqueeze(-1); };
  acc_out.mul_(per_row(wa / total_safe)).add_(part.out.to(acc_out.scalar_type()) * per_row(wb / total_safe));
  acc_lse.copy_(merged);
}

AttentionResult merge_partials(const AttentionResult& a, const AttentionResult& b) {
  if (!a.out.defined() || !b.out.defined() || !a.lse.defined() || !b.lse.defined() || a.out.sizes() != b.out.sizes() ||
      a.lse.sizes() != b.lse.sizes() || a.out.dim() != 4 || a.lse.dim() != 3 || a.lse.size(0) != a.out.size(0) ||
      a.lse.size(1) != a.out.size(2) || a.lse.size(2) != a.out.size(1)) {
    throw std::runtime_error(fmt::format(
        "kernels::merge_partials: both parts need out [B, Sq, Hq, D] and lse [B, Hq, Sq] of one shape, got out "
        "{} / {} and lse {} / {}",
        shape_string(a.out), shape_string(b.out), shape_string(a.lse), shape_string(b.lse)));
  }
  // The fused SDPA paths return an lse without gradient; merging such a part
  // under autograd would silently drop the gradient through the weights.
  for (const AttentionResult* part : {&a, &b}) {
    if (at::GradMode::is_enabled() && part->out.requires_grad() && !part->lse.requires_grad()) {
      throw std::runtime_error(
          "kernels::merge_partials: a part's out requires grad but its lse carries none (fused SDPA path), so the "
          "merged gradient would be wrong; merge inside a custom autograd Function or without gradient");
    }
  }
  const at::ScalarType ct = compute_type(a.lse.scalar_type());
  const at::Tensor la = a.lse.to(ct), lb = b.lse.to(ct);  // [B, Hq, Sq]
  // Shift by the larger lse (no gradient needed: it cancels); rows empty in both
  // parts keep lse -inf and out 0.
  const at::Tensor m = at::maximum(la, lb).detach();
  const at::Tensor m_safe = at::where(m == -kInf, at::zeros_like(m), m);
  const at::Tensor wa = (la - m_safe).exp(), wb = (lb - m_safe).exp();
  const at::Tensor total = wa + wb;
  const at::Tensor empty = total == 0;
  const at::Tensor total_safe = at::where(empty, at::ones_like(total), total);
  const at::Tensor lse = at::where(empty, at::full_like(total, -kInf), total_safe.log() + m_safe);
  // Weights [B, Hq, Sq] -> [B, Sq, Hq, 1] to scale the outputs.
  const at::Tensor ca = (wa / total_safe).transpose(1, 2).unsqueeze(-1);
  const at::Tensor cb = (wb / total_safe).transpose(1, 2).unsqueeze(-1);
  const at::Tensor out = ca * a.out.to(ct) + cb * b.out.to(ct);
  return {out.to(a.out.scalar_type()), lse};
}

}  // namespace ssa::kernels::reference
