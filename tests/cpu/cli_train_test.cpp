// `ssa train` end to end on CPU: exact resume, kill during a checkpoint,
// incompatible resume refused, non-finite steps skipped, the three modes.
#include <gtest/gtest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <fstream>
#include <thread>

#include "cli_support.h"
#include "core/model.h"
#include "core/tensor_file.h"

namespace fs = std::filesystem;
using ssa::test::run_ssa;

namespace {

// A tiny model on tiny batches: each step takes milliseconds.
std::string tiny_args(const fs::path& data, const fs::path& run, int steps) {
  return "train --run-dir " + run.string() + " --set data.path=" + data.string() +
         " --set model.hidden=32 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=2"
         " --set model.ffn_hidden=64 --set train.seq_len=64 --set train.global_batch=4 --set train.micro_batch=2"
         " --set attention.top_k=2 --set checkpoint.every=2 --set monitoring.enabled=false"
         " --set monitoring.progress_every=1 --set eval.at_end=false --set train.steps=" + std::to_string(steps);
}

std::vector<nlohmann::json> step_lines(const fs::path& run) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(run / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["kind"] == "step") lines.push_back(j);
  }
  return lines;
}

// Loss of each step (as its exact double), by step number, later lines winning.
std::map<int64_t, double> losses(const fs::path& run) {
  std::map<int64_t, double> out;
  for (const auto& j : step_lines(run)) out[j["step"].get<int64_t>()] = j["loss"].is_null() ? NAN : j["loss"].get<double>();
  return out;
}

void expect_same_weights(const fs::path& a, const fs::path& b) {
  auto ta = ssa::core::read_tensor_file((a / "checkpoints/latest/model.h5").string());
  auto tb = ssa::core::read_tensor_file((b / "checkpoints/latest/model.h5").string());
  ASSERT_EQ(ta.size(), tb.size());
  for (size_t i = 0; i < ta.size(); ++i) {
    EXPECT_EQ(ta[i].name, tb[i].name);
    EXPECT_TRUE(at::equal(ta[i].tensor, tb[i].tensor)) << ta[i].name;
  }
}

class TrainCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ssa::test::fresh_dir("work");
    data_ = ssa::test::prepare_dataset(dir_);
  }
  fs::path dir_, data_;
};

}  // namespace

TEST_F(TrainCli, ResumeIsBitExact) {
  auto straight = run_ssa(tiny_args(data_, dir_ / "straight", 6));
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  EXPECT_NE(straight.output.find("resolved config"), std::string::npos);
  EXPECT_TRUE(fs::exists(dir_ / "straight/config.json"));

  for (int part = 0; part < 3; ++part) {
    auto r = run_ssa(tiny_args(data_, dir_ / "pieces", 6) + " --stop-after-steps 2");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    if (part > 0) EXPECT_NE(r.output.find("resumed from"), std::string::npos) << r.output;
  }
  auto a = losses(dir_ / "straight"), b = losses(dir_ / "pieces");
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 6u);
  for (const auto& [step, loss] : a) EXPECT_EQ(loss, b[step]) << "step " << step;
  EXPECT_LT(a[6], a[1]) << "loss should fall";
  expect_same_weights(dir_ / "straight", dir_ / "pieces");
  // `ssa report` lists both runs (the resumed one read across its three pieces)
  // with the same losses.
  auto report = run_ssa("report " + (dir_ / "straight").string() + " " + (dir_ / "pieces").string() +
                        " --warmup 1 --loss-steps 2 6");
  ASSERT_EQ(report.exit_code, 0) << report.output;
  EXPECT_NE(report.output.find("vs first"), std::string::npos) << report.output;
  EXPECT_NE(report.output.find(fmt::format("{:.4f}", a[6])), std::string::npos) << report.output;
  const std::string pieces_row = report.output.substr(report.output.rfind("pieces"));
  EXPECT_NE(pieces_row.find(fmt::format("{:.4f}", a[6])), std::string::npos) << report.output;
}

TEST_F(TrainCli, KilledWhileCheckpointingLeavesThePreviousOneAndResumes) {
  auto straight = run_ssa(tiny_args(data_, dir_ / "straight", 6));
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  const auto run = dir_ / "killed";
  ASSERT_EQ(run_ssa(tiny_args(data_, run, 6) + " --stop-after-steps 2").exit_code, 0);

  // Resume; the checkpoint of step 4 pauses after writing its files, before the
  // commit: kill the process there.
  pid_t pid = ssa::test::spawn_ssa(tiny_args(data_, run, 6), "SSA_TEST_CHECKPOINT_PAUSE_SECONDS=60", dir_ / "kill.log");
  const auto staging = run / "checkpoints/step-000004.tmp/state.json";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!fs::exists(staging) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(fs::exists(staging)) << "the run never reached the step-4 checkpoint";
  ::kill(-pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFSIGNALED(status));

  EXPECT_EQ(fs::read_symlink(run / "checkpoints/latest"), "step-000002");
  EXPECT_NO_THROW(ssa::core::read_tensor_file((run / "checkpoints/latest/model.h5").string()));
  auto resumed = run_ssa(tiny_args(data_, run, 6));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resumed from"), std::string::npos);
  EXPECT_FALSE(fs::exists(run / "checkpoints/step-000004.tmp")) << "stale staging folder must be cleaned";
  auto a = losses(dir_ / "straight"), b = losses(run);
  for (const auto& [step, loss] : a) EXPECT_EQ(loss, b[step]) << "step " << step;
  expect_same_weights(dir_ / "straight", run);
}

