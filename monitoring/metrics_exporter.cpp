#include "monitoring/metrics_exporter.h"

#include <fmt/format.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <thread>

namespace ssa::monitoring {
namespace {

// Every family name, in one place: registration below and served_metric_names()
// both read these.
namespace name {
constexpr const char* kStep = "ssa_step";
constexpr const char* kTotalSteps = "ssa_total_steps";
constexpr const char* kTokensSeen = "ssa_tokens_seen";
constexpr const char* kLoss = "ssa_loss";
constexpr const char* kCeLoss = "ssa_ce_loss";
constexpr const char* kSparsityLoss = "ssa_sparsity_loss";
constexpr const char* kCommitmentLoss = "ssa_commitment_loss";
constexpr const char* kLearningRate = "ssa_learning_rate";
constexpr const char* kGradNorm = "ssa_grad_norm";
constexpr const char* kStepSeconds = "ssa_step_seconds";
constexpr const char* kTokensPerSecond = "ssa_tokens_per_second";
constexpr const char* kMfu = "ssa_mfu";
constexpr const char* kDataWaitSeconds = "ssa_data_wait_seconds";
constexpr const char* kGpuMemoryBytes = "ssa_gpu_memory_bytes";
constexpr const char* kCpBytesFull = "ssa_cp_bytes_full";
constexpr const char* kCpBytesSparse = "ssa_cp_bytes_sparse";
constexpr const char* kSkippedSteps = "ssa_skipped_steps";
constexpr const char* kCheckpointSeconds = "ssa_checkpoint_seconds";
constexpr const char* kEtaSeconds = "ssa_eta_seconds";
// Counters carry the _total suffix themselves: prometheus-cpp 1.0 exposes a
// counter under exactly the name it was registered with.
constexpr const char* kForwardPasses = "ssa_forward_passes_total";
constexpr const char* kCommSeconds = "ssa_comm_seconds_total";
constexpr const char* kEvalSparsity = "ssa_eval_attention_sparsity";
constexpr const char* kEvalEntropyBits = "ssa_eval_attention_entropy_bits";
constexpr const char* kEvalFullPerplexity = "ssa_eval_full_perplexity";
constexpr const char* kEvalSparsePerplexity = "ssa_eval_sparse_perplexity";
}  // namespace name

void warn(const std::string& message) {
  std::fprintf(stderr, "warning: ssa monitoring: %s\n", message.c_str());
  std::fflush(stderr);
}

std::string this_hostname() {
  char buffer[256] = {};
  if (gethostname(buffer, sizeof(buffer) - 1) != 0) return "unknown";
  return buffer;
}

// civetweb wants IPv6 addresses in brackets: "[::1]:9400".
std::string listen_address(const std::string& bind, int port) {
  const bool ipv6 = bind.find(':') != std::string::npos && bind.front() != '[';
  return ipv6 ? fmt::format("[{}]:{}", bind, port) : fmt::format("{}:{}", bind, port);
}

// Opens and closes one TCP connection to the exporter's own port; false if the
// address is not one we can dial (then shutdown just takes its 2 s).
bool poke(const std::string& bind, int port) {
  std::string host = bind;
  if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  if (host == "0.0.0.0") host = "127.0.0.1";
  if (host == "::") host = "::1";
  sockaddr_storage address{};
  socklen_t length = 0;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&address);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&address);
  if (inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(static_cast<uint16_t>(port));
    length = sizeof(sockaddr_in);
  } else if (inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(static_cast<uint16_t>(port));
    length = sizeof(sockaddr_in6);
  } else {
    return false;
  }
  const int fd = socket(address.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  connect(fd, reinterpret_cast<sockaddr*>(&address), length);
  close(fd);
  return true;
}

// Counters only ever grow: NaN, Inf and negative increments are dropped.
void add_to(prometheus::Counter& counter, double amount) {
  if (std::isfinite(amount) && amount > 0) counter.Increment(amount);
}

}  // namespace

// A gauge series that appears with its first value: before the first step (or
// the first checkpoint) the series is absent rather than a made-up 0.
struct LazyGauge {
  prometheus::Family<prometheus::Gauge>* family = nullptr;
  prometheus::Gauge* series = nullptr;
  void set(double value) {
    if (!series) series = &family->Add({});
    series->Set(value);
  }
};

struct MetricsExporter::State {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<prometheus::Exposer> exposer;
  std::mutex mutex;  // record_step and record_eval may come from different threads
  bool warned = false;

  LazyGauge step, total_steps, tokens_seen, loss, ce_loss, sparsity_loss, commitment_loss, learning_rate,
      grad_norm, step_seconds, tokens_per_second, mfu, data_wait_seconds, gpu_memory_bytes, cp_bytes_full, cp_bytes_sparse, skipped_steps,
      checkpoint_seconds, eta_seconds;
  prometheus::Counter *full_passes, *sparse_passes;
  prometheus::Family<prometheus::Counter>* comm_seconds;  // label op
  prometheus::Family<prometheus::Gauge>*eval_sparsity, *eval_entropy_bits,  // seq_len, top_k
      *eval_full_perplexity,                                                // seq_len
      *eval_sparse_perplexity;                                              // seq_len, top_k

