// A real one-node Slurm cluster (launch/slurm/local-cluster.sh, started for this
// program and stopped after it) runs launch/slurm/ssa-train.sbatch:
// - with a stand-in training command: the batch shell's USR1 trap reaches every
//   task through srun, exit code 3 makes the script requeue the job, and the
//   requeued job runs again (Restarts=1) and completes;
// - with `ssa train` on 2 ranks (cp = 2, CPU): preempted mid-run, it writes a
//   checkpoint, exits 3, is requeued, resumes from the checkpoint and finishes.
// Skipped unless running as root with slurm-wlm and munge installed.
// Preemption is delivered with `scancel --batch --signal=USR1`, the same signal
// to the same process as --signal=B:USR1@N, at a moment the test chooses.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

struct Shell {
  int status = -1;
  std::string out;
};

// Runs `command` under bash with SLURM_CONF set; returns exit status and stdout+stderr.
Shell sh(const std::string& command, const std::string& slurm_conf = "") {
  std::string full = slurm_conf.empty() ? command : fmt::format("export SLURM_CONF='{}'; {}", slurm_conf, command);
  full = fmt::format("bash -c '{}' 2>&1", [&] {
    std::string escaped;
    for (char c : full) escaped += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return escaped;
  }());
  Shell r;
  FILE* pipe = popen(full.c_str(), "r");
  if (!pipe) return r;
  std::array<char, 4096> buf{};
  size_t n = 0;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(pipe);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

bool have(const char* tool) { return sh(fmt::format("command -v {}", tool)).status == 0; }

class SlurmCluster : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (geteuid() != 0) {
      skip_reason_ = "needs root (the test cluster's daemons run as root)";
      return;
    }
    for (const char* tool : {"munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol"}) {
      if (!have(tool)) {
        skip_reason_ = fmt::format("{} not installed (apt-get install slurm-wlm munge libpmix2)", tool);
        return;
      }
    }
    dir_ = fs::path(SSA_TEST_TMP) / fmt::format("slurm-{}", getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    const Shell start = sh(fmt::format("'{}/launch/slurm/local-cluster.sh' start '{}'", SSA_SOURCE_DIR,
                                       (dir_ / "cluster").string()));
    if (start.status != 0) {
      start_error_ = start.out;
      return;
    }
    conf_ = (dir_ / "cluster" / "slurm.conf").string();
    // The CPU test node has no GPUs: the same script without its GPU request.
    sh(fmt::format("sed '/--gpus-per-node/d' '{}/launch/slurm/ssa-train.sbatch' > '{}'", SSA_SOURCE_DIR,
                   (dir_ / "ssa-train-cpu.sbatch").string()));
  }

  static void TearDownTestSuite() {
    if (!conf_.empty()) {
      sh(fmt::format("'{}/launch/slurm/local-cluster.sh' stop '{}'", SSA_SOURCE_DIR, (dir_ / "cluster").string()));
    }
  }

  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
    ASSERT_TRUE(start_error_.empty()) << "the test cluster did not start:\n" << start_error_;
  }

  static std::string job_field(const std::string& job, const std::string& field) {
    const Shell s = sh(fmt::format("scontrol show job {}", job), conf_);
    const auto at = s.out.find(field + "=");
    if (at == std::string::npos) return "";
    const auto end = s.out.find_first_of(" \n", at);
    return s.out.substr(at + field.size() + 1, end - at - field.size() - 1);
  }

  // Submits the CPU batch script with 2 tasks; returns the job id.
  static std::string submit(const std::string& env, const std::string& args, const fs::path& output) {
    const Shell s = sh(fmt::format("cd '{}' && {} sbatch --parsable --ntasks-per-node=2 --cpus-per-task=1 --time=10 "
                                   "--output='{}' '{}' {}",
                                   dir_.string(), env, output.string(), (dir_ / "ssa-train-cpu.sbatch").string(), args),
                       conf_);
    EXPECT_EQ(s.status, 0) << s.out;
    std::string id = s.out;
    while (!id.empty() && (id.back() == '\n' || id.back() == ' ')) id.pop_back();
    return id;
  }

  // Waits until `done()`; false after `limit`.
  template <class F>
  static bool wait_for(F done, std::chrono::seconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      if (done()) return true;
      std::this_thread::sleep_for(500ms);
    }
    return done();
  }

  // Preempts like --signal=B:USR1@N, waits for the requeue and makes the
  // requeued job eligible at once (Slurm otherwise holds it ~2 minutes), waits
  // until the batch log shows the second start ("restart 1": states seen before
  // it, such as CANCELLED for the requeued run, are not the end), then for the
  // job to end. Returns the final JobState.
  static std::string preempt_and_finish(const std::string& job, const fs::path& log) {
    const Shell s = sh(fmt::format("scancel --batch --signal=USR1 {}", job), conf_);
    EXPECT_EQ(s.status, 0) << s.out;
    // A job that ends before the signal lands is not requeued: fail at once, not
    // after the timeouts below.
    const bool requeued = wait_for(
        [&] {
          const std::string state = job_field(job, "JobState");
          return job_field(job, "Restarts") == "1" || state == "COMPLETED" || state == "FAILED";
        },
        120s);
    if (!requeued || job_field(job, "Restarts") != "1") {
      ADD_FAILURE() << "job was not requeued (state " << job_field(job, "JobState") << "):\n" << read_file(log);
      return job_field(job, "JobState");
    }
    const bool restarted = wait_for(
        [&] {
          if (job_field(job, "JobState") == "PENDING") sh(fmt::format("scontrol update JobId={} StartTime=now", job), conf_);
          return read_file(log).find("restart 1") != std::string::npos;
        },
        180s);
    EXPECT_TRUE(restarted) << "the requeued job did not start:\n" << read_file(log);
    wait_for(
        [&] {
          const std::string state = job_field(job, "JobState");
          return state == "COMPLETED" || state == "FAILED" || state == "CANCELLED" || state == "TIMEOUT";
        },
        300s);
    return job_field(job, "JobState");
  }

  static inline fs::path dir_;
  static inline std::string conf_;
  static inline std::string skip_reason_;
  static inline std::string start_error_;
};

