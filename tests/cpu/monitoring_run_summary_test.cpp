// Run summaries read back from metrics.jsonl files written here with known
// values: medians after warm-up, ratio to the first run, communication with its
// exposed part, bytes, losses (the last record of a repeated step after a
// resume), and the errors for missing, malformed and empty files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "monitoring/run_summary.h"

namespace ssa::monitoring {
namespace {

namespace fs = std::filesystem;

class RunSummaryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("ssa-run-summary-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A run folder whose metrics.jsonl holds `lines`.
  fs::path run(const std::string& name, const std::vector<std::string>& lines) {
    const fs::path d = dir_ / name;
    fs::create_directories(d);
    std::ofstream f(d / "metrics.jsonl");
    for (const auto& l : lines) f << l << "\n";
    return d;
  }
  static std::string step(int64_t n, double loss, double seconds, double ring, double ring_exposed,
                          int64_t memory = 0) {
    return "{\"kind\":\"step\",\"step\":" + std::to_string(n) + ",\"loss\":" + std::to_string(loss) +
           ",\"step_seconds\":" + std::to_string(seconds) + ",\"tokens_per_second\":" + std::to_string(1000 / seconds) +
           ",\"mfu\":0.25,\"comm_seconds\":{\"cp_ring_kv\":" + std::to_string(ring) +
           ",\"cp_ring_kv_exposed\":" + std::to_string(ring_exposed) + "},\"gpu_memory_bytes\":" +
           std::to_string(memory) + ",\"cp_bytes_full\":2097152,\"cp_bytes_sparse\":0}";
  }
  fs::path dir_;
};

TEST_F(RunSummaryTest, MediansRatiosCommunicationAndLosses) {
  // Warm-up step 1 is slow and is left out; steps 2..4 take 0.2, 0.4, 0.3 s.
  const fs::path a = run("base", {step(1, 5.0, 9.0, 0.9, 0.9, int64_t{3} << 30), step(2, 4.0, 0.2, 0.004, 0.001),
                                  "{\"kind\":\"eval\",\"step\":2}", step(3, 3.5, 0.4, 0.006, 0.002),
                                  step(4, 3.0, 0.3, 0.005, 0.0)});
  // A resumed run: step 2 appears twice, the second record counts for its loss.
  const fs::path b = run("half", {step(1, 5.0, 9.0, 0, 0), step(2, 4.5, 0.1, 0, 0), step(2, 4.25, 0.15, 0, 0),
                                  step(3, 3.6, 0.2, 0, 0)});
  const RunSummary sa = summarize_run(a, 1), sb = summarize_run(b, 1);
  EXPECT_EQ(sa.steps, 4);
  EXPECT_EQ(sa.measured, 3);
  EXPECT_DOUBLE_EQ(sa.step_seconds, 0.3);
  EXPECT_NEAR(sa.comm_seconds.at("cp_ring_kv"), 0.005, 1e-12);
  EXPECT_NEAR(sa.comm_seconds.at("cp_ring_kv_exposed"), 0.001, 1e-12);
  EXPECT_DOUBLE_EQ(sa.peak_memory_gib, 3.0);
  EXPECT_EQ(sa.cp_bytes_full, 2097152);
  EXPECT_DOUBLE_EQ(sa.loss.at(4), 3.0);
  EXPECT_DOUBLE_EQ(sb.step_seconds, 0.15);  // median of 0.1, 0.15, 0.2
  EXPECT_DOUBLE_EQ(sb.loss.at(2), 4.25);
  // More warm-up than steps: every step counts.
  EXPECT_EQ(summarize_run(a / "metrics.jsonl", 10).measured, 4);

  const std::string t = summary_table({sa, sb}, {2, 4});
  EXPECT_NE(t.find("0.500x"), std::string::npos) << t;  // 0.15 / 0.3
  EXPECT_NE(t.find("cp_ring_kv 5.00 / 1.00"), std::string::npos) << t;
  EXPECT_NE(t.find("2.1 MB / 0 B"), std::string::npos) << t;
  EXPECT_NE(t.find("4.2500"), std::string::npos) << t;
  EXPECT_NE(t.find("       -"), std::string::npos) << t;  // run "half" has no step 4
}

TEST_F(RunSummaryTest, BadInputsNameTheFile) {
  auto message = [](const fs::path& p) {
    try {
      summarize_run(p, 0);
    } catch (const std::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message(dir_ / "missing").find("cannot read"), std::string::npos);
  const fs::path bad = run("bad", {step(1, 1, 1, 0, 0), "{not json"});
  EXPECT_NE(message(bad).find("metrics.jsonl:2 is not a JSON object"), std::string::npos) << message(bad);
  const fs::path no_loss = run("noloss", {"{\"kind\":\"step\",\"step\":1,\"step_seconds\":1}"});
  EXPECT_NE(message(no_loss).find("'loss'"), std::string::npos) << message(no_loss);
  const fs::path empty = run("empty", {"{\"kind\":\"eval\",\"step\":1}"});
  EXPECT_NE(message(empty).find("has no step records"), std::string::npos) << message(empty);
  EXPECT_THROW(summarize_run(empty, -1), std::invalid_argument);
}

}  // namespace
}  // namespace ssa::monitoring
