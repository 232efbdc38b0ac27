#include "monitoring/jsonl_log.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <system_error>

#include "monitoring/record_json.h"

namespace ssa::monitoring {

JsonlLog::JsonlLog(std::filesystem::path path) : path_(std::move(path)) {
  if (path_.has_parent_path()) {
    std::error_code ec;
    std::filesystem::create_directories(path_.parent_path(), ec);
    if (ec)
      throw std::runtime_error(fmt::format("JSONL log {}: cannot create its folder: {}", path_.string(), ec.message()));
  }
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0)
    throw std::runtime_error(
        fmt::format("JSONL log {}: cannot open for appending: {}", path_.string(), std::strerror(errno)));
  // A run killed mid-line leaves a last line without its newline: end it, so the
  // resumed run's first record starts a line of its own.
  struct stat info {};
  if (::fstat(fd_, &info) == 0 && info.st_size > 0) {
    char last = '\n';
    const int reader = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (reader >= 0) {
      if (::pread(reader, &last, 1, info.st_size - 1) != 1) last = '\n';
      ::close(reader);
    }
    if (last != '\n') append("");
  }
}

JsonlLog::~JsonlLog() {
  if (fd_ >= 0) ::close(fd_);
}

void JsonlLog::write(const StepRecord& record) { append(to_json(record).dump()); }
void JsonlLog::write(const EvalRecord& record) { append(to_json(record).dump()); }

void JsonlLog::append(const std::string& json) {
  const std::string line = json + "\n";
  size_t done = 0;
  while (done < line.size()) {
    const ssize_t n = ::write(fd_, line.data() + done, line.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      throw std::runtime_error(fmt::format("JSONL log {}: write failed: {}", path_.string(),
                                           n < 0 ? std::strerror(errno) : "no bytes written"));
    done += static_cast<size_t>(n);
  }
}

}  // namespace ssa::monitoring
