// Context-parallel attention: cp = 2 and 4 (as the world allows) give the
// outputs, selections, alignment losses and gradients of one rank (cp = 1), in
// fp32 to 1e-5, for both streams together and for each alone, with the sparse
// stream over the ring and over the selected-block exchange.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <ATen/ATen.h>

#include <string>
#include <vector>

#ifdef SSA_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "parallel/context_attention.h"
#include "parallel/process_grid.h"
#include "tests/mpi/parallel_test_main.h"

namespace ssa::parallel {
namespace {

constexpr double kAlpha = 10.0;

struct Shape {
  int64_t batch = 2, seq = 64, hq = 4, hkv = 2, dim = 8;
};

struct Inputs {
  at::Tensor q, k, v;       // whole sequence [B, S, H, D]
  at::Tensor w_full, w_sparse;  // random projections of the outputs (the "task" loss)
};

Inputs make_inputs(const Shape& s, uint64_t seed, at::Device device = at::kCPU) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto f = at::TensorOptions().dtype(at::kFloat);
  Inputs in;
  in.q = at::randn({s.batch, s.seq, s.hq, s.dim}, gen, f);
  in.k = at::randn({s.batch, s.seq, s.hkv, s.dim}, gen, f);
  in.v = at::randn({s.batch, s.seq, s.hkv, s.dim}, gen, f);
  in.w_full = at::randn({s.batch, s.seq, s.hq, s.dim}, gen, f);
  in.w_sparse = at::randn({s.batch, s.seq, s.hq, s.dim}, gen, f);
  for (at::Tensor* t : {&in.q, &in.k, &in.v, &in.w_full, &in.w_sparse}) *t = t->to(device);
  return in;
}

// What a run returns: outputs, ids and gradients of this rank's rows, and the
// rank's share of the two alignment losses (the whole loss summed over ranks).
struct Result {
  at::Tensor full, sparse, ids, dq, dk, dv;
  double loss_s = 0, loss_c = 0;
  AttentionStreams streams;
};

// SmoothL1 (beta 1) summed; divided by the global element count gives the
// rank's share of the mean.
at::Tensor smooth_l1_sum(const at::Tensor& a, const at::Tensor& b) {
  return at::smooth_l1_loss(a, b, at::Reduction::Sum, 1.0);
}

// replay: a call without gradients fills a memo first, and the differentiable
// call replays it (as a layer re-run for its backward does).
Result run(const Inputs& in, const Shape& s, const kernels::SparseOptions& opts, StreamRequest req,
           Communicator* cp_group, int64_t cp, int64_t cp_rank, ContextOptions ctx = {}, bool replay = false) {
  auto local = [&](const at::Tensor& t) { return cp > 1 ? zigzag_slice(t, 1, cp, cp_rank) : t; };
  at::Tensor q = local(in.q).detach().requires_grad_(true);
  at::Tensor k = local(in.k).detach().requires_grad_(true);
  at::Tensor v = local(in.v).detach().requires_grad_(true);
  Result r;
  const std::shared_ptr<AttentionMemo> memo = replay ? make_attention_memo() : nullptr;
  if (replay) {
    at::NoGradGuard no_grad;
    attention_streams(q, k, v, s.seq, opts, req, cp_group, ctx, memo.get());
  }
  r.streams = attention_streams(q, k, v, s.seq, opts, req, cp_group, ctx, memo.get());
  at::Tensor loss = at::zeros({}, q.options());
  const double total = static_cast<double>(s.batch * s.seq * s.hq * s.dim);
  if (req.full) loss = loss + (r.streams.full * local(in.w_full)).sum();
  if (req.sparse) loss = loss + (r.streams.sparse * local(in.w_sparse)).sum();
  if (req.full && req.sparse) {
    // L_s = SmoothL1(full, sg(sparse)), L_c = SmoothL1(sg(full), sparse), means over all elements.
    const at::Tensor ls = smooth_l1_sum(r.streams.full, r.streams.sparse.detach()) / total;
    const at::Tensor lc = smooth_l1_sum(r.streams.full.detach(), r.streams.sparse) / total;
    loss = loss + kAlpha * (ls + lc);
    r.loss_s = ls.item<double>();
    r.loss_c = lc.item<double>();
  }
  loss.backward();
  r.full = r.streams.full.defined() ? r.streams.full.detach() : at::Tensor();
  r.sparse = r.streams.sparse.defined() ? r.streams.sparse.detach() : at::Tensor();
  r.ids = r.streams.block_ids;
  r.dq = q.grad();
  r.dk = k.grad();
  r.dv = v.grad();
  return r;
}

void expect_close(const at::Tensor& got_any, const at::Tensor& want_any, const std::string& what) {
  ASSERT_TRUE(got_any.defined()) << what << " undefined";
  const at::Tensor got = got_any.cpu(), want = want_any.cpu();
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const double err = (got - want).abs().max().item<double>();
  const double scale = want.abs().max().item<double>();
  EXPECT_LE(err, 1e-5 * std::max(1.0, scale)) << what << ": max |diff| " << err << " (max |want| " << scale << ")";
}

// Runs every request at every cp the world allows and compares with cp = 1.
void check_against_one_rank(const Shape& s, const kernels::SparseOptions& opts, uint64_t seed,
                            at::DeviceType device_type = at::kCPU) {
  const int n = test::world_size();
  for (int64_t cp : {2, 4}) {
    if (n % cp != 0) continue;
    ProcessGrid grid = ProcessGrid::init(n / cp, cp);
    const Inputs in = make_inputs(s, seed, grid.bind_device(device_type));
    const int64_t r = grid.cp_rank();
    auto mine = [&](const at::Tensor& t) { return zigzag_slice(t, 1, cp, r); };
    struct Case {
      StreamRequest req;
      SparseTransportChoice transport;
      const char* name;
    };
    for (const Case& c : {Case{{true, true}, SparseTransportChoice::kAuto, "ssa"},
                          Case{{true, false}, SparseTransportChoice::kAuto, "full"},
                          Case{{false, true}, SparseTransportChoice::kRing, "sparse/ring"},
                          Case{{false, true}, SparseTransportChoice::kSelectedBlocks, "sparse/selected"}}) {
      const Result want = run(in, s, opts, c.req, nullptr, 1, 0);
      for (const bool replay : {false, true}) {
        const std::string what = fmt::format("cp {} rank {} {}{}", cp, r, c.name, replay ? " replayed" : "");
        const Result got = run(in, s, opts, c.req, &grid.cp_group(), cp, r, ContextOptions{c.transport}, replay);
        if (c.req.full) expect_close(got.full, mine(want.full), what + " full output");
        if (c.req.sparse) {
          expect_close(got.sparse, mine(want.sparse), what + " sparse output");
          EXPECT_TRUE(at::equal(got.ids.cpu(), mine(want.ids).cpu())) << what << ": selections differ";
          EXPECT_EQ(got.streams.sparse_transport, c.transport == SparseTransportChoice::kSelectedBlocks
                                                       ? SparseTransport::kSelectedBlocks
                                                       : SparseTransport::kRing)
              << what;
        }
        expect_close(got.dq, mine(want.dq), what + " dq");
        expect_close(got.dk, mine(want.dk), what + " dk");
        expect_close(got.dv, mine(want.dv), what + " dv");
        // Alignment losses: the ranks' shares add up to the one-rank value.
        at::Tensor losses = at::tensor({got.loss_s, got.loss_c}, at::TensorOptions().dtype(at::kDouble));
        grid.cp_group().all_reduce(losses, ReduceOp::kSum);
        EXPECT_NEAR(losses[0].item<double>(), want.loss_s, 1e-5 * std::max(1.0, want.loss_s)) << what << " L_s";
        EXPECT_NEAR(losses[1].item<double>(), want.loss_c, 1e-5 * std::max(1.0, want.loss_c)) << what << " L_c";
        if (c.req.full && c.req.sparse) {
          // Not a vacuous comparison: the streams differ and the losses are not zero.
          EXPECT_GT((want.full - want.sparse).abs().max().item<double>(), 1e-2) << what;
          EXPECT_GT(want.loss_s, 1e-4) << what;
          // Bytes: full carries the K/V ring; the sparse stream selects and attends
          // on the K/V that ring brings, so it sends nothing of its own. A replay
          // moves nothing.
          const int64_t kv = s.batch * (s.seq / cp) * s.hkv * s.dim * 4;
          EXPECT_EQ(got.streams.bytes_full, replay ? 0 : (cp - 1) * 2 * kv) << what;
          EXPECT_EQ(got.streams.bytes_sparse, 0) << what;
        }
      }
      // One rank replaying its memo equals one rank computing.
      const Result one = run(in, s, opts, c.req, nullptr, 1, 0, {}, /*replay=*/true);
      if (c.req.full) expect_close(one.full, want.full, std::string(c.name) + " one rank replayed full output");
      if (c.req.sparse) {
        EXPECT_TRUE(at::equal(one.ids.cpu(), want.ids.cpu())) << c.name << " one rank replayed";
      }
      expect_close(one.dq, want.dq, std::string(c.name) + " one rank replayed dq");
      expect_close(one.dk, want.dk, std::string(c.name) + " one rank replayed dk");
      expect_close(one.dv, want.dv, std::string(c.name) + " one rank replayed dv");
    }
  }
}

TEST(ContextAttention, TokenSelectionMatchesOneRank) {
  kernels::SparseOptions opts;
  opts.block_size = 4;
  opts.top_k = 3;
  check_against_one_rank(Shape{}, opts, 11);
  check_against_one_rank(Shape{1, 64, 4, 2, 8}, opts, 13);  // one sequence: K/V received in place
}

TEST(ContextAttention, QueryBlockSelectionMatchesOneRank) {
  kernels::SparseOptions opts;
  opts.block_size = 4;
  opts.top_k = 2;
  opts.mode = kernels::SelectionMode::kQueryBlock;
  check_against_one_rank(Shape{1, 64, 2, 1, 8}, opts, 12);
}

// The same on GPUs (NCCL ring), when every rank of this host has its own GPU.
TEST(ContextAttention, CudaMatchesOneRank) {
#ifdef SSA_WITH_CUDA
  if (c10::cuda::device_count() < test::world_grid().local_size()) {
    GTEST_SKIP() << "needs one GPU per rank";
  }
  kernels::SparseOptions opts;
  opts.block_size = 4;
  opts.top_k = 3;
  check_against_one_rank(Shape{}, opts, 16, at::kCUDA);
  check_against_one_rank(Shape{1, 64, 4, 2, 8}, opts, 17, at::kCUDA);  // K/V received in place
#else
  GTEST_SKIP() << "built without CUDA";
#endif
}

TEST(ContextAttention, OneRankGroupEqualsNoGroup) {
  ProcessGrid grid = ProcessGrid::init(test::world_size(), 1);
  ASSERT_EQ(grid.cp_group().size(), 1);
  kernels::SparseOptions opts;
  opts.block_size = 4;
  opts.top_k = 3;
  const Shape s;
  const Inputs in = make_inputs(s, 13);
  const Result a = run(in, s, opts, {true, true}, nullptr, 1, 0);
  const Result b = run(in, s, opts, {true, true}, &grid.cp_group(), 1, 0);
  EXPECT_TRUE(at::equal(a.full, b.full));
  EXPECT_TRUE(at::equal(a.sparse, b.sparse));
  EXPECT_TRUE(at::equal(a.dq, b.dq));
  EXPECT_EQ(b.streams.bytes_full, 0);
  EXPECT_EQ(b.streams.sparse_transport, SparseTransport::kNone);
}

// Every query selects global block 0 (a sink-like key) and its own block: only
// block 0 travels, so fetching selected blocks beats the ring and auto picks it.
TEST(ContextAttention, AutoPicksSelectedBlocksWhenTheyMoveLess) {
  const int n = test::world_size();
  if (n % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  const int64_t cp = 2;
  ProcessGrid grid = ProcessGrid::init(n / cp, cp);
  Shape s{1, 64, 2, 1, 8};
  Inputs in = make_inputs(s, 14);
  // q all along +e0; keys of block 0 long along +e0, the rest along -e0.
  in.q = at::zeros_like(in.q);
  in.q.select(3, 0).fill_(1.0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(15);  // never the default generator: it differs per rank
  in.k = at::randn(in.k.sizes(), gen, in.k.options()) * 0.1;
  in.k.narrow(1, 4, s.seq - 4).select(3, 0).fill_(-1.0);
  in.k.narrow(1, 0, 4).select(3, 0).fill_(5.0);
  kernels::SparseOptions opts;
  opts.block_size = 4;
  opts.top_k = 2;
  const Result want = run(in, s, opts, {false, true}, nullptr, 1, 0);
  const Result got = run(in, s, opts, {false, true}, &grid.cp_group(), cp, grid.cp_rank());
  EXPECT_EQ(got.streams.sparse_transport, SparseTransport::kSelectedBlocks);
  EXPECT_LT(got.streams.bytes_sparse_selected, got.streams.bytes_sparse_ring);
  // Block 0 (rank 0's) goes to rank 1 only: 4 rows of K and V.
  EXPECT_EQ(got.streams.bytes_sparse_selected, grid.cp_rank() == 0 ? 2 * 4 * s.hkv * s.dim * 4 : 0);
  auto mine = [&](const at::Tensor& t) { return zigzag_slice(t, 1, cp, grid.cp_rank()); };
  expect_close(got.sparse, mine(want.sparse), "selected sparse output");
  expect_close(got.dq, mine(want.dq), "selected dq");
  expect_close(got.dk, mine(want.dk), "selected dk");
  expect_close(got.dv, mine(want.dv), "selected dv");
}

TEST(ContextAttention, BadShapesAreRefused) {
  kernels::SparseOptions opts;
  opts.block_size = 4;
  const at::Tensor q = at::zeros({1, 16, 2, 8}), k = at::zeros({1, 16, 1, 8});
  EXPECT_THROW(attention_streams(q, k, k, 32, opts, {true, true}, nullptr), std::invalid_argument);  // S_local != S
  EXPECT_THROW(attention_streams(q, at::zeros({1, 16, 3, 8}), at::zeros({1, 16, 3, 8}), 16, opts, {}, nullptr),
               std::invalid_argument);  // Hq % Hkv
  EXPECT_THROW(attention_streams(q, k, k, 16, opts, {false, false}, nullptr), std::invalid_argument);
  const int n = test::world_size();
  if (n % 2 == 0) {
    ProcessGrid grid = ProcessGrid::init(n / 2, 2);
    opts.block_size = 8;  // chunk of 32 / 4 = 8 tokens: fine; 16 tokens of S = 32 over cp 2 per rank
    const at::Tensor ql = at::zeros({1, 16, 2, 8}), kl = at::zeros({1, 16, 1, 8});
    EXPECT_NO_THROW(attention_streams(ql, kl, kl, 32, opts, {true, true}, &grid.cp_group()));
    opts.block_size = 16;  // chunk of 8 tokens is not a multiple of 16
    EXPECT_THROW(attention_streams(ql, kl, kl, 32, opts, {true, true}, &grid.cp_group()), std::invalid_argument);
  }
}

}  // namespace
}  // namespace ssa::parallel
