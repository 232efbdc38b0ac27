// kernels::full_attention_backward: the gradients of one part (a chunk pair) of a
// merged full-attention result, from the merged output and log-sum-exp, as a
// ring backward needs them. Recomputing the part's forward under autograd would
// be exact too, but LibTorch's fused forward gives its lse no gradient, which
// costs an extra forward and backward per pair; the softmax rebuilt from the
// merged lse already is this part's share of the merged softmax.
//
// Layouts as kernels/attention.h. Paths:
// - CUDA, bf16/fp16, D % 8 == 0, D <= 256, and a pair that is either the same
//   positions (q_start == k_start, Sq == Sk: causal) or entirely in the past
//   (every key at or before the first query: no mask): the fused backward the
//   fused forward's autograd runs (cuDNN, or flash for larger head dims), fed
//   with the merged out and lse, over [B, H, S, D] views.
// - Otherwise: the matmul formula in chunks of queries, fp32 (fp64 for fp64).
#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <tuple>

#include "kernels/attention.h"
#include "kernels/attention_checks.h"
#include "kernels/reference_attention.h"

namespace ssa::kernels {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Scores per chunk of the matmul path (elements of one [.., rows, Sk] matrix).
constexpr int64_t kChunkElements = int64_t{16} << 20;

void check_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, int64_t q_start, int64_t k_start,
                  int64_t chunk_rows) {
  constexpr const char* fn = "full_attention_backward";
  check_merged_grad_inputs(fn, dout, q, k, v, out, lse);
  check_starts(fn, q_start, k_start);
  if (chunk_rows < 0) {
    throw std::runtime_error(fmt::format("kernels::{}: chunk_rows must be >= 0 (0: automatic), got {}", fn, chunk_rows));
  }
}

// The fused flash kernels want a unit last stride (a gradient may arrive expanded).
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

bool fused_usable(const at::Tensor& q) {
  const at::ScalarType dtype = q.scalar_type();
  const int64_t d = q.size(3);
  return q.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf) && d % 8 == 0 && d <= 256;
}

// LibTorch's fused backward over [B, H, S, D] views; causal is top-left aligned
// (Sq == Sk here). Same positions or all keys in the past only. cuDNN where
// reference::cudnn_attention_usable (GQA native: dK/dV come per kv head); else
// the flash backward with each kv head repeated over its query heads and the
// gradients summed back over the group in fp32.
AttentionGrads fused_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& lse, bool causal) {
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t sk = k.size(1), hkv = k.size(2), group = hq / hkv;
  const at::ScalarType dtype = q.scalar_type();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const at::Tensor qh = unit_last_stride(q).transpose(1, 2);
  // out and dout in one layout ([B, S, H, D] memory), as the forward returns out.
  const at::Tensor oh = out.to(dtype).contiguous().transpose(1, 2);
  const at::Tensor doh = dout.to(dtype).contiguous().transpose(1, 2);
  if (reference::cudnn_attention_usable(q, k)) {
    const at::Tensor lse4 = lse.to(at::kFloat).contiguous().view({b, hq, sq, 1});
    // Dropout is off, so the random state is never read; no bias, no packed
    // (variable-length) sequences.
    const at::Tensor none, seed = at::empty({}, q.options().dtype(at::kLong)), offset = at::empty_like(seed);
    at::Tensor dqh, dkh, dvh;  // dq [B, Hq, Sq, D]; dk, dv [B, Hkv, Sk, D]
    std::tie(dqh, dkh, dvh) = at::_scaled_dot_product_cudnn_attention_backward(
        doh, qh, unit_last_stride(k).transpose(1, 2), unit_last_stride(v).transpose(1, 2), oh, lse4, seed, offset,
        none, none, none, sq, sk, 0.0, causal, scale);
    return {dqh.transpose(1, 2).contiguous(), dkh.transpose(1, 2).to(k.scalar_type()).contiguous(),
            dvh.transpose(1, 2).to(v.scalar_type()).contiguous()};
  }
  auto per_query_head = [group](const at::Tensor& t) { return group == 1 ? t : t.repeat_interleave(group, 2); };
  const at::Tensor kh = unit_last_stride(per_query_head(k)).transpose(1, 2);
  const at::Tensor vh = unit_last_stride(per_query_head(v)).transpose(1, 2);
  const at::Tensor lse_f = lse.to(at::kFloat).contiguous();  // [B, Hq, Sq], read as a dense array
  // Dropout is off, so the random state is never read; shaped as the forward returns it.
  const at::Tensor seed = at::empty({2}, q.options().dtype(at::kUInt64));
  const at::Tensor offset = at::empty({}, q.options().dtype(at::kUInt64));
  at::Tensor dqh, dkh, dvh;  // [B, Hq, S, D]
  std::tie(dqh, dkh, dvh) = at::_scaled_dot_product_flash_attention_backward(
      doh, qh, kh, vh, oh, lse_f, at::Tensor(), at::Tensor(), sq, sk, 0.0, causal, seed, offset, scale);
  // [B, Hq, Sk, D] -> [B, Sk, Hkv, D], summing the G query heads of each kv head.
  auto per_kv_head = [&](const at::Tensor& g, at::ScalarType type) {
    const at::Tensor t = g.transpose(1, 2);
    if (group == 1) return t.to(type).contiguous();
    return t.to(at::kFloat).reshape({b, sk, hkv, group, d}).sum(3).to(type);
  };
  return {dqh.transpose(1, 2).contiguous(), per_kv_head(dkh, k.scalar_type()), per_kv_head(dvh, v.scalar_type())};
}

