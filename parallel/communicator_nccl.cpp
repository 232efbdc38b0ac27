// The NCCL half of Communicator: CUDA tensors, one side stream per group. Each op
// waits (on the GPU) for the caller's current stream, runs on the side stream
// between two timing events, and makes the caller's stream wait for it; the
// tensors are recorded on the side stream so the caching allocator does not
// reuse their memory while the transfer runs.
#include "parallel/communicator.h"

#ifdef SSA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>

#include "parallel/communicator_internal.h"
#include "parallel/error_check.h"

namespace ssa::parallel {
namespace {

ncclDataType_t nccl_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kInt: return ncclInt32;
    case at::kLong: return ncclInt64;
    case at::kByte: return ncclUint8;
    case at::kChar: return ncclInt8;
    case at::kBool: return ncclUint8;
    default:
      throw CommError(fmt::format("{}: CUDA tensors of dtype {} cannot be communicated with NCCL", process_location(),
                                  c10::toString(type)));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kAvg: return ncclAvg;
    case ReduceOp::kMax: return ncclMax;
  }
  return ncclSum;
}

int64_t nbytes(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

// NVLink SHARP (multicast) is kept off unless the user asked for it: on the
// project's GPU hosts multicast objects can take the GPUs out of service.
constexpr const char* kNvlsEnv = "NCCL_NVLS_ENABLE";

}  // namespace

void Communicator::init_nccl(int device) {
  if (nccl_ && nccl_->comm) {
    if (nccl_->device != device) {
      throw CommError(fmt::format("{}: communicator '{}' already uses NCCL on cuda:{}; got a tensor on cuda:{} (one "
                                  "device per rank)",
                                  process_location(), name_, nccl_->device, device));
    }
    return;
  }
  setenv(kNvlsEnv, "0", /*overwrite=*/0);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  ncclUniqueId id;
  if (rank_ == 0) SSA_NCCL_CHECK(ncclGetUniqueId(&id));
  SSA_MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, comm_));
  auto state = std::make_unique<NcclState>();
  state->device = device;
  SSA_NCCL_CHECK(ncclCommInitRank(&state->comm, size_, id, rank_));
  state->stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, static_cast<c10::DeviceIndex>(device));
  nccl_ = std::move(state);
}

void Communicator::destroy_nccl() {
  if (!nccl_) return;
  if (nccl_->comm) {
    flush_nccl_timings(/*wait=*/true);
    ncclComm_t comm = nccl_->comm;
    nccl_->comm = nullptr;
    SSA_NCCL_CHECK(ncclCommDestroy(comm));
  }
  nccl_.reset();
}

void Communicator::flush_nccl_timings(bool wait) {
  if (!nccl_) return;
  // Side-stream events complete in order: stop at the first one still running.
  auto& pending = nccl_->pending;
  size_t done = 0;
  for (; done < pending.size(); ++done) {
    auto& t = pending[done];
    if (wait) {
      t.end.synchronize();
    } else if (!t.end.query()) {
      break;
    }
    seconds_[name_ + "_" + t.op] += static_cast<double>(t.start.elapsed_time(t.end)) / 1000.0;
  }
  pending.erase(pending.begin(), pending.begin() + static_cast<std::ptrdiff_t>(done));
  auto& exposures = nccl_->exposures;
  size_t kept = 0;
  for (auto& e : exposures) {
    if (wait) {
      e.done.synchronize();
      e.arrive.synchronize();
    } else if (!e.done.query() || !e.arrive.query()) {
      if (&exposures[kept] != &e) exposures[kept] = std::move(e);
      ++kept;
      continue;
    }
    const double ms = static_cast<double>(e.arrive.elapsed_time(e.done));  // done - arrive
    seconds_[name_ + "_" + e.op + "_exposed"] += std::max(0.0, ms) / 1000.0;
  }
  exposures.erase(exposures.begin() + static_cast<std::ptrdiff_t>(kept), exposures.end());
}

void nccl_wait_exposed(Communicator::NcclState& s, const std::string& op, at::cuda::CUDAEvent done) {
  const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(s.device));
  at::cuda::CUDAEvent arrive(cudaEventDefault);
  arrive.record(compute);
  done.block(compute);
  s.exposures.push_back({op, std::move(arrive), std::move(done)});
}

