// Full attention on CUDA bf16 (the fused cuDNN / flash path, GQA without repeated
// K/V) against the same computation on fp32 copies (efficient-attention forward,
// matmul-formula backward): the whole causal attention under autograd, and
// full_attention_backward per key chunk from the merged out and lse, as the
// context-parallel ring calls it (a diagonal chunk and a chunk from the past).
// Bounds are norm-relative, a few times the bf16 rounding of the inputs.
#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "kernels/alignment.h"
#include "kernels/attention.h"
#include "kernels/rotary.h"
#include "kernels/side_stream.h"
#include "kernels_gpu_support.h"

#ifdef SSA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace ssa::kernels {
namespace {

using gpu_test::gpu;
using gpu_test::relative_error;

struct Grads {
  at::Tensor out, lse, dq, dk, dv;
};

Grads whole(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout) {
  const at::Tensor ql = q.detach().requires_grad_(true), kl = k.detach().requires_grad_(true),
                   vl = v.detach().requires_grad_(true);
  const AttentionResult r = full_attention(ql, kl, vl);
  const auto g = torch::autograd::grad({(r.out.to(at::kFloat) * dout.to(at::kFloat)).sum()}, {ql, kl, vl});
  return {r.out.detach(), r.lse.detach(), g[0], g[1], g[2]};
}

// Lengths 640 (cuDNN) and 600 (not a multiple of 64: flash), chunks of 256 and
// the rest.
TEST(CudaFullAttention, FusedForwardAndBackwardMatchFp32) {
  SSA_REQUIRE_GPU();
  for (const auto& [hq, hkv, d, s] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{16, 2, 64, 640},
                                      {8, 8, 128, 640},
                                      {4, 1, 64, 640},
                                      {16, 2, 64, 600}}) {
    const std::string name = "hq " + std::to_string(hq) + " hkv " + std::to_string(hkv) + " d " + std::to_string(d) +
                             " s " + std::to_string(s);
    at::manual_seed(5);
    const int64_t b = 2;
    const at::Tensor q = at::randn({b, s, hq, d}, gpu()), k = at::randn({b, s, hkv, d}, gpu()),
                     v = at::randn({b, s, hkv, d}, gpu()), dout = at::randn({b, s, hq, d}, gpu());
    const Grads got = whole(q, k, v, dout);
    const Grads want = whole(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), dout.to(at::kFloat));
    EXPECT_EQ(got.dk.sizes(), k.sizes()) << name;
    EXPECT_LT(relative_error(got.out, want.out), 1e-2) << name;
    EXPECT_LT((got.lse - want.lse).abs().max().item<double>(), 2e-2) << name;
    for (const auto& [what, g, w] : {std::tuple<const char*, at::Tensor, at::Tensor>{"dq", got.dq, want.dq},
                                     {"dk", got.dk, want.dk},
                                     {"dv", got.dv, want.dv}}) {
      EXPECT_LT(relative_error(g, w), 2e-2) << name << " " << what;
    }

    // Key chunks [0, 256) (past for queries [256, s)) and [256, s) (diagonal),
    // gradients from the merged result: their sum is the whole's.
    const int64_t q0 = 256, n = s - q0;
    const at::Tensor qc = q.narrow(1, q0, n), dc = dout.narrow(1, q0, n);
    const at::Tensor oc = got.out.narrow(1, q0, n), lc = got.lse.narrow(2, q0, n);
    const AttentionGrads past = full_attention_backward(dc, qc, k.narrow(1, 0, q0), v.narrow(1, 0, q0), oc, lc, q0, 0);
    const AttentionGrads diag =
        full_attention_backward(dc, qc, k.narrow(1, q0, n), v.narrow(1, q0, n), oc, lc, q0, q0);
    EXPECT_EQ(past.dk.sizes(), k.narrow(1, 0, q0).sizes()) << name;
    const at::Tensor dq = past.dq.to(at::kFloat) + diag.dq.to(at::kFloat);
    EXPECT_LT(relative_error(dq, want.dq.narrow(1, q0, n)), 2e-2) << name << " chunked dq";
    // Keys [256, s) get gradient only from queries [256, s): the diagonal chunk's.
    EXPECT_LT(relative_error(diag.dk, want.dk.narrow(1, q0, n)), 2e-2) << name << " chunked dk";
    EXPECT_LT(relative_error(diag.dv, want.dv.narrow(1, q0, n)), 2e-2) << name << " chunked dv";
  }
}

