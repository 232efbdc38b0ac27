// Process grid, communicators and preemption agreement under 1, 2 and 4 ranks:
// every collective against its closed form.
#include <gtest/gtest.h>

#include <cstdlib>
#include <csignal>
#include <string>

#ifdef SSA_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "parallel/communicator.h"
#include "parallel/error_check.h"
#include "parallel/preemption.h"
#include "parallel/process_grid.h"
#include "tests/mpi/parallel_test_main.h"

namespace ssa::parallel {
namespace {

using test::world_grid;

at::TensorOptions opts(at::ScalarType t) { return at::TensorOptions().dtype(t); }

TEST(ProcessGrid, WorldLayoutAndLocalRank) {
  ProcessGrid& g = world_grid();
  EXPECT_EQ(g.dp(), g.world_size());
  EXPECT_EQ(g.cp(), 1);
  EXPECT_EQ(g.dp_rank(), g.rank());
  EXPECT_EQ(g.cp_rank(), 0);
  // Every test rank runs on this host.
  EXPECT_EQ(g.local_size(), g.world_size());
  EXPECT_EQ(g.local_rank(), g.rank());
  EXPECT_FALSE(g.host().empty());
  EXPECT_GE(g.thread_level(), 1);  // at least MPI_THREAD_FUNNELED
  EXPECT_EQ(g.world().size(), g.world_size());
  EXPECT_EQ(g.cp_group().size(), 1);
  EXPECT_EQ(g.bind_device(at::kCPU), at::Device(at::kCPU));
}

TEST(ProcessGrid, TwoAxesSplitRanksAsDesigned) {
  const int n = test::world_size();
  if (n % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  ProcessGrid g = ProcessGrid::init(n / 2, 2);
  EXPECT_EQ(g.rank(), g.dp_rank() * 2 + g.cp_rank());
  EXPECT_EQ(g.cp_group().size(), 2);
  EXPECT_EQ(g.dp_group().size(), n / 2);
  EXPECT_EQ(g.cp_group().rank(), g.cp_rank());
  EXPECT_EQ(g.dp_group().rank(), g.dp_rank());
  EXPECT_TRUE(g.cp_group_on_one_host());
  // cp group of replica d holds world ranks 2d and 2d+1: their sum is 4d + 1.
  at::Tensor t = at::full({1}, g.rank(), opts(at::kLong));
  g.cp_group().all_reduce(t, ReduceOp::kSum);
  EXPECT_EQ(t.item<int64_t>(), 4 * g.dp_rank() + 1);
  // dp group of cp rank c holds world ranks 2d + c, d in [0, n/2).
  at::Tensor u = at::full({1}, g.rank(), opts(at::kLong));
  g.dp_group().all_reduce(u, ReduceOp::kSum);
  const int64_t m = n / 2;
  EXPECT_EQ(u.item<int64_t>(), m * (m - 1) + m * g.cp_rank());
}

TEST(ProcessGrid, WrongShapeNamesTheConfigKeys) {
  const int n = test::world_size();
  try {
    ProcessGrid::init(n + 1, 1);
    ADD_FAILURE() << "a grid of world + 1 ranks was accepted";
  } catch (const GridError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("parallel.dp"), std::string::npos) << m;
    EXPECT_NE(m.find("parallel.cp"), std::string::npos) << m;
    EXPECT_NE(m.find(std::to_string(n)), std::string::npos) << m;
  }
  EXPECT_THROW(ProcessGrid::init(1, 0), GridError);
  EXPECT_THROW(ProcessGrid::init(-1, 1), GridError);
}

TEST(ProcessGrid, SlurmTaskCountMustMatchTheWorld) {
  const int n = test::world_size();
  const char* saved = std::getenv("SLURM_NTASKS");
  const std::string keep = saved ? saved : "";
  const char* step = std::getenv("SLURM_STEP_NUM_TASKS");
  const std::string keep_step = step ? step : "";
  unsetenv("SLURM_STEP_NUM_TASKS");
  setenv("SLURM_NTASKS", std::to_string(n + 3).c_str(), 1);
  try {
    ProcessGrid::init(n, 1);
    ADD_FAILURE() << "a world smaller than SLURM_NTASKS was accepted";
  } catch (const GridError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("SLURM_NTASKS=" + std::to_string(n + 3)), std::string::npos) << m;
    EXPECT_NE(m.find("srun --mpi=pmix"), std::string::npos) << m;
  }
  setenv("SLURM_NTASKS", std::to_string(n).c_str(), 1);
  EXPECT_NO_THROW(ProcessGrid::init(n, 1));
  if (saved) setenv("SLURM_NTASKS", keep.c_str(), 1); else unsetenv("SLURM_NTASKS");
  if (step) setenv("SLURM_STEP_NUM_TASKS", keep_step.c_str(), 1);
}

// A grid destroyed while an exception propagates is abandoned (no
// MPI_Finalize that could wait for stuck peers); a program that catches the
// error keeps working with its other grids.
TEST(ProcessGrid, GridLeftByAnExceptionIsAbandoned) {
  const int n = test::world_size();
  try {
    ProcessGrid g = ProcessGrid::init(n, 1);
    throw std::runtime_error("failure with a grid alive");
  } catch (const std::runtime_error&) {
  }
  at::Tensor t = at::ones({1}, opts(at::kInt));
  world_grid().world().all_reduce(t, ReduceOp::kSum);
  EXPECT_EQ(t.item<int>(), n);
  ProcessGrid again = ProcessGrid::init(n, 1);
  EXPECT_EQ(again.world_size(), n);
}

TEST(Communicator, AllReduceClosedForms) {
  Communicator& w = world_grid().world();
  const int n = w.size(), r = w.rank();
  for (at::ScalarType type : {at::kFloat, at::kDouble, at::kBFloat16, at::kLong, at::kInt}) {
    // Element i of rank r holds (r + 1) * (i + 1): the sum is n(n+1)/2 * (i + 1).
    at::Tensor t = (at::arange(1, 6, opts(at::kDouble)) * (r + 1)).to(type);
    w.all_reduce(t, ReduceOp::kSum);
    const at::Tensor expect = at::arange(1, 6, opts(at::kDouble)) * (n * (n + 1) / 2);
    EXPECT_TRUE(at::equal(t.to(at::kDouble), expect)) << c10::toString(type) << " sum " << t;
    at::Tensor mx = (at::arange(1, 6, opts(at::kDouble)) * (r + 1)).to(type);
    w.all_reduce(mx, ReduceOp::kMax);
    EXPECT_TRUE(at::equal(mx.to(at::kDouble), at::arange(1, 6, opts(at::kDouble)) * n)) << c10::toString(type);
  }
  // avg of r over ranks: (n - 1) / 2, exactly representable.
  at::Tensor a = at::full({3, 2}, static_cast<double>(r), opts(at::kFloat));
  w.all_reduce(a, ReduceOp::kAvg);
  EXPECT_TRUE(at::allclose(a, at::full({3, 2}, (n - 1) / 2.0, opts(at::kFloat))));
  // A non-contiguous view is reduced in place.
  at::Tensor base = at::full({4, 3}, static_cast<double>(r + 1), opts(at::kDouble));
  at::Tensor view = base.t();
  w.all_reduce(view, ReduceOp::kSum);
  EXPECT_TRUE(at::equal(base, at::full({4, 3}, n * (n + 1) / 2.0, opts(at::kDouble))));
  // avg of integers is refused.
  at::Tensor ints = at::ones({2}, opts(at::kInt));
  EXPECT_THROW(w.all_reduce(ints, ReduceOp::kAvg), CommError);
}

TEST(Communicator, ReduceScatterAllGatherBroadcast) {
  Communicator& w = world_grid().world();
  const int n = w.size(), r = w.rank();
  constexpr int64_t kPer = 4;
  // input[j] = 1000 r + j for j in [0, n * kPer); rank q gets rows q:
  // sum_r (1000 r + q kPer + i) = 1000 n(n-1)/2 + n (q kPer + i).
  at::Tensor input = at::arange(n * kPer, opts(at::kDouble)) + 1000.0 * r;
  at::Tensor out = w.reduce_scatter(input, ReduceOp::kSum);
  ASSERT_EQ(out.numel(), kPer);
  const at::Tensor expect = 1000.0 * n * (n - 1) / 2 + n * (at::arange(kPer, opts(at::kDouble)) + r * kPer);
  EXPECT_TRUE(at::equal(out, expect)) << out;
  at::Tensor avg = w.reduce_scatter(input.to(at::kFloat), ReduceOp::kAvg);
  EXPECT_TRUE(at::allclose(avg, (expect / n).to(at::kFloat)));
  at::Tensor bf = w.reduce_scatter(at::full({n * 2}, 1.0, opts(at::kBFloat16)), ReduceOp::kSum);
  EXPECT_TRUE(at::equal(bf.to(at::kFloat), at::full({2}, static_cast<float>(n), opts(at::kFloat))));
  at::Tensor wrong = at::zeros({3}, opts(at::kFloat));
  EXPECT_THROW(w.reduce_scatter(input, wrong, ReduceOp::kSum), CommError);

  // all_gather of [2, 3] -> [2n, 3], rows 2q, 2q+1 from rank q.
  at::Tensor mine = at::arange(6, opts(at::kFloat)).view({2, 3}) + 10.0 * r;
  at::Tensor all = w.all_gather(mine);
  ASSERT_EQ(all.sizes(), (std::vector<int64_t>{2 * n, 3}));
  for (int q = 0; q < n; ++q) {
    EXPECT_TRUE(at::equal(all.narrow(0, 2 * q, 2), at::arange(6, opts(at::kFloat)).view({2, 3}) + 10.0 * q));
  }
  at::Tensor flags = w.all_gather(at::full({1}, r % 2 == 0, opts(at::kBool)));
  for (int q = 0; q < n; ++q) EXPECT_EQ(flags[q].item<bool>(), q % 2 == 0);

  at::Tensor b = at::full({5}, static_cast<double>(r), opts(at::kBFloat16));
  w.broadcast(b, n - 1);
  EXPECT_TRUE(at::equal(b.to(at::kFloat), at::full({5}, static_cast<float>(n - 1), opts(at::kFloat))));
  EXPECT_THROW(w.broadcast(b, n), CommError);
}

TEST(Communicator, RingSendRecvAndCounters) {
  Communicator& w = world_grid().world();
  const int n = w.size(), r = w.rank();
  w.reset_counters();
  const int right = (r + 1) % n, left = (r - 1 + n) % n;
  at::Tensor out_a = at::full({8}, static_cast<float>(r), opts(at::kFloat));
  at::Tensor out_b = at::full({3}, static_cast<double>(100 + r), opts(at::kBFloat16));
  at::Tensor in_a = at::empty({8}, opts(at::kFloat)), in_b = at::empty({3}, opts(at::kBFloat16));
  P2PBatch batch = w.start_p2p({P2POp::send(out_a, right, 1), P2POp::send(out_b, right, 2),
                                P2POp::recv(in_a, left, 1), P2POp::recv(in_b, left, 2)},
                               "ring_test");
  EXPECT_TRUE(batch.pending());
  batch.wait();
  EXPECT_FALSE(batch.pending());
  EXPECT_TRUE(at::equal(in_a, at::full({8}, static_cast<float>(left), opts(at::kFloat))));
  EXPECT_TRUE(at::equal(in_b.to(at::kFloat), at::full({3}, static_cast<float>(100 + left), opts(at::kFloat))));

  at::Tensor t = at::zeros({10}, opts(at::kFloat));
  w.all_reduce(t, ReduceOp::kSum);
  w.all_reduce(t, ReduceOp::kSum);
  const auto bytes = w.comm_bytes();
  const auto calls = w.comm_calls();
  EXPECT_EQ(bytes.at("world_ring_test"), 2 * (8 * 4 + 3 * 2));  // sent + received
  EXPECT_EQ(calls.at("world_ring_test"), 1);
  EXPECT_EQ(bytes.at("world_all_reduce"), 2 * 40);
  EXPECT_EQ(calls.at("world_all_reduce"), 2);
  const auto seconds = w.comm_seconds();
  EXPECT_GE(seconds.at("world_all_reduce"), 0.0);
  EXPECT_GE(seconds.at("world_ring_test"), 0.0);
  const auto grid_seconds = world_grid().comm_seconds();
  EXPECT_EQ(grid_seconds.count("world_all_reduce"), 1u);

  // A batch left unwaited completes in its destructor (no buffer freed in flight).
  {
    at::Tensor s = at::full({4}, static_cast<float>(r), opts(at::kFloat)), d = at::empty({4}, opts(at::kFloat));
    P2PBatch pending = w.start_p2p({P2POp::send(s, right), P2POp::recv(d, left)}, "ring_test");
    (void)pending;
  }
  // Non-contiguous buffers are refused.
  at::Tensor nc = at::zeros({4, 4}, opts(at::kFloat)).t();
  EXPECT_THROW(w.start_p2p({P2POp::send(nc, right)}, "bad"), CommError);
}

// Collectives returned in flight give the closed forms of the blocking ones
// after wait() (on CPU they complete at once); bad buffers are refused.
void check_collectives_in_flight(Communicator& w, const at::TensorOptions& o) {
  const int n = w.size(), r = w.rank();
  at::Tensor t = at::arange(1, 1 + (1 << 16), o.dtype(at::kDouble)).to(at::kFloat) * (r + 1);
  P2PBatch sum = w.start_all_reduce(t, ReduceOp::kSum);
  constexpr int64_t kPer = 1 << 14;
  at::Tensor input = at::arange(n * kPer, o.dtype(at::kFloat)) + 1000.0f * r;
  at::Tensor out = at::empty({kPer}, o.dtype(at::kFloat));
  P2PBatch scatter = w.start_reduce_scatter(input, out, ReduceOp::kAvg);
  at::Tensor mine = at::full({kPer}, static_cast<float>(r + 1), o.dtype(at::kBFloat16));
  at::Tensor gathered = at::empty({n * kPer}, o.dtype(at::kBFloat16));
  P2PBatch gather = w.start_all_gather(mine, gathered);
  sum.wait();
  scatter.wait();
  gather.wait();
  const auto cpu = at::TensorOptions().dtype(at::kDouble);
  EXPECT_TRUE(at::equal(t.cpu().to(at::kDouble), at::arange(1, 1 + (1 << 16), cpu) * (n * (n + 1) / 2)));
  const at::Tensor expect = 1000.0 * (n - 1) / 2 + at::arange(kPer, cpu) + r * kPer;
  EXPECT_TRUE(at::allclose(out.cpu().to(at::kDouble), expect)) << out;
  // Row q of the gathered buffer is rank q's input.
  EXPECT_TRUE(at::equal(gathered.cpu().to(at::kDouble).view({n, kPer}),
                        (at::arange(1, n + 1, cpu).unsqueeze(1)).expand({n, kPer})));
  at::Tensor nc = at::zeros({4, 4}, o.dtype(at::kFloat)).t();
  EXPECT_THROW(w.start_all_reduce(nc, ReduceOp::kSum), CommError);
  EXPECT_THROW(w.start_all_reduce(at::zeros({2}, o.dtype(at::kBool)), ReduceOp::kSum), CommError);
  EXPECT_THROW(w.start_reduce_scatter(input, at::empty({3}, o.dtype(at::kFloat)), ReduceOp::kSum), CommError);
  EXPECT_THROW(w.start_all_gather(mine, at::empty({n * kPer + 1}, o.dtype(at::kBFloat16))), CommError);
}

TEST(Communicator, CollectivesInFlight) { check_collectives_in_flight(world_grid().world(), opts(at::kFloat)); }

// NCCL path: CUDA tensors, same closed forms (needs one GPU per rank of this host).
TEST(Communicator, CudaTensorsGoThroughNccl) {
#ifdef SSA_WITH_CUDA
  if (c10::cuda::device_count() < world_grid().local_size()) GTEST_SKIP() << "needs one GPU per rank";
  const int n = test::world_size();
  ProcessGrid g = ProcessGrid::init(n, 1);
  const at::Device dev = g.bind_device(at::kCUDA);
  Communicator& w = g.world();
  EXPECT_TRUE(w.has_nccl());
  const int r = w.rank();
  const auto cuda = [&](at::ScalarType t) { return at::TensorOptions().dtype(t).device(dev); };
  for (at::ScalarType type : {at::kFloat, at::kBFloat16, at::kLong}) {
    at::Tensor t = (at::arange(1, 6, cuda(at::kDouble)) * (r + 1)).to(type);
    w.all_reduce(t, ReduceOp::kSum);
    EXPECT_TRUE(at::equal(t.cpu().to(at::kDouble), at::arange(1, 6, opts(at::kDouble)) * (n * (n + 1) / 2)));
  }
  at::Tensor a = at::full({7}, static_cast<float>(r), cuda(at::kFloat));
  w.all_reduce(a, ReduceOp::kAvg);
  EXPECT_TRUE(at::allclose(a.cpu(), at::full({7}, (n - 1) / 2.0, opts(at::kFloat))));
  at::Tensor input = at::arange(n * 4, cuda(at::kFloat)) + 1000.0f * r;
  at::Tensor out = w.reduce_scatter(input, ReduceOp::kSum);
  EXPECT_TRUE(at::equal(out.cpu(), (1000.0 * n * (n - 1) / 2 + n * (at::arange(4, opts(at::kDouble)) + r * 4)).to(at::kFloat)));
  at::Tensor all = w.all_gather(at::full({2}, static_cast<float>(r), cuda(at::kFloat)));
  for (int q = 0; q < n; ++q) EXPECT_EQ(all[2 * q + 1].item<float>(), static_cast<float>(q));
  at::Tensor b = at::full({3}, static_cast<float>(r), cuda(at::kBFloat16));
  w.broadcast(b, n - 1);
  EXPECT_EQ(b[0].item<float>(), static_cast<float>(n - 1));
  const int right = (r + 1) % n, left = (r - 1 + n) % n;
  at::Tensor send = at::full({1 << 20}, static_cast<float>(r), cuda(at::kFloat));
  at::Tensor recv = at::empty({1 << 20}, cuda(at::kFloat));
  w.start_p2p({P2POp::send(send, right), P2POp::recv(recv, left)}, "ring_test").wait();
  EXPECT_TRUE(at::equal(recv.cpu(), at::full({1 << 20}, static_cast<float>(left), opts(at::kFloat))));
  const auto seconds = w.comm_seconds();
  EXPECT_GT(seconds.at("world_ring_test"), 0.0);
  EXPECT_GT(seconds.at("world_all_reduce"), 0.0);
  EXPECT_EQ(w.comm_bytes().at("world_ring_test"), 2 * (1 << 20) * 4);
  check_collectives_in_flight(w, cuda(at::kFloat));
#else
  GTEST_SKIP() << "built without CUDA";
#endif
}

TEST(Preemption, OneRanksSignalIsAgreedByAll) {
  Communicator& w = world_grid().world();
  const int n = w.size(), r = w.rank();
  install_preemption_handlers();
  clear_preemption_flag();
  EXPECT_FALSE(preemption_agreed(w));
  if (r == n - 1) std::raise(SIGUSR1);
  EXPECT_EQ(preemption_requested(), r == n - 1);
  EXPECT_TRUE(preemption_agreed(w));
  clear_preemption_flag();
  EXPECT_FALSE(preemption_agreed(w));
  if (r == 0) std::raise(SIGTERM);  // handled: the process keeps running
  EXPECT_TRUE(preemption_agreed(w));
  EXPECT_EQ(preemption_signal(), r == 0 ? SIGTERM : 0);
  clear_preemption_flag();
}

}  // namespace
}  // namespace ssa::parallel
