#include "core/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace ssa::core {
namespace fs = std::filesystem;

namespace {

std::string step_name(int64_t step) { return fmt::format("step-{:06d}", step); }

void fsync_dir(const fs::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) throw std::runtime_error(fmt::format("{}: cannot open folder to fsync", dir.string()));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw std::runtime_error(fmt::format("{}: fsync of folder failed", dir.string()));
}

}  // namespace

CheckpointDir::CheckpointDir(fs::path run_dir) : root_(std::move(run_dir) / "checkpoints") {}

std::optional<fs::path> CheckpointDir::latest() const {
  const fs::path link = root_ / "latest";
  std::error_code ec;
  if (!fs::is_symlink(fs::symlink_status(link, ec))) return std::nullopt;
  const fs::path target = root_ / fs::read_symlink(link);
  if (!fs::is_directory(target) || !fs::exists(target / "state.json"))
    throw std::runtime_error(fmt::format("{}: points at {}, which is not a complete checkpoint (no state.json)",
                                         link.string(), target.string()));
  return target;
}

fs::path CheckpointDir::staging(int64_t step) const { return root_ / (step_name(step) + ".tmp"); }

void CheckpointDir::prepare(int64_t step) const {
  fs::create_directories(root_);
  for (const auto& entry : fs::directory_iterator(root_))
    if (entry.path().extension() == ".tmp") fs::remove_all(entry.path());  // interrupted writes
  fs::create_directories(staging(step));
}

fs::path CheckpointDir::commit(int64_t step, int64_t keep) const {
  const fs::path tmp = staging(step);
  const fs::path final_dir = root_ / step_name(step);
  fsync_dir(tmp);
  if (fs::exists(final_dir)) fs::remove_all(final_dir);  // re-written step (e.g. after a resume)
  fs::rename(tmp, final_dir);
  // Atomic replacement of `latest`: a new symlink renamed over the old one.
  const fs::path link_tmp = root_ / "latest.tmp";
  fs::remove(link_tmp);
  fs::create_symlink(step_name(step), link_tmp);
  fs::rename(link_tmp, root_ / "latest");
  fsync_dir(root_);

  std::vector<fs::path> complete;
  for (const auto& entry : fs::directory_iterator(root_)) {
    const auto name = entry.path().filename().string();
    if (entry.is_directory() && name.rfind("step-", 0) == 0 && entry.path().extension() != ".tmp")
      complete.push_back(entry.path());
  }
  std::sort(complete.begin(), complete.end());
  for (size_t i = 0; i + static_cast<size_t>(keep) < complete.size(); ++i)
    if (complete[i] != final_dir) fs::remove_all(complete[i]);
  return final_dir;
}

void write_text_file_synced(const fs::path& path, const std::string& text) {
  {
    std::ofstream out(path, std::ios::trunc);
    if (!out) throw std::runtime_error(fmt::format("{}: cannot write", path.string()));
    out << text;
    out.flush();
    if (!out) throw std::runtime_error(fmt::format("{}: write failed", path.string()));
  }
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0 || ::fsync(fd) != 0) {
    if (fd >= 0) ::close(fd);
    throw std::runtime_error(fmt::format("{}: fsync failed", path.string()));
  }
  ::close(fd);
}

std::string read_text_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(fmt::format("{}: cannot read", path.string()));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace ssa::core
