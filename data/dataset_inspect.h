#pragma once
// `ssa data inspect`: a summary of every shard of a dataset and a full
// validation (format and version, vocabulary agreement, doc offsets strictly
// increasing and in range, every token id < vocab_size), reading all tokens.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/shard_file.h"

namespace ssa::data {

struct ShardReport {
  ShardMeta meta;              // meta.path is always set; the rest once the file opened
  int64_t eos_tokens = 0;      // tokens equal to eos_id
  int64_t max_token = -1;
  std::string problem;         // empty: the shard passed every check
};

struct InspectReport {
  std::string dir;
  std::vector<ShardReport> shards;
  std::vector<std::string> problems;  // every failure, shard-level ones included
  int64_t total_tokens = 0, total_documents = 0, total_file_bytes = 0;
  bool ok() const { return problems.empty(); }
};

// Never throws for a bad dataset: every problem found is listed in the report.
// `on_shard(i, n)` is called before shard i of n is scanned.
InspectReport inspect_dataset(const std::string& dir, const std::function<void(size_t, size_t)>& on_shard = {});

}  // namespace ssa::data
