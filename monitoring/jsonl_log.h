#pragma once
// The run's JSONL log (rank 0): one JSON object per line per step and per eval
// (see record_json.h for the keys), appended to <run>/metrics.jsonl or wherever
// the trainer points it. The file is opened in append mode so a resumed run
// continues it; each line goes to the file in one write(2) as it is logged, so a
// killed run loses at most the line being written. A line cut short by a crash
// is closed with a newline on reopening, so every later line still parses.
#include <filesystem>

#include "monitoring/step_record.h"

namespace ssa::monitoring {

class JsonlLog {
 public:
  // Creates the file (and its parent folders) if needed. Throws
  // std::runtime_error naming the path and the system error if it cannot.
  explicit JsonlLog(std::filesystem::path path);
  ~JsonlLog();
  JsonlLog(const JsonlLog&) = delete;
  JsonlLog& operator=(const JsonlLog&) = delete;

  // Throw std::runtime_error naming the path if the line cannot be written.
  void write(const StepRecord& record);
  void write(const EvalRecord& record);

  const std::filesystem::path& path() const { return path_; }

 private:
  void append(const std::string& line);

  std::filesystem::path path_;
  int fd_ = -1;
};

}  // namespace ssa::monitoring
