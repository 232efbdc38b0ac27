#include "parallel/sharded_adamw.h"

#include <ATen/core/grad_mode.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

#include "parallel/error_check.h"

namespace ssa::parallel {
namespace {

void check_options(const AdamWOptions& o) {
  auto fail = [](const char* key, double value, const char* rule) {
    throw std::invalid_argument(fmt::format("parallel::ShardedAdamW: optimizer.{} = {}: {}", key, value, rule));
  };
  if (!(o.lr >= 0)) fail("lr", o.lr, "must be >= 0");
  if (!(o.beta1 >= 0 && o.beta1 < 1)) fail("beta1", o.beta1, "must be in [0, 1)");
  if (!(o.beta2 >= 0 && o.beta2 < 1)) fail("beta2", o.beta2, "must be in [0, 1)");
  if (!(o.eps > 0)) fail("eps", o.eps, "must be > 0");
  if (!(o.weight_decay >= 0)) fail("weight_decay", o.weight_decay, "must be >= 0");
  if (std::isnan(o.grad_clip)) fail("grad_clip", o.grad_clip, "must be a number (<= 0 disables clipping)");
  if (o.bucket_numel < 1) fail("bucket_numel", static_cast<double>(o.bucket_numel), "must be >= 1");
}

int64_t group_size(const Communicator* c) { return c ? c->size() : 1; }

}  // namespace

ShardedAdamW::ShardedAdamW(std::vector<Parameter> params, AdamWOptions options, Communicator* dp_group,
                           Communicator* cp_group)
    : params_(std::move(params)), options_(options), dp_(dp_group), cp_(cp_group) {
  check_options(options_);
  if (params_.empty()) throw std::invalid_argument("parallel::ShardedAdamW: no parameters to optimise");
  device_ = params_.front().tensor.defined() ? params_.front().tensor.device() : at::Device(at::kCPU);
  gather_type_ = params_.front().tensor.defined() ? params_.front().tensor.scalar_type() : at::kFloat;
  std::vector<int64_t> numels;
  for (const Parameter& p : params_) {
    if (!p.tensor.defined() || !at::isFloatingType(p.tensor.scalar_type()) || !p.tensor.is_contiguous() ||
        p.tensor.device() != device_) {
      throw std::invalid_argument(fmt::format(
          "parallel::ShardedAdamW: parameter '{}' must be a defined, contiguous floating tensor on {} (got {})", p.name,
          device_.str(), p.tensor.defined() ? p.tensor.toString() + " on " + p.tensor.device().str() : "undefined"));
    }
    numels.push_back(p.tensor.numel());
    // The new weights travel in the model dtype when every parameter shares it:
    // half the bytes to all-gather for bf16, and same-dtype copies into the parameters.
    if (p.tensor.scalar_type() != gather_type_) gather_type_ = at::kFloat;
  }
  dp_size_ = group_size(dp_);
  dp_rank_ = dp_ ? dp_->rank() : 0;
  layout_ = std::make_unique<FlatLayout>(numels, options_.bucket_numel, sharded() ? dp_size_ : 1,
                                         sharded() ? dp_rank_ : 0);
  if (dp_) dp_->ensure_device(device_);
  if (cp_) cp_->ensure_device(device_);

  at::NoGradGuard no_grad;
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device_);
  for (const FlatBucket& b : layout_->buckets()) {
    const int64_t n = sharded() ? b.shard_numel : b.numel;
    BucketState s{at::zeros({n}, f32), at::zeros({n}, f32), at::zeros({n}, f32)};
    const int64_t origin = state_origin(b);
    for (const FlatPiece& piece : FlatLayout::pieces_in(b, b.own_begin, b.own_end)) {
      s.master.narrow(0, piece.bucket_offset - origin, piece.numel)
          .copy_(params_[static_cast<size_t>(piece.param)].tensor.detach().reshape({-1}).narrow(0, piece.param_offset,
                                                                                               piece.numel));
    }
    state_.push_back(std::move(s));
    std::vector<DecayRun> runs;
    for (const FlatPiece& piece : FlatLayout::pieces_in(b, b.own_begin, b.own_end)) {
      const bool decay = params_[static_cast<size_t>(piece.param)].decay;
      const int64_t offset = piece.bucket_offset - origin;
      if (!runs.empty() && runs.back().decay == decay && runs.back().offset + runs.back().numel == offset) {
        runs.back().numel += piece.numel;
      } else {
        runs.push_back({offset, piece.numel, decay});
      }
    }
    runs_.push_back(std::move(runs));
  }
  device_step_ = at::zeros({1}, f32);
  param_pieces_.resize(params_.size());
  const auto& buckets = layout_->buckets();
  for (size_t i = 0; i < buckets.size(); ++i) {
    for (const FlatPiece& piece : buckets[i].pieces) param_pieces_[static_cast<size_t>(piece.param)].emplace_back(i, piece);
  }
  reductions_.resize(buckets.size());
  arrived_.assign(params_.size(), 0);
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& t = params_[i].tensor;
    if (!t.requires_grad()) continue;
    const unsigned handle = t.register_hook([this, i](const at::Tensor& grad) { on_gradient(i, grad); });
    hooks_.emplace_back(t, handle);
  }
}

