#include "data/token_reader.h"

#include <fmt/format.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <future>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "data/sample_order.h"
#include "data/shard_set.h"

namespace ssa::data {

namespace {

void check_options(const ReaderOptions& o, const ReaderCursor& cursor) {
  auto bad = [](const std::string& message) { throw std::invalid_argument("token reader: " + message); };
  if (o.seq_len < 1) bad(fmt::format("seq_len {} must be >= 1", o.seq_len));
  if (o.global_batch < 1) bad(fmt::format("global_batch {} must be >= 1", o.global_batch));
  if (o.dp_size < 1 || o.dp_rank < 0 || o.dp_rank >= o.dp_size) {
    bad(fmt::format("dp_rank {} is outside [0, dp_size {})", o.dp_rank, o.dp_size));
  }
  if (o.global_batch % o.dp_size != 0) {
    bad(fmt::format("global_batch {} is not divisible by dp_size {}", o.global_batch, o.dp_size));
  }
  if (o.cp_size < 1 || o.cp_rank < 0 || o.cp_rank >= o.cp_size) {
    bad(fmt::format("cp_rank {} is outside [0, cp_size {})", o.cp_rank, o.cp_size));
  }
  if (o.cp_size > 1 && o.seq_len % (2 * o.cp_size) != 0) {
    bad(fmt::format("seq_len {} is not divisible by 2 * cp_size = {}", o.seq_len, 2 * o.cp_size));
  }
  if (o.prefetch < 1) bad(fmt::format("prefetch {} must be >= 1", o.prefetch));
  if (cursor.step < 0) bad(fmt::format("cursor step {} is negative", cursor.step));
}

// A contiguous run of a sample's inputs held by this cp rank.
struct Segment {
  int64_t offset = 0;  // first input position within the sample
  int64_t length = 0;  // inputs; length + 1 tokens are read (the last label)
};

std::vector<Segment> segments_of(const ReaderOptions& o) {
  if (o.cp_size == 1) return {{0, o.seq_len}};
  int64_t chunk = o.seq_len / (2 * o.cp_size);
  return {{o.cp_rank * chunk, chunk}, {(2 * o.cp_size - 1 - o.cp_rank) * chunk, chunk}};
}

}  // namespace

struct TokenReader::Impl {
  ReaderOptions options;
  // Written by the I/O thread before the constructor returns, constant after.
  int64_t vocab_size = 0, eos_id = -1, total_tokens = 0, samples_per_epoch = 0;

  std::mutex mutex;
  std::condition_variable changed;
  std::deque<Batch> queue;          // [<= prefetch] batches ready for next()
  std::exception_ptr error;         // the I/O thread's failure, rethrown by next()
  bool stop = false;
  ReaderCursor cursor;              // after the last batch next() returned
  std::promise<void> opened;        // set by the I/O thread once the dataset is open
  std::thread io_thread;