  explicit State(const prometheus::Labels& constant) {
    auto gauge_family = [&](const char* n, const char* help) -> prometheus::Family<prometheus::Gauge>& {
      return prometheus::BuildGauge().Name(n).Help(help).Labels(constant).Register(*registry);
    };
    auto gauge = [&](const char* n, const char* help) { return LazyGauge{&gauge_family(n, help)}; };
    step = gauge(name::kStep, "Optimizer steps completed");
    total_steps = gauge(name::kTotalSteps, "Optimizer steps the run is configured for");
    tokens_seen = gauge(name::kTokensSeen, "Training tokens consumed over all ranks since the run began");
    loss = gauge(name::kLoss, "Total loss of the last step: ce + alpha * alignment");
    ce_loss = gauge(name::kCeLoss, "Cross-entropy loss of the last step");
    sparsity_loss = gauge(name::kSparsityLoss, "SSA sparsity loss L_s of the last step, mean over layers");
    commitment_loss = gauge(name::kCommitmentLoss, "SSA commitment loss L_c of the last step, mean over layers");
    learning_rate = gauge(name::kLearningRate, "Learning rate of the last step");
    grad_norm = gauge(name::kGradNorm, "Global gradient norm of the last step");
    step_seconds = gauge(name::kStepSeconds, "Wall time of the last optimizer step");
    tokens_per_second = gauge(name::kTokensPerSecond, "Training throughput of the last step");
    mfu = gauge(name::kMfu, "Model FLOP utilisation of the last step (0 on CPU)");
    data_wait_seconds = gauge(name::kDataWaitSeconds, "Time the last step waited for its batch");
    gpu_memory_bytes = gauge(name::kGpuMemoryBytes, "Peak GPU memory allocated on this rank (0 on CPU)");
    cp_bytes_full = gauge(name::kCpBytesFull, "Bytes this rank sent over cp in the last step's forward passes, full stream");
    cp_bytes_sparse = gauge(name::kCpBytesSparse, "Bytes this rank sent over cp in the last step's forward passes, sparse stream");
    skipped_steps = gauge(name::kSkippedSteps, "Steps skipped for a NaN/Inf loss since the run began");
    checkpoint_seconds = gauge(name::kCheckpointSeconds, "Wall time of the last checkpoint write");
    eta_seconds = gauge(name::kEtaSeconds, "Estimated time to the end of the run");

    auto& passes = prometheus::BuildCounter()
                       .Name(name::kForwardPasses)
                       .Help("Forward passes by the SSA stream drawn (mode full or sparse)")
                       .Labels(constant)
                       .Register(*registry);
    // Both children exist from the start so rate() sees a zero before the first draw.
    full_passes = &passes.Add({{"mode", "full"}});
    sparse_passes = &passes.Add({{"mode", "sparse"}});
    comm_seconds = &prometheus::BuildCounter()
                        .Name(name::kCommSeconds)
                        .Help("Seconds spent in communication, by collective op")
                        .Labels(constant)
                        .Register(*registry);

    eval_sparsity = &gauge_family(name::kEvalSparsity,
                                  "Eval: mean full-attention mass inside the top-k selected blocks");
    eval_entropy_bits = &gauge_family(name::kEvalEntropyBits, "Eval: mean full-attention entropy in bits");
    eval_full_perplexity = &gauge_family(name::kEvalFullPerplexity, "Eval: perplexity under full attention");
    eval_sparse_perplexity =
        &gauge_family(name::kEvalSparsePerplexity, "Eval: perplexity under sparse attention with budget top_k");
  }
};

MetricsExporter::MetricsExporter(const ExporterOptions& options) {
  if (!options.enabled) return;
  const std::string address = listen_address(options.bind.empty() ? "127.0.0.1" : options.bind, options.port);
  try {
    if (options.port < 0 || options.port > 65535)
      throw std::runtime_error(fmt::format("port {} is outside 0..65535", options.port));
    const prometheus::Labels constant{{"job", options.job},
                                      {"rank", std::to_string(options.rank)},
                                      {"dp_rank", std::to_string(options.dp_rank)},
                                      {"cp_rank", std::to_string(options.cp_rank)},
                                      {"host", options.host.empty() ? this_hostname() : options.host}};
    auto state = std::make_unique<State>(constant);
    state->exposer = std::make_unique<prometheus::Exposer>(address, /*num_threads=*/2);
    const std::vector<int> ports = state->exposer->GetListeningPorts();
    if (ports.empty()) throw std::runtime_error("the HTTP server reports no listening port");
    state->exposer->RegisterCollectable(state->registry);
    port_ = ports.front();
    bind_ = options.bind.empty() ? "127.0.0.1" : options.bind;
    endpoint_ = fmt::format("http://{}/metrics", listen_address(options.bind.empty() ? "127.0.0.1" : options.bind, port_));
    state_ = std::move(state);
  } catch (const std::exception& e) {
    warn(fmt::format("cannot serve Prometheus metrics on {} ({}; monitoring.bind / monitoring.port); "
                     "continuing with metrics disabled",
                     address, e.what()));
  } catch (...) {
    warn(fmt::format("cannot serve Prometheus metrics on {}; continuing with metrics disabled", address));
  }
}

