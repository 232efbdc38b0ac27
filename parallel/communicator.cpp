#include "parallel/communicator.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <climits>
#include <utility>

#include "parallel/communicator_internal.h"
#include "parallel/error_check.h"

namespace ssa::parallel {
namespace {

using Clock = std::chrono::steady_clock;

// MPI type that moves the elements of `type` unchanged (bf16/fp16 as 16-bit words).
MPI_Datatype mpi_transfer_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kInt: return MPI_INT32_T;
    case at::kLong: return MPI_INT64_T;
    case at::kShort: return MPI_INT16_T;
    case at::kByte: return MPI_UINT8_T;
    case at::kChar: return MPI_INT8_T;
    case at::kBool: return MPI_UINT8_T;
    case at::kBFloat16:
    case at::kHalf: return MPI_UINT16_T;
    default:
      throw CommError(fmt::format("{}: tensors of dtype {} cannot be communicated (supported: fp32, fp64, bf16, "
                                  "fp16, int8/16/32/64, uint8, bool)",
                                  process_location(), c10::toString(type)));
  }
}

// Types MPI reduces natively; others are reduced in a wider copy.
bool mpi_reduces(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kInt || type == at::kLong || type == at::kShort ||
         type == at::kByte || type == at::kChar;
}
at::ScalarType wide_type(at::ScalarType type) { return type == at::kBool ? at::kLong : at::kFloat; }

MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::kMax ? MPI_MAX : MPI_SUM; }

int mpi_count(int64_t n, const char* what) {
  if (n > INT_MAX) {
    throw CommError(fmt::format("{}: {} of {} elements exceeds the MPI count limit {}; split it into smaller buckets",
                                process_location(), what, n, INT_MAX));
  }
  return static_cast<int>(n);
}

void check_avg_type(const at::Tensor& t, ReduceOp op, const char* what) {
  if (op == ReduceOp::kAvg && !at::isFloatingType(t.scalar_type())) {
    throw CommError(fmt::format("{}: {} with ReduceOp avg needs a floating tensor, got {}", process_location(), what,
                                c10::toString(t.scalar_type())));
  }
}

int64_t nbytes(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

}  // namespace

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMax: return "max";
  }
  return "?";
}

// ---------------------------------------------------------------------------
// P2PBatch

P2PBatch::P2PBatch() = default;
P2PBatch::P2PBatch(P2PBatch&& other) noexcept = default;
P2PBatch& P2PBatch::operator=(P2PBatch&& other) noexcept {
  if (this != &other) {
    if (state_) {
      try {
        wait();
      } catch (...) {
      }
    }
    state_ = std::move(other.state_);
  }
  return *this;
}
P2PBatch::~P2PBatch() {
  if (!state_) return;
  try {
    wait();
  } catch (const std::exception& e) {
    fmt::print(stderr, "{}: error while completing transfers of {} at destruction: {}\n", process_location(),
               state_ ? state_->op : "?", e.what());
  }
}

void P2PBatch::wait() {
  if (!state_) return;
  std::unique_ptr<State> s = std::move(state_);
#ifdef SSA_WITH_CUDA
  if (s->cuda) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(s->device));
    // Seconds come from the NCCL stream's events (Communicator::comm_seconds),
    // the exposed part from when this stream starts waiting.
    nccl_wait_exposed(*s->comm->nccl_, s->op, std::move(*s->done));
    return;
  }
#endif
  const auto t0 = Clock::now();
  if (!s->requests.empty()) {
    SSA_MPI_CHECK(MPI_Waitall(static_cast<int>(s->requests.size()), s->requests.data(), MPI_STATUSES_IGNORE));
  }
  s->comm->add_seconds(s->op, s->post_seconds + seconds_since(t0));
}

// ---------------------------------------------------------------------------
// Communicator: dispatch, counters, MPI half

