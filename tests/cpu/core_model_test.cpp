// Model pieces: chunked cross-entropy, recomputation, schedule, mode draws.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include <torch/csrc/autograd/autograd.h>

#include "core/cross_entropy.h"
#include "core/model.h"
#include "core/rope.h"
#include "core/runtime.h"
#include "core/schedule.h"

using namespace ssa;

TEST(ChunkedCrossEntropy, EqualsFullLogitsCrossEntropy) {
  at::manual_seed(0);
  const int64_t N = 37, H = 16, V = 53;
  auto hidden = at::randn({N, H}, at::kDouble).requires_grad_(true);
  auto weight = at::randn({V, H}, at::kDouble).requires_grad_(true);
  auto labels = at::randint(0, V, {N}, at::kLong);
  for (int64_t chunk : {1, 5, 37, 100}) {
    auto ours = core::chunked_cross_entropy(hidden, weight, labels, chunk);
    auto ref = at::cross_entropy_loss(at::matmul(hidden, weight.t()), labels);
    EXPECT_NEAR(ours.item<double>(), ref.item<double>(), 1e-5) << "chunk " << chunk;
    auto g1 = torch::autograd::grad({ours}, {hidden, weight});
    auto g2 = torch::autograd::grad({ref}, {hidden, weight});
    EXPECT_TRUE(at::allclose(g1[0], g2[0].to(at::kFloat).to(at::kDouble), 1e-4, 1e-6)) << "dhidden chunk " << chunk;
    EXPECT_TRUE(at::allclose(g1[1], g2[1], 1e-4, 1e-6)) << "dweight chunk " << chunk;
  }
}

namespace {
core::ModelConfig tiny_model() {
  core::ModelConfig m;
  m.vocab_size = 264;
  m.hidden = 32;
  m.n_layers = 2;
  m.n_heads = 4;
  m.n_kv_heads = 2;
  m.ffn_hidden = 48;
  return m;
}
core::StreamSettings ssa_settings(bool pass_full) {
  core::StreamSettings s;
  s.mode = core::AttentionMode::kSsa;
  s.pass_full = pass_full;
  s.sparse.block_size = 8;
  s.sparse.top_k = 2;
  s.seq_len = 32;
  return s;
}
}  // namespace

TEST(Transformer, RecomputationGivesTheSameLossAndGradients) {
  core::Transformer model(tiny_model(), at::kCPU, at::kFloat, 5);
  auto tokens = at::randint(0, 257, {2, 32}, at::kLong);
  auto labels = at::randint(0, 257, {2, 32}, at::kLong);
  auto positions = at::arange(32, at::kLong);
  std::vector<at::Tensor> params;
  for (const auto& p : model.parameters()) params.push_back(p.tensor);
  for (bool pass_full : {true, false}) {
    std::vector<std::vector<at::Tensor>> grads;
    std::vector<double> losses;
    for (core::Recompute recompute :
         {core::Recompute::kNone, core::Recompute::kKeepAttention, core::Recompute::kFull}) {
      auto r = model.forward(tokens, positions, ssa_settings(pass_full), recompute);
      auto ce = core::chunked_cross_entropy(r.hidden.reshape({-1, 32}), model.embedding(), labels.reshape({-1}), 16);
      auto loss = ce + 10.0 * (r.sparsity_loss + r.commitment_loss);
      losses.push_back(loss.item<double>());
      grads.push_back(torch::autograd::grad({loss}, params));
    }
    for (size_t m = 1; m < losses.size(); ++m) {
      EXPECT_DOUBLE_EQ(losses[0], losses[m]) << "mode " << m;
      for (size_t i = 0; i < params.size(); ++i)
        EXPECT_TRUE(at::allclose(grads[0][i], grads[m][i], 1e-5, 1e-7)) << model.parameters()[i].name << " mode " << m;
    }
  }
}

// The rotary table is kept for the positions tensor last seen: another tensor,
// or the same one changed in place, gets its own table.
TEST(Transformer, RotaryTableFollowsThePositions) {
  at::NoGradGuard no_grad;
  core::Transformer model(tiny_model(), at::kCPU, at::kFloat, 5);
  core::Transformer fresh(tiny_model(), at::kCPU, at::kFloat, 5);
  auto tokens = at::randint(0, 257, {1, 32}, at::kLong);
  auto run = [&](const core::Transformer& m, const at::Tensor& positions) {
    return m.forward(tokens, positions, ssa_settings(true), core::Recompute::kNone).hidden;
  };
  at::Tensor positions = at::arange(32, at::kLong);
  const at::Tensor first = run(model, positions);
  EXPECT_TRUE(at::equal(run(model, positions), first));
  // Rotary attention sees relative positions only: spread them out, not shift.
  const at::Tensor spread = at::arange(32, at::kLong) * 3;
  EXPECT_TRUE(at::equal(run(model, spread), run(fresh, spread.clone())));
  EXPECT_FALSE(at::allclose(run(model, spread), first));
  positions.mul_(3);  // in place: now equal to `spread`
  EXPECT_TRUE(at::equal(run(model, positions), run(fresh, spread.clone())));
}

