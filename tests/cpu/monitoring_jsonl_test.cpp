// The JSONL log: one parseable object per record with the record's values, each
// line on disk as soon as it is logged, a reopened log appending (resume), and
// a line cut short by a crash closed so later lines still parse.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "monitoring/jsonl_log.h"

namespace ssa::monitoring {
namespace {

namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::path(SSA_TEST_TMP) / "monitoring_jsonl" / name;
  fs::remove_all(dir);
  return dir;
}

std::vector<std::string> read_lines(const fs::path& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

StepRecord step_record(int64_t step) {
  StepRecord r;
  r.step = step;
  r.total_steps = 50;
  r.tokens_seen = step * 2048;
  r.loss = 5.5 - 0.25 * step;
  r.ce_loss = 5.25 - 0.25 * step;
  r.sparsity_loss = 0.015625;
  r.commitment_loss = 0.0078125;
  r.mode = step % 2 ? "full" : "sparse";
  r.full_passes = step % 2;
  r.sparse_passes = 1 - step % 2;
  r.lr = 1e-3;
  r.grad_norm = 1.5;
  r.step_seconds = 0.75;
  r.tokens_per_second = 2730.25;
  r.data_wait_seconds = 0.001;
  r.comm_seconds = {{"all_reduce", 0.125}};
  r.skipped_steps = 0;
  r.eta_seconds = 36.0;
  return r;
}

TEST(JsonlLog, EachRecordIsOneLineWithItsValuesOnDiskAtOnce) {
  const fs::path path = fresh_dir("lines") / "run" / "metrics.jsonl";  // parent folders created
  JsonlLog log(path);
  const double before = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  StepRecord with_checkpoint = step_record(1);
  with_checkpoint.checkpoint_seconds = 2.5;
  log.write(with_checkpoint);
  // Read while the log is still open: the line must already be in the file.
  std::vector<std::string> lines = read_lines(path);
  ASSERT_EQ(lines.size(), 1u);
  log.write(step_record(2));
  EvalRecord e;
  e.step = 2;
  e.seq_len = 512;
  e.top_k = 8;
  e.full_perplexity = 30.5;
  e.sparse_perplexity = 31.25;
  e.sparsity = 0.875;
  e.entropy_bits = 6.5;
  log.write(e);
  lines = read_lines(path);
  ASSERT_EQ(lines.size(), 3u);

  const auto first = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(first.at("kind"), "step");
  EXPECT_EQ(first.at("step"), 1);
  EXPECT_EQ(first.at("total_steps"), 50);
  EXPECT_EQ(first.at("tokens_seen"), 2048);
  EXPECT_DOUBLE_EQ(first.at("loss").get<double>(), 5.25);
  EXPECT_DOUBLE_EQ(first.at("ce_loss").get<double>(), 5.0);
  EXPECT_DOUBLE_EQ(first.at("sparsity_loss").get<double>(), 0.015625);
  EXPECT_DOUBLE_EQ(first.at("commitment_loss").get<double>(), 0.0078125);
  EXPECT_EQ(first.at("mode"), "full");
  EXPECT_EQ(first.at("full_passes"), 1);
  EXPECT_EQ(first.at("sparse_passes"), 0);
  EXPECT_DOUBLE_EQ(first.at("lr").get<double>(), 1e-3);
  EXPECT_DOUBLE_EQ(first.at("grad_norm").get<double>(), 1.5);
  EXPECT_DOUBLE_EQ(first.at("step_seconds").get<double>(), 0.75);
  EXPECT_DOUBLE_EQ(first.at("tokens_per_second").get<double>(), 2730.25);
  EXPECT_DOUBLE_EQ(first.at("data_wait_seconds").get<double>(), 0.001);
  EXPECT_DOUBLE_EQ(first.at("comm_seconds").at("all_reduce").get<double>(), 0.125);
  EXPECT_EQ(first.at("skipped_steps"), 0);
  EXPECT_DOUBLE_EQ(first.at("checkpoint_seconds").get<double>(), 2.5);
  EXPECT_DOUBLE_EQ(first.at("eta_seconds").get<double>(), 36.0);
  const double time = first.at("time").get<double>();
  EXPECT_GE(time, before - 1);
  EXPECT_LE(time, before + 60);

  const auto second = nlohmann::json::parse(lines[1]);
  EXPECT_EQ(second.at("step"), 2);
  EXPECT_EQ(second.at("mode"), "sparse");
  EXPECT_TRUE(second.at("checkpoint_seconds").is_null());  // no checkpoint on this step
  // Every step line has the same keys.
  std::vector<std::string> keys_first, keys_second;
  for (auto it = first.begin(); it != first.end(); ++it) keys_first.push_back(it.key());
  for (auto it = second.begin(); it != second.end(); ++it) keys_second.push_back(it.key());
  EXPECT_EQ(keys_first, keys_second);

  const auto eval = nlohmann::json::parse(lines[2]);
  EXPECT_EQ(eval.at("kind"), "eval");
  EXPECT_EQ(eval.at("step"), 2);
  EXPECT_EQ(eval.at("seq_len"), 512);
  EXPECT_EQ(eval.at("top_k"), 8);
  EXPECT_DOUBLE_EQ(eval.at("full_perplexity").get<double>(), 30.5);
  EXPECT_DOUBLE_EQ(eval.at("sparse_perplexity").get<double>(), 31.25);
  EXPECT_DOUBLE_EQ(eval.at("sparsity").get<double>(), 0.875);
  EXPECT_DOUBLE_EQ(eval.at("entropy_bits").get<double>(), 6.5);
}

TEST(JsonlLog, ReopenedLogAppends) {
  const fs::path path = fresh_dir("resume") / "metrics.jsonl";
  {
    JsonlLog log(path);
    for (int64_t s = 1; s <= 3; ++s) log.write(step_record(s));
  }
  {
    JsonlLog resumed(path);
    for (int64_t s = 4; s <= 5; ++s) resumed.write(step_record(s));
  }
  const auto lines = read_lines(path);
  ASSERT_EQ(lines.size(), 5u);
  for (size_t i = 0; i < lines.size(); ++i) EXPECT_EQ(nlohmann::json::parse(lines[i]).at("step"), i + 1);
}

TEST(JsonlLog, LineCutShortByACrashIsClosedOnReopen) {
  const fs::path path = fresh_dir("torn") / "metrics.jsonl";
  {
    JsonlLog log(path);
    log.write(step_record(1));
  }
  {
    std::ofstream out(path, std::ios::app);
    out << R"({"kind":"step","step":2,"lo)";  // killed mid-write
  }
  {
    JsonlLog resumed(path);
    resumed.write(step_record(2));
  }
  const auto lines = read_lines(path);
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(nlohmann::json::parse(lines[0]).at("step"), 1);
  EXPECT_FALSE(nlohmann::json::accept(lines[1]));
  EXPECT_EQ(nlohmann::json::parse(lines[2]).at("step"), 2);
}

TEST(JsonlLog, NonFiniteLossIsNull) {
  const fs::path path = fresh_dir("nan") / "metrics.jsonl";
  JsonlLog log(path);
  StepRecord r = step_record(1);
  r.loss = std::nan("");
  r.skipped_steps = 1;
  log.write(r);
  const auto line = nlohmann::json::parse(read_lines(path).at(0));
  EXPECT_TRUE(line.at("loss").is_null());
  EXPECT_EQ(line.at("skipped_steps"), 1);
}

TEST(JsonlLog, UnwritablePathThrowsNamingIt) {
  const fs::path dir = fresh_dir("unwritable");
  fs::create_directories(dir);
  const fs::path path = dir / "is-a-directory";
  fs::create_directories(path);  // opening a folder for writing fails
  try {
    JsonlLog log(path);
    FAIL() << "opening a folder as the log did not throw";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ssa::monitoring
