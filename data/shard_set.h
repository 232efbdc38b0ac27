#pragma once
// A dataset: the shards of one folder, in file-name order, read as one token
// stream (the concatenation of their /tokens).
#include <cstdint>
#include <string>
#include <vector>

#include "data/shard_file.h"

namespace ssa::data {

// The *.h5 files directly inside `dir` (not its subfolders, so DIR/val/ stays
// apart), sorted by file name; `dir` may also name a single .h5 file. Throws
// ShardError naming the path when it does not exist or holds no shard.
std::vector<std::string> list_shard_paths(const std::string& dir);

class ShardSet {
 public:
  // Opens and validates every shard (see ShardFile) and checks that they agree
  // on vocab_size, eos_id and tokenizer.
  explicit ShardSet(const std::string& dir);

  const std::string& dir() const { return dir_; }
  int64_t total_tokens() const { return starts_.back(); }
  int64_t vocab_size() const { return shards_.front().meta().vocab_size; }
  int64_t eos_id() const { return shards_.front().meta().eos_id; }
  const std::string& tokenizer() const { return shards_.front().meta().tokenizer; }
  std::vector<ShardFile>& shards() { return shards_; }
  // Position of shard i's first token in the stream; starts()[n_shards] = total.
  const std::vector<int64_t>& starts() const { return starts_; }

  // stream[begin, begin + count) into out[count]; the range may span shards.
  void read(int64_t begin, int64_t count, int32_t* out);

 private:
  std::string dir_;
  std::vector<ShardFile> shards_;
  std::vector<int64_t> starts_;  // [n_shards + 1]
};

}  // namespace ssa::data
