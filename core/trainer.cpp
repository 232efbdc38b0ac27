#include "core/trainer.h"

#include <ATen/record_function.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "core/checkpoint.h"
#include "core/cross_entropy.h"
#include "core/eval.h"
#include "core/model.h"
#include "core/model_io.h"
#include "core/run_state.h"
#include "core/runtime.h"
#include "core/schedule.h"
#include "core/step_profiler.h"
#include "core/tensor_file.h"
#include "data/token_reader.h"
#include "monitoring/console_progress.h"
#include "monitoring/jsonl_log.h"
#include "monitoring/metrics_exporter.h"
#include "parallel/host_copy.h"
#include "parallel/preemption.h"
#include "parallel/process_grid.h"
#include "parallel/sharded_adamw.h"

namespace ssa::core {
namespace fs = std::filesystem;
namespace {

// Fault-injection hooks for tests, read from the environment at start:
// steps (1-based, comma-separated) whose loss is replaced by NaN, exercising the
// skip-and-count path; and a pause inside every checkpoint write, after the files
// are written and before the commit, so a test can SIGKILL a run mid-checkpoint.
constexpr const char* kInjectNonfiniteStepsEnv = "SSA_TEST_NONFINITE_STEPS";
constexpr const char* kCheckpointPauseEnv = "SSA_TEST_CHECKPOINT_PAUSE_SECONDS";

std::set<int64_t> steps_from_env(const char* name) {
  std::set<int64_t> steps;
  const char* value = std::getenv(name);
  if (!value) return steps;
  std::stringstream in(value);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) steps.insert(std::stoll(item));
  return steps;
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The reader's next batch on the device, uploaded ahead of its step.
struct DeviceBatch {
  int64_t rows = 0;
  int64_t step = 0;          // the batch's step in the sample order (the stream draw)
  at::Tensor inputs, labels;  // [rows, seq] int64
  at::Tensor positions;       // [seq] int64
  int64_t data_step = 0;     // the reader's position after this batch
  double data_wait = 0;      // seconds the reader made us wait for it
};

// One optimizer step's losses, averaged over the step's micro-batches.
struct StepLosses {
  double loss = 0, ce = 0, sparsity = 0, commitment = 0;
  int64_t full_passes = 0, sparse_passes = 0;
  int64_t bytes_full = 0, bytes_sparse = 0;
  // [loss, ce, sparsity, commitment] of this rank: on the device, then on its
  // way to the host (queued before the update) until read_losses.
  at::Tensor device_sums;
  parallel::HostCopy host_sums;
};

class Trainer {
 public:
  Trainer(Config config, fs::path run_dir, TrainLimits limits)
      : config_(std::move(config)),
        run_dir_(std::move(run_dir)),
        limits_(limits),
        grid_(parallel::ProcessGrid::init(config_.parallel.dp, config_.parallel.cp)),
        leader_(grid_.rank() == 0),
        runtime_(choose_runtime(config_.train, grid_.local_rank())),
        checkpoints_(run_dir_) {}

  TrainOutcome run();

 private:
  void start();
  void resume(const fs::path& checkpoint);
  DeviceBatch next_batch();
  StepLosses train_step(const DeviceBatch& batch, int64_t step);  // step: its number, from 1
  void read_losses(StepLosses* out);
  void save_checkpoint(double* seconds);
  void evaluate_at_end();
  void barrier() { grid_.world().barrier(); }