std::unique_ptr<ShardedAdamW> ShardedAdamW::for_grid(std::vector<Parameter> params, AdamWOptions options,
                                                     ProcessGrid& grid) {
  if (options.zero && grid.cp() > 1) {
    auto opt = std::make_unique<ShardedAdamW>(std::move(params), options, group_or_null(grid.world()), nullptr);
    opt->shards_over_cp_ = true;
    return opt;
  }
  return std::make_unique<ShardedAdamW>(std::move(params), options, group_or_null(grid.dp_group()),
                                        group_or_null(grid.cp_group()));
}

ShardedAdamW::~ShardedAdamW() {
  for (auto& [tensor, handle] : hooks_) {
    try {
      tensor.remove_hook(handle);
    } catch (...) {  // the parameter may already be gone from the graph's view; nothing to undo then
    }
  }
}

void ShardedAdamW::reduce_during_next_backward() {
  // The previous step may still be finishing: launch_step took its reductions.
  if (overlap_armed_)
    throw std::logic_error("parallel::ShardedAdamW::reduce_during_next_backward: already armed, and no step was launched since");
  arm_reductions();
}

void ShardedAdamW::arm_reductions() {
  const auto& buckets = layout_->buckets();
  for (size_t i = 0; i < buckets.size(); ++i) {
    Reduction& r = reductions_[i];
    if (!r.buffer.defined()) r.buffer = at::zeros({buckets[i].padded}, at::TensorOptions().dtype(at::kFloat).device(device_));
    r.missing = static_cast<int64_t>(buckets[i].pieces.size());
  }
  std::fill(arrived_.begin(), arrived_.end(), 0);
  next_start_ = 0;
  overlap_armed_ = true;
}

void ShardedAdamW::on_gradient(size_t param, const at::Tensor& grad) {
  if (!overlap_armed_ || !grad.defined()) return;
  at::NoGradGuard no_grad;
  // The hook sees this backward's gradient before it is added to .grad, which
  // holds the earlier micro-batches' sum.
  const at::Tensor& earlier = params_[param].tensor.grad();
  const at::Tensor flat = grad.reshape({-1});
  for (const auto& [bucket, piece] : param_pieces_[param]) {
    at::Tensor dst = reductions_[bucket].buffer.narrow(0, piece.bucket_offset, piece.numel);
    if (arrived_[param]) {  // a second gradient for the same parameter in one backward
      dst.add_(flat.narrow(0, piece.param_offset, piece.numel));
      continue;
    }
    dst.copy_(flat.narrow(0, piece.param_offset, piece.numel));
    if (earlier.defined()) dst.add_(earlier.reshape({-1}).narrow(0, piece.param_offset, piece.numel));
    reductions_[bucket].missing -= 1;
  }
  arrived_[param] = 1;
  start_reductions(/*all=*/false);
}

