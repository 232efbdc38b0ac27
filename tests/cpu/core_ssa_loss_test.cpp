// The SSA objective: which stream each alignment loss sends gradient through,
// checked against a manual LibTorch computation of the same losses.
#include <gtest/gtest.h>

#include <torch/csrc/autograd/autograd.h>

#include "core/ssa_layer.h"
#include "kernels/attention.h"

using namespace ssa;

namespace {

struct Inputs {
  at::Tensor q, k, v, gate;
};

Inputs make_inputs(int64_t seed) {
  at::manual_seed(seed);
  auto opts = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = 2, S = 32, Hq = 4, Hkv = 2, D = 8;
  Inputs in;
  in.q = at::randn({B, S, Hq, D}, opts).requires_grad_(true);
  in.k = at::randn({B, S, Hkv, D}, opts).requires_grad_(true);
  in.v = at::randn({B, S, Hkv, D}, opts).requires_grad_(true);
  in.gate = at::sigmoid(at::randn({B, S, Hq, 1}, opts)).requires_grad_(true);
  return in;
}

core::StreamSettings settings_for(core::AttentionMode mode, bool after_gate) {
  core::StreamSettings s;
  s.mode = mode;
  s.align_after_gate = after_gate;
  s.sparse.block_size = 8;
  s.sparse.top_k = 2;  // 2 of 4 blocks: sparse differs from full
  s.seq_len = 32;
  return s;
}

std::vector<at::Tensor> grads_of(const at::Tensor& loss, const Inputs& in) {
  return torch::autograd::grad({loss}, {in.q, in.k, in.v, in.gate}, {}, /*retain_graph=*/true,
                               /*create_graph=*/false, /*allow_unused=*/true);
}

void expect_same(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, const char* what) {
  const char* names[] = {"q", "k", "v", "gate"};
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].defined(), b[i].defined()) << what << " d" << names[i];
    if (!a[i].defined()) continue;  // the gate takes no part when aligning before it
    // The layer computes the loss in fp32, the manual reference in fp64.
    EXPECT_TRUE(at::allclose(a[i], b[i], 1e-5, 1e-9)) << what << " d" << names[i] << " max diff "
                                                         << (a[i] - b[i]).abs().max().item<double>();
  }
}

}  // namespace

TEST(SsaLoss, EachAlignmentLossFlowsThroughOneStream) {
  for (bool after_gate : {true, false}) {
    Inputs in = make_inputs(7);
    auto s = settings_for(core::AttentionMode::kSsa, after_gate);
    auto layer = core::ssa_attention(in.q, in.k, in.v, in.gate, s);

    // Manual: both streams from the reference kernels, stop-gradients by hand.
    auto full = kernels::full_attention(in.q, in.k, in.v).out;
    auto pooled = kernels::pool_keys(in.k.detach(), 8);
    auto ids = kernels::select_blocks(in.q.detach(), pooled, s.sparse);
    auto sparse = kernels::sparse_attention(in.q, in.k, in.v, ids, s.sparse).out;
    auto h_full = after_gate ? full * in.gate : full;
    auto h_sparse = after_gate ? sparse * in.gate : sparse;
    auto manual_ls = at::smooth_l1_loss(h_full, h_sparse.detach(), at::Reduction::Mean, 1.0);
    auto manual_lc = at::smooth_l1_loss(h_full.detach(), h_sparse, at::Reduction::Mean, 1.0);
    EXPECT_NEAR(layer.sparsity_loss.item<double>(), manual_ls.item<double>(), 1e-6);
    EXPECT_NEAR(layer.commitment_loss.item<double>(), manual_lc.item<double>(), 1e-6);
    EXPECT_GT(manual_ls.item<double>(), 1e-4) << "streams must differ for this test to mean anything";

    expect_same(grads_of(layer.sparsity_loss, in), grads_of(manual_ls.to(at::kFloat), in), "L_s");
    expect_same(grads_of(layer.commitment_loss, in), grads_of(manual_lc.to(at::kFloat), in), "L_c");

    // L_s through the full stream only: its gradient equals that of the full
    // stream's output with the sparse side frozen, and differs from one that
    // flowed through the sparse stream.
    auto ls_via_sparse = at::smooth_l1_loss(h_full.detach(), h_sparse, at::Reduction::Mean, 1.0);
    auto a = grads_of(layer.sparsity_loss, in);
    auto b = grads_of(ls_via_sparse, in);
    EXPECT_FALSE(at::allclose(a[0], b[0], 1e-6, 1e-8)) << "L_s must not flow through the sparse stream";
  }
}

TEST(SsaLoss, PassesTheDrawnStream) {
  Inputs in = make_inputs(3);
  auto s = settings_for(core::AttentionMode::kSsa, true);
  s.pass_full = true;
  auto full_out = core::ssa_attention(in.q, in.k, in.v, in.gate, s).out;
  s.pass_full = false;
  auto sparse_out = core::ssa_attention(in.q, in.k, in.v, in.gate, s).out;
  auto full = kernels::full_attention(in.q, in.k, in.v).out * in.gate;
  EXPECT_TRUE(at::allclose(full_out, full, 1e-10, 1e-12));
  EXPECT_FALSE(at::allclose(sparse_out, full, 1e-4, 1e-6));

  // Baselines: full and sparse modes carry no alignment loss.
  for (auto mode : {core::AttentionMode::kFull, core::AttentionMode::kSparse}) {
    auto r = core::ssa_attention(in.q, in.k, in.v, in.gate, settings_for(mode, true));
    EXPECT_EQ(r.sparsity_loss.item<double>(), 0.0);
    EXPECT_EQ(r.commitment_loss.item<double>(), 0.0);
  }
  auto sparse_mode = core::ssa_attention(in.q, in.k, in.v, in.gate, settings_for(core::AttentionMode::kSparse, true));
  EXPECT_TRUE(at::allclose(sparse_mode.out, sparse_out, 1e-10, 1e-12));
}