TEST_F(TrainCli, IncompatibleResumeIsRefusedAndNothingIsLost) {
  const auto run = dir_ / "run";
  ASSERT_EQ(run_ssa(tiny_args(data_, run, 2)).exit_code, 0);
  auto before = fs::read_symlink(run / "checkpoints/latest");
  auto r = run_ssa(tiny_args(data_, run, 4) + " --set model.hidden=64");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("model.hidden"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("cannot change on resume"), std::string::npos) << r.output;
  EXPECT_EQ(fs::read_symlink(run / "checkpoints/latest"), before);
  // Extending the run (more steps) is allowed; its step 3 is profiled.
  r = run_ssa(tiny_args(data_, run, 4) + " --set monitoring.profile_start=3 --set monitoring.profile_steps=1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("profile of 1 step(s) from step 3 on rank 0"), std::string::npos) << r.output;
  std::ifstream trace(run / "profile-rank0.json");
  ASSERT_TRUE(trace.good());
  const auto json = nlohmann::json::parse(trace, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(json.is_discarded());
  EXPECT_GT(json.at("traceEvents").size(), 10u);  // the step's operators
  EXPECT_TRUE(fs::exists(run / "profile-rank0.txt"));
}

TEST_F(TrainCli, NonFiniteStepsAreSkippedAndTooManyStopTheRun) {
  const auto run = dir_ / "skip";
  auto r = run_ssa(tiny_args(data_, run, 4), "SSA_TEST_NONFINITE_STEPS=2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto lines = step_lines(run);
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_EQ(lines[1]["skipped_steps"], 1);
  EXPECT_EQ(lines[3]["skipped_steps"], 1);

  const auto run2 = dir_ / "stop";
  r = run_ssa(tiny_args(data_, run2, 8) + " --set train.max_nonfinite_steps=2", "SSA_TEST_NONFINITE_STEPS=3,4");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("consecutive"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("step-000002"), std::string::npos) << "names the last good checkpoint: " << r.output;
  EXPECT_EQ(fs::read_symlink(run2 / "checkpoints/latest"), "step-000002");
}

TEST_F(TrainCli, BaselineModesAndBadInput) {
  for (const char* mode : {"full", "sparse"}) {
    const auto run = dir_ / mode;
    auto r = run_ssa(tiny_args(data_, run, 2) + " --set attention.mode=" + mode);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    auto lines = step_lines(run);
    ASSERT_EQ(lines.size(), 2u);
    EXPECT_EQ(lines[0]["mode"], mode);
    EXPECT_EQ(lines[0]["sparsity_loss"], 0.0);
  }
  auto r = run_ssa(tiny_args(data_, dir_ / "bad", 2) + " --set train.seq_len=100");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("train.seq_len"), std::string::npos) << r.output;
  r = run_ssa(tiny_args(dir_ / "no-such-data", dir_ / "bad2", 2));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("no-such-data"), std::string::npos) << r.output;
}

TEST_F(TrainCli, EvaluatesAtTheEndAndWithSsaEval) {
  const auto run = dir_ / "eval";
  const std::string eval_args = " --set eval.data=" + (data_ / "val").string() +
                                " --set eval.seq_lens=[64] --set eval.top_ks=[1,4] --set eval.batches=2";
  auto r = run_ssa(tiny_args(data_, run, 3) + " --set eval.at_end=true" + eval_args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("sparse PPL"), std::string::npos) << r.output;
  int eval_lines = 0;
  std::ifstream in(run / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) eval_lines += nlohmann::json::parse(line)["kind"] == "eval";
  EXPECT_EQ(eval_lines, 2);

  r = run_ssa("eval --run-dir " + run.string() + eval_args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto report = nlohmann::json::parse(std::ifstream(run / "eval.json"));
  ASSERT_EQ(report["rows"].size(), 2u);
  const auto& k1 = report["rows"][0];
  const auto& k4 = report["rows"][1];
  // 64 tokens = 4 blocks of 16: a budget of 4 blocks is full attention.
  EXPECT_NEAR(k4["sparsity"].get<double>(), 1.0, 1e-6);
  EXPECT_NEAR(k4["sparse_perplexity"].get<double>(), k4["full_perplexity"].get<double>(), 1e-3);
  EXPECT_LT(k1["sparsity"].get<double>(), 1.0);
  EXPECT_GT(k1["sparsity"].get<double>(), 0.0);
  EXPECT_GT(k1["entropy_bits"].get<double>(), 0.0);
  EXPECT_LE(k1["entropy_bits"].get<double>(), 6.0 + 1e-9) << "at most log2(64) bits";
  EXPECT_EQ(k1["layer_sparsity"].size(), 2u);

  r = run_ssa("eval --run-dir " + (dir_ / "no-run").string());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("no checkpoint"), std::string::npos) << r.output;
}