namespace {

// Queues `launch(comm, stream)` on the group's side stream after the caller's
// current stream's work; returns the event that marks its end (the caller's
// stream does not wait for it yet).
template <class Launch>
at::cuda::CUDAEvent enqueue_on_side_stream(Communicator::NcclState& s, const std::vector<at::Tensor>& touched,
                                           const std::string& key, Launch&& launch) {
  const auto device = static_cast<c10::DeviceIndex>(s.device);
  c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device);
  at::cuda::CUDAEvent ready;
  ready.record(compute);
  ready.block(*s.stream);
  at::cuda::CUDAEvent start(cudaEventDefault), end(cudaEventDefault);
  start.record(*s.stream);
  launch(s.comm, s.stream->stream());
  end.record(*s.stream);
  at::cuda::CUDAEvent done(cudaEventDefault);
  done.record(*s.stream);
  for (const auto& t : touched) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), *s.stream);
  s.pending.push_back({key, std::move(start), std::move(end)});
  return done;
}

// As above, and the caller's current stream waits for it.
template <class Launch>
void run_on_side_stream(Communicator::NcclState& s, const std::vector<at::Tensor>& touched, const std::string& key,
                        Launch&& launch) {
  const auto device = static_cast<c10::DeviceIndex>(s.device);
  c10::cuda::CUDAGuard guard(device);
  nccl_wait_exposed(s, key, enqueue_on_side_stream(s, touched, key, std::forward<Launch>(launch)));
}

}  // namespace

void Communicator::nccl_all_reduce(const at::Tensor& tensor, ReduceOp op) {
  ensure_device(tensor.device());
  at::Tensor buf = tensor.is_contiguous() ? tensor : tensor.contiguous();
  at::Tensor work = buf.scalar_type() == at::kBool ? buf.to(at::kLong) : buf;  // NCCL sums uint8, not bool
  run_on_side_stream(*nccl_, {work}, "all_reduce", [&](ncclComm_t comm, cudaStream_t stream) {
    SSA_NCCL_CHECK(ncclAllReduce(work.data_ptr(), work.data_ptr(), static_cast<size_t>(work.numel()),
                                 nccl_type(work.scalar_type()), nccl_op(op), comm, stream));
  });
  if (!work.is_same(buf)) buf.copy_(work);
  if (!buf.is_same(tensor)) tensor.copy_(buf);
  record("all_reduce", 0.0, nbytes(tensor));
  if (nccl_->pending.size() > 1024) flush_nccl_timings(/*wait=*/false);
}

void Communicator::nccl_reduce_scatter(const at::Tensor& input, const at::Tensor& output, ReduceOp op) {
  ensure_device(input.device());
  const at::Tensor in = input.contiguous();
  at::Tensor out = output.is_contiguous() ? output : at::empty({output.numel()}, output.options());
  run_on_side_stream(*nccl_, {in, out}, "reduce_scatter", [&](ncclComm_t comm, cudaStream_t stream) {
    SSA_NCCL_CHECK(ncclReduceScatter(in.data_ptr(), out.data_ptr(), static_cast<size_t>(out.numel()),
                                     nccl_type(in.scalar_type()), nccl_op(op), comm, stream));
  });
  if (!out.is_same(output)) output.copy_(out.view(output.sizes()));
  record("reduce_scatter", 0.0, nbytes(input));
}

void Communicator::nccl_all_gather(const at::Tensor& input, const at::Tensor& output) {
  ensure_device(input.device());
  const at::Tensor in = input.contiguous();
  at::Tensor out = output.is_contiguous() ? output : at::empty({output.numel()}, output.options());
  run_on_side_stream(*nccl_, {in, out}, "all_gather", [&](ncclComm_t comm, cudaStream_t stream) {
    SSA_NCCL_CHECK(ncclAllGather(in.data_ptr(), out.data_ptr(), static_cast<size_t>(in.numel()),
                                 nccl_type(in.scalar_type()), comm, stream));
  });
  if (!out.is_same(output)) output.copy_(out.view(output.sizes()));
  record("all_gather", 0.0, nbytes(output));
}

void Communicator::nccl_broadcast(const at::Tensor& tensor, int root) {
  ensure_device(tensor.device());
  at::Tensor buf = tensor.contiguous();
  run_on_side_stream(*nccl_, {buf}, "broadcast", [&](ncclComm_t comm, cudaStream_t stream) {
    SSA_NCCL_CHECK(ncclBroadcast(buf.data_ptr(), buf.data_ptr(), static_cast<size_t>(buf.numel()),
                                 nccl_type(buf.scalar_type()), root, comm, stream));
  });
  if (!buf.is_same(tensor)) tensor.copy_(buf);
  record("broadcast", 0.0, nbytes(tensor));
}

P2PBatch Communicator::in_flight(std::unique_ptr<P2PBatch::State> state) {
  P2PBatch batch;
  batch.state_ = std::move(state);
  return batch;
}

namespace {

// The batch of a collective queued by enqueue_on_side_stream.
std::unique_ptr<P2PBatch::State> collective_state(Communicator* comm, int device, const std::string& op,
                                                  std::vector<at::Tensor> tensors, at::cuda::CUDAEvent done) {
  auto state = std::make_unique<P2PBatch::State>();
  state->comm = comm;
  state->op = op;
  state->cuda = true;
  state->device = device;
  state->done.emplace(std::move(done));
  state->tensors = std::move(tensors);
  return state;
}

}  // namespace