  void run_io(int64_t first_step);
  void fill(Batch& batch, int64_t step, ShardSet& shards, SampleOrder& order, const std::vector<Segment>& segments,
            const std::vector<int64_t>& positions, std::vector<int32_t>& window) const;
};

// Owns every HDF5 handle of this reader: the shards are opened, read and closed
// on this thread only.
void TokenReader::Impl::run_io(int64_t first_step) {
  std::unique_ptr<ShardSet> shards;
  std::unique_ptr<SampleOrder> order;
  try {
    shards = std::make_unique<ShardSet>(options.dir);
    vocab_size = shards->vocab_size();
    eos_id = shards->eos_id();
    total_tokens = shards->total_tokens();
    // Sample i is tokens [i*S, i*S + S + 1): it needs i*S + S < total.
    samples_per_epoch = total_tokens > 0 ? (total_tokens - 1) / options.seq_len : 0;
    if (samples_per_epoch < 1) {
      throw std::runtime_error(fmt::format("dataset {}: {} tokens, fewer than one sample of seq_len + 1 = {} tokens",
                                           options.dir, total_tokens, options.seq_len + 1));
    }
    order = std::make_unique<SampleOrder>(samples_per_epoch, options.seed);
    opened.set_value();
  } catch (...) {
    opened.set_exception(std::current_exception());
    return;
  }

  std::vector<Segment> segments = segments_of(options);
  std::vector<int64_t> positions = zigzag_positions(options.seq_len, options.cp_size, options.cp_rank);
  std::vector<int32_t> window;
  for (int64_t step = first_step;; ++step) {
    {
      std::unique_lock lock(mutex);
      changed.wait(lock, [&] { return stop || static_cast<int64_t>(queue.size()) < options.prefetch; });
      if (stop) break;
    }
    Batch batch;
    try {
      fill(batch, step, *shards, *order, segments, positions, window);
    } catch (...) {
      std::lock_guard lock(mutex);
      error = std::current_exception();
      changed.notify_all();
      break;
    }
    std::lock_guard lock(mutex);
    queue.push_back(std::move(batch));
    changed.notify_all();
  }
}

void TokenReader::Impl::fill(Batch& batch, int64_t step, ShardSet& shards, SampleOrder& order,
                             const std::vector<Segment>& segments, const std::vector<int64_t>& positions,
                             std::vector<int32_t>& window) const {
  const ReaderOptions& o = options;
  batch.step = step;
  batch.epoch = step * o.global_batch / samples_per_epoch;
  batch.rows = o.global_batch / o.dp_size;
  batch.cols = static_cast<int64_t>(positions.size());
  batch.positions = positions;
  batch.inputs.resize(static_cast<size_t>(batch.rows * batch.cols));
  batch.labels.resize(batch.inputs.size());
  batch.sample_ids.resize(static_cast<size_t>(batch.rows));
  // This dp rank's rows: global samples [t*GB + r*rows, t*GB + (r+1)*rows).
  int64_t first = step * o.global_batch + o.dp_rank * batch.rows;
  for (int64_t row = 0; row < batch.rows; ++row) {
    SampleRef ref = order.at(first + row);
    batch.sample_ids[static_cast<size_t>(row)] = ref.sample;
    int64_t start = ref.sample * o.seq_len;
    int32_t* inputs = batch.inputs.data() + row * batch.cols;
    int32_t* labels = batch.labels.data() + row * batch.cols;
    for (const Segment& segment : segments) {
      // window: [length + 1] tokens; inputs are window[0, length), labels window[1, length].
      window.resize(static_cast<size_t>(segment.length + 1));
      shards.read(start + segment.offset, segment.length + 1, window.data());
      std::copy(window.begin(), window.end() - 1, inputs);
      std::copy(window.begin() + 1, window.end(), labels);
      inputs += segment.length;
      labels += segment.length;
    }
  }
}

TokenReader::TokenReader(ReaderOptions options, ReaderCursor cursor) : impl_(std::make_unique<Impl>()) {
  check_options(options, cursor);
  impl_->options = std::move(options);
  impl_->cursor = cursor;
  std::future<void> ready = impl_->opened.get_future();
  impl_->io_thread = std::thread([impl = impl_.get(), step = cursor.step] { impl->run_io(step); });
  try {
    ready.get();  // rethrows what opening the dataset threw
  } catch (...) {
    impl_->io_thread.join();
    throw;
  }
}

TokenReader::~TokenReader() {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->stop = true;
  }
  impl_->changed.notify_all();
  if (impl_->io_thread.joinable()) impl_->io_thread.join();
}

Batch TokenReader::next() {
  auto started = std::chrono::steady_clock::now();
  std::unique_lock lock(impl_->mutex);
  impl_->changed.wait(lock, [&] { return !impl_->queue.empty() || impl_->error; });
  if (impl_->queue.empty()) std::rethrow_exception(impl_->error);
  Batch batch = std::move(impl_->queue.front());
  impl_->queue.pop_front();
  impl_->cursor.step = batch.step + 1;
  lock.unlock();
  impl_->changed.notify_all();
  batch.wait_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return batch;
}

ReaderCursor TokenReader::cursor() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->cursor;
}

int64_t TokenReader::vocab_size() const { return impl_->vocab_size; }
int64_t TokenReader::eos_id() const { return impl_->eos_id; }
int64_t TokenReader::total_tokens() const { return impl_->total_tokens; }
int64_t TokenReader::samples_per_epoch() const { return impl_->samples_per_epoch; }

}  // namespace ssa::data