Communicator::Communicator(MPI_Comm comm, std::string name) : comm_(comm), name_(std::move(name)) {
  if (comm_ == MPI_COMM_NULL) throw CommError(fmt::format("{}: communicator '{}' is MPI_COMM_NULL", process_location(), name_));
  SSA_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  SSA_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  SSA_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

void Communicator::abandon() {
  abandoned_ = true;
#ifdef SSA_WITH_CUDA
  if (nccl_ && nccl_->comm) {
    ncclCommAbort(nccl_->comm);  // its result does not matter: the process is ending
    nccl_->comm = nullptr;
  }
#endif
  nccl_.reset();
}

Communicator::~Communicator() {
  if (abandoned_) return;
  try {
    destroy_nccl();
  } catch (const std::exception& e) {
    fmt::print(stderr, "{}: destroying the NCCL communicator of '{}': {}\n", process_location(), name_, e.what());
  }
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_WORLD && comm_ != MPI_COMM_SELF && comm_ != MPI_COMM_NULL) {
    MPI_Comm_free(&comm_);  // a failure here cannot be reported from a destructor
  }
}

void Communicator::record(const std::string& op, double seconds, int64_t bytes) {
  const std::string key = name_ + "_" + op;
  seconds_[key] += seconds;
  bytes_[key] += bytes;
  calls_[key] += 1;
}

void Communicator::add_seconds(const std::string& op, double seconds) { seconds_[name_ + "_" + op] += seconds; }

std::map<std::string, double> Communicator::comm_seconds() {
#ifdef SSA_WITH_CUDA
  flush_nccl_timings(/*wait=*/false);
#endif
  return seconds_;
}
std::map<std::string, int64_t> Communicator::comm_bytes() const { return bytes_; }
std::map<std::string, int64_t> Communicator::comm_calls() const { return calls_; }
void Communicator::reset_counters() {
#ifdef SSA_WITH_CUDA
  flush_nccl_timings(/*wait=*/true);
#endif
  seconds_.clear();
  bytes_.clear();
  calls_.clear();
}

void Communicator::check_device(const at::Tensor& tensor, const char* op) const {
  if (!tensor.defined()) throw CommError(fmt::format("{}: {} on '{}' got an undefined tensor", process_location(), op, name_));
  if (tensor.is_cpu()) return;
  if (tensor.is_cuda()) {
#ifdef SSA_WITH_CUDA
    return;
#else
    throw CommError(fmt::format("{}: {} on '{}' got a CUDA tensor, but this build has no NCCL (SSA_WITH_CUDA off)",
                                process_location(), op, name_));
#endif
  }
  throw CommError(fmt::format("{}: {} on '{}': tensors on {} are not supported (CPU via MPI, CUDA via NCCL)",
                              process_location(), op, name_, tensor.device().str()));
}

void Communicator::ensure_device(const at::Device& device) {
  if (device.is_cpu()) return;
#ifdef SSA_WITH_CUDA
  if (device.is_cuda()) {
    init_nccl(device.has_index() ? device.index() : 0);
    return;
  }
#endif
  throw CommError(fmt::format("{}: communicator '{}' cannot serve tensors on {}", process_location(), name_, device.str()));
}

bool Communicator::has_nccl() const {
#ifdef SSA_WITH_CUDA
  return nccl_ != nullptr && nccl_->comm != nullptr;
#else
  return false;
#endif
}

void Communicator::all_reduce(const at::Tensor& tensor, ReduceOp op) {
  check_device(tensor, "all_reduce");
  check_avg_type(tensor, op, "all_reduce");
#ifdef SSA_WITH_CUDA
  if (tensor.is_cuda()) return nccl_all_reduce(tensor, op);
#endif
  mpi_all_reduce(tensor, op);
}

namespace {

void check_in_flight_tensor(const at::Tensor& t, const std::string& group, const char* op) {
  if (!t.is_contiguous() || t.scalar_type() == at::kBool) {
    throw CommError(fmt::format("{}: {} on '{}' in flight needs a contiguous, non-bool tensor (got {} {})",
                                process_location(), op, group, c10::toString(t.scalar_type()),
                                t.is_contiguous() ? "contiguous" : "non-contiguous"));
  }
}

}  // namespace