P2PBatch Communicator::nccl_start_all_reduce(const at::Tensor& tensor, ReduceOp op) {
  ensure_device(tensor.device());
  at::cuda::CUDAEvent done = enqueue_on_side_stream(*nccl_, {tensor}, "all_reduce", [&](ncclComm_t comm, cudaStream_t stream) {
    SSA_NCCL_CHECK(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), static_cast<size_t>(tensor.numel()),
                                 nccl_type(tensor.scalar_type()), nccl_op(op), comm, stream));
  });
  record("all_reduce", 0.0, nbytes(tensor));
  return in_flight(collective_state(this, nccl_->device, "all_reduce", {tensor}, std::move(done)));
}

P2PBatch Communicator::nccl_start_reduce_scatter(const at::Tensor& input, const at::Tensor& output, ReduceOp op) {
  ensure_device(input.device());
  at::cuda::CUDAEvent done =
      enqueue_on_side_stream(*nccl_, {input, output}, "reduce_scatter", [&](ncclComm_t comm, cudaStream_t stream) {
        SSA_NCCL_CHECK(ncclReduceScatter(input.data_ptr(), output.data_ptr(), static_cast<size_t>(output.numel()),
                                         nccl_type(input.scalar_type()), nccl_op(op), comm, stream));
      });
  record("reduce_scatter", 0.0, nbytes(input));
  return in_flight(collective_state(this, nccl_->device, "reduce_scatter", {input, output}, std::move(done)));
}

P2PBatch Communicator::nccl_start_all_gather(const at::Tensor& input, const at::Tensor& output) {
  ensure_device(input.device());
  at::cuda::CUDAEvent done =
      enqueue_on_side_stream(*nccl_, {input, output}, "all_gather", [&](ncclComm_t comm, cudaStream_t stream) {
        SSA_NCCL_CHECK(ncclAllGather(input.data_ptr(), output.data_ptr(), static_cast<size_t>(input.numel()),
                                     nccl_type(input.scalar_type()), comm, stream));
      });
  record("all_gather", 0.0, nbytes(output));
  return in_flight(collective_state(this, nccl_->device, "all_gather", {input, output}, std::move(done)));
}

P2PBatch Communicator::nccl_start_p2p(std::vector<P2POp> ops, const std::string& op_name) {
  ensure_device(ops.front().tensor.device());
  NcclState& s = *nccl_;
  const auto device = static_cast<c10::DeviceIndex>(s.device);
  c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device);
  at::cuda::CUDAEvent ready;
  ready.record(compute);
  ready.block(*s.stream);
  at::cuda::CUDAEvent start(cudaEventDefault), end(cudaEventDefault);
  start.record(*s.stream);
  // The caller's next kernels wait until the transfer is next on the NCCL
  // stream. Else a kernel that fills every SM for a long time (a fused attention
  // forward) can be scheduled first, and the transfer, which the peer waits for,
  // only starts when that kernel ends.
  start.block(compute);
  int64_t bytes = 0;
  SSA_NCCL_CHECK(ncclGroupStart());
  for (const auto& o : ops) {
    const auto count = static_cast<size_t>(o.tensor.numel());
    const ncclDataType_t type = nccl_type(o.tensor.scalar_type());
    if (o.kind == P2POp::Kind::kSend) {
      SSA_NCCL_CHECK(ncclSend(o.tensor.data_ptr(), count, type, o.peer, s.comm, s.stream->stream()));
    } else {
      SSA_NCCL_CHECK(ncclRecv(o.tensor.data_ptr(), count, type, o.peer, s.comm, s.stream->stream()));
    }
    bytes += nbytes(o.tensor);
  }
  SSA_NCCL_CHECK(ncclGroupEnd());
  end.record(*s.stream);
  auto state = std::make_unique<P2PBatch::State>();
  state->comm = this;
  state->op = op_name;
  state->cuda = true;
  state->device = s.device;
  state->done.emplace(cudaEventDefault);  // timed: P2PBatch::wait measures the exposed part
  state->done->record(*s.stream);
  for (auto& o : ops) {
    c10::cuda::CUDACachingAllocator::recordStream(o.tensor.storage().data_ptr(), *s.stream);
    state->tensors.push_back(std::move(o.tensor));
  }
  s.pending.push_back({op_name, std::move(start), std::move(end)});
  record(op_name, 0.0, bytes);
  P2PBatch batch;
  batch.state_ = std::move(state);
  return batch;
}

}  // namespace ssa::parallel
#endif  // SSA_WITH_CUDA
