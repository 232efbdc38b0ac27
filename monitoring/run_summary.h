#pragma once
// Reads a run's metrics.jsonl back and condenses it for side-by-side comparison
// (`ssa report`): median step time and throughput after warm-up, peak memory,
// communication per step (time on the communication stream and the part the
// compute stream waited for it), context-parallel bytes per stream, losses at
// chosen steps.
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace ssa::monitoring {

struct RunSummary {
  std::string name;                 // the run folder's name
  int64_t steps = 0;                // step records in the file
  int64_t measured = 0;             // of them, after the warm-up skipped
  double step_seconds = 0;          // medians over the measured steps
  double tokens_per_second = 0;
  double mfu = 0;
  double peak_memory_gib = 0;       // over all steps
  // Median seconds per step by op ("cp_ring_kv", ...; "<op>_exposed": waited for).
  std::map<std::string, double> comm_seconds;
  int64_t cp_bytes_full = 0;        // of the last step
  int64_t cp_bytes_sparse = 0;
  std::map<int64_t, double> loss;   // step -> loss (the last record of that step)
};

// run: a run folder (reads <run>/metrics.jsonl) or a metrics file. The first
// `warmup` step records are left out of the medians (all are kept when there
// are no more). Throws std::runtime_error naming the file (and line) when it is
// missing, unreadable, malformed or has no step record.
RunSummary summarize_run(const std::filesystem::path& run, int64_t warmup);

// The summaries as text tables; step times also as a ratio to the first run's.
// loss_steps: steps whose losses are listed (those a run lacks print "-").
std::string summary_table(const std::vector<RunSummary>& runs, const std::vector<int64_t>& loss_steps);

}  // namespace ssa::monitoring