P2PBatch Communicator::start_all_reduce(const at::Tensor& tensor, ReduceOp op) {
  check_device(tensor, "all_reduce");
  check_in_flight_tensor(tensor, name_, "all_reduce");
#ifdef SSA_WITH_CUDA
  if (tensor.is_cuda()) {
    check_avg_type(tensor, op, "all_reduce");
    return nccl_start_all_reduce(tensor, op);
  }
#endif
  all_reduce(tensor, op);
  return P2PBatch();
}

#ifdef SSA_WITH_CUDA
// A reduce-scatter's input or an all-gather's output (`whole`, size() times
// `part`) and its other tensor go to NCCL when both are CUDA tensors of one
// dtype with those sizes; otherwise the blocking call runs on CPU or reports
// what is wrong.
bool Communicator::nccl_pair_fits(const at::Tensor& whole, const at::Tensor& part, const char* op) const {
  if (!whole.is_cuda() || !part.is_cuda() || whole.scalar_type() != part.scalar_type() ||
      whole.numel() != part.numel() * size_) {
    return false;
  }
  check_device(whole, op);
  check_device(part, op);
  return true;
}
#endif

P2PBatch Communicator::start_reduce_scatter(const at::Tensor& input, const at::Tensor& output, ReduceOp op) {
  check_in_flight_tensor(input, name_, "reduce_scatter");
  check_in_flight_tensor(output, name_, "reduce_scatter");
#ifdef SSA_WITH_CUDA
  if (nccl_pair_fits(input, output, "reduce_scatter")) {
    check_avg_type(input, op, "reduce_scatter");
    return nccl_start_reduce_scatter(input, output, op);
  }
#endif
  reduce_scatter(input, output, op);  // CPU, or the shape/dtype error
  return P2PBatch();
}

P2PBatch Communicator::start_all_gather(const at::Tensor& input, const at::Tensor& output) {
  check_in_flight_tensor(input, name_, "all_gather");
  check_in_flight_tensor(output, name_, "all_gather");
#ifdef SSA_WITH_CUDA
  if (nccl_pair_fits(output, input, "all_gather")) {
    return nccl_start_all_gather(input, output);
  }
#endif
  all_gather(input, output);  // CPU, or the shape/dtype error
  return P2PBatch();
}

void Communicator::reduce_scatter(const at::Tensor& input, const at::Tensor& output, ReduceOp op) {
  check_device(input, "reduce_scatter");
  check_device(output, "reduce_scatter");
  check_avg_type(input, op, "reduce_scatter");
  if (input.numel() != output.numel() * size_ || input.scalar_type() != output.scalar_type() ||
      input.device() != output.device()) {
    throw CommError(fmt::format("{}: reduce_scatter on '{}' (size {}) needs input numel = size * output numel and one "
                                "dtype/device; got input {} {} {} and output {} {} {}",
                                process_location(), name_, size_, input.numel(), c10::toString(input.scalar_type()),
                                input.device().str(), output.numel(), c10::toString(output.scalar_type()),
                                output.device().str()));
  }
#ifdef SSA_WITH_CUDA
  if (input.is_cuda()) return nccl_reduce_scatter(input, output, op);
#endif
  mpi_reduce_scatter(input, output, op);
}

at::Tensor Communicator::reduce_scatter(const at::Tensor& input, ReduceOp op) {
  check_device(input, "reduce_scatter");
  if (input.numel() % size_ != 0) {
    throw CommError(fmt::format("{}: reduce_scatter on '{}' needs an input numel divisible by the group size {}, got {}",
                                process_location(), name_, size_, input.numel()));
  }
  std::vector<int64_t> shape{input.numel() / size_};
  if (input.dim() >= 1 && input.size(0) % size_ == 0) {
    shape = input.sizes().vec();
    shape[0] /= size_;
  }
  at::Tensor output = at::empty(shape, input.options());
  reduce_scatter(input, output, op);
  return output;
}

