// End to end with a real Prometheus server: a training process serves metrics on
// loopback, /usr/bin/prometheus scrapes it every second (generated config, own
// free port, TSDB in a temp folder), and the test finds the loss through
// Prometheus's HTTP query API, then runs every query of the Grafana dashboard
// against that Prometheus (valid PromQL, and data behind each one).
//
// Every process the test starts is killed and reaped on every path (RAII, and
// PR_SET_PDEATHSIG in case the test process itself dies).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cpu/monitoring_test_support.h"
#include "monitoring/metrics_exporter.h"

namespace ssa::monitoring {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr const char* kPrometheus = "/usr/bin/prometheus";

// A child process, killed (SIGKILL) and reaped when this goes out of scope.
class ChildProcess {
 public:
  ChildProcess() = default;
  explicit ChildProcess(pid_t pid) : pid_(pid) {}
  ChildProcess(ChildProcess&& other) noexcept : pid_(std::exchange(other.pid_, -1)) {}
  ChildProcess& operator=(ChildProcess&& other) noexcept {
    stop();
    pid_ = std::exchange(other.pid_, -1);
    return *this;
  }
  ~ChildProcess() { stop(); }

  pid_t pid() const { return pid_; }
  // Exit description once it has ended ("exit code 3", "signal 9"); empty while running.
  std::string ended() {
    if (pid_ <= 0) return "not started";
    if (!status_) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) != pid_) return "";
      status_ = status;
    }
    return WIFEXITED(*status_) ? "exit code " + std::to_string(WEXITSTATUS(*status_))
                               : "signal " + std::to_string(WTERMSIG(*status_));
  }
  void stop() {
    if (pid_ <= 0) return;
    if (!status_) {
      ::kill(pid_, SIGKILL);
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
    pid_ = -1;
    status_.reset();
  }

 private:
  pid_t pid_ = -1;
  std::optional<int> status_;
};

// Forks; the child dies with the test process and runs body (which must not return).
ChildProcess fork_child(const std::function<void()>& body) {
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(std::string("fork failed: ") + std::strerror(errno));
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(120);  // the parent died before prctl
    body();
    ::_exit(121);
  }
  return ChildProcess(pid);
}

// Child side: stdout and stderr to log, then exec argv (never returns).
[[noreturn]] void exec_logged(const std::vector<std::string>& argv, const fs::path& log) {
  const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    ::dup2(fd, STDOUT_FILENO);
    ::dup2(fd, STDERR_FILENO);
    ::close(fd);
  }
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  ::execv(args[0], args.data());
  std::fprintf(stderr, "exec %s failed: %s\n", args[0], std::strerror(errno));
  ::_exit(127);
}

std::string tail_of(const fs::path& file, size_t bytes = 3000) {
  std::ifstream in(file);
  std::stringstream text;
  text << in.rdbuf();
  const std::string all = text.str();
  return all.size() > bytes ? all.substr(all.size() - bytes) : all;
}