// The fused merge kernel against the ATen formula on CPU copies: accumulators
// that are a row range of a larger buffer, rows empty in the accumulator, in the
// part, and in both.
TEST(CudaFullAttention, FusedMergeMatchesTheFormula) {
  SSA_REQUIRE_GPU();
  at::manual_seed(9);
  const int64_t b = 2, rows = 96, h = 4, d = 64, n = 40, row0 = 32;
  const double inf = std::numeric_limits<double>::infinity();
  for (const at::ScalarType part_type : {at::kBFloat16, at::kFloat}) {
    at::Tensor out_gpu = at::randn({b, rows, h, d}, gpu(at::kFloat));
    at::Tensor lse_gpu = at::randn({b, h, rows}, gpu(at::kFloat));
    lse_gpu.narrow(2, row0, 5).fill_(-inf);  // empty accumulator rows (their out is 0)
    out_gpu.narrow(1, row0, 5).zero_();
    AttentionResult part{at::randn({b, n, h, d}, gpu(part_type)), at::randn({b, h, n}, gpu(at::kFloat))};
    part.lse.narrow(2, 3, 4).fill_(-inf);  // empty part rows, overlapping the empty accumulator rows at 3, 4
    part.out.narrow(1, 3, 4).zero_();
    at::Tensor out_cpu = out_gpu.cpu(), lse_cpu = lse_gpu.cpu();
    at::Tensor o1 = out_gpu.narrow(1, row0, n), l1 = lse_gpu.narrow(2, row0, n);
    merge_into(o1, l1, part);
    at::Tensor o2 = out_cpu.narrow(1, row0, n), l2 = lse_cpu.narrow(2, row0, n);
    merge_into(o2, l2, AttentionResult{part.out.cpu(), part.lse.cpu()});
    EXPECT_TRUE(at::allclose(out_gpu.cpu(), out_cpu, 1e-5, 1e-5));
    EXPECT_TRUE(at::equal(at::isinf(lse_gpu.cpu()), at::isinf(lse_cpu)));
    const at::Tensor finite = at::isfinite(lse_cpu);
    EXPECT_TRUE(at::allclose(lse_gpu.cpu().masked_select(finite), lse_cpu.masked_select(finite), 1e-5, 1e-5));
    EXPECT_TRUE(at::equal(out_gpu.narrow(1, 0, row0).cpu(), out_cpu.narrow(1, 0, row0)));  // rows outside untouched
  }
}

// The one-pass row kernels against the ATen formulas on CPU copies: bf16 parts
// on overlapping row ranges (one with empty rows) into bf16 and fp32 outputs,
// rows no part covers; bf16 terms added to an fp32 sum.
TEST(CudaFullAttention, RowKernelsMatchTheFormula) {
  SSA_REQUIRE_GPU();
  at::manual_seed(11);
  const int64_t b = 2, rows = 70, h = 4, d = 64;
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<RowPartial> parts, parts_cpu;
  for (const auto& [row, n] : {std::pair<int64_t, int64_t>{0, 64}, {32, 32}, {40, 24}}) {
    AttentionResult p{at::randn({b, n, h, d}, gpu(at::kBFloat16)), at::randn({b, h, n}, gpu(at::kFloat))};
    if (row == 32) {  // rows no key reached in this part
      p.lse.narrow(2, 2, 3).fill_(-inf);
      p.out.narrow(1, 2, 3).zero_();
    }
    parts.push_back({row, p});
    parts_cpu.push_back({row, AttentionResult{p.out.cpu(), p.lse.cpu()}});
  }
  const AttentionResult want = merge_row_partials(rows, parts_cpu, at::kFloat);
  for (const at::ScalarType out_type : {at::kBFloat16, at::kFloat}) {
    const AttentionResult got = merge_row_partials(rows, parts, out_type);
    ASSERT_TRUE(got.out.is_cuda());
    EXPECT_EQ(got.out.scalar_type(), out_type);
    const double tol = out_type == at::kFloat ? 1e-5 : 1e-2;
    EXPECT_TRUE(at::allclose(got.out.cpu().to(at::kFloat), want.out, tol, tol)) << c10::toString(out_type);
    EXPECT_TRUE(at::equal(at::isinf(got.lse.cpu()), at::isinf(want.lse)));
    const at::Tensor finite = at::isfinite(want.lse);
    EXPECT_TRUE(at::allclose(got.lse.cpu().masked_select(finite), want.lse.masked_select(finite), 1e-5, 1e-5));
    EXPECT_TRUE(at::equal(got.out.narrow(1, 64, 6).cpu(), at::zeros({b, 6, h, d}, out_type)));
  }
  const at::Tensor base = at::randn({b, rows, h, d}, gpu(at::kFloat));
  const at::Tensor t1 = at::randn({b, rows, h, d}, gpu(at::kBFloat16)), t2 = at::randn({b, 30, h, d}, gpu(at::kBFloat16));
  at::Tensor sum = base.cpu() + t1.cpu().to(at::kFloat);
  sum.narrow(1, 40, 30).add_(t2.cpu().to(at::kFloat));
  const at::Tensor fp32 = add_row_terms(base, {{0, t1}, {40, t2}}, at::kFloat);
  EXPECT_TRUE(at::allclose(fp32.cpu(), sum, 1e-6, 1e-6));
  const at::Tensor bf16 = add_row_terms(base, {{0, t1}, {40, t2}}, at::kBFloat16);
  EXPECT_EQ(bf16.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(bf16.cpu(), sum.to(at::kBFloat16)));  // one rounding, of the fp32 sum
}

