#include "data/shard_set.h"

#include <algorithm>
#include <filesystem>

#include "data/shard_format.h"

namespace ssa::data {

namespace fs = std::filesystem;

std::vector<std::string> list_shard_paths(const std::string& dir) {
  std::error_code error;
  fs::file_status status = fs::status(dir, error);
  if (!fs::exists(status)) throw ShardError(fmt::format("dataset {}: no such folder", dir));
  if (fs::is_regular_file(status)) {
    if (fs::path(dir).extension() == kShardExtension) return {dir};
    throw ShardError(fmt::format("dataset {}: is a file but not a shard (*{})", dir, kShardExtension));
  }
  if (!fs::is_directory(status)) throw ShardError(fmt::format("dataset {}: not a folder", dir));
  if (fs::exists(fs::path(dir) / kIncompleteMarker, error)) {
    throw ShardError(fmt::format("dataset {}: incomplete: an interrupted `ssa data prepare` was writing it ({} exists); "
                                 "run the prepare again",
                                 dir, (fs::path(dir) / kIncompleteMarker).string()));
  }
  std::vector<std::string> paths;
  fs::directory_iterator it(dir, error);
  if (error) throw ShardError(fmt::format("dataset {}: cannot list the folder: {}", dir, error.message()));
  for (const auto& entry : it) {
    const fs::path& path = entry.path();
    std::string name = path.filename().string();
    // Hidden files include the temporary names prepare writes before renaming.
    if (name.empty() || name[0] == '.' || path.extension() != kShardExtension) continue;
    if (!entry.is_regular_file(error)) continue;
    paths.push_back(path.string());
  }
  if (paths.empty()) throw ShardError(fmt::format("dataset {}: no shards (*{} files) in the folder", dir, kShardExtension));
  std::sort(paths.begin(), paths.end());
  return paths;
}

ShardSet::ShardSet(const std::string& dir) : dir_(dir) {
  std::vector<std::string> paths = list_shard_paths(dir);
  shards_.reserve(paths.size());
  starts_.push_back(0);
  for (const auto& path : paths) {
    shards_.emplace_back(path);
    const ShardMeta& first = shards_.front().meta();
    const ShardMeta& meta = shards_.back().meta();
    auto mismatch = [&](const char* what, const std::string& value, const std::string& expected) {
      throw ShardError(fmt::format("shard {}: {} is {} but {} has {}: all shards of dataset {} must agree", meta.path,
                                   what, value, first.path, expected, dir));
    };
    if (meta.vocab_size != first.vocab_size) {
      mismatch("vocab_size", std::to_string(meta.vocab_size), std::to_string(first.vocab_size));
    }
    if (meta.eos_id != first.eos_id) mismatch("eos_id", std::to_string(meta.eos_id), std::to_string(first.eos_id));
    if (meta.tokenizer != first.tokenizer) mismatch("tokenizer", meta.tokenizer, first.tokenizer);
    starts_.push_back(starts_.back() + meta.n_tokens);
  }
}

void ShardSet::read(int64_t begin, int64_t count, int32_t* out) {
  if (begin < 0 || count < 0 || begin + count > total_tokens()) {
    throw ShardError(fmt::format("dataset {}: read of tokens [{}, {}) is outside the stream of {} tokens", dir_, begin,
                                 begin + count, total_tokens()));
  }
  // The shard holding `begin`: the last whose start is <= begin (skipping empty ones).
  size_t shard = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin()) - 1;
  while (count > 0) {
    int64_t local = begin - starts_[shard];
    int64_t piece = std::min(count, starts_[shard + 1] - begin);
    if (piece > 0) {
      shards_[shard].read(local, piece, out);
      out += piece;
      begin += piece;
      count -= piece;
    }
    ++shard;
  }
}

}  // namespace ssa::data