void ShardedAdamW::start_reductions(bool all) {
  const auto& buckets = layout_->buckets();
  while (next_start_ < buckets.size()) {
    const size_t i = buckets.size() - 1 - next_start_;
    Reduction& r = reductions_[i];
    if (r.missing > 0 && !all) return;
    if (r.missing > 0) {  // parameters this backward did not reach: their .grad, or zero
      for (const FlatPiece& piece : buckets[i].pieces) {
        const size_t p = static_cast<size_t>(piece.param);
        if (arrived_[p]) continue;
        at::Tensor dst = r.buffer.narrow(0, piece.bucket_offset, piece.numel);
        const at::Tensor& grad = params_[p].tensor.grad();
        if (grad.defined()) {
          dst.copy_(grad.reshape({-1}).narrow(0, piece.param_offset, piece.numel));
        } else {
          dst.zero_();
        }
      }
      r.missing = 0;
    }
    if (sharded()) {
      r.reduced = at::empty({buckets[i].shard_numel}, r.buffer.options());
      r.dp_flight = dp_->start_reduce_scatter(r.buffer, r.reduced, ReduceOp::kAvg);
    } else {
      r.reduced = r.buffer;
      if (dp_size_ > 1) r.dp_flight = dp_->start_all_reduce(r.reduced, ReduceOp::kAvg);
    }
    // Over cp in flight too when nothing over dp precedes it (a cp reduction
    // after a dp one waits for it in finish_reductions).
    if (group_size(cp_) > 1 && dp_size_ == 1) r.cp_flight = cp_->start_all_reduce(r.reduced, ReduceOp::kAvg);
    ++next_start_;
  }
}

std::vector<at::Tensor> ShardedAdamW::finish_reductions() {
  overlapped_buckets_ = static_cast<int64_t>(next_start_);
  start_reductions(/*all=*/true);
  overlap_armed_ = false;
  std::vector<at::Tensor> grads;
  for (Reduction& r : reductions_) {
    r.dp_flight.wait();
    if (group_size(cp_) > 1) {
      if (r.cp_flight.pending()) {
        r.cp_flight.wait();
      } else {
        cp_->all_reduce(r.reduced, ReduceOp::kAvg);
      }
    }
    grads.push_back(r.reduced);
  }
  return grads;
}

void ShardedAdamW::launch_step(double lr, const at::Tensor& skip) {
  if (pending_verdict_.pending())
    throw std::logic_error("parallel::ShardedAdamW::launch_step: the previous step was not finished");
  at::NoGradGuard no_grad;
  const auto& buckets = layout_->buckets();
  // Without a reduction armed before the backward, every bucket is filled from
  // .grad here and reduced at once; its buffers are released after the step.
  const bool during_backward = overlap_armed_;
  if (!during_backward) arm_reductions();
  const std::vector<at::Tensor> grads = finish_reductions();  // my part of each bucket, averaged over dp and cp
  at::Tensor norm_sq = at::zeros({1}, at::TensorOptions().dtype(at::kDouble).device(device_));
  for (size_t i = 0; i < buckets.size(); ++i) {
    const FlatBucket& b = buckets[i];
    if (b.own_numel() == 0) continue;
    // fp32 reduction (fp32 accumulators in a tree: ~1e-7 relative), squared in
    // fp64; asking for an fp64 norm would first convert the whole shard.
    const at::Tensor norm = at::linalg_vector_norm(grads[i].narrow(0, b.own_begin - state_origin(b), b.own_numel()), 2);
    norm_sq.add_(norm.to(at::kDouble).square());
  }
  if (sharded()) dp_->all_reduce(norm_sq, ReduceOp::kSum);  // disjoint shards: sum of squares
  // Every rank must take the same branch: agree on "skip" over dp and cp.
  at::Tensor bad = at::isfinite(norm_sq).logical_not().to(at::kFloat);
  if (skip.defined()) bad = at::maximum(bad, skip.reshape({1}).ne(0).to(at::kFloat));
  if (dp_size_ > 1) dp_->all_reduce(bad, ReduceOp::kMax);
  if (group_size(cp_) > 1) cp_->all_reduce(bad, ReduceOp::kMax);
  // The fused kernel skips everything when found_inf is 1 and divides the
  // gradients by grad_scale: 1 / clip factor, clip = min(1, max / (norm + 1e-6)).
  std::optional<at::Tensor> inverse_clip;
  if (options_.grad_clip > 0) {
    inverse_clip = at::clamp_min((norm_sq.sqrt() + 1e-6) / options_.grad_clip, 1.0).to(at::kFloat);
  }
  // The verdict to the host now, ahead of the update (see finish_step).
  pending_verdict_ = HostCopy(at::cat({norm_sq, bad.to(at::kDouble)}));
  device_step_.add_(1.0 - bad);
  const double b1 = options_.beta1, b2 = options_.beta2;
  // Each bucket's new weights leave for the other ranks while the next bucket
  // is updated (a skipped step writes the unchanged weights back).
  std::vector<WeightGather> gathers;
  for (size_t i = 0; i < buckets.size(); ++i) {
    BucketState& s = state_[i];
    for (const bool decay : {true, false}) {
      std::vector<at::Tensor> p, g, m, v, steps;
      for (const DecayRun& run : runs_[i]) {
        if (run.decay != decay) continue;
        p.push_back(s.master.narrow(0, run.offset, run.numel));
        g.push_back(grads[i].narrow(0, run.offset, run.numel));
        m.push_back(s.exp_avg.narrow(0, run.offset, run.numel));
        v.push_back(s.exp_avg_sq.narrow(0, run.offset, run.numel));
        steps.push_back(device_step_);
      }
      if (p.empty()) continue;
      at::_fused_adamw_(p, g, m, v, {}, steps, lr, b1, b2, decay ? options_.weight_decay : 0.0, options_.eps,
                        /*amsgrad=*/false, /*maximize=*/false, inverse_clip, bad);
    }
    gathers.push_back(start_weight_gather(i));
  }
  for (size_t i = 0; i < buckets.size(); ++i) finish_weight_gather(i, gathers[i]);
  if (!during_backward) {
    for (Reduction& r : reductions_) r = Reduction{};
  }
}