// The fused rotary kernel against the ATen formula on the CPU: forward in bf16
// and fp32, and the gradient (the inverse rotation) under autograd; fp16 takes
// the formula on the GPU.
TEST(CudaRotary, FusedRotationMatchesTheFormula) {
  SSA_REQUIRE_GPU();
  at::manual_seed(10);
  const int64_t b = 2, s = 37, h = 3, d = 64;
  const at::Tensor angles = at::rand({s, d / 2}, at::kDouble) * 50.0;
  const at::Tensor cos = angles.cos().to(at::kFloat), sin = angles.sin().to(at::kFloat);
  for (const at::ScalarType type : {at::kBFloat16, at::kFloat, at::kHalf}) {
    const at::Tensor x = at::randn({b, s, h, d}).to(type);
    const at::Tensor dy = at::randn({b, s, h, d}).to(type);
    const at::Tensor xg = x.to(gpu(type)).requires_grad_(true);
    const at::Tensor y = rotate_pairs(xg, cos.to(gpu(at::kFloat)), sin.to(gpu(at::kFloat)));
    const at::Tensor dx = torch::autograd::grad({(y.to(at::kFloat) * dy.to(gpu(at::kFloat))).sum()}, {xg})[0];
    const at::Tensor xc = x.to(at::kFloat).requires_grad_(true);
    const at::Tensor yc = rotate_pairs_reference(xc, cos, sin);
    const at::Tensor dxc = torch::autograd::grad({(yc * dy.to(at::kFloat)).sum()}, {xc})[0];
    const double tol = type == at::kFloat ? 1e-5 : 1e-2;
    EXPECT_EQ(y.scalar_type(), type);
    EXPECT_LT(relative_error(y.cpu(), yc), tol) << c10::toString(type);
    EXPECT_LT(relative_error(dx.cpu(), dxc), tol) << c10::toString(type);
  }
  // Wrong table shapes are refused with the expected shape named.
  const at::Tensor x = at::randn({b, s, h, d}, gpu(at::kBFloat16));
  EXPECT_THROW(rotate_pairs(x, cos.narrow(0, 0, 5).cuda(), sin.narrow(0, 0, 5).cuda()), c10::Error);
}

