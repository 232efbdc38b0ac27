// Reference eval statistics of the full causal attention distribution
// (ssa-method.md, Metrics): per (query, head) the share of the attention mass
// inside the selected blocks (sparsity) and the Shannon entropy in bits. Queries
// are processed in chunks so memory stays O(chunk * Sk); no gradient.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>

#include "kernels/reference_attention.h"

namespace ssa::kernels::reference {
namespace {

// Probability entries per chunk (Hq * rows * Sk): 16M fp32 values, 64 MiB.
constexpr int64_t kChunkProbs = int64_t{1} << 24;

}  // namespace

AttentionStats attention_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& block_ids,
                               int64_t block_size, int64_t chunk_rows) {
  at::NoGradGuard no_grad;
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t sk = k.size(1), hkv = k.size(2), group = hq / hkv;
  const int64_t nb = (sk + block_size - 1) / block_size;
  const at::ScalarType ct = compute_type(q.scalar_type());
  const auto long_opts = q.options().dtype(at::kLong);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));

  const at::Tensor kh = k.detach().to(ct).permute({0, 2, 3, 1});  // [B, Hkv, D, Sk]
  const at::Tensor kpos = at::arange(sk, long_opts);
  const int64_t rows = chunk_rows > 0 ? chunk_rows : std::max<int64_t>(1, kChunkProbs / std::max<int64_t>(1, hq * sk));
  at::Tensor sparsity_sum = at::zeros({}, q.options().dtype(at::kDouble));
  at::Tensor entropy_sum = at::zeros({}, q.options().dtype(at::kDouble));
  for (int64_t c0 = 0; c0 < sq; c0 += rows) {
    const int64_t c = std::min(rows, sq - c0);
    // qg [B, Hkv, c*G, D] x kh -> log-probabilities [B, Hkv, c, G, Sk]
    const at::Tensor qg = q.detach().narrow(1, c0, c).to(ct).reshape({b, c, hkv, group, d}).permute({0, 2, 1, 3, 4});
    const at::Tensor scores =
        at::matmul(qg.reshape({b, hkv, c * group, d}), kh).mul_(scale).view({b, hkv, c, group, sk});
    const at::Tensor qpos = at::arange(c0, c0 + c, long_opts);
    const at::Tensor causal = (kpos.view({1, sk}) <= qpos.view({c, 1})).view({1, 1, c, 1, sk});
    const at::Tensor logp =
        scores.masked_fill(causal.logical_not(), -std::numeric_limits<double>::infinity()).log_softmax(-1);
    const at::Tensor p = logp.exp();
    // Entropy in bits; masked keys (p = 0) contribute 0, not 0 * -inf.
    const at::Tensor plogp = at::where(p > 0, p * logp, at::zeros_like(p));
    entropy_sum -= plogp.sum(at::kDouble) / std::numbers::ln2;

    // Mass per key block [B, Hkv, c, G, Nb] (a last partial block zero-padded).
    const at::Tensor block_mass =
        at::constant_pad_nd(p, {0, nb * block_size - sk}).view({b, hkv, c, group, nb, block_size}).sum(-1);
    // Selected-block indicator [B, Hkv, c, 1, Nb]; -1 slots land in an extra
    // column that is dropped.
    const at::Tensor ids = block_ids.narrow(1, c0, c).to(at::kLong);
    const at::Tensor slot = at::where(ids < 0, at::full_like(ids, nb), ids);
    const at::Tensor selected = at::zeros({b, c, hkv, nb + 1}, p.options())
                                    .scatter_(3, slot, 1.0)
                                    .narrow(3, 0, nb)
                                    .permute({0, 2, 1, 3})
                                    .unsqueeze(3);
    sparsity_sum += (block_mass * selected).sum(at::kDouble);
  }
  AttentionStats stats;
  stats.count = b * sq * hq;
  if (stats.count > 0) {
    stats.sparsity = sparsity_sum.item<double>() / static_cast<double>(stats.count);
    stats.entropy_bits = entropy_sum.item<double>() / static_cast<double>(stats.count);
  }
  return stats;
}

}  // namespace ssa::kernels::reference
