#pragma once
// `ssa data bench`: how fast the TokenReader delivers batches on this machine,
// against a named baseline measured in the same run: one sequential pass over
// the token stream in 1M-token reads (the fastest way to get tokens out of the
// same shards through HDF5).
#include <cstdint>
#include <string>

namespace ssa::data {

struct BenchOptions {
  std::string dir;
  int64_t seq_len = 2048;
  int64_t global_batch = 32;
  int64_t steps = 1000;
  int64_t dp_size = 1;         // the bench consumes dp rank 0's batches
  int64_t cp_size = 1;         // ... and cp rank 0's slices
  int64_t prefetch = 4;
  uint64_t seed = 0;
  double consumer_ms = 0;      // simulated work per step (0: consume as fast as possible)
  int64_t baseline_max_tokens = int64_t{1} << 28;  // cap on the sequential pass
};

struct BenchResult {
  int64_t total_tokens = 0, samples_per_epoch = 0;
  double open_seconds = 0;         // constructing the reader (open + validate shards)
  int64_t steps = 0;
  int64_t tokens = 0;              // input tokens delivered to this rank
  double seconds = 0;              // from the first next() to the last batch
  double wait_seconds = 0;         // summed Batch::wait_seconds
  double max_wait_seconds = 0;     // longest single wait
  int64_t epochs_touched = 0;      // last batch's epoch + 1
  int64_t baseline_tokens = 0;
  double baseline_seconds = 0;
  int64_t checksum = 0;            // sum of all delivered ids (keeps the reads honest)
  double tokens_per_second() const { return seconds > 0 ? tokens / seconds : 0; }
  double baseline_tokens_per_second() const { return baseline_seconds > 0 ? baseline_tokens / baseline_seconds : 0; }
};

// Throws what the reader throws for a bad dataset or bad options.
BenchResult run_reader_bench(const BenchOptions& options);

}  // namespace ssa::data