struct TempDir {
  fs::path path;
  TempDir() {
    fs::create_directories(SSA_TEST_TMP);
    std::string pattern = (fs::path(SSA_TEST_TMP) / "core_prometheus_XXXXXX").string();
    if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp " + pattern + " failed");
    path = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

// ---------------------------------------------------------------------------
// The training process. THE ONE PLACE TO SWITCH TO THE REAL TRAINER:
// set kRealTrainer = true once `ssa train` serves metrics. The test then makes
// a small dataset with `ssa data prepare` and execs (ssa_train_argv)
//   $SSA_BINARY train --run-dir <tmp>/run --set train.steps=N --set monitoring.port=P
//     --set data.path=<tmp>/data ... (a model small enough for ~1 step/s)
// Until then a forked child plays the trainer: a MetricsExporter on the
// port recording steps with the known loss fake_loss(step), 10 steps a second.
// It would run 16 s but is killed once Prometheus has answered (about 7 s in);
// the margin keeps a slow Prometheus start on a busy machine from failing the
// test. The checks that need the known loss run only for the stand-in.
constexpr bool kRealTrainer = true;
// ---------------------------------------------------------------------------

constexpr int64_t kFakeSteps = 160;
constexpr auto kFakeStepTime = 100ms;
// Exact in binary, so PromQL can check loss + step / 16 == 12 exactly.
double fake_loss(int64_t step) { return 12.0 - static_cast<double>(step) / 16.0; }

[[noreturn]] void run_fake_trainer(int port) {
  int code = 0;
  {
    ExporterOptions options;
    options.port = port;
    options.job = "ssa";
    MetricsExporter exporter(options);
    if (!exporter.serving()) code = 3;
    for (int64_t step = 1; code == 0 && step <= kFakeSteps; ++step) {
      StepRecord r;
      r.step = step;
      r.total_steps = kFakeSteps;
      r.tokens_seen = step * 2048;
      r.loss = fake_loss(step);
      r.ce_loss = r.loss - 0.5;
      r.sparsity_loss = 0.03;
      r.commitment_loss = 0.02;
      r.mode = step % 2 ? "full" : "sparse";
      r.full_passes = step % 2;
      r.sparse_passes = 1 - step % 2;
      r.lr = 1e-3;
      r.grad_norm = 1.0;
      r.step_seconds = 0.1;
      r.tokens_per_second = 20480;
      r.data_wait_seconds = 0.001;
      r.comm_seconds = {{"all_reduce", 0.01}};
      if (step == 1) r.checkpoint_seconds = 0.5;
      r.eta_seconds = static_cast<double>(kFakeSteps - step) * 0.1;
      exporter.record_step(r);
      if (step == 1) {
        EvalRecord e;
        e.step = step;
        e.seq_len = 256;
        e.top_k = 4;
        e.full_perplexity = 100;
        e.sparse_perplexity = 110;
        e.sparsity = 0.5;
        e.entropy_bits = 6;
        exporter.record_eval(e);
      }
      std::this_thread::sleep_for(kFakeStepTime);
    }
  }
  ::_exit(code);
}

// Runs argv to completion (output to log); its exit description, or "timed out".
std::string run_to_completion(const std::vector<std::string>& argv, const fs::path& log, Clock::duration limit) {
  ChildProcess child = fork_child([&] { exec_logged(argv, log); });
  const auto give_up = Clock::now() + limit;
  for (;;) {
    const std::string ended = child.ended();
    if (!ended.empty()) return ended;
    if (Clock::now() > give_up) return "timed out";
    std::this_thread::sleep_for(20ms);
  }
}

// Real trainer only: a small byte-token dataset (train + val) written by
// `ssa data prepare` from generated text, and the argv of a short, small run.
std::vector<std::string> ssa_train_argv(const fs::path& dir, int port) {
  const char* binary = std::getenv("SSA_BINARY");
  if (!binary) throw std::runtime_error("SSA_BINARY is not set (ctest sets it for core_ tests)");
  fs::create_directories(dir / "corpus");
  for (int d = 0; d < 40; ++d) {
    std::ofstream text(dir / "corpus" / ("doc-" + std::to_string(d) + ".txt"));
    for (int line = 0; line < 60; ++line)
      text << "Document " << d << " line " << line << ": the value " << (d * 7919 + line * 104729) % 1000
           << " follows the value " << (d * 31 + line) % 97 << ".\n";
  }
  const std::string prepared =
      run_to_completion({binary, "data", "prepare", "-i", (dir / "corpus").string(), "-o", (dir / "data").string(),
                         "--val-fraction", "0.2", "-q"},
                        dir / "prepare.log", 20s);
  if (prepared != "exit code 0")
    throw std::runtime_error("ssa data prepare: " + prepared + "\n" + tail_of(dir / "prepare.log"));
  return {binary, "train", "--run-dir", (dir / "run").string(),
          "--set", "data.path=" + (dir / "data").string(), "--set", "eval.data=" + (dir / "data" / "val").string(),
          // Far more steps than the test waits for: the test ends the run.
          "--set", "train.steps=1000000", "--set", "checkpoint.every=0",
          "--set", "monitoring.port=" + std::to_string(port),
          // Small enough for a step a second or so on a busy 2-core machine.
          "--set", "model.hidden=64", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
          "--set", "model.n_kv_heads=1", "--set", "model.ffn_hidden=128", "--set", "train.seq_len=64",
          "--set", "train.global_batch=2", "--set", "train.micro_batch=2", "--set", "attention.top_k=2",
          "--set", "eval.seq_lens=[64]", "--set", "eval.top_ks=[2]", "--set", "eval.batches=1",
          "--set", "monitoring.progress_every=50"};
}

ChildProcess start_training_process(int port, const fs::path& dir) {
  if (kRealTrainer) {
    const std::vector<std::string> argv = ssa_train_argv(dir, port);
    return fork_child([&] { exec_logged(argv, dir / "train.log"); });
  }
  return fork_child([&] { run_fake_trainer(port); });
}

ChildProcess start_prometheus(const fs::path& dir, int prometheus_port, int target_port) {
  // honor_labels: our job label is kept (instead of renamed exported_job).
  std::ofstream(dir / "prometheus.yml") << "global:\n"
                                           "  scrape_interval: 1s\n"
                                           "  scrape_timeout: 1s\n"
                                           "  evaluation_interval: 1s\n"
                                           "scrape_configs:\n"
                                           "  - job_name: ssa-train-test\n"
                                           "    honor_labels: true\n"
                                           "    static_configs:\n"
                                           "      - targets: ['127.0.0.1:"
                                        << target_port << "']\n";
  const std::vector<std::string> argv{kPrometheus,
                                      "--config.file=" + (dir / "prometheus.yml").string(),
                                      "--storage.tsdb.path=" + (dir / "tsdb").string(),
                                      "--web.listen-address=127.0.0.1:" + std::to_string(prometheus_port),
                                      "--log.level=warn"};
  return fork_child([&] { exec_logged(argv, dir / "prometheus.log"); });
}

std::string url_encode(const std::string& text) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : text) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

// GET /api/v1/query. ok: Prometheus answered "success"; then result holds
// data.result (a vector or a matrix). Otherwise error says why.
struct QueryAnswer {
  bool ok = false;
  std::string error;
  nlohmann::json result;
};

QueryAnswer query(int prometheus_port, const std::string& promql) {
  QueryAnswer answer;
  const auto response = testing::http_get(prometheus_port, "/api/v1/query?query=" + url_encode(promql));
  if (response.status == 0) {
    answer.error = "no HTTP response";
    return answer;
  }
  const auto body = nlohmann::json::parse(response.body, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) {
    answer.error = "HTTP " + std::to_string(response.status) + ", body is not JSON: " + response.body.substr(0, 200);
  } else if (body.value("status", "") != "success") {
    answer.error = "HTTP " + std::to_string(response.status) + ": " + body.value("error", response.body.substr(0, 200));
  } else {
    answer.ok = true;
    answer.result = body.at("data").at("result");
  }
  return answer;
}

double number(const nlohmann::json& value_pair) { return std::stod(value_pair.at(1).get<std::string>()); }

// Grafana's variables, as the dashboard would resolve them for this run.
std::string resolve_variables(std::string promql, const std::string& job) {
  auto replace = [&](const std::string& from, const std::string& to) {
    for (size_t at; (at = promql.find(from)) != std::string::npos;) promql.replace(at, from.size(), to);
  };
  replace("$__rate_interval", "5s");
  replace("$job", job);
  replace("$rank", ".*");
  return promql;
}

TEST(Prometheus, ScrapesTheTrainingRunAndAnswersQueries) {
  if (::access(kPrometheus, X_OK) != 0) GTEST_SKIP() << kPrometheus << " is not installed";
  // Generous: under a parallel ctest on 2 cores start-up alone can take seconds.
  const auto deadline = Clock::now() + 60s;
  TempDir dir;
  const int target_port = testing::free_loopback_port();
  const int prometheus_port = testing::free_loopback_port();
  ASSERT_GT(target_port, 0);
  ASSERT_GT(prometheus_port, 0);
  ASSERT_NE(target_port, prometheus_port);

  ChildProcess trainer = start_training_process(target_port, dir.path);
  ChildProcess prometheus = start_prometheus(dir.path, prometheus_port, target_port);
  auto logs = [&] {
    return "\n--- prometheus.log ---\n" + tail_of(dir.path / "prometheus.log") + "\n--- train.log ---\n" +
           tail_of(dir.path / "train.log");
  };
  // Both processes must still run while we wait on them.
  auto alive = [&](const char* waiting_for) {
    const std::string trainer_end = trainer.ended();
    const std::string prometheus_end = prometheus.ended();
    EXPECT_EQ(trainer_end, "") << "the training process ended while waiting for " << waiting_for << logs();
    EXPECT_EQ(prometheus_end, "") << "prometheus ended while waiting for " << waiting_for << logs();
    EXPECT_LT(Clock::now(), deadline) << "timed out waiting for " << waiting_for << logs();
    return trainer_end.empty() && prometheus_end.empty() && Clock::now() < deadline;
  };

  // 1. The loss, found through the query API, from at least two scrapes.
  QueryAnswer loss, history;
  for (;;) {
    if (!alive("ssa_loss from two scrapes")) return;
    loss = query(prometheus_port, "ssa_loss");
    history = query(prometheus_port, "ssa_loss[30s]");  // the raw samples with their scrape times
    if (loss.ok && loss.result.size() == 1 && history.ok && history.result.size() == 1 &&
        history.result[0].at("values").size() >= 2)
      break;
    std::this_thread::sleep_for(200ms);
  }
  const nlohmann::json& labels = loss.result[0].at("metric");
  const std::string job = labels.value("job", "");
  EXPECT_FALSE(job.empty()) << labels;
  EXPECT_EQ(labels.value("rank", ""), "0") << labels;
  EXPECT_EQ(labels.value("dp_rank", ""), "0") << labels;
  EXPECT_EQ(labels.value("cp_rank", ""), "0") << labels;
  EXPECT_FALSE(labels.value("host", "").empty()) << labels;
  EXPECT_EQ(labels.count("step"), 0u) << labels;
  const double latest = number(loss.result[0].at("value"));
  EXPECT_TRUE(std::isfinite(latest) && latest > 0) << latest;

  const nlohmann::json& samples = history.result[0].at("values");  // [[time, "value"], ...] ascending
  for (size_t i = 1; i < samples.size(); ++i)
    EXPECT_GT(samples[i].at(0).get<double>(), samples[i - 1].at(0).get<double>()) << "scrape times must advance";
  if (!kRealTrainer) {
    // The stand-in's loss: 12 - step/16 at some step 1..kFakeSteps, falling scrape to scrape.
    for (size_t i = 0; i < samples.size(); ++i) {
      const double value = number(samples[i]);
      const double step = (12.0 - value) * 16.0;
      EXPECT_EQ(step, std::round(step)) << value << " is not a loss the training process recorded";
      EXPECT_GE(step, 1);
      EXPECT_LE(step, kFakeSteps);
      if (i > 0) {
        EXPECT_LT(value, number(samples[i - 1])) << "loss did not fall between scrapes";
      }
    }
    EXPECT_EQ(latest, number(samples.back()));
    // Loss and step of one scrape belong together.
    const QueryAnswer pair = query(prometheus_port, "ssa_loss + ssa_step / 16");
    ASSERT_TRUE(pair.ok) << pair.error;
    ASSERT_EQ(pair.result.size(), 1u) << pair.result;
    EXPECT_EQ(number(pair.result[0].at("value")), 12.0);
  }

  // 2. Every dashboard query is valid PromQL for this Prometheus, and (with the
  //    stand-in, which records every metric) has data behind it.
  std::vector<std::string> queries;
  testing::collect_queries(testing::load_dashboard(), queries);
  ASSERT_FALSE(queries.empty());
  std::vector<std::string> waiting;
  for (const std::string& q : queries) {
    if (q.rfind("label_values(", 0) == 0) continue;  // a Grafana function, not PromQL
    const std::string promql = resolve_variables(q, job);
    ASSERT_EQ(promql.find('$'), std::string::npos) << "unresolved variable in " << q;
    const QueryAnswer answer = query(prometheus_port, promql);
    EXPECT_TRUE(answer.ok) << promql << ": " << answer.error;
    if (answer.ok && answer.result.empty()) waiting.push_back(promql);
  }
  while (!kRealTrainer && !waiting.empty()) {  // a rate() may need one more scrape
    if (!alive("data behind every dashboard query")) {
      for (const std::string& q : waiting) ADD_FAILURE() << "no data for dashboard query " << q;
      return;
    }
    std::this_thread::sleep_for(250ms);
    std::vector<std::string> still;
    for (const std::string& q : waiting)
      if (query(prometheus_port, q).result.empty()) still.push_back(q);
    waiting = still;
  }
  // trainer and prometheus are killed and reaped here, as on every early return.
}

}  // namespace
}  // namespace ssa::monitoring
