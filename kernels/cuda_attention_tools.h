#pragma once
// What `ssa attn check` and `ssa attn bench` run (the command prints and writes
// files): the CUDA kernels against the reference backend, and timings of the
// sparse path against cuDNN dense attention on the same shapes. CUDA builds only.
#ifdef SSA_WITH_CUDA
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "kernels/attention.h"

namespace ssa::kernels::cuda {

// One tensor of the CUDA path against the reference on fp32 copies. The bound is
// a multiple of the reference's own bf16-vs-fp32 spread, with a floor.
struct TensorError {
  std::string name;
  double max_abs = 0, rel = 0;                // CUDA vs reference (rel: norm-relative)
  double spread_abs = 0, spread_rel = 0;      // reference on bf16 inputs vs reference on fp32
  double rel_bound = 0, abs_bound = 0;
  bool ok = false;
};

struct CheckReport {
  double selection_agree = 0;  // share of (b, token, kv head) rows with the reference's exact set
  double selection_gap = 0;    // worst: a left-out block's fp64 score above a kept one's
  double selection_tol = 0;
  bool selection_ok = false;
  std::vector<TensorError> errors;  // out, lse, dq, dk, dv
  bool ok = false;
  std::vector<std::pair<std::string, at::Tensor>> tensors;  // inputs, ids and all results (CPU)
};

// q [B, S, Hq, D], k/v [B, S, Hkv, D] on the GPU (any float dtype; the CUDA path
// reads bf16). Selection: both backends on the same pooled keys (of the bf16
// keys, so bf16, as in training). Attention: both backends on the reference's
// block ids, gradients of sum(out * w_out) + sum(lse * w_lse) with fixed random
// weights.
CheckReport check_against_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const SparseOptions& options, uint64_t seed);

struct BenchShape {
  int64_t batch = 1, seq = 8192, heads = 32, kv_heads = 2, head_dim = 64;
  SparseOptions options;
};

struct BenchRow {
  std::string name;
  double ms = 0;
  double tflops = 0;  // useful FLOPs / time (sparse: selected keys only)
  double gbps = 0;    // fewest bytes the step must move / time
  double mhz_first = 0, mhz_last = 0;  // SM clock right after the first and the last timed run
};

struct BenchReport {
  std::vector<BenchRow> rows;
  double kept_pairs = 0;  // share of the causal (query, key) pairs the selection keeps
};

// Median times over `iters` runs (after `warmup`), CUDA events on one stream, and
// the SM clock after the first and the last run (the H200 lowers it under
// sustained load, which slows every kernel alike).
BenchReport run_bench(const BenchShape& shape, int warmup, int iters);

// The bench's "sparse total" case as one callable (selection, forward and
// backward on the bench's random inputs), for profiling it.
std::function<void()> sparse_total_step(const BenchShape& shape);

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
