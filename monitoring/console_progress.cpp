#include "monitoring/console_progress.h"

#include <fmt/format.h>

#include <cmath>
#include <iostream>
#include <stdexcept>

namespace ssa::monitoring {

std::string format_hms(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "-:--:--";
  const auto total = static_cast<int64_t>(std::llround(seconds));
  return fmt::format("{}:{:02}:{:02}", total / 3600, total / 60 % 60, total % 60);
}

std::string format_rate(double per_second) {
  if (!std::isfinite(per_second)) return fmt::format("{}", per_second);
  // Thresholds sit where rounding would carry: 999.7 prints as "1.00k", not "1000".
  const char* suffixes[] = {"", "k", "M", "G"};
  double scaled = per_second;
  int unit = 0;
  while (unit < 3 && std::fabs(scaled) >= 999.5) {
    scaled /= 1000;
    ++unit;
  }
  if (unit == 0) return fmt::format("{:.0f}", scaled);
  const double a = std::fabs(scaled);
  const int decimals = a >= 99.95 ? 0 : a >= 9.995 ? 1 : 2;
  return fmt::format("{:.{}f}{}", scaled, decimals, suffixes[unit]);
}

std::string format_progress_line(const StepRecord& r) {
  const int width = static_cast<int>(std::to_string(r.total_steps).size());
  std::string line = fmt::format(
      // Alignment losses in 3 significant digits: on long sequences they are 1e-5 and below.
      "step {:>{}}/{} | loss {:.4f} | ce {:.4f} | align s {:.3g} c {:.3g} | mode {} | lr {:.2e} | "
      "{} tok/s | eta {} | data wait {:.3f} s",
      r.step, width, r.total_steps, r.loss, r.ce_loss, r.sparsity_loss, r.commitment_loss,
      r.mode.empty() ? "-" : r.mode, r.lr, format_rate(r.tokens_per_second), format_hms(r.eta_seconds),
      r.data_wait_seconds);
  if (r.skipped_steps > 0) line += fmt::format(" | skipped {}", r.skipped_steps);
  return line;
}

std::string format_eval_line(const EvalRecord& r) {
  return fmt::format(
      "eval step {} seq_len {} top_k {} | ppl full {:.3f} sparse {:.3f} | attention sparsity {:.4f} | "
      "entropy {:.3f} bits",
      r.step, r.seq_len, r.top_k, r.full_perplexity, r.sparse_perplexity, r.sparsity, r.entropy_bits);
}

ConsoleProgress::ConsoleProgress(int64_t every) : ConsoleProgress(every, std::cout) {}

ConsoleProgress::ConsoleProgress(int64_t every, std::ostream& out) : every_(every), out_(&out) {
  if (every < 1)
    throw std::runtime_error(
        fmt::format("console progress: monitoring.progress_every = {}, must be >= 1", every));
}

bool ConsoleProgress::due(const StepRecord& r) const {
  return r.step % every_ == 0 || r.step == r.total_steps;
}

void ConsoleProgress::on_step(const StepRecord& r) {
  if (due(r)) *out_ << format_progress_line(r) << std::endl;
}

void ConsoleProgress::on_eval(const EvalRecord& r) { *out_ << format_eval_line(r) << std::endl; }

}  // namespace ssa::monitoring