void Communicator::all_gather(const at::Tensor& input, const at::Tensor& output) {
  check_device(input, "all_gather");
  check_device(output, "all_gather");
  if (output.numel() != input.numel() * size_ || input.scalar_type() != output.scalar_type() ||
      input.device() != output.device()) {
    throw CommError(fmt::format("{}: all_gather on '{}' (size {}) needs output numel = size * input numel and one "
                                "dtype/device; got input {} {} and output {} {}",
                                process_location(), name_, size_, input.numel(), c10::toString(input.scalar_type()),
                                output.numel(), c10::toString(output.scalar_type())));
  }
#ifdef SSA_WITH_CUDA
  if (input.is_cuda()) return nccl_all_gather(input, output);
#endif
  mpi_all_gather(input, output);
}

at::Tensor Communicator::all_gather(const at::Tensor& input) {
  check_device(input, "all_gather");
  std::vector<int64_t> shape{size_};
  if (input.dim() >= 1) {
    shape = input.sizes().vec();
    shape[0] *= size_;
  }
  at::Tensor output = at::empty(shape, input.options().memory_format(at::MemoryFormat::Contiguous));
  all_gather(input, output);
  return output;
}

void Communicator::broadcast(const at::Tensor& tensor, int root) {
  check_device(tensor, "broadcast");
  if (root < 0 || root >= size_) {
    throw CommError(fmt::format("{}: broadcast on '{}' from root {} outside [0, {})", process_location(), name_, root, size_));
  }
#ifdef SSA_WITH_CUDA
  if (tensor.is_cuda()) return nccl_broadcast(tensor, root);
#endif
  mpi_broadcast(tensor, root);
}

void Communicator::barrier() {
  const auto t0 = Clock::now();
  SSA_MPI_CHECK(MPI_Barrier(comm_));
  record("barrier", seconds_since(t0), 0);
}

P2PBatch Communicator::start_p2p(std::vector<P2POp> ops, const std::string& op_name) {
  if (ops.empty()) return P2PBatch{};
  const at::Device device = ops.front().tensor.defined() ? ops.front().tensor.device() : at::Device(at::kCPU);
  for (const auto& o : ops) {
    check_device(o.tensor, op_name.c_str());
    if (o.tensor.device() != device || !o.tensor.is_contiguous() || o.peer < 0 || o.peer >= size_) {
      throw CommError(fmt::format("{}: {} on '{}': every transfer of a batch needs a contiguous tensor on one device "
                                  "and a peer in [0, {}); got a {} tensor on {} for peer {}",
                                  process_location(), op_name, name_, size_,
                                  o.tensor.is_contiguous() ? "contiguous" : "non-contiguous", o.tensor.device().str(),
                                  o.peer));
    }
  }
#ifdef SSA_WITH_CUDA
  if (device.is_cuda()) return nccl_start_p2p(std::move(ops), op_name);
#endif
  return mpi_start_p2p(std::move(ops), op_name);
}

void Communicator::mpi_all_reduce(const at::Tensor& tensor, ReduceOp op) {
  const auto t0 = Clock::now();
  // Work on a contiguous buffer of a type MPI reduces, then copy back if needed.
  at::Tensor buf = tensor;
  if (!mpi_reduces(tensor.scalar_type())) buf = tensor.to(wide_type(tensor.scalar_type()));
  buf = buf.contiguous();
  const MPI_Datatype type = mpi_transfer_type(buf.scalar_type());
  const int64_t elem = buf.element_size();
  char* data = static_cast<char*>(buf.data_ptr());
  // MPI counts are int: reduce in pieces of at most 2^30 elements.
  constexpr int64_t kPiece = int64_t{1} << 30;
  for (int64_t off = 0; off < buf.numel(); off += kPiece) {
    const int count = static_cast<int>(std::min(kPiece, buf.numel() - off));
    SSA_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, data + off * elem, count, type, mpi_op(op), comm_));
  }
  if (op == ReduceOp::kAvg) buf.div_(size_);
  if (!buf.is_same(tensor)) tensor.copy_(buf);
  record("all_reduce", seconds_since(t0), nbytes(tensor));
}