TEST(Transformer, InitIsSeededAndLlamaStyle) {
  auto m = tiny_model();
  core::Transformer a(m, at::kCPU, at::kFloat, 1), b(m, at::kCPU, at::kFloat, 1), c(m, at::kCPU, at::kFloat, 2);
  EXPECT_TRUE(at::equal(a.parameters()[1 + 1].tensor, b.parameters()[2].tensor));
  EXPECT_FALSE(at::equal(a.parameters()[2].tensor, c.parameters()[2].tensor));
  for (const auto& p : a.parameters()) {
    if (p.name.find("norm") != std::string::npos) EXPECT_TRUE(at::equal(p.tensor, at::ones_like(p.tensor))) << p.name;
    if (p.name.find("wq") != std::string::npos) EXPECT_NEAR(p.tensor.std().item<double>(), 0.02, 0.004) << p.name;
    if (p.name.find("wo") != std::string::npos) EXPECT_NEAR(p.tensor.std().item<double>(), 0.01, 0.003) << p.name;
  }
  const int64_t H = 32, D = 8, F = 48;
  const int64_t per_layer = 2 * H + 4 * D * H * 2 + 2 * D * H * 2 + 4 * H + 3 * H * F;
  EXPECT_EQ(a.parameter_count(), 264 * H + 2 * per_layer + H);
}

TEST(Rope, RotationPreservesNormsAndDependsOnRelativePosition) {
  auto q = at::randn({1, 4, 1, 8}, at::kDouble);
  auto k = at::randn({1, 4, 1, 8}, at::kDouble);
  auto t0 = core::rotary_table(at::arange(0, 4, at::kLong), 8, 10000.0, 1.0);
  auto t5 = core::rotary_table(at::arange(5, 9, at::kLong), 8, 10000.0, 1.0);
  auto q0 = core::apply_rotary(q.to(at::kFloat), t0), k0 = core::apply_rotary(k.to(at::kFloat), t0);
  auto q5 = core::apply_rotary(q.to(at::kFloat), t5), k5 = core::apply_rotary(k.to(at::kFloat), t5);
  EXPECT_TRUE(at::allclose(q0.norm(2, -1), q.to(at::kFloat).norm(2, -1), 1e-5, 1e-5));
  // <q_i, k_j> depends only on i - j: shifting both by 5 keeps every score.
  auto s0 = at::einsum("bihd,bjhd->bij", {q0, k0});
  auto s5 = at::einsum("bihd,bjhd->bij", {q5, k5});
  EXPECT_TRUE(at::allclose(s0, s5, 1e-4, 1e-4));
}

TEST(Schedule, WarmupThenCosineToFloor) {
  EXPECT_DOUBLE_EQ(core::cosine_lr(1.0, 0, 100, 0.1, 0.0), 0.1);
  EXPECT_DOUBLE_EQ(core::cosine_lr(1.0, 9, 100, 0.1, 0.0), 1.0);
  EXPECT_NEAR(core::cosine_lr(1.0, 10, 100, 0.1, 0.0), 1.0, 1e-12);
  EXPECT_NEAR(core::cosine_lr(1.0, 55, 100, 0.1, 0.0), 0.5, 1e-12);
  EXPECT_NEAR(core::cosine_lr(1.0, 100, 100, 0.1, 0.1), 0.1, 1e-12);
}

TEST(ModeDraw, ReproducibleAndFair) {
  int full = 0;
  for (int64_t step = 0; step < 4000; ++step) {
    const bool a = core::draw_full_stream(42, step, 0, 0.5);
    EXPECT_EQ(a, core::draw_full_stream(42, step, 0, 0.5));
    full += a;
  }
  EXPECT_NEAR(full / 4000.0, 0.5, 0.03);
  int differ = 0;
  for (int64_t step = 0; step < 100; ++step)
    differ += core::draw_full_stream(42, step, 0, 0.5) != core::draw_full_stream(43, step, 0, 0.5);
  EXPECT_GT(differ, 20);
  // Micro-batches of one step (keyed by their first sequence) draw independently.
  int mixed = 0;
  for (int64_t step = 0; step < 100; ++step)
    mixed += core::draw_full_stream(42, step, 0, 0.5) != core::draw_full_stream(42, step, 4, 0.5);
  EXPECT_GT(mixed, 20);
  EXPECT_FALSE(core::draw_full_stream(1, 2, 3, 0.0));
  EXPECT_TRUE(core::draw_full_stream(1, 2, 3, 1.0));
}

TEST(Runtime, CudaConnectionsGoToTheEnvironmentUnlessItSetsThemOrTheRunIsOnCpu) {
  constexpr const char* kName = "CUDA_DEVICE_MAX_CONNECTIONS";
  const char* before = std::getenv(kName);
  const std::string saved = before != nullptr ? before : "";
  ssa::core::TrainConfig train;
  ::unsetenv(kName);
  train.device = "cpu";
  EXPECT_EQ(ssa::core::apply_cuda_connections(train), "");  // a CPU run leaves it alone
  train.device = "auto";
  train.cuda_connections = 0;
  EXPECT_EQ(ssa::core::apply_cuda_connections(train), "");  // 0: the driver's default
  train.cuda_connections = 2;
  EXPECT_EQ(ssa::core::apply_cuda_connections(train), "2");
  ::setenv(kName, "4", 1);
  EXPECT_EQ(ssa::core::apply_cuda_connections(train), "4");  // the user's environment wins
  if (before != nullptr) {
    ::setenv(kName, saved.c_str(), 1);
  } else {
    ::unsetenv(kName);
  }
}
