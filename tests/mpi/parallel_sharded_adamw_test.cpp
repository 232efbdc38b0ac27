// ShardedAdamW under 1, 2 and 4 ranks against plain AdamW written here with
// LibTorch ops on the whole batch: ZeRO and replicated, dp alone and dp x cp,
// non-finite steps, checkpoint shards re-sharded to another dp size.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "parallel/process_grid.h"
#include "parallel/sharded_adamw.h"
#include "tests/mpi/parallel_test_main.h"

namespace ssa::parallel {
namespace {

constexpr int64_t kRows = 8;  // global batch: rows are split over all dp * cp ranks

AdamWOptions test_options(bool zero) {
  AdamWOptions o;
  o.beta1 = 0.9;
  o.beta2 = 0.95;
  o.eps = 1e-8;
  o.weight_decay = 0.1;
  o.grad_clip = 0.5;  // small enough that some steps clip
  o.zero = zero;
  o.bucket_numel = 7;  // several buckets, parameters cut across them, a padded tail
  return o;
}

double lr_at(int step) { return 0.02 * (step + 1) / 5.0; }

// A two-layer regression model: W1 [6, 5] (decay), b1 [6] (no decay), W2 [3, 6] (decay).
struct Model {
  std::vector<at::Tensor> params;
  std::vector<bool> decay{true, false, true};
};

Model make_model(uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  Model m;
  m.params = {at::randn({6, 5}, gen) * 0.5, at::randn({6}, gen) * 0.1, at::randn({3, 6}, gen) * 0.5};
  for (auto& p : m.params) p.requires_grad_(true);
  return m;
}

struct Data {
  at::Tensor x, y;  // [kRows, 5], [kRows, 3]
};
Data make_data(uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return {at::randn({kRows, 5}, gen), at::randn({kRows, 3}, gen) * 2.0};
}

// Mean over rows of the squared error (so a rank's loss is the mean over its rows).
at::Tensor loss_of(const Model& m, const at::Tensor& x, const at::Tensor& y) {
  const at::Tensor h = at::tanh(at::matmul(x, m.params[0].t()) + m.params[1]);
  return (at::matmul(h, m.params[2].t()) - y).pow(2).sum(1).mean();
}

std::vector<Parameter> as_parameters(const Model& m) {
  return {{"w1", m.params[0], true}, {"b1", m.params[1], false}, {"w2", m.params[2], true}};
}

// Plain AdamW on the whole batch (PyTorch's update rule), with global-norm clipping.
struct ReferenceAdamW {
  Model model;
  std::vector<at::Tensor> exp_avg, exp_avg_sq;
  int step = 0;
  explicit ReferenceAdamW(uint64_t seed) : model(make_model(seed)) {
    for (const auto& p : model.params) {
      exp_avg.push_back(at::zeros_like(p));
      exp_avg_sq.push_back(at::zeros_like(p));
    }
  }
  double update(const Data& d, double lr, const AdamWOptions& o) {
    for (auto& p : model.params) p.mutable_grad().reset();
    loss_of(model, d.x, d.y).backward();
    at::NoGradGuard no_grad;
    double sq = 0;
    for (const auto& p : model.params) sq += p.grad().pow(2).sum().item<double>();
    const double norm = std::sqrt(sq);
    const double clip = std::min(1.0, o.grad_clip / (norm + 1e-6));
    ++step;
    for (size_t i = 0; i < model.params.size(); ++i) {
      at::Tensor p = model.params[i].detach();
      const at::Tensor g = model.params[i].grad() * clip;
      if (model.decay[i]) p.mul_(1 - lr * o.weight_decay);
      exp_avg[i] = exp_avg[i] * o.beta1 + g * (1 - o.beta1);
      exp_avg_sq[i] = exp_avg_sq[i] * o.beta2 + g * g * (1 - o.beta2);
      const double bc1 = 1 - std::pow(o.beta1, step), bc2 = 1 - std::pow(o.beta2, step);
      p.sub_(exp_avg[i] / (exp_avg_sq[i].sqrt() / std::sqrt(bc2) + o.eps) * (lr / bc1));
    }
    return norm;
  }
};

// My rows of the global batch: rank g = dp_rank * cp + cp_rank of n owns
// rows [g * kRows / n, (g + 1) * kRows / n).
Data my_rows(const Data& d, const ProcessGrid& grid) {
  const int64_t n = grid.world_size(), per = kRows / n, first = grid.rank() * per;
  return {d.x.narrow(0, first, per), d.y.narrow(0, first, per)};
}

// overlap: the gradients are reduced during the backward (in two halves, so
// the earlier one reaches the optimizer through .grad as with micro-batches).
StepResult distributed_step(ShardedAdamW& opt, const Model& m, const Data& mine, double lr, bool overlap = false) {
  opt.zero_grad();
  if (!overlap) {
    loss_of(m, mine.x, mine.y).backward();
    return opt.step(lr);
  }
  const int64_t half = mine.x.size(0) / 2, rest = mine.x.size(0) - half;
  (loss_of(m, mine.x.narrow(0, 0, half), mine.y.narrow(0, 0, half)) * (static_cast<double>(half) / mine.x.size(0)))
      .backward();
  opt.reduce_during_next_backward();
  (loss_of(m, mine.x.narrow(0, half, rest), mine.y.narrow(0, half, rest)) * (static_cast<double>(rest) / mine.x.size(0)))
      .backward();
  return opt.step(lr);
}

double max_diff(const Model& a, const Model& b) {
  double d = 0;
  for (size_t i = 0; i < a.params.size(); ++i) d = std::max(d, (a.params[i] - b.params[i]).abs().max().item<double>());
  return d;
}

void check_matches_plain_adamw(int64_t dp, int64_t cp, bool zero, bool overlap = false) {
  ProcessGrid grid = ProcessGrid::init(dp, cp);
  const Data data = make_data(21);
  const AdamWOptions o = test_options(zero);
  Model model = make_model(7);
  const auto owned = ShardedAdamW::for_grid(as_parameters(model), o, grid);
  ShardedAdamW& opt = *owned;
  EXPECT_EQ(opt.shards_over_cp(), zero && cp > 1);
  ReferenceAdamW ref(7);
  int clipped = 0;
  for (int s = 0; s < 5; ++s) {
    const StepResult r = distributed_step(opt, model, my_rows(data, grid), lr_at(s), overlap);
    const double norm = ref.update(data, lr_at(s), o);
    EXPECT_TRUE(r.applied);
    EXPECT_NEAR(r.grad_norm, norm, 1e-5 * norm) << "step " << s;
    // Every parameter receives its gradient in the last backward: every bucket
    // starts its reduction before the step.
    if (overlap) {
      EXPECT_EQ(opt.overlapped_buckets(), opt.bucket_count()) << "step " << s;
    }
    clipped += norm > o.grad_clip;
  }
  EXPECT_GE(clipped, 1) << "the test should exercise clipping";
  EXPECT_EQ(opt.step_count(), 5);
  const double d = max_diff(model, ref.model);
  EXPECT_LE(d, 1e-6) << fmt::format("dp {} cp {} zero {} overlap {}: max |param - reference| = {}", dp, cp, zero,
                                     overlap, d);
  EXPECT_GT(max_diff(model, make_model(7)), 1e-3) << "the parameters should have moved";
}

TEST(ShardedAdamW, ZeroOverDpMatchesPlainAdamW) { check_matches_plain_adamw(test::world_size(), 1, true); }
TEST(ShardedAdamW, ReplicatedOverDpMatchesPlainAdamW) { check_matches_plain_adamw(test::world_size(), 1, false); }
TEST(ShardedAdamW, ZeroOverDpAndCpMatchesPlainAdamW) {
  if (test::world_size() % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  check_matches_plain_adamw(test::world_size() / 2, 2, true);
}

TEST(ShardedAdamW, ReductionDuringBackwardMatchesPlainAdamW) {
  const int n = test::world_size();
  check_matches_plain_adamw(n, 1, true, true);
  check_matches_plain_adamw(n, 1, false, true);
  check_matches_plain_adamw(1, n, false, true);
  if (n % 2 == 0) check_matches_plain_adamw(n / 2, 2, true, true);
}

TEST(ShardedAdamW, StepsMustBeLaunchedAndFinishedInTurn) {
  ProcessGrid grid = ProcessGrid::init(test::world_size(), 1);
  const Data data = make_data(23);
  Model model = make_model(9);
  ShardedAdamW opt(as_parameters(model), test_options(true), group_or_null(grid.dp_group()), nullptr);
  EXPECT_THROW(opt.finish_step(), std::logic_error);  // nothing launched
  loss_of(model, my_rows(data, grid).x, my_rows(data, grid).y).backward();
  opt.launch_step(0.01);
  EXPECT_THROW(opt.launch_step(0.01), std::logic_error);               // the first is not finished
  opt.reduce_during_next_backward();  // the next backward may be queued while it finishes
  EXPECT_THROW(opt.reduce_during_next_backward(), std::logic_error);  // but not armed twice
  EXPECT_TRUE(opt.finish_step().applied);
  EXPECT_EQ(opt.step_count(), 1);
}

TEST(ShardedAdamW, NonFiniteGradientChangesNothingOnAnyRank) {
  ProcessGrid grid = ProcessGrid::init(test::world_size(), 1);
  const Data data = make_data(22);
  Model model = make_model(8);
  ShardedAdamW opt(as_parameters(model), test_options(true), group_or_null(grid.dp_group()), nullptr);
  distributed_step(opt, model, my_rows(data, grid), 0.01);
  std::vector<at::Tensor> before;
  for (const auto& p : model.params) before.push_back(p.detach().clone());
  opt.zero_grad();
  loss_of(model, my_rows(data, grid).x, my_rows(data, grid).y).backward();
  if (grid.rank() == grid.world_size() - 1) {
    at::NoGradGuard no_grad;
    model.params[1].mutable_grad()[2] = std::numeric_limits<float>::quiet_NaN();
  }
  const StepResult bad = opt.step(0.01);
  EXPECT_FALSE(bad.applied);
  EXPECT_FALSE(std::isfinite(bad.grad_norm));
  EXPECT_EQ(opt.step_count(), 1);
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(at::equal(model.params[i], before[i])) << "param " << i;
  const StepResult good = distributed_step(opt, model, my_rows(data, grid), 0.01);
  EXPECT_TRUE(good.applied);
  EXPECT_EQ(opt.step_count(), 2);
}

// Every rank's exported shards, on every rank (what reading all
// optimizer-dp*.h5 files of a checkpoint gives).
std::vector<ShardState> gather_all_shards(Communicator& world, const std::vector<ShardState>& mine) {
  std::vector<ShardState> all;
  for (int src = 0; src < world.size(); ++src) {
    at::Tensor count = at::full({1}, static_cast<int64_t>(mine.size()), at::TensorOptions().dtype(at::kLong));
    world.broadcast(count, src);
    for (int64_t i = 0; i < count.item<int64_t>(); ++i) {
      at::Tensor head = at::zeros({2}, at::TensorOptions().dtype(at::kLong));
      if (world.rank() == src) head = at::tensor({mine[i].offset, mine[i].numel});
      world.broadcast(head, src);
      ShardState s;
      s.offset = head[0].item<int64_t>();
      s.numel = head[1].item<int64_t>();
      for (at::Tensor* t : {&s.master, &s.exp_avg, &s.exp_avg_sq}) *t = at::zeros({s.numel});
      if (world.rank() == src) {
        s.master.copy_(mine[i].master);
        s.exp_avg.copy_(mine[i].exp_avg);
        s.exp_avg_sq.copy_(mine[i].exp_avg_sq);
      }
      for (at::Tensor* t : {&s.master, &s.exp_avg, &s.exp_avg_sq}) world.broadcast(*t, src);
      all.push_back(std::move(s));
    }
  }
  return all;
}

// Shards exported at dp = n (ZeRO) and imported at dp = n / 2 (x cp 2) give the
// same next step as continuing at dp = n.
TEST(ShardedAdamW, ShardsFromOneDpResumeAtAnother) {
  const int n = test::world_size();
  if (n % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  const Data data = make_data(23);
  const AdamWOptions o = test_options(true);
  Model wide_model = make_model(9);
  std::vector<ShardState> all;
  std::vector<at::Tensor> weights_at_3;
  {
    ProcessGrid wide = ProcessGrid::init(n, 1);
    ShardedAdamW opt(as_parameters(wide_model), o, group_or_null(wide.dp_group()), nullptr);
    for (int s = 0; s < 3; ++s) distributed_step(opt, wide_model, my_rows(data, wide), lr_at(s));
    const std::vector<ShardState> mine = opt.export_state();
    if (n > 1) {
      int64_t mine_numel = 0;
      for (const auto& shard : mine) mine_numel += shard.numel;
      EXPECT_LT(mine_numel, opt.numel());  // a shard, not everything
    }
    all = gather_all_shards(wide.world(), mine);
    for (const auto& p : wide_model.params) weights_at_3.push_back(p.detach().clone());
    distributed_step(opt, wide_model, my_rows(data, wide), lr_at(3));
  }
  ProcessGrid narrow = ProcessGrid::init(n / 2, 2);
  Model model = make_model(1234);  // other values: the import must restore them
  {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < model.params.size(); ++i) model.params[i].copy_(weights_at_3[i]);
  }
  ShardedAdamW opt(as_parameters(model), o, group_or_null(narrow.dp_group()), group_or_null(narrow.cp_group()));
  opt.import_state(all, 3);
  EXPECT_EQ(opt.step_count(), 3);
  distributed_step(opt, model, my_rows(data, narrow), lr_at(3));
  const double d = max_diff(model, wide_model);
  EXPECT_LE(d, 1e-6) << "resumed at dp " << n / 2 << " vs continued at dp " << n << ": " << d;
  EXPECT_GT(max_diff(model, Model{weights_at_3}), 1e-4) << "the step should have moved the weights";
}

TEST(ShardedAdamW, ImportRejectsGapsOverlapsAndOtherModels) {
  ProcessGrid grid = ProcessGrid::init(test::world_size(), 1);
  Model model = make_model(10);
  ShardedAdamW opt(as_parameters(model), test_options(true), group_or_null(grid.dp_group()), nullptr);
  const int64_t n = opt.numel();
  auto shard = [](int64_t offset, int64_t numel) {
    return ShardState{offset, numel, at::zeros({numel}), at::zeros({numel}), at::zeros({numel})};
  };
  auto message = [&](const std::vector<ShardState>& shards) {
    try {
      opt.import_state(shards, 1);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(message({shard(0, 10), shard(12, n - 12)}).find("no shard covers [10, 12)"), std::string::npos);
  EXPECT_NE(message({shard(0, 10), shard(8, n - 8)}).find("overlaps"), std::string::npos);
  EXPECT_NE(message({shard(0, n + 5)}).find(fmt::format("model has {}", n)), std::string::npos);
  ShardState bad = shard(0, n);
  bad.exp_avg = at::zeros({n - 1});
  EXPECT_NE(message({bad}).find("truncated"), std::string::npos);
}

TEST(ShardedAdamW, ExportWithoutZeroComesFromDpRankZeroOnly) {
  ProcessGrid grid = ProcessGrid::init(test::world_size(), 1);
  Model model = make_model(11);
  ShardedAdamW opt(as_parameters(model), test_options(false), group_or_null(grid.dp_group()), nullptr);
  const auto shards = opt.export_state();
  int64_t covered = 0;
  for (const auto& s : shards) covered += s.numel;
  EXPECT_EQ(covered, grid.dp_rank() == 0 ? opt.numel() : 0);
}

TEST(ShardedAdamW, BytesPerParameterFollowTheZeroFormula) {
  const int n = test::world_size();
  ProcessGrid grid = ProcessGrid::init(n, 1);
  for (bool zero : {true, false}) {
    Model model = make_model(12);
    AdamWOptions o = test_options(zero);
    ShardedAdamW opt(as_parameters(model), o, group_or_null(grid.dp_group()), nullptr);
    const double formula = 8.0 + 12.0 / (zero ? n : 1);  // fp32 weights + grads, master + 2 moments
    EXPECT_DOUBLE_EQ(opt.zero_formula_bytes_per_parameter(), formula);
    // Measured: the allocated shards, whose padding (< n elements per bucket) is the only excess.
    const double buckets = std::ceil(static_cast<double>(opt.numel()) / 8.0);
    EXPECT_GE(opt.bytes_per_parameter(), formula - 1e-9);
    EXPECT_LE(opt.bytes_per_parameter(), formula + 12.0 * buckets * n / opt.numel() / (zero ? n : 1) + 1e-9);
  }
}

TEST(ShardedAdamW, Bf16ParametersReceiveTheirFp32MasterWeights) {
  ProcessGrid grid = ProcessGrid::init(test::world_size(), 1);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(31);
  const at::Tensor init = at::randn({37}, gen);
  const at::Tensor grad = at::randn({37}, gen);
  at::Tensor p = init.to(at::kBFloat16).requires_grad_(true);
  AdamWOptions o = test_options(true);
  o.grad_clip = 0;
  ShardedAdamW opt({{"p", p, true}}, o, group_or_null(grid.dp_group()), nullptr);
  p.mutable_grad() = grad.to(at::kBFloat16);
  ASSERT_TRUE(opt.step(0.01).applied);
  // One AdamW step from the bf16-rounded start, in fp32: m/sqrt(v) = sign(g).
  const at::Tensor g = grad.to(at::kBFloat16).to(at::kFloat);
  const at::Tensor master = init.to(at::kBFloat16).to(at::kFloat) * (1 - 0.01 * o.weight_decay) -
                            0.01 * g / (g.abs() + o.eps);
  EXPECT_TRUE(at::equal(p.detach(), master.to(at::kBFloat16)));
  EXPECT_EQ(p.scalar_type(), at::kBFloat16);
}

}  // namespace
}  // namespace ssa::parallel