  Config config_;
  fs::path run_dir_;
  TrainLimits limits_;
  parallel::ProcessGrid grid_;
  bool leader_;
  Runtime runtime_;
  CheckpointDir checkpoints_;
  std::unique_ptr<Transformer> model_;
  std::unique_ptr<parallel::ShardedAdamW> optimizer_;
  std::unique_ptr<data::TokenReader> reader_;
  std::unique_ptr<monitoring::MetricsExporter> exporter_;
  std::unique_ptr<monitoring::JsonlLog> log_;
  std::unique_ptr<monitoring::ConsoleProgress> progress_;
  std::unique_ptr<StepProfiler> profiler_;
  at::Tensor last_positions_;                  // the previous batch's positions on the device
  std::vector<int64_t> last_position_values_;  // and their values
  RunState state_;
  std::set<int64_t> inject_nonfinite_ = steps_from_env(kInjectNonfiniteStepsEnv);
  AttentionMode mode_ = AttentionMode::kSsa;
};

Recompute recompute_mode(const TrainConfig& train) {
  if (!train.recompute) return Recompute::kNone;
  return train.recompute_attention ? Recompute::kFull : Recompute::kKeepAttention;
}

std::vector<parallel::Parameter> optimizer_parameters(const Transformer& model) {
  std::vector<parallel::Parameter> params;
  for (const auto& p : model.parameters()) params.push_back({p.name, p.tensor, p.decay});
  return params;
}

void Trainer::start() {
  mode_ = parse_attention_mode(config_.attention.mode);
  grid_.bind_device(runtime_.device.type());  // CUDA: device = local rank, NCCL communicators
  if (leader_) {
    fs::create_directories(run_dir_);
    std::string queues;
    if (runtime_.device.is_cuda()) {
      const char* set = std::getenv("CUDA_DEVICE_MAX_CONNECTIONS");
      queues = fmt::format(" ({} hardware queues)", set != nullptr ? set : "the driver's default");
    }
    fmt::print("ssa train: run {} | grid dp={} cp={} | device {}{} {} | resolved config:\n{}\n", run_dir_.string(),
               grid_.dp(), grid_.cp(), runtime_.device.str(), queues, runtime_.dtype_name(), config_.to_json());
  }
  barrier();
  std::optional<fs::path> latest = checkpoints_.latest();
  if (latest) {
    // An incompatible config must be refused before anything is overwritten.
    auto saved_state = run_state_from_json(read_text_file(*latest / "state.json"), (*latest / "state.json").string());
    Config saved = config_from_json(saved_state.config_json, (*latest / "state.json").string());
    check_resume_compatible(saved, config_, latest->string());
  }
  if (leader_) write_text_file_synced(run_dir_ / "config.json", config_.to_json());

  model_ = std::make_unique<Transformer>(config_.model, runtime_.device, runtime_.dtype,
                                         static_cast<uint64_t>(config_.train.seed));
  parallel::AdamWOptions adam;
  adam.lr = config_.optimizer.lr;
  adam.beta1 = config_.optimizer.beta1;
  adam.beta2 = config_.optimizer.beta2;
  adam.eps = config_.optimizer.eps;
  adam.weight_decay = config_.optimizer.weight_decay;
  adam.grad_clip = config_.optimizer.grad_clip;
  adam.zero = config_.optimizer.zero;
  adam.bucket_numel = config_.optimizer.bucket_mb * (int64_t{1} << 20) / 4;
  optimizer_ = parallel::ShardedAdamW::for_grid(optimizer_parameters(*model_), adam, grid_);
  state_.dp = grid_.dp();
  state_.cp = grid_.cp();
  state_.seed = static_cast<uint64_t>(config_.train.seed);
  if (latest) resume(*latest);
  if (leader_)
    fmt::print("model: {:.2f} M parameters | optimizer: {:.2f} bytes/parameter measured (ZeRO formula {:.2f})\n",
               static_cast<double>(model_->parameter_count()) / 1e6, optimizer_->bytes_per_parameter(),
               optimizer_->zero_formula_bytes_per_parameter());

  data::ReaderOptions ro;
  ro.dir = config_.data.path;
  ro.seq_len = config_.train.seq_len;
  ro.global_batch = config_.train.global_batch;
  ro.dp_size = grid_.dp();
  ro.dp_rank = grid_.dp_rank();
  ro.cp_size = grid_.cp();
  ro.cp_rank = grid_.cp_rank();
  ro.seed = static_cast<uint64_t>(config_.train.seed);
  ro.prefetch = config_.data.prefetch;
  reader_ = std::make_unique<data::TokenReader>(ro, data::ReaderCursor{state_.data_step});
  if (reader_->vocab_size() > config_.model.vocab_size)
    throw ConfigError(fmt::format("config key 'model.vocab_size' = '{}': must be >= the vocab size {} of the data in {}",
                                  config_.model.vocab_size, reader_->vocab_size(), config_.data.path));

  monitoring::ExporterOptions eo;
  eo.enabled = config_.monitoring.enabled;
  eo.bind = config_.monitoring.bind;
  eo.port = config_.monitoring.port == 0 ? 0 : static_cast<int>(config_.monitoring.port + grid_.local_rank());
  eo.job = run_dir_.filename().string();
  eo.rank = static_cast<int>(grid_.rank());
  eo.dp_rank = static_cast<int>(grid_.dp_rank());
  eo.cp_rank = static_cast<int>(grid_.cp_rank());
  exporter_ = std::make_unique<monitoring::MetricsExporter>(eo);
  if (exporter_->serving() && grid_.local_rank() == 0) fmt::print("metrics: {}\n", exporter_->endpoint());
  if (leader_) {
    if (config_.monitoring.jsonl) log_ = std::make_unique<monitoring::JsonlLog>(run_dir_ / "metrics.jsonl");
    if (config_.monitoring.progress_every > 0)
      progress_ = std::make_unique<monitoring::ConsoleProgress>(config_.monitoring.progress_every);
  }
  parallel::install_preemption_handlers();
  std::cout.flush();
}

void Trainer::resume(const fs::path& checkpoint) {
  state_ = run_state_from_json(read_text_file(checkpoint / "state.json"), (checkpoint / "state.json").string());
  load_model_weights(*model_, (checkpoint / "model.h5").string());
  std::vector<parallel::ShardState> shards;
  for (const auto& entry : fs::directory_iterator(checkpoint)) {
    const auto name = entry.path().filename().string();
    if (name.rfind("optimizer-dp", 0) != 0) continue;
    auto tensors = read_tensor_file(entry.path().string());
    std::map<int64_t, parallel::ShardState> by_offset;
    for (auto& t : tensors) {
      // Datasets "<offset>/master|exp_avg|exp_avg_sq" with attribute offset.
      const auto slash = t.name.find('/');
      const auto field = t.name.substr(slash + 1);
      auto& shard = by_offset[t.attrs.at("offset")];
      shard.offset = t.attrs.at("offset");
      shard.numel = t.tensor.numel();
      if (field == "master") shard.master = t.tensor;
      else if (field == "exp_avg") shard.exp_avg = t.tensor;
      else if (field == "exp_avg_sq") shard.exp_avg_sq = t.tensor;
    }
    for (auto& [offset, shard] : by_offset) shards.push_back(std::move(shard));
  }
  optimizer_->import_state(shards, state_.step);
  state_.dp = grid_.dp();
  state_.cp = grid_.cp();
  if (leader_)
    fmt::print("resumed from {} at step {} ({} tokens seen)\n", checkpoint.string(), state_.step, state_.tokens_seen);
}

void Trainer::save_checkpoint(double* seconds) {
  auto t0 = Clock::now();
  const int64_t step = state_.step;
  if (leader_) checkpoints_.prepare(step);
  barrier();
  const fs::path dir = checkpoints_.staging(step);
  if (leader_) save_model_weights(*model_, (dir / "model.h5").string());
  // Optimizer shards with their global offsets: one file per dp rank, or per
  // rank when the cp ranks hold different shards; any grid can read them.
  if (grid_.cp_rank() == 0 || optimizer_->shards_over_cp()) {
    std::vector<NamedTensor> tensors;
    for (const auto& shard : optimizer_->export_state()) {
      const std::map<std::string, int64_t> attrs{{"offset", shard.offset}, {"numel", shard.numel}};
      const auto prefix = std::to_string(shard.offset) + "/";
      tensors.push_back({prefix + "master", shard.master, attrs});
      tensors.push_back({prefix + "exp_avg", shard.exp_avg, attrs});
      tensors.push_back({prefix + "exp_avg_sq", shard.exp_avg_sq, attrs});
    }
    const std::string name = optimizer_->shards_over_cp()
                                 ? fmt::format("optimizer-dp{}-cp{}.h5", grid_.dp_rank(), grid_.cp_rank())
                                 : fmt::format("optimizer-dp{}.h5", grid_.dp_rank());
    write_tensor_file((dir / name).string(), tensors);
  }
  if (leader_) {
    state_.config_json = config_.to_json();
    write_text_file_synced(dir / "state.json", run_state_to_json(state_));
  }
  if (const char* pause = std::getenv(kCheckpointPauseEnv))
    std::this_thread::sleep_for(std::chrono::duration<double>(std::stod(pause)));
  barrier();
  if (leader_) checkpoints_.commit(step, config_.checkpoint.keep);
  barrier();
  *seconds = seconds_since(t0);
}

void Trainer::evaluate_at_end() {
  if (leader_) {
    const auto report = evaluate_model(config_, *model_, runtime_);
    fmt::print("eval after step {} (full vs sparse inference):\n{}", state_.step, report.to_table());
    for (const auto& row : report.rows) {
      monitoring::EvalRecord record;
      record.step = state_.step;
      record.seq_len = row.seq_len;
      record.top_k = row.top_k;
      record.full_perplexity = row.full_perplexity;
      record.sparse_perplexity = row.sparse_perplexity;
      record.sparsity = row.sparsity;
      record.entropy_bits = row.entropy_bits;
      exporter_->record_eval(record);
      if (log_) log_->write(record);
    }
  }
  barrier();
}

DeviceBatch Trainer::next_batch() {
  const data::Batch batch = reader_->next();
  DeviceBatch out;
  out.rows = batch.rows;
  out.step = batch.step;
  out.data_step = reader_->cursor().step;
  out.data_wait = batch.wait_seconds;
  const int64_t cols = batch.cols;
  out.inputs = at::from_blob(const_cast<int32_t*>(batch.inputs.data()), {batch.rows, cols}, at::kInt).to(at::kLong);
  out.labels = at::from_blob(const_cast<int32_t*>(batch.labels.data()), {batch.rows, cols}, at::kInt).to(at::kLong);
  // The positions repeat from step to step: the same tensor again (no copy, and
  // the model keeps its rotary table for it).
  const bool same_positions = last_positions_.defined() && batch.positions == last_position_values_;
  if (!same_positions) {
    out.positions = at::from_blob(const_cast<int64_t*>(batch.positions.data()), {cols}, at::kLong).clone();
  }
  if (runtime_.device.is_cuda()) {
    // From pinned memory without waiting: the previous step's update may still
    // be running, and this step's work queues behind it.
    for (at::Tensor* t : {&out.inputs, &out.labels, &out.positions}) {
      if (t->defined()) *t = t->pin_memory().to(runtime_.device, /*non_blocking=*/true);
    }
  }
  if (same_positions) {
    out.positions = last_positions_;
  } else {
    last_positions_ = out.positions;
    last_position_values_ = batch.positions;
  }
  return out;
}

StepLosses Trainer::train_step(const DeviceBatch& batch, int64_t step) {
  const int64_t micro = config_.train.micro_batch;
  const int64_t n_micro = batch.rows / micro;
  const at::Tensor& inputs = batch.inputs;
  const at::Tensor& labels = batch.labels;
  const at::Tensor& positions = batch.positions;

  StreamSettings settings;
  settings.mode = mode_;
  settings.align_after_gate = config_.ssa.align_after_gate;
  settings.smooth_l1_beta = config_.ssa.smooth_l1_beta;
  settings.sparse = sparse_options(config_.attention, runtime_.device);
  settings.seq_len = config_.train.seq_len;
  settings.cp_group = parallel::group_or_null(grid_.cp_group());

  StepLosses out;
  // The losses stay on the device until the optimizer step is enqueued: reading
  // them here would make the device idle while the host launches the update.
  at::Tensor sums = at::zeros({4}, at::TensorOptions().dtype(at::kDouble).device(runtime_.device));
  for (int64_t m = 0; m < n_micro; ++m) {
    settings.pass_full = mode_ == AttentionMode::kFull ||
                         (mode_ == AttentionMode::kSsa &&
                          draw_full_stream(state_.seed, batch.step, grid_.dp_rank() * batch.rows + m * micro,
                                           config_.ssa.full_probability));
    (settings.pass_full ? out.full_passes : out.sparse_passes) += 1;
    auto result = model_->forward(inputs.narrow(0, m * micro, micro), positions, settings, recompute_mode(config_.train));
    auto hidden = result.hidden.reshape({-1, result.hidden.size(-1)});
    auto ce = chunked_cross_entropy(hidden, model_->embedding(), labels.narrow(0, m * micro, micro).reshape({-1}),
                                    config_.train.ce_chunk_tokens);
    auto loss = ce;
    if (mode_ == AttentionMode::kSsa)
      loss = ce + config_.ssa.alpha * (result.sparsity_loss + result.commitment_loss);
    // The step's gradients complete in the last micro-batch's backward.
    if (m + 1 == n_micro && config_.optimizer.overlap_reduction) optimizer_->reduce_during_next_backward();
    (loss / static_cast<double>(n_micro)).backward();
    sums += at::stack({loss.detach(), ce.detach(), result.sparsity_loss.detach(), result.commitment_loss.detach()})
                .to(at::kDouble);
    out.bytes_full += result.bytes_full;
    out.bytes_sparse += result.bytes_sparse;
  }
  sums /= static_cast<double>(n_micro);
  if (inject_nonfinite_.count(step)) sums.fill_(std::nan(""));
  out.device_sums = sums;
  return out;
}

// After the optimizer step is enqueued: the step's losses over every rank.
void Trainer::read_losses(StepLosses* out) {
  at::Tensor sums = out->host_sums.wait();
  out->device_sums = at::Tensor();
  grid_.world().all_reduce(sums, parallel::ReduceOp::kAvg);
  auto acc = sums.accessor<double, 1>();
  out->loss = acc[0];
  out->ce = acc[1];
  out->sparsity = acc[2];
  out->commitment = acc[3];
}

TrainOutcome Trainer::run() {
  start();
  const int64_t total = config_.train.steps;
  const int64_t tokens_per_step = config_.train.global_batch * config_.train.seq_len;
  const double flops_per_token = training_flops_per_token(config_.model, config_.train.seq_len, mode_,
                                                          config_.attention.top_k, config_.attention.block_size);
  int64_t consecutive_bad = 0;
  double last_loss = std::nan("");
  std::map<std::string, double> comm_before = grid_.comm_seconds();
  auto run_start = Clock::now();
  DeviceClock step_clock(runtime_.device);  // marks each step's end in the device queue
  const int64_t first_step = state_.step;
  profiler_ = std::make_unique<StepProfiler>(config_.monitoring.profile_start, config_.monitoring.profile_steps,
                                             run_dir_, grid_.rank(), runtime_.device.is_cuda(), leader_);
  // A step whose forward and backward are queued. The next step's batch goes up
  // before the current step's update is queued, and its forward and backward
  // right behind that update, before the host waits for the current step's
  // results and does its bookkeeping: the device does not wait for the host
  // between steps.
  struct QueuedStep {
    StepLosses losses;
    int64_t data_step = 0;     // the reader's position after this step's batch
    double data_wait = 0;
  };
  auto queue_step = [&](const DeviceBatch& batch, int64_t step) {
    RECORD_USER_SCOPE("ssa::queue_step");  // host phases show in profiler traces
    QueuedStep q;
    q.data_step = batch.data_step;
    q.data_wait = batch.data_wait;
    q.losses = train_step(batch, step);
    return q;
  };
  std::optional<QueuedStep> queued;
  while (state_.step < total) {
    profiler_->before_step(state_.step + 1);
    QueuedStep current = queued ? std::move(*queued) : queue_step(next_batch(), state_.step + 1);
    queued.reset();
    const bool run_ends = state_.step + 1 >= total ||
                          (limits_.stop_after_steps >= 0 && state_.step + 1 - first_step >= limits_.stop_after_steps);
    std::optional<DeviceBatch> next_input;
    if (!run_ends) next_input = next_batch();
    StepLosses& losses = current.losses;
    const double lr = cosine_lr(config_.optimizer.lr, state_.step, total, config_.schedule.warmup_fraction,
                                config_.schedule.final_lr_fraction);
    // A non-finite loss on any rank skips the update on every rank (decided on
    // the device with the gradient norm's verdict).
    losses.host_sums = parallel::HostCopy(losses.device_sums);
    optimizer_->launch_step(lr, at::isfinite(losses.device_sums.narrow(0, 0, 1)).logical_not());
    step_clock.mark();
    optimizer_->zero_grad();  // the next step's gradients start from zero
    if (next_input) queued = queue_step(*next_input, state_.step + 2);
    parallel::StepResult result;
    {
      RECORD_USER_SCOPE("ssa::wait_for_step");
      read_losses(&losses);
      result = optimizer_->finish_step();
    }
    const bool finite_loss = std::isfinite(losses.loss);
    state_.data_step = current.data_step;  // a checkpoint resumes after this step's batch
    if (!finite_loss || !result.applied) {
      ++state_.skipped_steps;
      ++consecutive_bad;
      if (leader_)
        fmt::print(stderr, "step {}: non-finite {} ({}); step skipped ({} in a row)\n", state_.step + 1,
                   finite_loss ? "gradient norm" : "loss", finite_loss ? result.grad_norm : losses.loss,
                   consecutive_bad);
      if (consecutive_bad >= config_.train.max_nonfinite_steps) {
        auto last = checkpoints_.latest();
        throw std::runtime_error(fmt::format(
            "{} consecutive steps had a non-finite loss or gradient (train.max_nonfinite_steps = {}); stopping. "
            "The last good checkpoint is {}",
            consecutive_bad, config_.train.max_nonfinite_steps, last ? last->string() : "(none written yet)"));
      }
    } else {
      consecutive_bad = 0;
    }
    ++state_.step;
    state_.tokens_seen += tokens_per_step;
    // A step's time: from the previous step's update to this one's, on the
    // device's clock (the host is already queueing the next step).
    const double step_seconds = step_clock.seconds_to_last_mark();
    profiler_->after_step(state_.step);

    RECORD_USER_SCOPE("ssa::step_end");  // records, logs, preemption, checkpoint
    monitoring::StepRecord record;
    record.step = state_.step;
    record.total_steps = total;
    record.tokens_seen = state_.tokens_seen;
    record.loss = losses.loss;
    record.ce_loss = losses.ce;
    record.sparsity_loss = losses.sparsity;
    record.commitment_loss = losses.commitment;
    record.full_passes = losses.full_passes;
    record.sparse_passes = losses.sparse_passes;
    record.mode = losses.full_passes && losses.sparse_passes ? "mixed" : (losses.full_passes ? "full" : "sparse");
    record.lr = lr;
    record.grad_norm = result.grad_norm;
    record.step_seconds = step_seconds;
    record.tokens_per_second = static_cast<double>(tokens_per_step) / step_seconds;
    record.mfu = runtime_.peak_flops > 0
                     ? flops_per_token * record.tokens_per_second / (runtime_.peak_flops * grid_.world_size())
                     : 0.0;
    record.data_wait_seconds = current.data_wait;
    auto comm_now = grid_.comm_seconds();
    for (const auto& [op, s] : comm_now) record.comm_seconds[op] = s - comm_before[op];
    comm_before = comm_now;
    record.gpu_memory_bytes = runtime_.peak_memory_bytes();
    record.cp_bytes_full = losses.bytes_full;
    record.cp_bytes_sparse = losses.bytes_sparse;
    record.skipped_steps = state_.skipped_steps;
    const double elapsed = seconds_since(run_start);
    record.eta_seconds = elapsed / static_cast<double>(state_.step - first_step) * static_cast<double>(total - state_.step);

    const bool preempted = parallel::preemption_agreed(grid_.world());
    const bool periodic = config_.checkpoint.every > 0 && state_.step % config_.checkpoint.every == 0;
    const bool pause = limits_.stop_after_steps >= 0 && state_.step - first_step >= limits_.stop_after_steps;
    if (preempted || periodic || pause || state_.step == total) {
      double seconds = 0;
      save_checkpoint(&seconds);
      record.checkpoint_seconds = seconds;
    }
    exporter_->record_step(record);
    if (log_) log_->write(record);
    if (progress_) progress_->on_step(record);
    if (preempted) {
      runtime_.synchronize();  // the queued step's transfers finish on every rank alike
      if (leader_) fmt::print("preemption signal: checkpoint written at step {}; exiting for requeue\n", state_.step);
      return TrainOutcome::kPreempted;
    }
    last_loss = losses.loss;
    if (pause && state_.step < total) {
      if (leader_) fmt::print("paused after {} steps of this run at step {}; run again to continue\n",
                              state_.step - first_step, state_.step);
      return TrainOutcome::kPaused;
    }
  }
  if (leader_) fmt::print("training finished: {} steps, final loss {:.4f}\n", state_.step, last_loss);
  if (config_.eval.at_end) evaluate_at_end();
  return TrainOutcome::kFinished;
}

}  // namespace

TrainOutcome run_training(Config config, const fs::path& run_dir, TrainLimits limits) {
  apply_cuda_connections(config.train);  // before MPI or LibTorch create a CUDA context
  Trainer trainer(std::move(config), run_dir, limits);
  return trainer.run();
}

}  // namespace ssa::core
