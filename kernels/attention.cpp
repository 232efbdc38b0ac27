// Entry points of kernels/attention.h: input checks, backend choice, dispatch to
// the reference (reference_*.cpp) or, with Backend::kCuda, to the CUDA kernels.
//
// Formulations of the reference backend (LibTorch ops, CPU or CUDA tensors):
// - Full attention. Keys after the last query are dropped first (masked for
//   every row). Then, when q and k start at one position and Sq == Sk, or when
//   every key precedes every query (a context-parallel chunk from the past),
//   fused SDPA that also returns the log-sum-exp:
//   _scaled_dot_product_flash_attention_for_cpu on CPU (fp32/fp64/bf16/fp16),
//   _scaled_dot_product_cudnn_attention on CUDA for bf16/fp16 with D <= 128 and
//   lengths that are multiples of 64 (GQA native), else
//   _scaled_dot_product_flash_attention for bf16/fp16, and
//   _scaled_dot_product_efficient_attention for fp32 (D % 8 == 0, D <= 256);
//   GQA by repeating each kv head over its query heads. Their lse output carries
//   no gradient (out does). Every other case (partial causal overlap of the
//   chunks, other dtypes or head dims) is matmul + masked softmax with the mask
//   from global positions, memory O(Sq * Sk), and there the lse is
//   differentiable too. A chunk whose keys all lie in the future returns out 0
//   and lse -inf without a graph.
// - Masked softmax: rows are shifted by their (gradient-free) max; a row with no
//   visible key gets probs 0 and lse -inf and finite gradients.
// - Sparse attention: for each (query, kv head) the keys and values of the
//   top_k selected blocks are gathered into [top_k * block_size] slots
//   (an embedding lookup, whose backward is deterministic on CPU and CUDA, so
//   options.deterministic holds; memory O(Sq * top_k * block_size)); a slot is masked
//   when its id is -1, its position is outside this k chunk [k_start,
//   k_start + Sk) (which also covers the missing tail of a last partial block)
//   or it is after the query (the causal mask inside the query's own block).
//   out and lse are both differentiable.
// - Selection (no gradient): pooled keys are block means (a last partial block
//   averages the keys it has); per query head softmax over the causal blocks
//   (first position <= the query's) of q . kbar / sqrt(D), summed over the GQA
//   group; the own block scored +inf, non-causal blocks -inf; a stable
//   descending sort (ties to the lower id) gives the top_k, sorted ascending,
//   -inf picks turned into -1. Query-block mode ranks by the mean over the
//   block's queries (same order as the sum). Queries run in chunks so the
//   scores stay O(chunk * Nb).
// - Statistics (no gradient): the full causal softmax per chunk of queries
//   (O(chunk * Sk)); sparsity = mass in the selected blocks, entropy in bits,
//   both averaged over batch, queries and heads.
// - Merge: lse = logaddexp(lse_a, lse_b) in fp32 (fp64 for fp64), out weighted by
//   exp(lse_x - lse); rows empty in both parts stay 0 / -inf; differentiable in
//   the parts' out and lse. Under autograd a part whose out requires grad but
//   whose lse has none (fused path) is refused: its merged gradient would be
//   wrong. Context-parallel merging runs inside its own autograd Function.
// Arithmetic is fp32 for fp32/bf16/fp16 inputs and fp64 for fp64 inputs.
#include "kernels/attention.h"

#include <ATen/core/grad_mode.h>
#include <fmt/format.h>

#include <limits>
#include <stdexcept>

#include "kernels/attention_checks.h"
#include "kernels/cuda_attention.h"
#include "kernels/reference_attention.h"

