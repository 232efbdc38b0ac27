#include "monitoring/run_summary.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <set>
#include <stdexcept>

namespace ssa::monitoring {
namespace {

namespace fs = std::filesystem;

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string bytes_text(int64_t b) {
  if (b >= (int64_t{1} << 20)) return fmt::format("{:.1f} MB", static_cast<double>(b) / 1e6);
  if (b >= 1024) return fmt::format("{:.1f} kB", static_cast<double>(b) / 1e3);
  return fmt::format("{} B", b);
}

}  // namespace

RunSummary summarize_run(const fs::path& run, int64_t warmup) {
  if (warmup < 0) throw std::invalid_argument(fmt::format("report: warm-up steps must be >= 0, got {}", warmup));
  const fs::path file = fs::is_directory(run) ? run / "metrics.jsonl" : run;
  std::ifstream in(file);
  if (!in) {
    throw std::runtime_error(fmt::format("report: cannot read '{}' (a run folder with metrics.jsonl, or the file)",
                                         file.string()));
  }
  RunSummary s;
  // The run folder's name; a metrics file under another name: its stem.
  s.name = fs::is_directory(run) ? run.filename().string()
           : file.filename() == "metrics.jsonl" ? file.parent_path().filename().string()
                                                : file.stem().string();
  if (s.name.empty()) s.name = file.string();
  std::vector<nlohmann::json> steps;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      throw std::runtime_error(fmt::format("report: {}:{} is not a JSON object", file.string(), number));
    }
    if (j.value("kind", "") != "step") continue;
    for (const char* key : {"step", "loss", "step_seconds"}) {
      if (!j.contains(key) || !j[key].is_number()) {
        throw std::runtime_error(
            fmt::format("report: {}:{}: step record without a numeric '{}'", file.string(), number, key));
      }
    }
    steps.push_back(std::move(j));
  }
  if (steps.empty()) throw std::runtime_error(fmt::format("report: '{}' has no step records", file.string()));
  s.steps = static_cast<int64_t>(steps.size());
  const size_t first = static_cast<size_t>(warmup) < steps.size() ? static_cast<size_t>(warmup) : 0;
  s.measured = static_cast<int64_t>(steps.size() - first);
  std::vector<double> step_s, tok_s, mfu;
  std::set<std::string> ops;
  for (const auto& j : steps) {
    s.peak_memory_gib = std::max(s.peak_memory_gib, j.value("gpu_memory_bytes", 0.0) / static_cast<double>(1 << 30));
    s.loss[j["step"].get<int64_t>()] = j["loss"].get<double>();
    if (j.contains("comm_seconds") && j["comm_seconds"].is_object()) {
      for (const auto& [op, v] : j["comm_seconds"].items()) ops.insert(op);
    }
  }
  for (size_t i = first; i < steps.size(); ++i) {
    step_s.push_back(steps[i]["step_seconds"].get<double>());
    tok_s.push_back(steps[i].value("tokens_per_second", 0.0));
    mfu.push_back(steps[i].value("mfu", 0.0));
  }
  for (const auto& op : ops) {
    std::vector<double> v;
    for (size_t i = first; i < steps.size(); ++i) {
      const auto& c = steps[i].value("comm_seconds", nlohmann::json::object());
      v.push_back(c.contains(op) && c[op].is_number() ? c[op].get<double>() : 0.0);
    }
    s.comm_seconds[op] = median(v);
  }
  s.step_seconds = median(step_s);
  s.tokens_per_second = median(tok_s);
  s.mfu = median(mfu);
  s.cp_bytes_full = steps.back().value("cp_bytes_full", int64_t{0});
  s.cp_bytes_sparse = steps.back().value("cp_bytes_sparse", int64_t{0});
  return s;
}

std::string summary_table(const std::vector<RunSummary>& runs, const std::vector<int64_t>& loss_steps) {
  if (runs.empty()) return "";
  size_t width = 4;
  for (const auto& r : runs) width = std::max(width, r.name.size());
  std::string t = fmt::format("{:<{}}  {:>5}  {:>8}  {:>8}  {:>9}  {:>5}  {:>8}  {:>21}\n", "run", width, "steps",
                              "step s", "vs first", "tokens/s", "MFU", "peak GiB", "cp bytes full/sparse");
  for (const auto& r : runs) {
    const double ratio = runs.front().step_seconds > 0 ? r.step_seconds / runs.front().step_seconds : 0.0;
    t += fmt::format("{:<{}}  {:>5}  {:>8.4f}  {:>7.3f}x  {:>9.0f}  {:>5.3f}  {:>8.2f}  {:>21}\n", r.name, width,
                     r.steps, r.step_seconds, ratio, r.tokens_per_second, r.mfu, r.peak_memory_gib,
                     bytes_text(r.cp_bytes_full) + " / " + bytes_text(r.cp_bytes_sparse));
  }
  t += fmt::format("medians over the steps after warm-up ({} of {} in the first run)\n", runs.front().measured,
                   runs.front().steps);
  bool any_comm = false;
  for (const auto& r : runs) {
    std::string line;
    for (const auto& [op, sec] : r.comm_seconds) {
      if (op.size() > 8 && op.compare(op.size() - 8, 8, "_exposed") == 0) continue;
      const auto exposed = r.comm_seconds.find(op + "_exposed");
      if (sec <= 0 && exposed == r.comm_seconds.end()) continue;
      if (exposed == r.comm_seconds.end()) {
        line += fmt::format("  {} {:.2f}", op, 1e3 * sec);
      } else {
        line += fmt::format("  {} {:.2f} / {:.2f}", op, 1e3 * sec, 1e3 * exposed->second);
      }
    }
    if (line.empty()) continue;
    if (!any_comm) t += "communication, ms per step (CUDA: on its stream / compute waited for it):\n";
    any_comm = true;
    t += fmt::format("{:<{}}{}\n", r.name, width, line);
  }
  if (!loss_steps.empty()) {
    t += fmt::format("{:<{}}", "loss at step", width);
    for (int64_t s : loss_steps) t += fmt::format("  {:>8}", s);
    t += "\n";
    for (const auto& r : runs) {
      t += fmt::format("{:<{}}", r.name, width);
      for (int64_t s : loss_steps) {
        const auto it = r.loss.find(s);
        t += it == r.loss.end() ? fmt::format("  {:>8}", "-") : fmt::format("  {:>8.4f}", it->second);
      }
      t += "\n";
    }
  }
  return t;
}

}  // namespace ssa::monitoring