StepResult ShardedAdamW::finish_step() {
  if (!pending_verdict_.pending())
    throw std::logic_error("parallel::ShardedAdamW::finish_step: no step was launched");
  const at::Tensor host = pending_verdict_.wait();
  const auto verdict = host.accessor<double, 1>();
  StepResult result;
  result.grad_norm = std::sqrt(verdict[0]);
  result.applied = verdict[1] == 0.0;
  if (result.applied) ++step_;
  return result;
}

ShardedAdamW::WeightGather ShardedAdamW::start_weight_gather(size_t bucket) {
  at::NoGradGuard no_grad;
  WeightGather g;
  g.own = state_[bucket].master.to(gather_type_);
  if (!sharded()) {
    g.full = g.own;
    return g;
  }
  g.full = at::empty({g.own.numel() * dp_size_}, g.own.options());
  g.batch = dp_->start_all_gather(g.own, g.full);
  return g;
}

void ShardedAdamW::finish_weight_gather(size_t bucket, WeightGather& g) {
  at::NoGradGuard no_grad;
  g.batch.wait();
  // One multi-tensor copy per bucket (not a kernel per parameter).
  std::vector<at::Tensor> dst, src;
  for (const FlatPiece& piece : layout_->buckets()[bucket].pieces) {
    dst.push_back(params_[static_cast<size_t>(piece.param)].tensor.detach().view({-1}).narrow(0, piece.param_offset,
                                                                                             piece.numel));
    src.push_back(g.full.narrow(0, piece.bucket_offset, piece.numel));
  }
  at::_foreach_copy_(dst, src);
}

void ShardedAdamW::write_parameters() {
  std::vector<WeightGather> gathers;
  const size_t n = layout_->buckets().size();
  for (size_t i = 0; i < n; ++i) gathers.push_back(start_weight_gather(i));
  for (size_t i = 0; i < n; ++i) finish_weight_gather(i, gathers[i]);
}

void ShardedAdamW::zero_grad() {
  for (Parameter& p : params_) p.tensor.mutable_grad().reset();
}

