// `ssa attn check`: the CUDA selection and sparse attention (forward and backward)
// against the reference backend on fp32 copies of the same bf16 inputs.
#include "kernels/cuda_attention_tools.h"

#ifdef SSA_WITH_CUDA
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>

#include "kernels/cuda_attention.h"

namespace ssa::kernels::cuda {
namespace {

struct Run {
  at::Tensor out, lse, dq, dk, dv;
};

Run run_sparse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ids,
               const SparseOptions& options, const at::Tensor& w_out, const at::Tensor& w_lse) {
  at::Tensor ql = q.detach().clone().requires_grad_(true);
  at::Tensor kl = k.detach().clone().requires_grad_(true);
  at::Tensor vl = v.detach().clone().requires_grad_(true);
  const AttentionResult r = sparse_attention(ql, kl, vl, ids, options);
  const at::Tensor lse = r.lse.to(at::kFloat);
  const at::Tensor loss = (r.out.to(at::kFloat) * w_out).sum() +
                          at::where(at::isfinite(lse), lse * w_lse, at::zeros_like(lse)).sum();
  const auto g = torch::autograd::grad({loss}, {ql, kl, vl});
  return {r.out.detach(), r.lse.detach(), g[0], g[1], g[2]};
}

// Worst amount by which a left-out causal block's fp64 group score exceeds the
// lowest kept one (the forced own block aside); <= 0 means an exact top-k.
double selection_gap(const at::Tensor& q, const at::Tensor& pooled, const at::Tensor& ids,
                     const SparseOptions& options) {
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t nb = pooled.size(1), hkv = pooled.size(2), g = hq / hkv, bs = options.block_size;
  const auto dev = q.device();
  const at::Tensor pd = pooled.to(at::kDouble);
  double worst = -INFINITY;
  const int64_t rows = std::max<int64_t>(bs, (512 / bs) * bs);  // whole query blocks per chunk
  for (int64_t c0 = 0; c0 < sq; c0 += rows) {
    const int64_t c = std::min(rows, sq - c0);
    const at::Tensor qd = q.narrow(1, c0, c).to(at::kDouble).view({b, c, hkv, g, d});
    const at::Tensor pos = at::arange(c0, c0 + c, at::TensorOptions().device(dev).dtype(at::kLong));
    const at::Tensor own = at::div(pos, bs, "floor");
    const at::Tensor blocks = at::arange(nb, pos.options());
    const at::Tensor causal = (blocks.view({1, nb}) <= own.view({c, 1})).view({1, c, 1, nb});
    const at::Tensor logits = at::einsum("bshgd,bnhd->bshgn", {qd, pd}) / std::sqrt(static_cast<double>(d));
    at::Tensor score = logits.masked_fill(causal.unsqueeze(3).logical_not(), -INFINITY).softmax(-1).sum(3);
    if (options.mode == SelectionMode::kQueryBlock) {
      const at::Tensor qb = at::div(at::arange(c, pos.options()), bs, "floor");
      const int64_t nqb = (c + bs - 1) / bs;
      const at::Tensor sums = at::zeros({b, nqb, hkv, nb}, score.options()).index_add_(1, qb, score);
      score = sums.index_select(1, qb);  // ranking by the sum equals ranking by the mean
    }
    score = score.masked_fill(causal.logical_not(), -INFINITY);
    const at::Tensor idl = ids.narrow(1, c0, c).to(at::kLong);
    const at::Tensor slot = at::where(idl >= 0, idl, at::full_like(idl, nb));
    const at::Tensor kept = at::zeros({b, c, hkv, nb + 1}, idl.options().dtype(at::kBool)).scatter_(3, slot, true).narrow(3, 0, nb);
    const at::Tensor is_own = blocks.view({1, 1, 1, nb}) == own.view({1, c, 1, 1});
    const at::Tensor kept_min = at::where(kept & is_own.logical_not(), score, at::full_like(score, INFINITY)).amin(-1);
    const at::Tensor out_max =
        at::where(kept.logical_not() & at::isfinite(score), score, at::full_like(score, -INFINITY)).amax(-1);
    // Rows with nothing left out or nothing kept besides the own block compare +-inf: no violation.
    const at::Tensor gap = at::where(at::isfinite(out_max) & at::isfinite(kept_min), out_max - kept_min,
                                     at::full_like(out_max, -INFINITY));
    worst = std::max(worst, gap.max().item<double>());
  }
  return worst;
}

TensorError compare(const std::string& name, const at::Tensor& got, const at::Tensor& want, const at::Tensor& spread) {
  auto stats = [](const at::Tensor& a, const at::Tensor& ref, double& max_abs, double& rel) {
    const at::Tensor x = a.to(at::kDouble), r = ref.to(at::kDouble);
    const at::Tensor finite = at::isfinite(r);
    const at::Tensor diff = at::where(finite, x - r, at::zeros_like(r));
    max_abs = diff.abs().max().item<double>();
    rel = diff.norm().item<double>() / std::max(at::where(finite, r, at::zeros_like(r)).norm().item<double>(), 1e-30);
  };
  TensorError e;
  e.name = name;
  stats(got, want, e.max_abs, e.rel);
  stats(spread, want, e.spread_abs, e.spread_rel);
  const at::Tensor w = want.to(at::kDouble);
  const double scale = at::where(at::isfinite(w), w.abs(), at::zeros_like(w)).max().item<double>();
  e.rel_bound = std::max(4 * e.spread_rel, 5e-3);
  e.abs_bound = std::max(8 * e.spread_abs, 1e-2 * scale);
  const bool same_inf = at::equal(at::isinf(got), at::isinf(want));
  const bool finite_got = !at::isnan(got).any().item<bool>();
  e.ok = same_inf && finite_got && e.rel <= e.rel_bound && e.max_abs <= e.abs_bound;
  return e;
}

}  // namespace

