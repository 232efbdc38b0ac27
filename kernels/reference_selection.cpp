// Reference block selection (ssa-method.md): mean-pooled keys per block, per query
// head a softmax over the causal blocks of q . kbar / sqrt(D), summed over the
// heads of each GQA group, the query's own block forced, the top_k best in
// ascending id order, -1 padding. Runs without gradient, in chunks of queries so
// the score matrix stays O(chunk * Nb).
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/reference_attention.h"

namespace ssa::kernels::reference {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Score entries per chunk (Hq * rows * Nb): 16M fp32 values, 64 MiB.
constexpr int64_t kChunkScores = int64_t{1} << 24;

// score [B, Hkv, R, Nb] with R rows whose current (own) block is cur [R]:
// non-causal blocks dropped, cur forced, the top_k best (ties to the lower id)
// in ascending order, -1 after them. -> [B, Hkv, R, top_k] int32
at::Tensor top_blocks(const at::Tensor& score, const at::Tensor& cur, int64_t top_k) {
  const int64_t nb = score.size(-1);
  const at::Tensor blocks = at::arange(nb, cur.options());
  const at::Tensor causal = blocks.view({1, nb}) <= cur.view({-1, 1});  // [R, Nb]
  const at::Tensor own = blocks.view({1, nb}) == cur.view({-1, 1});
  at::Tensor s = score.masked_fill(causal.logical_not(), -kInf).masked_fill(own, kInf);
  const int64_t keep = std::min(top_k, nb);
  // A stable descending sort keeps equal scores in id order, so ties go to the
  // lower block id on every backend.
  auto [values, order] = s.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true);
  values = values.narrow(-1, 0, keep);
  order = order.narrow(-1, 0, keep);
  // Non-causal picks (score -inf) sort after every real id, then become -1.
  order = at::where(values == -kInf, at::full_like(order, nb), order);
  order = std::get<0>(order.sort(-1));
  order = at::where(order == nb, at::full_like(order, -1), order).to(at::kInt);
  if (keep < top_k) {
    std::vector<int64_t> pad_shape(order.sizes().begin(), order.sizes().end());
    pad_shape.back() = top_k - keep;
    order = at::cat({order, at::full(pad_shape, -1, order.options())}, -1);
  }
  return order;
}

}  // namespace

at::Tensor pool_keys(const at::Tensor& k, int64_t block_size) {
  const int64_t b = k.size(0), sk = k.size(1), hkv = k.size(2), d = k.size(3);
  const int64_t nb = (sk + block_size - 1) / block_size;
  const at::ScalarType ct = compute_type(k.scalar_type());
  if (nb == 0) return at::zeros({b, 0, hkv, d}, k.options());
  // Zero-pad to whole blocks, sum each block, divide by the keys it really has;
  // the means in k's dtype (rounded once, as a mean of bf16 keys in PyTorch).
  const at::Tensor padded = at::constant_pad_nd(k.to(ct), {0, 0, 0, 0, 0, nb * block_size - sk});
  const at::Tensor sums = padded.view({b, nb, block_size, hkv, d}).sum(2);  // [B, Nb, Hkv, D]
  at::Tensor counts = at::full({nb}, static_cast<double>(block_size), k.options().dtype(ct));
  counts[nb - 1] = static_cast<double>(sk - (nb - 1) * block_size);
  return (sums / counts.view({1, nb, 1, 1})).to(k.scalar_type());
}

at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& pooled, const SparseOptions& options, int64_t q_start,
                         int64_t chunk_rows) {
  at::NoGradGuard no_grad;  // the router receives no gradient
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t nb = pooled.size(1), hkv = pooled.size(2), group = hq / hkv;
  const int64_t bs = options.block_size;
  const bool per_block = options.mode == SelectionMode::kQueryBlock;
  const at::ScalarType ct = compute_type(q.scalar_type());
  const auto long_opts = q.options().dtype(at::kLong);
  at::Tensor ids = at::full({b, sq, hkv, options.top_k}, -1, q.options().dtype(at::kInt));
  if (sq == 0) return ids;

  const at::Tensor pk = pooled.detach().to(ct).permute({0, 2, 3, 1});  // [B, Hkv, D, Nb]
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  // Whole query blocks per chunk, so a query block (query_block mode, where
  // q_start % block_size == 0) never straddles two chunks.
  const int64_t auto_rows = kChunkScores / std::max<int64_t>(1, hq * nb);
  const int64_t wanted = chunk_rows > 0 ? chunk_rows : auto_rows;
  const int64_t rows = std::max<int64_t>(1, (wanted + bs - 1) / bs) * bs;
  for (int64_t c0 = 0; c0 < sq; c0 += rows) {
    const int64_t c = std::min(rows, sq - c0);
    // qg [B, Hkv, c*G, D] (query-major, head-minor) x pk -> scores [B, Hkv, c, G, Nb]
    const at::Tensor qg = q.detach().narrow(1, c0, c).to(ct).reshape({b, c, hkv, group, d}).permute({0, 2, 1, 3, 4});
    const at::Tensor scores =
        at::matmul(qg.reshape({b, hkv, c * group, d}), pk).mul_(scale).view({b, hkv, c, group, nb});
    const at::Tensor cur = at::div(at::arange(q_start + c0, q_start + c0 + c, long_opts), bs, "floor");  // [c]
    const at::Tensor causal = at::arange(nb, long_opts).view({1, nb}) <= cur.view({c, 1});
    // Per query head softmax over its causal blocks (block 0 is always causal,
    // so no row is empty), then the GQA group sum: [B, Hkv, c, Nb].
    const at::Tensor probs = scores.masked_fill(causal.logical_not().view({1, 1, c, 1, nb}), -kInf).softmax(-1);
    const at::Tensor group_score = probs.sum(3);
    at::Tensor chosen;  // [B, Hkv, c, top_k]
    if (!per_block) {
      chosen = top_blocks(group_score, cur, options.top_k);
    } else {
      // The queries of one block share a set scored by their mean probability
      // (a last partial block averages the queries it has; the ranking equals
      // that of the sum).
      const int64_t nqb = (c + bs - 1) / bs;
      const at::Tensor padded = at::constant_pad_nd(group_score, {0, 0, 0, nqb * bs - c});
      at::Tensor counts = at::full({nqb}, static_cast<double>(bs), group_score.options());
      counts[nqb - 1] = static_cast<double>(c - (nqb - 1) * bs);
      const at::Tensor block_score = padded.view({b, hkv, nqb, bs, nb}).sum(3) / counts.view({1, 1, nqb, 1});
      const at::Tensor block_cur = at::arange(nqb, long_opts) + (q_start + c0) / bs;
      chosen = top_blocks(block_score, block_cur, options.top_k).repeat_interleave(bs, 2).narrow(2, 0, c);
    }
    ids.narrow(1, c0, c).copy_(chosen.permute({0, 2, 1, 3}));
  }
  return ids;
}

}  // namespace ssa::kernels::reference
