#pragma once
// What the trainer reports after each optimizer step (and after eval), consumed
// by the Prometheus exporter, the JSONL log and the console progress line.
#include <cstdint>
#include <map>
#include <optional>
#include <string>

namespace ssa::monitoring {

struct StepRecord {
  int64_t step = 0;             // optimizer steps completed
  int64_t total_steps = 0;
  int64_t tokens_seen = 0;      // over all ranks since the run began
  double loss = 0;              // total: ce + alpha * alignment
  double ce_loss = 0;
  double sparsity_loss = 0;     // L_s, mean over layers (0 when mode != ssa)
  double commitment_loss = 0;   // L_c, mean over layers
  std::string mode;             // stream passed on this step: "full" | "sparse" | "mixed" (several micro-batches)
  int64_t full_passes = 0;      // forward passes this step that passed on the full stream
  int64_t sparse_passes = 0;
  double lr = 0;
  double grad_norm = 0;
  double step_seconds = 0;
  double tokens_per_second = 0;
  double mfu = 0;               // model FLOP utilisation, 0 on CPU
  double data_wait_seconds = 0;
  std::map<std::string, double> comm_seconds;  // by op: all_reduce, reduce_scatter, ...
  int64_t gpu_memory_bytes = 0;  // peak allocated on this rank, 0 on CPU
  int64_t cp_bytes_full = 0;     // bytes this rank sent over cp in the step's forward passes, full stream
  int64_t cp_bytes_sparse = 0;   // same, sparse stream's own traffic (0 on one rank)
  int64_t skipped_steps = 0;     // total NaN/Inf steps skipped so far
  std::optional<double> checkpoint_seconds;  // set on steps that wrote a checkpoint
  double eta_seconds = 0;
};

// Eval results published as gauges (per context length and budget).
struct EvalRecord {
  int64_t step = 0;          // optimizer steps completed when the eval ran
  int64_t seq_len = 0;
  int64_t top_k = 0;
  double full_perplexity = 0;
  double sparse_perplexity = 0;
  double sparsity = 0;       // mean attention mass in the top-k blocks
  double entropy_bits = 0;   // mean attention entropy
};

}  // namespace ssa::monitoring