MetricsExporter::~MetricsExporter() {
  if (!state_) return;
  // civetweb's listening thread polls in 2 s quanta and looks at its stop flag
  // only between them, so stopping the server takes up to 2 s. A connection
  // wakes the poll: knock on our own port until the server is gone, so a run's
  // exit (and every test) does not wait for the quantum.
  std::atomic<bool> stopped{false};
  std::thread knocker([&] {
    while (!stopped.load() && poke(bind_, port_)) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  });
  state_.reset();
  stopped.store(true);
  knocker.join();
}

bool MetricsExporter::serving() const { return state_ != nullptr; }
int MetricsExporter::port() const { return port_; }
std::string MetricsExporter::endpoint() const { return endpoint_; }

void MetricsExporter::record_step(const StepRecord& r) {
  if (!state_) return;
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  try {
    s.step.set(static_cast<double>(r.step));
    s.total_steps.set(static_cast<double>(r.total_steps));
    s.tokens_seen.set(static_cast<double>(r.tokens_seen));
    s.loss.set(r.loss);
    s.ce_loss.set(r.ce_loss);
    s.sparsity_loss.set(r.sparsity_loss);
    s.commitment_loss.set(r.commitment_loss);
    s.learning_rate.set(r.lr);
    s.grad_norm.set(r.grad_norm);
    s.step_seconds.set(r.step_seconds);
    s.tokens_per_second.set(r.tokens_per_second);
    s.mfu.set(r.mfu);
    s.data_wait_seconds.set(r.data_wait_seconds);
    s.gpu_memory_bytes.set(static_cast<double>(r.gpu_memory_bytes));
    s.cp_bytes_full.set(static_cast<double>(r.cp_bytes_full));
    s.cp_bytes_sparse.set(static_cast<double>(r.cp_bytes_sparse));
    s.skipped_steps.set(static_cast<double>(r.skipped_steps));
    s.eta_seconds.set(r.eta_seconds);
    if (r.checkpoint_seconds) s.checkpoint_seconds.set(*r.checkpoint_seconds);
    add_to(*s.full_passes, static_cast<double>(r.full_passes));
    add_to(*s.sparse_passes, static_cast<double>(r.sparse_passes));
    for (const auto& [op, seconds] : r.comm_seconds) add_to(s.comm_seconds->Add({{"op", op}}), seconds);
  } catch (const std::exception& e) {
    if (!s.warned) warn(fmt::format("recording step {} failed ({}); metrics may be incomplete", r.step, e.what()));
    s.warned = true;
  }
}

void MetricsExporter::record_eval(const EvalRecord& r) {
  if (!state_) return;
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  try {
    const std::string seq_len = std::to_string(r.seq_len);
    const prometheus::Labels budget{{"seq_len", seq_len}, {"top_k", std::to_string(r.top_k)}};
    s.eval_sparsity->Add(budget).Set(r.sparsity);
    s.eval_entropy_bits->Add(budget).Set(r.entropy_bits);
    s.eval_sparse_perplexity->Add(budget).Set(r.sparse_perplexity);
    // Full attention does not depend on the budget: one series per length.
    s.eval_full_perplexity->Add({{"seq_len", seq_len}}).Set(r.full_perplexity);
  } catch (const std::exception& e) {
    if (!s.warned) warn(fmt::format("recording eval failed ({}); metrics may be incomplete", e.what()));
    s.warned = true;
  }
}

const std::vector<std::string>& MetricsExporter::served_metric_names() {
  static const std::vector<std::string> names{
      name::kStep,           name::kTotalSteps,        name::kTokensSeen,         name::kLoss,
      name::kCeLoss,         name::kSparsityLoss,      name::kCommitmentLoss,     name::kLearningRate,
      name::kGradNorm,       name::kStepSeconds,       name::kTokensPerSecond,    name::kMfu,
      name::kDataWaitSeconds, name::kGpuMemoryBytes,   name::kCpBytesFull,        name::kCpBytesSparse,
      name::kSkippedSteps,       name::kCheckpointSeconds,
      name::kEtaSeconds,     name::kForwardPasses,     name::kCommSeconds,        name::kEvalSparsity,
      name::kEvalEntropyBits, name::kEvalFullPerplexity, name::kEvalSparsePerplexity};
  return names;
}

}  // namespace ssa::monitoring