namespace ssa::kernels {

#ifndef SSA_WITH_CUDA
// A build without the CUDA kernels: the CUDA engineer's definition is compiled
// only with SSA_WITH_CUDA.
bool cuda::available() { return false; }
#endif

namespace {

bool cuda_usable(const at::Device& device) {
#ifdef SSA_WITH_CUDA
  return device.is_cuda() && cuda::available();
#else
  (void)device;
  return false;
#endif
}

// Throws unless the CUDA backend can run on q's device in this build.
void require_cuda(const char* fn, const at::Tensor& q) {
#ifdef SSA_WITH_CUDA
  if (!q.is_cuda() || !cuda::available()) {
    throw std::runtime_error(fmt::format(
        "kernels::{}: backend cuda needs CUDA tensors and a visible GPU, got tensors on {}", fn, q.device().str()));
  }
#else
  throw std::runtime_error(
      fmt::format("kernels::{}: backend cuda requested, but this build has no CUDA kernels (configure with "
                  "-DSSA_CUDA_RUNTIME=ON on a machine with nvcc and LibTorch's CUDA libraries)",
                  fn));
#endif
}

}  // namespace

SelectionMode parse_selection_mode(const std::string& name) {
  if (name == "token") return SelectionMode::kToken;
  if (name == "query_block") return SelectionMode::kQueryBlock;
  throw std::runtime_error(
      fmt::format("kernels: unknown selection mode '{}' (expected 'token' or 'query_block')", name));
}

Backend resolve_backend(const std::string& name, const at::Device& device) {
  if (name == "reference") return Backend::kReference;
  if (name == "auto") return cuda_usable(device) ? Backend::kAuto : Backend::kReference;
  if (name == "cuda") {
    if (cuda_usable(device)) return Backend::kCuda;
#ifdef SSA_WITH_CUDA
    throw std::runtime_error(fmt::format(
        "kernels: attention backend 'cuda' needs a CUDA device with a visible GPU, got device {}", device.str()));
#else
    throw std::runtime_error(
        "kernels: attention backend 'cuda' requested, but this build has no CUDA kernels (configure with "
        "-DSSA_CUDA_RUNTIME=ON), use 'auto' or 'reference'");
#endif
  }
  throw std::runtime_error(
      fmt::format("kernels: unknown attention backend '{}' (expected 'auto', 'reference' or 'cuda')", name));
}

namespace {

// runs_on_cuda, with fn naming the call when Backend::kCuda cannot run.
bool use_cuda(const char* fn, Backend backend, const at::Tensor& q, const at::Tensor& k, int64_t top_k,
              int64_t block_size, bool any_float = false) {
  switch (backend) {
    case Backend::kReference: return false;
    case Backend::kCuda: require_cuda(fn, q); return true;
    case Backend::kAuto:
#ifdef SSA_WITH_CUDA
      return cuda_usable(q.device()) && cuda::supports(q, k, top_k, block_size, any_float);
#else
      (void)k, (void)top_k, (void)block_size, (void)any_float;
      return false;
#endif
  }
  return false;
}

// The start positions checks, and a two-run call's split inside [0, Sq] with the
// late run after the early one.
void check_rows(const char* fn, const QueryRows& rows, int64_t sq, int64_t k_start) {
  check_starts(fn, rows.start, k_start);
  if (rows.two() && (rows.split > sq || rows.late_start < rows.start + rows.split)) {
    throw std::runtime_error(fmt::format(
        "kernels::{}: two query runs need 0 <= split ({}) <= Sq ({}) and a late start ({}) >= start ({}) + split",
        fn, rows.split, sq, rows.late_start, rows.start));
  }
}

// The non-empty runs of consecutive positions of Sq query rows: what the
// reference, which takes one start position, computes one call each.
struct RowRun {
  int64_t row = 0, len = 0, start = 0;
};
std::vector<RowRun> row_runs(const QueryRows& rows, int64_t sq) {
  if (!rows.two()) return {{0, sq, rows.start}};
  std::vector<RowRun> runs;
  if (rows.split > 0) runs.push_back({0, rows.split, rows.start});
  if (rows.split < sq) runs.push_back({rows.split, sq - rows.split, rows.late_start});
  if (runs.empty()) runs.push_back({0, 0, rows.start});
  return runs;
}

}  // namespace

bool runs_on_cuda(Backend backend, const at::Tensor& q, const at::Tensor& k, int64_t top_k, int64_t block_size,
                  bool any_float) {
  return use_cuda("attention", backend, q, k, top_k, block_size, any_float);
}

AttentionResult full_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_start,
                               int64_t k_start) {
  check_qkv("full_attention", q, k, v);
  check_starts("full_attention", q_start, k_start);
  return reference::full_attention(q, k, v, q_start, k_start);
}

at::Tensor pool_keys(const at::Tensor& k, int64_t block_size) {
  if (!k.defined() || k.dim() != 4 || !at::isFloatingType(k.scalar_type())) {
    throw std::runtime_error("kernels::pool_keys: k must be a floating 4-D tensor [B, Sk, Hkv, D]");
  }
  if (block_size <= 0) {
    throw std::runtime_error(fmt::format("kernels::pool_keys: block_size must be > 0, got {}", block_size));
  }
#ifdef SSA_WITH_CUDA
  if (k.is_cuda()) {
    at::Tensor pooled = cuda::pool_keys(k, block_size);
    if (pooled.defined()) return pooled;
  }
#endif
  return reference::pool_keys(k, block_size);
}