// The formula of attention.h with the position mask, chunk_rows queries at a time.
AttentionGrads matmul_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, const at::Tensor& lse, int64_t q_start, int64_t k_start,
                               int64_t chunk_rows) {
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t sk = k.size(1), hkv = k.size(2), group = hq / hkv;
  const at::ScalarType ct = reference::compute_type(q.scalar_type());
  const auto opts = q.options().dtype(ct);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  if (chunk_rows == 0) chunk_rows = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, b * hq * sk));
  const at::Tensor kh = k.to(ct).permute({0, 2, 1, 3});  // [B, Hkv, Sk, D]
  const at::Tensor vh = v.to(ct).permute({0, 2, 1, 3});
  const at::Tensor kpos = at::arange(k_start, k_start + sk, q.options().dtype(at::kLong));
  at::Tensor dq = at::empty({b, sq, hq, d}, opts);
  at::Tensor dk = at::zeros({b, hkv, sk, d}, opts);
  at::Tensor dv = at::zeros({b, hkv, sk, d}, opts);
  for (int64_t r0 = 0; r0 < sq; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, sq - r0);
    // [B, n, Hq, D] -> [B, Hkv, G*n, D]: the G heads of a kv head stacked so one
    // matmul serves them (and dK/dV sum over them).
    auto rows = [&](const at::Tensor& t) {
      return t.narrow(1, r0, n).to(ct).reshape({b, n, hkv, group, d}).permute({0, 2, 3, 1, 4}).reshape(
          {b, hkv, group * n, d});
    };
    const at::Tensor qc = rows(q), doc = rows(dout), oc = rows(out);
    const at::Tensor lc = lse.narrow(2, r0, n).to(ct).reshape({b, hkv, group * n, 1});  // head h = kv * G + g
    const at::Tensor qpos = at::arange(q_start + r0, q_start + r0 + n, kpos.options());
    // [n, Sk] causal mask, repeated over the G stacked heads; rows empty in the
    // merged result (lse -inf) get no probability at all.
    const at::Tensor causal = (kpos.unsqueeze(0) <= qpos.unsqueeze(1)).repeat({group, 1});
    const at::Tensor valid = at::logical_and(causal, lc != -kInf);  // [B, Hkv, G*n, Sk]
    const at::Tensor lc_safe = at::where(lc == -kInf, at::zeros_like(lc), lc);
    const at::Tensor s = at::matmul(qc, kh.transpose(-1, -2)).mul_(scale);  // [B, Hkv, G*n, Sk]
    const at::Tensor p = at::where(valid, (s - lc_safe).exp(), at::zeros_like(s));
    dv.add_(at::matmul(p.transpose(-1, -2), doc));
    const at::Tensor delta = (doc * oc).sum(-1, true);  // rowsum(dO * O): [B, Hkv, G*n, 1]
    const at::Tensor ds = p * (at::matmul(doc, vh.transpose(-1, -2)) - delta);
    dk.add_(at::matmul(ds.transpose(-1, -2), qc), scale);
    const at::Tensor dqc = at::matmul(ds, kh).mul_(scale);  // [B, Hkv, G*n, D]
    dq.narrow(1, r0, n).copy_(dqc.view({b, hkv, group, n, d}).permute({0, 3, 1, 2, 4}).reshape({b, n, hq, d}));
  }
  return {dq.to(q.scalar_type()), dk.permute({0, 2, 1, 3}).to(k.scalar_type()).contiguous(),
          dv.permute({0, 2, 1, 3}).to(v.scalar_type()).contiguous()};
}

}  // namespace

AttentionGrads full_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                       int64_t q_start, int64_t k_start, int64_t chunk_rows) {
  check_inputs(dout, q, k, v, out, lse, q_start, k_start, chunk_rows);
  const int64_t sq = q.size(1), q_last = q_start + sq - 1;
  auto zeros = [](const at::Tensor& like) { return at::zeros_like(like, at::MemoryFormat::Contiguous); };
  if (sq == 0 || k.size(1) == 0 || k_start > q_last) return {zeros(q), zeros(k), zeros(v)};  // no key visible to any row
  // Keys after the last query are masked for every row (zero gradient): drop
  // them, as the forward does, so q_start == k_start with Sk > Sq is fused too.
  const int64_t sk = std::min(k.size(1), q_last - k_start + 1);
  const at::Tensor kt = k.narrow(1, 0, sk), vt = v.narrow(1, 0, sk);
  AttentionGrads g;
  const bool same = q_start == k_start && sq == sk;
  const bool past = k_start + sk - 1 <= q_start;
  if ((same || past) && fused_usable(q)) {
    g = fused_backward(dout, q, kt, vt, out, lse, /*causal=*/same);
  } else {
    g = matmul_backward(dout, q, kt, vt, out, lse, q_start, k_start, chunk_rows);
  }
  if (sk == k.size(1)) return g;
  AttentionGrads padded{g.dq, zeros(k), zeros(v)};
  padded.dk.narrow(1, 0, sk).copy_(g.dk);
  padded.dv.narrow(1, 0, sk).copy_(g.dv);
  return padded;
}

}  // namespace ssa::kernels
