// Reference block-sparse attention: gathers, per (query, kv head), the keys and
// values of the selected blocks and runs a masked softmax over them. Memory is
// O(Sq * top_k * block_size) per head; nothing of size Sq * Sk is formed.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <limits>

#include "kernels/reference_attention.h"

namespace ssa::kernels::reference {

AttentionResult sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& block_ids, int64_t block_size, int64_t q_start, int64_t k_start) {
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t sk = k.size(1), hkv = k.size(2), group = hq / hkv;
  const int64_t top_k = block_ids.size(3), slots = top_k * block_size;
  const at::ScalarType ct = compute_type(q.scalar_type());
  if (sq == 0 || sk == 0) {
    return {at::zeros_like(q, at::MemoryFormat::Contiguous),
            at::full({b, hq, sq}, -std::numeric_limits<double>::infinity(), q.options().dtype(ct))};
  }
  const auto long_opts = q.options().dtype(at::kLong);

  // Global key position of every slot: pos [B, Sq, Hkv, top_k, block_size].
  const at::Tensor ids = block_ids.to(at::kLong).unsqueeze(-1);
  const at::Tensor pos = ids * block_size + at::arange(block_size, long_opts);
  const at::Tensor local = pos - k_start;  // row in this k/v chunk
  const at::Tensor qpos = at::arange(q_start, q_start + sq, long_opts).view({1, sq, 1, 1, 1});
  // A slot counts when its block is selected (id >= 0), the key lies in this
  // chunk (which also drops the missing tail of a last partial block) and it is
  // causal for the query (the mask inside the query's own block).
  const at::Tensor valid = ((ids >= 0) & (local >= 0) & (local < sk) & (pos <= qpos)).reshape({b, sq, hkv, slots});

  // The gather is an embedding lookup: its backward (a sort-based segment sum) is
  // deterministic, unlike the atomic index_add behind index_select. Invalid slots
  // read some row of their (batch, head) and are masked out.
  at::Tensor kg, vg;  // [B, Sq, Hkv, slots, D]
  const at::Tensor head =  // (batch, kv head) index: [B, 1, Hkv, 1]
      at::arange(b, long_opts).view({b, 1, 1, 1}) * hkv + at::arange(hkv, long_opts).view({1, 1, hkv, 1});
  if (k_start % block_size == 0) {
    // Blocks line up with the rows: one lookup per selected block (top_k per
    // query and head rather than top_k * block_size) in k seen as [B * Hkv * nb,
    // block_size * D], zero rows padding a last partial block.
    const int64_t nb = (sk + block_size - 1) / block_size, pad = nb * block_size - sk;
    auto as_blocks = [&](const at::Tensor& t) {
      const at::Tensor c = pad > 0 ? at::constant_pad_nd(t.to(ct), {0, 0, 0, 0, 0, pad}) : t.to(ct);
      return c.permute({0, 2, 1, 3}).reshape({b * hkv * nb, block_size * d});
    };
    const at::Tensor block_rows = head * nb + (ids.squeeze(-1) - k_start / block_size).clamp(0, nb - 1);
    kg = at::embedding(as_blocks(k), block_rows).view({b, sq, hkv, slots, d});
    vg = at::embedding(as_blocks(v), block_rows).view({b, sq, hkv, slots, d});
  } else {
    // Row of each slot in k laid out [B * Hkv * Sk, D].
    const at::Tensor rows = head * sk + local.reshape({b, sq, hkv, slots}).clamp(0, sk - 1);
    kg = at::embedding(k.to(ct).permute({0, 2, 1, 3}).reshape({b * hkv * sk, d}), rows);
    vg = at::embedding(v.to(ct).permute({0, 2, 1, 3}).reshape({b * hkv * sk, d}), rows);
  }

  // qg [B, Sq, Hkv, G, D] x kg^T -> scores [B, Sq, Hkv, G, slots]
  const at::Tensor qg = q.to(ct).reshape({b, sq, hkv, group, d});
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const at::Tensor scores = at::matmul(qg, kg.transpose(-1, -2)).mul_(scale);
  const MaskedSoftmax sm = masked_softmax(scores, valid.unsqueeze(3));
  const at::Tensor out = at::matmul(sm.probs, vg);  // [B, Sq, Hkv, G, D]
  return {out.reshape({b, sq, hq, d}).to(q.scalar_type()), sm.lse.reshape({b, sq, hq}).permute({0, 2, 1}).contiguous()};
}

AttentionGrads sparse_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                         const at::Tensor& block_ids, int64_t block_size, int64_t q_start,
                                         int64_t k_start) {
  const at::ScalarType ct = compute_type(q.scalar_type());
  const auto zeros = [ct](const at::Tensor& like) { return at::zeros(like.sizes(), like.options().dtype(ct)); };
  // The part under autograd (grad mode is off inside a backward).
  at::Tensor qg, kg, vg;
  AttentionResult part;
  {
    at::AutoGradMode grad_on(true);
    qg = q.detach().to(ct).requires_grad_(true);
    kg = k.detach().to(ct).requires_grad_(true);
    vg = v.detach().to(ct).requires_grad_(true);
    part = sparse_attention(qg, kg, vg, block_ids, block_size, q_start, k_start);
  }
  at::NoGradGuard no_grad;
  if (!part.out.requires_grad()) return {zeros(q), zeros(k), zeros(v)};  // no key of this part
  // [B, H, S] row statistics as [B, S, H, 1].
  auto per_row = [](const at::Tensor& stat) { return stat.transpose(1, 2).unsqueeze(-1); };
  const at::Tensor d = dout.to(ct), lse_m = lse.to(ct), lse_p = part.lse.detach();
  // w = exp(lse_part - lse); 0 where the merged row is empty (then lse_part is -inf too).
  const at::Tensor empty = at::isinf(lse_m).logical_and(lse_m < 0);
  const at::Tensor zero = at::zeros_like(lse_m);
  const at::Tensor w = at::where(empty, zero, (lse_p - at::where(empty, zero, lse_m)).exp());
  const at::Tensor dot_part = (d * part.out.detach()).sum(-1);  // [B, S, H]
  const at::Tensor dot_merged = (d * out.to(ct)).sum(-1);
  const at::Tensor grad_lse = w * (dot_part - dot_merged).transpose(1, 2);
  std::vector<at::Tensor> g;
  {
    at::AutoGradMode grad_on(true);
    g = torch::autograd::grad({part.out, part.lse}, {qg, kg, vg}, {per_row(w) * d, grad_lse},
                              /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
  }
  return {g[0].defined() ? g[0] : zeros(q), g[1].defined() ? g[1] : zeros(k), g[2].defined() ? g[2] : zeros(v)};
}

}  // namespace ssa::kernels::reference