at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& pooled, const SparseOptions& options,
                         QueryRows q_rows) {
  check_pooled("select_blocks", q, pooled);
  check_options("select_blocks", options);
  check_rows("select_blocks", q_rows, q.size(1), 0);
  if (q.size(1) > 0) {
    const int64_t last = q_rows.position(q.size(1) - 1), last_block = last / options.block_size;
    if (last_block >= pooled.size(1)) {
      throw std::runtime_error(fmt::format(
          "kernels::select_blocks: the last query (position {}) is in block {}, but pooled covers only blocks "
          "[0, {}); pooled must cover every key the queries may see",
          last, last_block, pooled.size(1)));
    }
  }
  if (options.mode == SelectionMode::kQueryBlock &&
      (q_rows.start % options.block_size != 0 ||
       (q_rows.two() && (q_rows.split % options.block_size != 0 || q_rows.late_start % options.block_size != 0)))) {
    throw std::runtime_error(
        fmt::format("kernels::select_blocks: query_block selection needs the query rows' start ({}), split ({}) "
                    "and late start ({}) to be multiples of block_size ({}) so no query block is split",
                    q_rows.start, q_rows.split, q_rows.late_start, options.block_size));
  }
  if (use_cuda("select_blocks", options.backend, q, pooled, options.top_k, options.block_size)) {
#ifdef SSA_WITH_CUDA
    return cuda::select_blocks(q, pooled, options, q_rows);
#endif
  }
  std::vector<at::Tensor> parts;
  for (const RowRun& run : row_runs(q_rows, q.size(1))) {
    parts.push_back(reference::select_blocks(q.narrow(1, run.row, run.len), pooled, options, run.start));
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts, 1);
}

AttentionResult sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& block_ids, const SparseOptions& options, QueryRows q_rows,
                                 int64_t k_start) {
  check_qkv("sparse_attention", q, k, v);
  check_options("sparse_attention", options);
  check_rows("sparse_attention", q_rows, q.size(1), k_start);
  const bool on_cuda = use_cuda("sparse_attention", options.backend, q, k, 0, options.block_size);
  // The CUDA path skips the value check: it would stall the stream with a sync
  // on every call, and its ids come from select_blocks.
  check_block_ids("sparse_attention", block_ids, q, k.size(2), !on_cuda);
  if (on_cuda) {
#ifdef SSA_WITH_CUDA
    return cuda::sparse_attention(q, k, v, block_ids, options, q_rows, k_start);
#endif
  }
  std::vector<at::Tensor> outs, lses;
  for (const RowRun& run : row_runs(q_rows, q.size(1))) {
    const AttentionResult r = reference::sparse_attention(q.narrow(1, run.row, run.len), k, v,
                                                          block_ids.narrow(1, run.row, run.len), options.block_size,
                                                          run.start, k_start);
    outs.push_back(r.out);
    lses.push_back(r.lse);
  }
  if (outs.size() == 1) return {outs[0], lses[0]};
  return {at::cat(outs, 1), at::cat(lses, 2)};
}

AttentionGrads sparse_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                         const at::Tensor& block_ids, const SparseOptions& options, QueryRows q_rows,
                                         int64_t k_start) {
  constexpr const char* fn = "sparse_attention_backward";
  check_merged_grad_inputs(fn, dout, q, k, v, out, lse);
  check_options(fn, options);
  check_rows(fn, q_rows, q.size(1), k_start);
  const bool on_cuda = use_cuda(fn, options.backend, q, k, 0, options.block_size);
  check_block_ids(fn, block_ids, q, k.size(2), !on_cuda);
  if (on_cuda) {
#ifdef SSA_WITH_CUDA
    return cuda::sparse_attention_backward(dout, q, k, v, out, lse, block_ids, options, q_rows, k_start);
#endif
  }
  std::vector<AttentionGrads> parts;
  for (const RowRun& run : row_runs(q_rows, q.size(1))) {
    auto rows = [&](const at::Tensor& t, int64_t dim) { return t.narrow(dim, run.row, run.len); };
    parts.push_back(reference::sparse_attention_backward(rows(dout, 1), rows(q, 1), k, v, rows(out, 1), rows(lse, 2),
                                                         rows(block_ids, 1), options.block_size, run.start,
                                                         k_start));
  }
  if (parts.size() == 1) return parts[0];
  return {at::cat({parts[0].dq, parts[1].dq}, 1), parts[0].dk + parts[1].dk, parts[0].dv + parts[1].dv};
}