CheckReport check_against_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const SparseOptions& options, uint64_t seed) {
  at::manual_seed(seed);
  const at::Tensor qb = q.to(at::kBFloat16).contiguous(), kb = k.to(at::kBFloat16).contiguous(),
                   vb = v.to(at::kBFloat16).contiguous();
  const at::Tensor qf = qb.to(at::kFloat), kf = kb.to(at::kFloat), vf = vb.to(at::kFloat);
  SparseOptions on_cuda = options, on_reference = options;
  on_cuda.backend = Backend::kCuda;
  on_reference.backend = Backend::kReference;

  CheckReport report;
  // The pooled keys training feeds the selection: means of the bf16 keys, in bf16.
  const at::Tensor pooled = pool_keys(kb, options.block_size);
  const at::Tensor ids_cuda = select_blocks(qb, pooled, on_cuda);
  const at::Tensor ids_ref = select_blocks(qf, pooled, on_reference);
  report.selection_agree = (ids_cuda == ids_ref).all(-1).to(at::kDouble).mean().item<double>();
  report.selection_gap = selection_gap(qb, pooled, ids_cuda, options);
  report.selection_tol = 2e-5 * static_cast<double>(q.size(2) / k.size(2));
  report.selection_ok = report.selection_gap <= report.selection_tol;

  const at::Tensor w_out = at::randn(qb.sizes(), qf.options());
  const at::Tensor w_lse = at::randn({q.size(0), q.size(2), q.size(1)}, qf.options());
  const Run got = run_sparse(qb, kb, vb, ids_ref, on_cuda, w_out, w_lse);
  const Run want = run_sparse(qf, kf, vf, ids_ref, on_reference, w_out, w_lse);
  const Run spread = run_sparse(qb, kb, vb, ids_ref, on_reference, w_out, w_lse);
  report.errors = {compare("out", got.out, want.out, spread.out), compare("lse", got.lse, want.lse, spread.lse),
                   compare("dq", got.dq, want.dq, spread.dq), compare("dk", got.dk, want.dk, spread.dk),
                   compare("dv", got.dv, want.dv, spread.dv)};
  report.ok = report.selection_ok;
  for (const TensorError& e : report.errors) report.ok = report.ok && e.ok;

  auto cpu = [](const at::Tensor& t) { return t.detach().to(at::kCPU); };
  report.tensors = {{"q", cpu(qf)},
                    {"k", cpu(kf)},
                    {"v", cpu(vf)},
                    {"pooled_keys", cpu(pooled.to(at::kFloat))},  // the bf16 block means both selections ranked on
                    {"block_ids_cuda", cpu(ids_cuda)},
                    {"block_ids_reference", cpu(ids_ref)},
                    {"loss_weight_out", cpu(w_out)},
                    {"loss_weight_lse", cpu(w_lse)}};
  for (const auto& [tag, r] : {std::pair<std::string, const Run*>{"cuda", &got}, {"reference", &want}}) {
    report.tensors.push_back({tag + ".out", cpu(r->out)});
    report.tensors.push_back({tag + ".lse", cpu(r->lse)});
    report.tensors.push_back({tag + ".dq", cpu(r->dq)});
    report.tensors.push_back({tag + ".dk", cpu(r->dk)});
    report.tensors.push_back({tag + ".dv", cpu(r->dv)});
  }
  return report;
}

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
