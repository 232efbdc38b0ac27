// `ssa train` under mpirun on CPU: a run checkpointed at dp = 4 resumes at dp = 2
// with the same global sample order and matching losses, and a 2-rank run sent
// SIGUSR1 checkpoints, exits with the requeue code and, restarted, ends with the
// losses of an uninterrupted run.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <thread>
#include <utility>

#include "cli_support.h"

namespace fs = std::filesystem;
using ssa::test::run_ssa;

namespace {

// mpirun as root on a small machine: allow root and more ranks than cores.
std::string mpirun(int np) {
  return "mpirun -np " + std::to_string(np) +
         " --oversubscribe --bind-to none --allow-run-as-root -x OMP_NUM_THREADS=1 " + ssa::test::ssa_binary();
}

int run_shell(const std::string& cmd, const fs::path& log) {
  const int status = std::system((cmd + " > " + log.string() + " 2>&1").c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string read_all(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// SSA with the streams drawn 50/50: the draw is keyed by each micro-batch's first
// sequence in the global batch, so different dp sizes (different micro-batch
// counts per rank, same micro-batch size) pass the same stream for each sequence
// and compute the same function.
std::string train_args(const fs::path& data, const fs::path& run, int dp, int cp, int steps) {
  return " train --run-dir " + run.string() + " --set data.path=" + data.string() +
         " --set model.hidden=32 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=2"
         " --set model.ffn_hidden=64 --set train.seq_len=64 --set train.global_batch=4 --set train.micro_batch=1"
         " --set attention.top_k=2 --set checkpoint.every=0 --set monitoring.enabled=false --set eval.at_end=false"
         " --set monitoring.progress_every=1 --set train.device=cpu"
         " --set parallel.dp=" + std::to_string(dp) + " --set parallel.cp=" + std::to_string(cp) +
         " --set train.steps=" + std::to_string(steps);
}

std::map<int64_t, double> losses(const fs::path& run) {
  std::map<int64_t, double> out;
  std::ifstream in(run / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j["kind"] == "step") out[j["step"].get<int64_t>()] = j["loss"].get<double>();
  }
  return out;
}

class DistributedTrain : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::system("command -v mpirun > /dev/null 2>&1") != 0) GTEST_SKIP() << "mpirun not installed";
    dir_ = ssa::test::fresh_dir("work");
    data_ = ssa::test::prepare_dataset(dir_);
  }
  fs::path dir_, data_;
};

// A 4-step run at grid (dp, cp) = a stopped after 2 steps and resumed at grid b
// ends with the losses of the same run left uninterrupted at a; returns the
// stopped-and-resumed run's directory.
fs::path expect_resume_on_grid(const fs::path& dir, const fs::path& data, std::pair<int, int> a,
                               std::pair<int, int> b) {
  const std::string name = std::to_string(a.first) + "x" + std::to_string(a.second) + "-then-" +
                           std::to_string(b.first) + "x" + std::to_string(b.second);
  const fs::path straight = dir / (name + "-straight"), run = dir / name;
  const int np_a = a.first * a.second, np_b = b.first * b.second;
  EXPECT_EQ(run_shell(mpirun(np_a) + train_args(data, straight, a.first, a.second, 4), dir / "straight.log"), 0)
      << read_all(dir / "straight.log");
  EXPECT_EQ(run_shell(mpirun(np_a) + train_args(data, run, a.first, a.second, 4) + " --stop-after-steps 2",
                      dir / "a.log"),
            0)
      << read_all(dir / "a.log");
  EXPECT_EQ(run_shell(mpirun(np_b) + train_args(data, run, b.first, b.second, 4), dir / "b.log"), 0)
      << read_all(dir / "b.log");
  EXPECT_NE(read_all(dir / "b.log").find("resumed from"), std::string::npos) << name;
  auto want = losses(straight), got = losses(run);
  EXPECT_EQ(want.size(), 4u) << name;
  EXPECT_EQ(got.size(), 4u) << name;
  for (const auto& [step, loss] : want) EXPECT_NEAR(got[step], loss, 1e-5 * std::abs(loss)) << name << " step " << step;
  return run;
}

}  // namespace