TEST_F(SlurmCluster, BatchScriptForwardsUsr1AndRequeuesOnExitCode3) {
  // Stand-in for `ssa train`: waits; on USR1 "checkpoints" and exits 3; when a
  // checkpoint exists, resumes and exits 0.
  const fs::path fake = dir_ / "fake-ssa";
  {
    std::ofstream f(fake);
    f << "#!/usr/bin/env bash\n"
         "run=''\n"
         "while (($#)); do case $1 in --run-dir) run=$2; shift 2;; *) shift;; esac; done\n"
         "mkdir -p \"$run\"\n"
         "if [[ -e $run/checkpoint ]]; then echo \"task $SLURM_PROCID resumed\"; touch \"$run/done.$SLURM_PROCID\"; "
         "exit 0; fi\n"
         "trap 'echo \"task $SLURM_PROCID checkpointing\"; touch \"$run/checkpoint\"; exit 3' USR1\n"
         "touch \"$run/started.$SLURM_PROCID\"\n"
         // The signal may reach every process of the task: the sleeps ignore it, so
         // only the trap ends the wait (a killed sleep would end it first, racing the trap).
         "for i in $(seq 300); do (trap '' USR1; exec sleep 1) & wait $!; done\n"
         "exit 1\n";
  }
  fs::permissions(fake, fs::perms::owner_all);
  const fs::path run = dir_ / "run-fake";
  const fs::path out = dir_ / "fake-%j.out";
  const std::string job = submit(fmt::format("SSA_BINARY='{}'", fake.string()), run.string() + " none.yaml", out);
  ASSERT_FALSE(job.empty());
  ASSERT_TRUE(wait_for([&] { return fs::exists(run / "started.0") && fs::exists(run / "started.1"); }, 120s))
      << "tasks did not start";
  EXPECT_EQ(preempt_and_finish(job, dir_ / fmt::format("fake-{}.out", job)), "COMPLETED");
  EXPECT_EQ(job_field(job, "Restarts"), "1");
  EXPECT_TRUE(fs::exists(run / "done.0") && fs::exists(run / "done.1")) << "the requeued job did not resume";
  const std::string log = read_file(dir_ / fmt::format("fake-{}.out", job));
  EXPECT_NE(log.find("task 0 checkpointing"), std::string::npos) << log;
  EXPECT_NE(log.find("task 1 checkpointing"), std::string::npos) << log;
  EXPECT_NE(log.find("requeueing job " + job), std::string::npos) << log;
  EXPECT_NE(log.find("restart 1"), std::string::npos) << log;
}

