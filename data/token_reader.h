#pragma once
// Streaming reader of training samples from a folder of HDF5 token shards.
//
// A sample is a window of seq_len + 1 tokens of the concatenated token stream
// (sample i starts at token i * seq_len). The global order is a seeded
// permutation of the samples per epoch, computed without memory proportional
// to the dataset. Global batch t covers permuted samples [t*GB, (t+1)*GB);
// dp rank r takes the contiguous slice [r*GB/dp, (r+1)*GB/dp) of it. Each cp rank
// reads only its two zigzag chunks (chunk c and 2cp-1-c of 2cp chunks of the
// seq_len inputs), each with its one extra label token.
//
// One I/O thread owns every HDF5 handle and fills a bounded queue of batches.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace ssa::data {

struct ReaderOptions {
  std::string dir;          // folder of shards (*.h5, not recursive)
  int64_t seq_len = 0;      // S: inputs per sample (the window is S + 1 tokens)
  int64_t global_batch = 0; // GB: samples per step over all dp ranks
  int64_t dp_size = 1, dp_rank = 0;
  int64_t cp_size = 1, cp_rank = 0;
  uint64_t seed = 0;
  int64_t prefetch = 4;     // batches queued ahead by the I/O thread
};

// Where the reader is in the sample order; saved in checkpoints. Independent of
// dp/cp sizes: a cursor saved at dp = 4 restores at dp = 2 with the same GB.
struct ReaderCursor {
  int64_t step = 0;  // global batches already delivered
};

struct Batch {
  int64_t step = 0;               // global batch index t
  int64_t epoch = 0;              // epoch of the first sample
  int64_t rows = 0;               // samples on this dp rank: GB / dp
  int64_t cols = 0;               // tokens per row on this cp rank: S / cp
  std::vector<int32_t> inputs;    // [rows, cols] row-major
  std::vector<int32_t> labels;    // [rows, cols]: the token after each input
  std::vector<int64_t> positions; // [cols]: global position of each column (zigzag)
  std::vector<int64_t> sample_ids;// [rows]: global sample index of each row
  double wait_seconds = 0;        // time the consumer waited in next()
};

class TokenReader {
 public:
  // Opens and validates the dataset; throws std::runtime_error naming the file
  // and the problem (missing folder, no shards, bad format, mixed vocab ...).
  explicit TokenReader(ReaderOptions options, ReaderCursor cursor = {});
  ~TokenReader();
  TokenReader(const TokenReader&) = delete;
  TokenReader& operator=(const TokenReader&) = delete;

  Batch next();  // blocks until the next batch is ready; rethrows I/O-thread errors
  ReaderCursor cursor() const;  // position after the last batch next() returned
  int64_t vocab_size() const;
  int64_t eos_id() const;
  int64_t total_tokens() const;
  int64_t samples_per_epoch() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Global positions of the columns held by cp rank `cp_rank` of `cp_size` for a
// sequence of seq_len tokens: chunks cp_rank and 2*cp_size-1-cp_rank of 2*cp_size.
std::vector<int64_t> zigzag_positions(int64_t seq_len, int64_t cp_size, int64_t cp_rank);

}  // namespace ssa::data