std::vector<ShardState> ShardedAdamW::export_state() const {
  std::vector<ShardState> out;
  if (!sharded() && dp_rank_ != 0) return out;  // replicated: dp rank 0 writes the one copy
  const auto& buckets = layout_->buckets();
  for (size_t i = 0; i < buckets.size(); ++i) {
    const FlatBucket& b = buckets[i];
    if (b.own_numel() == 0) continue;
    const int64_t first = b.own_begin - state_origin(b);
    auto take = [&](const at::Tensor& t) {
      return t.narrow(0, first, b.own_numel()).to(at::kCPU, at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    };
    out.push_back({b.start + b.own_begin, b.own_numel(), take(state_[i].master), take(state_[i].exp_avg),
                   take(state_[i].exp_avg_sq)});
  }
  return out;
}

void ShardedAdamW::import_state(const std::vector<ShardState>& shards, int64_t step) {
  if (step < 0) throw std::invalid_argument(fmt::format("parallel::ShardedAdamW::import_state: step {} < 0", step));
  std::vector<size_t> order(shards.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return shards[a].offset < shards[b].offset; });
  int64_t covered = 0;
  for (size_t i : order) {
    const ShardState& s = shards[i];
    for (const at::Tensor* t : {&s.master, &s.exp_avg, &s.exp_avg_sq}) {
      if (!t->defined() || t->dim() != 1 || t->numel() != s.numel || !at::isFloatingType(t->scalar_type())) {
        throw std::invalid_argument(fmt::format(
            "optimizer state: the shard at offset {} must hold 1-D floating master, exp_avg and exp_avg_sq of {} "
            "elements each (a truncated or mixed-up checkpoint?)",
            s.offset, s.numel));
      }
    }
    if (s.numel <= 0 || s.offset < 0) {
      throw std::invalid_argument(
          fmt::format("optimizer state: shard at offset {} with {} elements is empty or negative", s.offset, s.numel));
    }
    if (s.offset < covered) {
      throw std::invalid_argument(fmt::format(
          "optimizer state: the shard at offset {} overlaps the range [0, {}) already covered (shards of two runs "
          "mixed?)",
          s.offset, covered));
    }
    if (s.offset > covered) {
      throw std::invalid_argument(fmt::format(
          "optimizer state: no shard covers [{}, {}) (an optimizer shard file is missing?)", covered, s.offset));
    }
    covered += s.numel;
  }
  if (covered != numel()) {
    throw std::invalid_argument(fmt::format(
        "optimizer state: the shards cover {} parameters but the model has {} (a checkpoint of another model, or a "
        "missing shard file?)",
        covered, numel()));
  }
  const auto& buckets = layout_->buckets();
  for (size_t i = 0; i < buckets.size(); ++i) {
    const FlatBucket& b = buckets[i];
    const int64_t lo = b.start + b.own_begin, hi = b.start + b.own_end;  // my global range
    const int64_t origin = state_origin(b);
    for (const ShardState& s : shards) {
      const int64_t a = std::max(lo, s.offset), e = std::min(hi, s.offset + s.numel);
      if (a >= e) continue;
      const int64_t dst = a - b.start - origin, src = a - s.offset, n = e - a;
      state_[i].master.narrow(0, dst, n).copy_(s.master.narrow(0, src, n));
      state_[i].exp_avg.narrow(0, dst, n).copy_(s.exp_avg.narrow(0, src, n));
      state_[i].exp_avg_sq.narrow(0, dst, n).copy_(s.exp_avg_sq.narrow(0, src, n));
    }
  }
  step_ = step;
  device_step_.fill_(static_cast<double>(step));
  write_parameters();
}

double ShardedAdamW::bytes_per_parameter() const {
  double model = 0;
  for (const Parameter& p : params_) model += 2.0 * static_cast<double>(p.tensor.numel() * p.tensor.element_size());
  double optimizer = 0;
  for (const BucketState& s : state_) {
    for (const at::Tensor* t : {&s.master, &s.exp_avg, &s.exp_avg_sq}) {
      optimizer += static_cast<double>(t->numel() * t->element_size());
    }
  }
  return (model + optimizer) / static_cast<double>(numel());
}

double ShardedAdamW::zero_formula_bytes_per_parameter() const {
  double model = 0;
  for (const Parameter& p : params_) model += 2.0 * static_cast<double>(p.tensor.numel() * p.tensor.element_size());
  return model / static_cast<double>(numel()) + 12.0 / static_cast<double>(options_.zero ? dp_size_ : 1);
}

}  // namespace ssa::parallel