void sparse_attention_backward_into(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                    const at::Tensor& block_ids, const SparseOptions& options, QueryRows q_rows,
                                    int64_t k_start, at::Tensor& dq_acc, at::Tensor& dk_acc, at::Tensor& dv_acc,
                                    SideJoin* join) {
  constexpr const char* fn = "sparse_attention_backward_into";
  if (!dq_acc.defined() || !dk_acc.defined() || !dv_acc.defined() || dq_acc.sizes() != q.sizes() ||
      dk_acc.sizes() != k.sizes() || dv_acc.sizes() != v.sizes()) {
    throw std::runtime_error(fmt::format("kernels::{}: the accumulators must be shaped like q, k and v", fn));
  }
#ifdef SSA_WITH_CUDA
  check_merged_grad_inputs(fn, dout, q, k, v, out, lse);
  check_options(fn, options);
  check_rows(fn, q_rows, q.size(1), k_start);
  if (use_cuda(fn, options.backend, q, k, 0, options.block_size)) {
    check_block_ids(fn, block_ids, q, k.size(2), false);
    if (cuda::sparse_attention_backward_into(dout, q, k, v, out, lse, block_ids, options, q_rows, k_start, dq_acc,
                                             dk_acc, dv_acc, join)) {
      return;
    }
  }
#endif
  const AttentionGrads g = sparse_attention_backward(dout, q, k, v, out, lse, block_ids, options, q_rows, k_start);
  dq_acc.add_(g.dq);
  dk_acc.add_(g.dk);
  dv_acc.add_(g.dv);
}

SideJoin::~SideJoin() {
  try {
    join();
  } catch (...) {  // a destructor must not throw; the waits only order streams
  }
}

void SideJoin::join() {
  std::vector<std::function<void()>> waits;
  waits.swap(waits_);
  for (const auto& wait : waits) wait();
}

AttentionResult merge_partials(const AttentionResult& a, const AttentionResult& b) {
  return reference::merge_partials(a, b);
}

void merge_into(at::Tensor& acc_out, at::Tensor& acc_lse, const AttentionResult& part) {
  if (!acc_out.defined() || !acc_lse.defined() || !part.out.defined() || !part.lse.defined() || acc_out.dim() != 4 ||
      acc_lse.dim() != 3 || part.out.sizes() != acc_out.sizes() ||
      acc_lse.sizes() != at::IntArrayRef{acc_out.size(0), acc_out.size(2), acc_out.size(1)} ||
      part.lse.sizes() != acc_lse.sizes()) {
    throw std::runtime_error(fmt::format(
        "kernels::merge_into: need acc_out and part.out [B, n, H, D] alike and acc_lse, part.lse [B, H, n], got "
        "acc_out {}, acc_lse {}, part.out {}, part.lse {}",
        shape_string(acc_out), shape_string(acc_lse), shape_string(part.out), shape_string(part.lse)));
  }
  if (!at::isFloatingType(acc_out.scalar_type()) || acc_out.scalar_type() != acc_lse.scalar_type() ||
      at::elementSize(acc_out.scalar_type()) < 4) {
    throw std::runtime_error(fmt::format("kernels::merge_into: accumulators must be fp32 or fp64 alike, got {} and {}",
                                         c10::toString(acc_out.scalar_type()), c10::toString(acc_lse.scalar_type())));
  }
#ifdef SSA_WITH_CUDA
  if (cuda_usable(acc_out.device()) && cuda::merge_into(acc_out, acc_lse, part)) return;
#endif
  reference::merge_into(acc_out, acc_lse, part);
}

