#pragma once
// Writes a token stream into shards of a fixed number of tokens.
//
// Each shard is written as DIR/.NAME.tmp and renamed to DIR/NAME (e.g.
// shard-000003.h5) only once it is complete, closed and synced, so a run that
// is interrupted never leaves a partial shard under a final name (the reader
// ignores hidden files). Tokens are buffered one HDF5 chunk at a time, so the
// memory used does not grow with the shard size.
#include <cstdint>
#include <string>
#include <vector>

#include "data/hdf5_check.h"
#include "data/shard_format.h"

namespace ssa::data {

struct ShardWriterOptions {
  std::string dir;                               // created if missing
  std::string name_prefix = "shard";             // shards are PREFIX-000000.h5, ...
  int64_t shard_tokens = kDefaultShardTokens;    // tokens per shard (the last may hold fewer)
  int64_t chunk_tokens = kDefaultChunkTokens;    // HDF5 chunk length of /tokens
  int deflate_level = 0;                         // 0: no compression; 1..9: deflate
  int64_t token_bytes = 0;                       // 2 (uint16), 4 (uint32), 0: smallest that fits vocab_size
  int64_t vocab_size = 0;
  int64_t eos_id = -1;
  std::string tokenizer;
};

class ShardWriter {
 public:
  // Checks the options; throws std::invalid_argument naming the bad one.
  explicit ShardWriter(ShardWriterOptions options);
  ~ShardWriter();  // an unfinished shard is removed, never renamed
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // The next token appended starts a document (recorded in /doc_offsets).
  void begin_document();
  // Throws std::invalid_argument for an id outside [0, vocab_size).
  void append(int64_t token);
  // Each byte as its token id (the byte tokenizer).
  void append_bytes(const char* bytes, size_t count);
  // Writes the last shard. A stream of zero tokens still yields one empty
  // shard, so the dataset's metadata exists.
  void finish();

  int64_t tokens_written() const { return total_tokens_; }
  int64_t documents() const { return total_docs_; }
  const std::vector<std::string>& shard_paths() const { return finished_; }

 private:
  void open_shard();
  void flush_chunk();
  void close_shard();

  ShardWriterOptions options_;
  std::vector<uint32_t> chunk_;        // tokens not yet written: [< chunk_tokens]
  std::vector<uint64_t> doc_offsets_;  // of the open shard
  int64_t shard_fill_ = 0;             // tokens of the open shard, written or buffered
  int64_t shard_written_ = 0;          // tokens of the open shard already in the file
  int64_t total_tokens_ = 0, total_docs_ = 0;
  bool document_pending_ = false;      // begin_document() called, no token yet
  bool finished_called_ = false;
  std::string temp_path_, final_path_;
  H5Id file_, tokens_;
  std::vector<std::string> finished_;
};

}  // namespace ssa::data
