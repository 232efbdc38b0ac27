#include "data/dataset_inspect.h"

#include <fmt/format.h>

#include <algorithm>
#include <exception>

#include "data/shard_set.h"

namespace ssa::data {

namespace {

// Reads every token (read() rejects ids >= vocab_size) and the doc offsets.
void scan_shard(ShardFile& shard, ShardReport& report) {
  shard.validate_doc_offsets();
  const ShardMeta& meta = shard.meta();
  constexpr int64_t kPiece = int64_t{1} << 20;
  std::vector<int32_t> tokens;
  for (int64_t begin = 0; begin < meta.n_tokens; begin += kPiece) {
    int64_t count = std::min(kPiece, meta.n_tokens - begin);
    tokens.resize(static_cast<size_t>(count));
    shard.read(begin, count, tokens.data());
    for (int32_t id : tokens) {
      report.eos_tokens += id == meta.eos_id;
      report.max_token = std::max<int64_t>(report.max_token, id);
    }
  }
}

}  // namespace

InspectReport inspect_dataset(const std::string& dir, const std::function<void(size_t, size_t)>& on_shard) {
  InspectReport report;
  report.dir = dir;
  std::vector<std::string> paths;
  try {
    paths = list_shard_paths(dir);
  } catch (const std::exception& e) {
    report.problems.push_back(e.what());
    return report;
  }
  report.shards.reserve(paths.size());
  size_t reference = paths.size();  // index of the first shard that opened
  for (size_t i = 0; i < paths.size(); ++i) {
    if (on_shard) on_shard(i, paths.size());
    report.shards.emplace_back();
    ShardReport& shard_report = report.shards.back();
    shard_report.meta.path = paths[i];
    try {
      ShardFile shard(paths[i]);
      shard_report.meta = shard.meta();
      scan_shard(shard, shard_report);
    } catch (const std::exception& e) {
      shard_report.problem = e.what();
      report.problems.push_back(e.what());
    }
    if (shard_report.meta.vocab_size == 0) continue;  // did not open
    report.total_tokens += shard_report.meta.n_tokens;
    report.total_documents += shard_report.meta.n_docs;
    report.total_file_bytes += shard_report.meta.file_bytes;
    if (reference == paths.size()) {
      reference = i;
      continue;
    }
    auto disagree = [&](const char* what, const std::string& value, const std::string& expected) {
      std::string problem = fmt::format("shard {}: {} is {} but {} has {}: all shards of a dataset must agree",
                                        paths[i], what, value, report.shards[reference].meta.path, expected);
      if (shard_report.problem.empty()) shard_report.problem = problem;
      report.problems.push_back(problem);
    };
    const ShardMeta& a = shard_report.meta;
    const ShardMeta& b = report.shards[reference].meta;
    if (a.vocab_size != b.vocab_size) disagree("vocab_size", std::to_string(a.vocab_size), std::to_string(b.vocab_size));
    if (a.eos_id != b.eos_id) disagree("eos_id", std::to_string(a.eos_id), std::to_string(b.eos_id));
    if (a.tokenizer != b.tokenizer) disagree("tokenizer", a.tokenizer, b.tokenizer);
    if (a.version != b.version) disagree("version", std::to_string(a.version), std::to_string(b.version));
  }
  return report;
}

}  // namespace ssa::data