TEST_F(DistributedTrain, CheckpointAtDp4ResumesAtDp2) {
  expect_resume_on_grid(dir_, data_, {4, 1}, {2, 1});
  // Not vacuous: over the 16 sequences both streams were passed.
  const std::string log = read_all(dir_ / "straight.log");
  EXPECT_TRUE(log.find("mode full") != std::string::npos || log.find("mode mixed") != std::string::npos) << log;
  EXPECT_TRUE(log.find("mode sparse") != std::string::npos || log.find("mode mixed") != std::string::npos) << log;
}

// With cp > 1 the ZeRO shards spread over every rank: each writes its own, and
// the checkpoint resumes on a grid without cp (shards carry global offsets).
TEST_F(DistributedTrain, ShardsOverCpResumeAtDp2) {
  const fs::path run = expect_resume_on_grid(dir_, data_, {1, 2}, {2, 1});
  const fs::path at_cp2 = run / "checkpoints/step-000002", at_dp2 = run / "checkpoints/step-000004";
  for (const char* f : {"optimizer-dp0-cp0.h5", "optimizer-dp0-cp1.h5"}) EXPECT_TRUE(fs::exists(at_cp2 / f)) << f;
  EXPECT_FALSE(fs::exists(at_cp2 / "optimizer-dp0.h5"));
  for (const char* f : {"optimizer-dp0.h5", "optimizer-dp1.h5"}) EXPECT_TRUE(fs::exists(at_dp2 / f)) << f;
}

// Gradients reduced bucket by bucket during the backward (the default) train
// the same model as gradients reduced after it, with recomputed layers and
// micro-batches, over dp and cp together and over cp alone.
TEST_F(DistributedTrain, ReductionDuringBackwardEqualsReductionAfterIt) {
  for (const auto& [dp, cp] : {std::pair<int, int>{2, 2}, {1, 2}}) {
    const std::string grid = std::to_string(dp) + "x" + std::to_string(cp);
    const std::string common = " --set train.recompute=true --set optimizer.bucket_mb=1";
    const fs::path on = dir_ / ("overlap-" + grid), off = dir_ / ("after-" + grid);
    ASSERT_EQ(run_shell(mpirun(dp * cp) + train_args(data_, on, dp, cp, 3) + common, dir_ / "on.log"), 0)
        << read_all(dir_ / "on.log");
    ASSERT_EQ(run_shell(mpirun(dp * cp) + train_args(data_, off, dp, cp, 3) + common +
                            " --set optimizer.overlap_reduction=false",
                        dir_ / "off.log"),
              0)
        << read_all(dir_ / "off.log");
    auto a = losses(on), b = losses(off);
    ASSERT_EQ(a.size(), 3u) << grid;
    ASSERT_EQ(b.size(), 3u) << grid;
    for (const auto& [step, loss] : a) EXPECT_NEAR(b[step], loss, 1e-6 * std::abs(loss)) << grid << " step " << step;
  }
}

TEST_F(DistributedTrain, Sigusr1CheckpointsExitsForRequeueAndResumesExactly) {
  ASSERT_EQ(run_shell(mpirun(2) + train_args(data_, dir_ / "straight", 1, 2, 40), dir_ / "straight.log"), 0)
      << read_all(dir_ / "straight.log");
  const auto run = dir_ / "preempted";
  const auto log = dir_ / "preempted.log";
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setpgid(0, 0);
    const std::string cmd = "exec " + mpirun(2) + train_args(data_, run, 1, 2, 40) + " > " + log.string() + " 2>&1";
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait until a few steps are logged, then signal mpirun, which forwards it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(90);
  while (losses(run).size() < 3 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const auto signalled_at = losses(run).size();
  ASSERT_GE(signalled_at, 3u) << read_all(log);
  ::kill(pid, SIGUSR1);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status)) << read_all(log);
  EXPECT_EQ(WEXITSTATUS(status), 3) << read_all(log);
  const auto stopped_at = losses(run).size();
  EXPECT_LT(stopped_at, 40u) << "the signal (sent once " << signalled_at
                             << " steps were logged) must stop the run early\n" << read_all(log);
  EXPECT_TRUE(fs::exists(run / "checkpoints/latest/state.json"));

  ASSERT_EQ(run_shell(mpirun(2) + train_args(data_, run, 1, 2, 40), dir_ / "restart.log"), 0)
      << read_all(dir_ / "restart.log");
  auto a = losses(dir_ / "straight"), b = losses(run);
  ASSERT_EQ(b.size(), 40u);
  for (const auto& [step, loss] : a) EXPECT_EQ(b[step], loss) << "step " << step;
}
