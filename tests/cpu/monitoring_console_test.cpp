// The console progress line: exact text for known records, the h:mm:ss and
// rate formats at their rounding edges, and printing only when due.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "monitoring/console_progress.h"

namespace ssa::monitoring {
namespace {

TEST(ConsoleProgress, HoursMinutesSeconds) {
  EXPECT_EQ(format_hms(0), "0:00:00");
  EXPECT_EQ(format_hms(59.4), "0:00:59");
  EXPECT_EQ(format_hms(59.6), "0:01:00");
  EXPECT_EQ(format_hms(3723), "1:02:03");
  EXPECT_EQ(format_hms(100000), "27:46:40");
  EXPECT_EQ(format_hms(-1), "-:--:--");
  EXPECT_EQ(format_hms(std::nan("")), "-:--:--");
  EXPECT_EQ(format_hms(std::numeric_limits<double>::infinity()), "-:--:--");
}

TEST(ConsoleProgress, RatesWithSuffixes) {
  EXPECT_EQ(format_rate(0), "0");
  EXPECT_EQ(format_rate(950), "950");
  EXPECT_EQ(format_rate(999.4), "999");
  EXPECT_EQ(format_rate(999.6), "1.00k");
  EXPECT_EQ(format_rate(1234), "1.23k");
  EXPECT_EQ(format_rate(12345), "12.3k");
  EXPECT_EQ(format_rate(123456), "123k");
  EXPECT_EQ(format_rate(2.5e6), "2.50M");
  EXPECT_EQ(format_rate(3.25e9), "3.25G");
}

StepRecord record() {
  StepRecord r;
  r.step = 120;
  r.total_steps = 1000;
  r.loss = 3.21454;
  r.ce_loss = 3.10016;
  r.sparsity_loss = 0.00612;
  r.commitment_loss = 0.00529;
  r.mode = "sparse";
  r.lr = 6e-4;
  r.tokens_per_second = 12345;
  r.eta_seconds = 3723;
  r.data_wait_seconds = 0.0123;
  return r;
}

TEST(ConsoleProgress, LineHasEveryField) {
  EXPECT_EQ(format_progress_line(record()),
            "step  120/1000 | loss 3.2145 | ce 3.1002 | align s 0.00612 c 0.00529 | mode sparse | "
            "lr 6.00e-04 | 12.3k tok/s | eta 1:02:03 | data wait 0.012 s");
  StepRecord r = record();
  r.mode.clear();
  r.skipped_steps = 2;
  r.loss = std::nan("");
  EXPECT_EQ(format_progress_line(r),
            "step  120/1000 | loss nan | ce 3.1002 | align s 0.00612 c 0.00529 | mode - | "
            "lr 6.00e-04 | 12.3k tok/s | eta 1:02:03 | data wait 0.012 s | skipped 2");
  r.sparsity_loss = 3.14159e-6;  // small alignment losses keep their digits
  r.commitment_loss = 0.0;
  EXPECT_NE(format_progress_line(r).find("align s 3.14e-06 c 0 |"), std::string::npos) << format_progress_line(r);
}

TEST(ConsoleProgress, EvalLine) {
  EvalRecord e;
  e.step = 500;
  e.seq_len = 1024;
  e.top_k = 8;
  e.full_perplexity = 21.5;
  e.sparse_perplexity = 22.125;
  e.sparsity = 0.91234;
  e.entropy_bits = 5.25;
  EXPECT_EQ(format_eval_line(e),
            "eval step 500 seq_len 1024 top_k 8 | ppl full 21.500 sparse 22.125 | attention sparsity 0.9123 | "
            "entropy 5.250 bits");
}

TEST(ConsoleProgress, PrintsEveryNStepsAndTheLast) {
  std::ostringstream out;
  ConsoleProgress progress(4, out);
  StepRecord r = record();
  r.total_steps = 10;
  int lines = 0;
  for (int64_t step = 1; step <= 10; ++step) {
    r.step = step;
    progress.on_step(r);
    const std::string text = out.str();
    const int now = static_cast<int>(std::count(text.begin(), text.end(), '\n'));
    EXPECT_EQ(now - lines, step == 4 || step == 8 || step == 10 ? 1 : 0) << "step " << step;
    lines = now;
  }
  EXPECT_EQ(out.str().substr(0, 12), "step  4/10 |");
  EXPECT_THROW(ConsoleProgress(0, out), std::runtime_error);
}

}  // namespace
}  // namespace ssa::monitoring
