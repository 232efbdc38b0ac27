#include "data/reader_bench.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "data/shard_set.h"
#include "data/token_reader.h"

namespace ssa::data {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One sequential pass in 1M-token reads; this also brings the shards into the
// page cache, so the reader run that follows is measured warm, like the baseline.
void run_baseline(const BenchOptions& options, BenchResult& result) {
  ShardSet shards(options.dir);
  int64_t total = std::min(shards.total_tokens(), options.baseline_max_tokens);
  constexpr int64_t kPiece = int64_t{1} << 20;
  std::vector<int32_t> buffer(kPiece);
  auto start = Clock::now();
  for (int64_t begin = 0; begin < total; begin += kPiece) {
    int64_t count = std::min(kPiece, total - begin);
    shards.read(begin, count, buffer.data());
    for (int64_t i = 0; i < count; ++i) result.checksum += buffer[static_cast<size_t>(i)];
  }
  result.baseline_seconds = seconds_since(start);
  result.baseline_tokens = total;
}

}  // namespace

BenchResult run_reader_bench(const BenchOptions& options) {
  if (options.steps < 1) throw std::invalid_argument(fmt::format("bench: --steps {} must be >= 1", options.steps));
  if (options.consumer_ms < 0) {
    throw std::invalid_argument(fmt::format("bench: --consumer-ms {} must be >= 0", options.consumer_ms));
  }
  BenchResult result;
  run_baseline(options, result);

  ReaderOptions reader_options;
  reader_options.dir = options.dir;
  reader_options.seq_len = options.seq_len;
  reader_options.global_batch = options.global_batch;
  reader_options.dp_size = options.dp_size;
  reader_options.cp_size = options.cp_size;
  reader_options.seed = options.seed;
  reader_options.prefetch = options.prefetch;
  auto open_start = Clock::now();
  TokenReader reader(reader_options);
  result.open_seconds = seconds_since(open_start);
  result.total_tokens = reader.total_tokens();
  result.samples_per_epoch = reader.samples_per_epoch();

  auto start = Clock::now();
  for (int64_t step = 0; step < options.steps; ++step) {
    Batch batch = reader.next();
    result.wait_seconds += batch.wait_seconds;
    result.max_wait_seconds = std::max(result.max_wait_seconds, batch.wait_seconds);
    result.tokens += batch.rows * batch.cols;
    result.epochs_touched = batch.epoch + 1;
    for (int32_t id : batch.inputs) result.checksum += id;
    if (options.consumer_ms > 0) {
      std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(options.consumer_ms));
    }
  }
  result.seconds = seconds_since(start);
  result.steps = options.steps;
  return result;
}

}  // namespace ssa::data