// The fused gate-and-align kernels against the ATen formula on the same bf16
// inputs: the passed-on output bit for bit (same bf16 rounding of the gated
// values), the losses to fp32 summation order, the gradients of full, sparse and
// gate to bf16 precision (the formula rounds its intermediate gradients to bf16).
TEST(CudaAlignment, FusedGateAndAlignMatchTheFormula) {
  SSA_REQUIRE_GPU();
  at::manual_seed(11);
  for (const int64_t d : {64, 128, 40}) {
    const at::Tensor full = at::randn({2, 33, 3, d}, gpu());
    // Streams close to each other and far apart: both branches of SmoothL1.
    const at::Tensor sparse = (full.to(at::kFloat) + at::randn_like(full, gpu(at::kFloat)) *
                                                          at::rand({2, 33, 3, 1}, gpu(at::kFloat)) * 3.0)
                                  .to(at::kBFloat16);
    const at::Tensor gate = at::sigmoid(at::randn({2, 33, 3, 1}, gpu(at::kFloat))).to(at::kBFloat16);
    const at::Tensor w = at::randn_like(full, gpu(at::kFloat));
    for (const bool pass_full : {true, false})
      for (const bool after_gate : {true, false})
        for (const double beta : {1.0, 0.05, 0.0}) {
          const std::string what = fmt::format("D {} pass_full {} after_gate {} beta {}", d, pass_full, after_gate, beta);
          std::vector<at::Tensor> grads[2];
          GatedAlignment r[2];
          for (int fused = 0; fused < 2; ++fused) {
            const at::Tensor f = full.clone().requires_grad_(true), s = sparse.clone().requires_grad_(true);
            const at::Tensor g = gate.clone().requires_grad_(true);
            r[fused] = fused ? gate_and_align(f, s, g, pass_full, after_gate, beta)
                             : gate_and_align_reference(f, s, g, pass_full, after_gate, beta);
            const at::Tensor loss = (r[fused].out.to(at::kFloat) * w).sum() + 30.0 * r[fused].sparsity_loss +
                                    70.0 * r[fused].commitment_loss;
            grads[fused] = torch::autograd::grad({loss}, {f, s, g});
          }
          EXPECT_TRUE(at::equal(r[1].out, r[0].out)) << what;
          EXPECT_NEAR(r[1].sparsity_loss.item<double>(), r[0].sparsity_loss.item<double>(),
                      1e-5 * r[0].sparsity_loss.item<double>()) << what;
          EXPECT_NEAR(r[1].commitment_loss.item<double>(), r[0].commitment_loss.item<double>(),
                      1e-5 * r[0].sparsity_loss.item<double>()) << what;
          EXPECT_GT(r[0].sparsity_loss.item<double>(), 1e-3) << what;  // not a vacuous comparison
          for (int i = 0; i < 3; ++i) {
            EXPECT_LT(relative_error(grads[1][i].to(at::kFloat).cpu(), grads[0][i].to(at::kFloat).cpu()), 1e-2)
                << what << " gradient " << i;
          }
        }
  }
  // Mismatched shapes are refused.
  const at::Tensor x = at::randn({1, 4, 2, 8}, gpu());
  EXPECT_THROW(gate_and_align(x, x.narrow(1, 0, 2), at::ones({1, 4, 2, 1}, gpu()), true, true, 1.0),
               std::invalid_argument);
}

// Work on a side stream: it starts after what the current stream queued before
// open(), runs on another stream, and what it made is complete for the current
// stream after join(). The products are long enough to still run at each handover.
TEST(CudaSideStream, OrdersWorkBesideTheCurrentStream) {
  SSA_REQUIRE_GPU();
#ifdef SSA_WITH_CUDA
  at::manual_seed(3);
  const at::Tensor a = at::randn({2048, 2048}, gpu(at::kFloat)) / 48.0;
  auto chain = [&](at::Tensor x) {
    for (int i = 0; i < 6; ++i) x = at::matmul(x, a);
    return x;
  };
  const at::Tensor want = chain(chain(a)).cpu();
  const c10::cuda::CUDAStream outer = c10::cuda::getCurrentCUDAStream();
  const at::Tensor before = chain(a);  // queued on the current stream, read by the side work
  SideStream side(SideRole::kRingFull);
  side.open(a.device());
  ASSERT_TRUE(side.is_open());
  at::Tensor made;
  side.run([&] {
    EXPECT_NE(c10::cuda::getCurrentCUDAStream(), outer);
    made = chain(before);
  });
  EXPECT_EQ(c10::cuda::getCurrentCUDAStream(), outer);
  side.keep(made);
  side.join();
  EXPECT_FALSE(side.is_open());
  EXPECT_TRUE(at::allclose(made.cpu(), want, 1e-4, 1e-5));
  // Closed (CPU tensors, or never opened): the work runs inline on the current stream.
  SideStream closed(SideRole::kRingSparse);
  closed.open(at::Device(at::kCPU));
  EXPECT_FALSE(closed.is_open());
  closed.run([&] { EXPECT_EQ(c10::cuda::getCurrentCUDAStream(), outer); });
  closed.join();
#else
  GTEST_SKIP() << "built without CUDA";
#endif
}

}  // namespace
}  // namespace ssa::kernels
