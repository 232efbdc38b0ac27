#pragma once
// Checkpoint folders of a run:
//   <run>/checkpoints/step-000100/   model.h5, state.json and the optimizer shards:
//                                    optimizer-dp<r>.h5 (one per dp rank), or with
//                                    ZeRO over cp too optimizer-dp<r>-cp<c>.h5 (one per rank)
//   <run>/checkpoints/latest         symlink to the newest complete step folder
// A checkpoint is written into step-000100.tmp, every file fsynced, then the
// folder renamed and `latest` replaced atomically (symlink + rename), so a process
// killed at any moment leaves the previous checkpoint loadable. The last `keep`
// complete checkpoints are kept.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>

namespace ssa::core {

class CheckpointDir {
 public:
  explicit CheckpointDir(std::filesystem::path run_dir);

  const std::filesystem::path& root() const { return root_; }
  // The newest complete checkpoint, if any (follows `latest`; a `latest` that
  // points at a missing folder or one without state.json is an error).
  std::optional<std::filesystem::path> latest() const;

  // Folder to write step `step` into (the .tmp name). Only the writing leader
  // calls prepare(): it removes any stale .tmp folder of an interrupted write.
  std::filesystem::path staging(int64_t step) const;
  void prepare(int64_t step) const;
  // Leader only, after every rank's files are written and fsynced: fsyncs the
  // folder, renames it to its final name, replaces `latest`, prunes to `keep`.
  std::filesystem::path commit(int64_t step, int64_t keep) const;

 private:
  std::filesystem::path root_;
};

// Writes `text` to `path` and fsyncs it (used for state.json and config.json).
void write_text_file_synced(const std::filesystem::path& path, const std::string& text);
std::string read_text_file(const std::filesystem::path& path);

}  // namespace ssa::core