void Communicator::mpi_reduce_scatter(const at::Tensor& input, const at::Tensor& output, ReduceOp op) {
  const auto t0 = Clock::now();
  at::Tensor in = input;
  at::Tensor out = output;
  if (!mpi_reduces(input.scalar_type())) {
    in = input.to(wide_type(input.scalar_type()));
    out = at::empty({output.numel()}, in.options());
  }
  in = in.contiguous();
  if (!out.is_contiguous()) out = at::empty({output.numel()}, in.options());
  const int count = mpi_count(out.numel(), "reduce_scatter output");
  SSA_MPI_CHECK(MPI_Reduce_scatter_block(in.data_ptr(), out.data_ptr(), count, mpi_transfer_type(in.scalar_type()),
                                         mpi_op(op), comm_));
  if (op == ReduceOp::kAvg) out.div_(size_);
  if (!out.is_same(output)) output.copy_(out.view(output.sizes()));
  record("reduce_scatter", seconds_since(t0), nbytes(input));
}

void Communicator::mpi_all_gather(const at::Tensor& input, const at::Tensor& output) {
  const auto t0 = Clock::now();
  const at::Tensor in = input.contiguous();
  at::Tensor out = output.is_contiguous() ? output : at::empty({output.numel()}, output.options());
  const MPI_Datatype type = mpi_transfer_type(in.scalar_type());
  const int count = mpi_count(in.numel(), "all_gather input");
  SSA_MPI_CHECK(MPI_Allgather(in.data_ptr(), count, type, out.data_ptr(), count, type, comm_));
  if (!out.is_same(output)) output.copy_(out.view(output.sizes()));
  record("all_gather", seconds_since(t0), nbytes(output));
}

void Communicator::mpi_broadcast(const at::Tensor& tensor, int root) {
  const auto t0 = Clock::now();
  at::Tensor buf = tensor.contiguous();
  const MPI_Datatype type = mpi_transfer_type(buf.scalar_type());
  const int64_t elem = buf.element_size();
  char* data = static_cast<char*>(buf.data_ptr());
  constexpr int64_t kPiece = int64_t{1} << 30;
  for (int64_t off = 0; off < buf.numel(); off += kPiece) {
    const int count = static_cast<int>(std::min(kPiece, buf.numel() - off));
    SSA_MPI_CHECK(MPI_Bcast(data + off * elem, count, type, root, comm_));
  }
  if (!buf.is_same(tensor)) tensor.copy_(buf);
  record("broadcast", seconds_since(t0), nbytes(tensor));
}

P2PBatch Communicator::mpi_start_p2p(std::vector<P2POp> ops, const std::string& op_name) {
  const auto t0 = Clock::now();
  auto state = std::make_unique<P2PBatch::State>();
  state->comm = this;
  state->op = op_name;
  state->requests.reserve(ops.size());
  int64_t bytes = 0;
  for (auto& o : ops) {
    MPI_Request request = MPI_REQUEST_NULL;
    const int count = mpi_count(o.tensor.numel(), "point-to-point transfer");
    const MPI_Datatype type = mpi_transfer_type(o.tensor.scalar_type());
    if (o.kind == P2POp::Kind::kSend) {
      SSA_MPI_CHECK(MPI_Isend(o.tensor.data_ptr(), count, type, o.peer, o.tag, comm_, &request));
    } else {
      SSA_MPI_CHECK(MPI_Irecv(o.tensor.data_ptr(), count, type, o.peer, o.tag, comm_, &request));
    }
    bytes += nbytes(o.tensor);
    state->requests.push_back(request);
    state->tensors.push_back(std::move(o.tensor));
  }
  state->post_seconds = seconds_since(t0);
  // Counted now (calls, bytes); the seconds are added when the batch completes.
  record(op_name, 0.0, bytes);
  P2PBatch batch;
  batch.state_ = std::move(state);
  return batch;
}

#ifndef SSA_WITH_CUDA
void Communicator::destroy_nccl() { nccl_.reset(); }
#endif

}  // namespace ssa::parallel
