#pragma once
// Optional profile of a few training steps (monitoring.profile_steps > 0): the
// LibTorch (Kineto) profiler records CPU operators and, on GPU, every kernel of
// steps [profile_start, profile_start + profile_steps). Each rank writes
// <run>/profile-rank<R>.json (Chrome trace: chrome://tracing, Perfetto) and
// <run>/profile-rank<R>.txt: the kernels by total device time, with their share of
// the profiled wall time and the device-busy fraction (low: the host is the limit).
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>

namespace ssa::core {

class StepProfiler {
 public:
  // start: first profiled step (1-based); steps: how many (0: never profiles).
  StepProfiler(int64_t start, int64_t steps, std::filesystem::path run_dir, int rank, bool cuda, bool print);
  ~StepProfiler();
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  void before_step(int64_t step);  // step about to run (1-based)
  // After the step's work was synchronised; writes the files after the last one.
  void after_step(int64_t step);

 private:
  void finish();

  int64_t start_, end_;  // profiled steps [start_, end_)
  std::filesystem::path run_dir_;
  int rank_;
  bool cuda_, print_;
  bool active_ = false;
  double wall_seconds_ = 0;
  int64_t profiled_ = 0;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace ssa::core