TEST_F(SlurmCluster, TrainingIsPreemptedRequeuedAndResumed) {
  const char* binary = std::getenv("SSA_BINARY");
  ASSERT_NE(binary, nullptr) << "SSA_BINARY is not set";
  // A small byte-level corpus.
  const fs::path text = dir_ / "corpus.txt";
  {
    std::ofstream f(text);
    for (int i = 0; i < 3000; ++i) {
      f << "Line " << i << ": the quick brown fox jumps over the lazy dog while sparse attention keeps "
        << (i % 7) << " blocks.\n";
      if (i % 20 == 19) f << "\n";  // documents are separated by blank lines
    }
  }
  const fs::path data = dir_ / "data";
  const Shell prep = sh(fmt::format("'{}' data prepare --input '{}' --output '{}' --split blank-lines --val-fraction 0.05 -q", binary,
                                    text.string(), data.string()));
  ASSERT_EQ(prep.status, 0) << prep.out;
  // Long enough that the preemption (sent after 8 logged steps) lands mid-run
  // even on a fast machine.
  const int64_t steps = 160;
  const std::string overrides = fmt::format(
      "--set train.steps={} --set train.seq_len=64 --set train.global_batch=2 --set train.micro_batch=2 "
      "--set model.hidden=64 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=2 "
      "--set model.ffn_hidden=128 --set attention.block_size=8 --set attention.top_k=2 "
      "--set checkpoint.every=40 --set monitoring.enabled=false --set data.path='{}' --set eval.data='{}/val' "
      "--set eval.seq_lens=[64]",
      steps, data.string(), data.string());
  const fs::path run = dir_ / "run-train";
  const std::string job = submit("SSA_CP=2 SSA_BINARY=" + std::string(binary),
                                 fmt::format("'{}' '{}/configs/tiny.yaml' {}", run.string(), SSA_SOURCE_DIR, overrides),
                                 dir_ / "train-%j.out");
  ASSERT_FALSE(job.empty());
  // Preempt once a few steps are logged.
  const fs::path metrics = run / "metrics.jsonl";
  const bool progressed = wait_for(
      [&] {
        const std::string m = read_file(metrics);
        return std::count(m.begin(), m.end(), '\n') >= 8;
      },
      240s);
  const std::string log_path = (dir_ / fmt::format("train-{}.out", job)).string();
  ASSERT_TRUE(progressed) << "training did not log 8 steps; output:\n" << read_file(log_path);
  EXPECT_EQ(preempt_and_finish(job, log_path), "COMPLETED") << read_file(log_path);
  EXPECT_EQ(job_field(job, "Restarts"), "1");
  const std::string log = read_file(log_path);
  EXPECT_NE(log.find("requeueing job " + job), std::string::npos) << log;
  EXPECT_NE(log.find("resumed from"), std::string::npos) << log;
  EXPECT_NE(log.find("training finished"), std::string::npos) << log;
  EXPECT_TRUE(fs::exists(run / "checkpoints" / fmt::format("step-{:06d}", steps))) << log;
}

}  // namespace
