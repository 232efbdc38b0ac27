#pragma once
// The console progress line rank 0 prints every N steps, e.g.
//   step  120/1000 | loss 3.2145 | ce 3.1002 | align s 0.0061 c 0.0053 | mode sparse |
//   lr 6.00e-04 | 12.3k tok/s | eta 1:02:03 | data wait 0.012 s
// (one line; "| skipped N" is appended once any step was skipped).
#include <cstdint>
#include <iosfwd>
#include <string>

#include "monitoring/step_record.h"

namespace ssa::monitoring {

// h:mm:ss, hours unbounded ("27:46:40"); seconds rounded to the nearest one.
// Negative or non-finite (no estimate yet): "-:--:--".
std::string format_hms(double seconds);
// A rate with a k/M/G suffix and 3 significant figures: 950 -> "950",
// 12345 -> "12.3k", 2.5e6 -> "2.50M".
std::string format_rate(double per_second);
std::string format_progress_line(const StepRecord& record);
std::string format_eval_line(const EvalRecord& record);

class ConsoleProgress {
 public:
  // every: print every that many steps (monitoring.progress_every), >= 1;
  // throws std::runtime_error otherwise.
  explicit ConsoleProgress(int64_t every);
  ConsoleProgress(int64_t every, std::ostream& out);

  // Due on multiples of every and on the last step.
  bool due(const StepRecord& record) const;
  void on_step(const StepRecord& record);  // prints the line when due
  void on_eval(const EvalRecord& record);  // always prints

 private:
  int64_t every_;
  std::ostream* out_;
};

}  // namespace ssa::monitoring