AttentionResult merge_row_partials(int64_t rows, const std::vector<RowPartial>& parts, at::ScalarType out_type) {
  constexpr const char* fn = "merge_row_partials";
  if (parts.empty()) throw std::runtime_error(fmt::format("kernels::{}: no parts to merge", fn));
  if (rows < 0) throw std::runtime_error(fmt::format("kernels::{}: rows must be >= 0, got {}", fn, rows));
  const at::Tensor& first = parts.front().part.out;
  for (size_t i = 0; i < parts.size(); ++i) {
    const RowPartial& p = parts[i];
    const at::Tensor &o = p.part.out, &l = p.part.lse;
    const bool shaped = o.defined() && l.defined() && o.dim() == 4 && first.dim() == 4 && l.dim() == 3 &&
                        o.size(0) == first.size(0) && o.size(2) == first.size(2) && o.size(3) == first.size(3) &&
                        l.sizes() == at::IntArrayRef{o.size(0), o.size(2), o.size(1)} && o.device() == first.device() &&
                        l.device() == first.device() && at::isFloatingType(o.scalar_type());
    if (!shaped) {
      throw std::runtime_error(fmt::format(
          "kernels::{}: part {} needs out [B, n, H, D] and lse [B, H, n] on the device of part 0, with B, H, D of "
          "part 0 ({}); got out {}, lse {}",
          fn, i, shape_string(first), shape_string(o), shape_string(l)));
    }
    if (p.row < 0 || p.row + o.size(1) > rows) {
      throw std::runtime_error(fmt::format("kernels::{}: part {} covers rows [{}, {}), outside [0, {})", fn, i, p.row,
                                           p.row + o.size(1), rows));
    }
  }
  at::NoGradGuard no_grad;
#ifdef SSA_WITH_CUDA
  if (cuda_usable(first.device())) {
    AttentionResult fused = cuda::merge_row_partials(rows, parts, out_type);
    if (fused.out.defined()) return fused;
  }
#endif
  const at::ScalarType acc = first.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor out = at::zeros({first.size(0), rows, first.size(2), first.size(3)}, first.options().dtype(acc));
  at::Tensor lse = at::full({first.size(0), first.size(2), rows}, -inf, first.options().dtype(acc));
  for (const RowPartial& p : parts) {
    at::Tensor o = out.narrow(1, p.row, p.part.out.size(1)), l = lse.narrow(2, p.row, p.part.out.size(1));
    merge_into(o, l, p.part);
  }
  return {out.to(out_type), lse};
}

at::Tensor add_row_terms(const at::Tensor& base, const std::vector<RowTerm>& terms, at::ScalarType out_type) {
  constexpr const char* fn = "add_row_terms";
  if (!base.defined() || base.dim() < 2 || (base.scalar_type() != at::kFloat && base.scalar_type() != at::kDouble)) {
    throw std::runtime_error(fmt::format("kernels::{}: base must be an fp32 or fp64 tensor [B, S, ...], got {}{}", fn,
                                         shape_string(base), base.defined() ? " " + std::string(c10::toString(base.scalar_type())) : ""));
  }
  for (size_t i = 0; i < terms.size(); ++i) {
    const at::Tensor& t = terms[i].value;
    const bool shaped = t.defined() && t.dim() == base.dim() && t.size(0) == base.size(0) &&
                        t.sizes().slice(2) == base.sizes().slice(2) && t.device() == base.device() &&
                        at::isFloatingType(t.scalar_type());
    if (!shaped || terms[i].row < 0 || terms[i].row + t.size(1) > base.size(1)) {
      throw std::runtime_error(fmt::format(
          "kernels::{}: term {} ({} at row {}) must be a floating tensor on base's device shaped like base {} except "
          "in dim 1, within its rows",
          fn, i, shape_string(t), terms[i].row, shape_string(base)));
    }
  }
  at::NoGradGuard no_grad;
#ifdef SSA_WITH_CUDA
  if (cuda_usable(base.device())) {
    at::Tensor fused = cuda::add_row_terms(base, terms, out_type);
    if (fused.defined()) return fused;
  }
#endif
  at::Tensor sum = base.clone();
  for (const RowTerm& t : terms) sum.narrow(1, t.row, t.value.size(1)).add_(t.value);
  return sum.to(out_type);
}

AttentionStats attention_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& block_ids,
                               int64_t block_size) {
  if (!q.defined()) throw std::runtime_error("kernels::attention_stats: q is undefined");
  return attention_stats(q, k, block_ids, block_size, resolve_backend("auto", q.device()));
}

AttentionStats attention_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& block_ids,
                               int64_t block_size, Backend backend) {
  check_qk("attention_stats", q, k);
  if (block_size <= 0) {
    throw std::runtime_error(fmt::format("kernels::attention_stats: block_size must be > 0, got {}", block_size));
  }
  if (k.size(1) == 0) throw std::runtime_error("kernels::attention_stats: k has no keys (Sk = 0)");
  check_block_ids("attention_stats", block_ids, q, k.size(2));
  const int64_t nb = (k.size(1) + block_size - 1) / block_size;
  if (block_ids.numel() > 0) {
    const int64_t max_id = block_ids.max().item<int64_t>();
    if (max_id >= nb) {
      throw std::runtime_error(fmt::format(
          "kernels::attention_stats: block id {} is beyond the {} blocks of the {} keys", max_id, nb, k.size(1)));
    }
  }
  // Statistics read q and k as bf16 whatever their dtype (cuda::attention_stats).
  if (use_cuda("attention_stats", backend, q, k, 0, block_size, /*any_float=*/true)) {
#ifdef SSA_WITH_CUDA
    return cuda::attention_stats(q, k, block_ids, block_size);
#endif
  }
  return reference::attention_stats(q, k, block_ids, block_size);
}

}  // namespace ssa::kernels
