#include "core/step_profiler.h"

#include <torch/csrc/autograd/profiler_kineto.h>

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>
#include <vector>

namespace ssa::core {
namespace {

namespace prof = torch::profiler::impl;

std::set<prof::ActivityType> activities(bool cuda) {
  std::set<prof::ActivityType> a{prof::ActivityType::CPU};
  if (cuda) a.insert(prof::ActivityType::CUDA);
  return a;
}

struct KernelTotal {
  std::string name;
  double seconds = 0;
  int64_t calls = 0;
};

std::string shortened(const std::string& name) {
  constexpr size_t kMax = 110;
  return name.size() <= kMax ? name : name.substr(0, kMax - 3) + "...";
}

}  // namespace

StepProfiler::StepProfiler(int64_t start, int64_t steps, std::filesystem::path run_dir, int rank, bool cuda,
                           bool print)
    : start_(start), end_(start + steps), run_dir_(std::move(run_dir)), rank_(rank), cuda_(cuda), print_(print) {
  if (steps > 0 && start < 1) {
    throw std::invalid_argument(fmt::format("monitoring.profile_start must be >= 1, got {}", start));
  }
}

StepProfiler::~StepProfiler() {
  if (!active_) return;
  try {
    torch::autograd::profiler::disableProfiler();  // a run that stopped mid-profile: drop it
  } catch (...) {
  }
}

void StepProfiler::before_step(int64_t step) {
  if (step != start_ || start_ >= end_) return;
  const prof::ProfilerConfig config(prof::ProfilerState::KINETO);
  torch::autograd::profiler::prepareProfiler(config, activities(cuda_));
  torch::autograd::profiler::enableProfiler(config, activities(cuda_));
  active_ = true;
  t0_ = std::chrono::steady_clock::now();
}

void StepProfiler::after_step(int64_t step) {
  if (!active_) return;
  ++profiled_;
  if (step + 1 >= end_) finish();
}

void StepProfiler::finish() {
  wall_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  std::unique_ptr<torch::autograd::profiler::ProfilerResult> result = torch::autograd::profiler::disableProfiler();
  active_ = false;
  const std::filesystem::path trace = run_dir_ / fmt::format("profile-rank{}.json", rank_);
  result->save(trace.string());

  // Device kernels by name (CPU operators only when there is no device).
  std::map<std::string, KernelTotal> totals;
  double busy = 0;
  for (const auto& e : result->events()) {
    const bool device = e.deviceType() != c10::DeviceType::CPU;
    if (device != cuda_) continue;
    KernelTotal& t = totals[e.name()];
    t.name = e.name();
    t.seconds += static_cast<double>(e.durationNs()) * 1e-9;
    t.calls += 1;
    if (device) busy += static_cast<double>(e.durationNs()) * 1e-9;
  }
  std::vector<KernelTotal> sorted;
  for (auto& [name, t] : totals) sorted.push_back(t);
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.seconds > b.seconds; });

  const double per = 1.0 / static_cast<double>(std::max<int64_t>(1, profiled_));
  std::string text = fmt::format("profile of {} step(s) from step {} on rank {}: {:.1f} ms wall per step\n", profiled_,
                                 start_, rank_, 1e3 * wall_seconds_ * per);
  if (cuda_) {
    text += fmt::format("device busy (sum of kernel times over the wall time; streams may overlap): {:.1f}%\n",
                        100.0 * busy / wall_seconds_);
  }
  text += fmt::format("{:>10} {:>7} {:>7}  {}\n", "ms/step", "share", "calls",
                      cuda_ ? "kernel" : "operator (inclusive)");
  for (size_t i = 0; i < sorted.size() && i < 30; ++i) {
    const KernelTotal& t = sorted[i];
    text += fmt::format("{:>10.3f} {:>6.1f}% {:>7}  {}\n", 1e3 * t.seconds * per, 100.0 * t.seconds / wall_seconds_,
                        static_cast<int64_t>(static_cast<double>(t.calls) * per), shortened(t.name));
  }
  const std::filesystem::path summary = run_dir_ / fmt::format("profile-rank{}.txt", rank_);
  std::ofstream(summary) << text;
  if (print_) fmt::print("{}profile written to {} and {}\n", text, trace.string(), summary.string());
}

}  // namespace ssa::core
