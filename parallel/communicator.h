#pragma once
// Collectives and point-to-point transfers of at::Tensor over one group of ranks
// (the world, a dp group or a cp group of the process grid). CPU tensors go
// through MPI; CUDA tensors through NCCL on a side stream of the tensor's device
// (only in SSA_WITH_CUDA builds): the caller's current stream waits for the
// transfer with an event, so results are used in stream order without blocking
// the host. Every op records the seconds it took and the bytes it moved, by op
// name, for the step metrics.
//
// Byte convention (per rank, like the "size" column of nccl-tests): all_reduce
// and broadcast count the tensor, reduce_scatter its input, all_gather its
// output, a send the bytes sent and a receive the bytes received. Bus bandwidth
// follows as bytes / seconds * 2(n-1)/n for all_reduce and (n-1)/n otherwise.
#include <ATen/ATen.h>
#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace ssa::parallel {

enum class ReduceOp { kSum, kAvg, kMax };
const char* reduce_op_name(ReduceOp op);

// One transfer of a batch posted by Communicator::start_p2p.
struct P2POp {
  enum class Kind { kSend, kRecv };
  Kind kind = Kind::kSend;
  at::Tensor tensor;  // contiguous; a receive writes into it
  int peer = 0;       // rank within the communicator
  int tag = 0;        // MPI: transfers of one pair and tag match in posting order
  static P2POp send(at::Tensor tensor, int peer, int tag = 0) { return {Kind::kSend, std::move(tensor), peer, tag}; }
  static P2POp recv(at::Tensor tensor, int peer, int tag = 0) { return {Kind::kRecv, std::move(tensor), peer, tag}; }
};

class Communicator;

// Transfers (or a collective) in flight. wait() completes them (CPU: MPI_Waitall; CUDA: the
// caller's current stream waits for the NCCL stream). The destructor waits when
// wait() was not called, so no buffer is released while a transfer uses it.
class P2PBatch {
 public:
  P2PBatch();
  P2PBatch(P2PBatch&& other) noexcept;
  P2PBatch& operator=(P2PBatch&& other) noexcept;
  ~P2PBatch();
  void wait();
  bool pending() const { return state_ != nullptr; }

  struct State;  // defined in communicator.cpp

 private:
  friend class Communicator;
  std::unique_ptr<State> state_;
};

class Communicator {
 public:
  // Takes ownership of `comm` (freed on destruction unless it is MPI_COMM_WORLD
  // or MPI_COMM_SELF) and sets MPI_ERRORS_RETURN on it. `name` labels the
  // metrics: op "all_reduce" of communicator "dp" is reported as "dp_all_reduce".
  Communicator(MPI_Comm comm, std::string name);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& name() const { return name_; }
  MPI_Comm mpi_comm() const { return comm_; }

  // In place on every rank. kAvg divides the sum by size() (floating types only).
  void all_reduce(const at::Tensor& tensor, ReduceOp op);
  // input: size() * n elements seen as [size(), n]; rank r receives the reduction
  // of row r into output (n elements).
  void reduce_scatter(const at::Tensor& input, const at::Tensor& output, ReduceOp op);
  // As above; output shaped [input.size(0) / size(), ...] when dim 0 divides, else [n].
  at::Tensor reduce_scatter(const at::Tensor& input, ReduceOp op);
  // output: size() * n elements seen as [size(), n]; row r is rank r's input.
  void all_gather(const at::Tensor& input, const at::Tensor& output);
  // As above; output shaped [size() * input.size(0), ...] (a 0-dim input gives [size()]).
  at::Tensor all_gather(const at::Tensor& input);
  // As all_reduce, reduce_scatter and all_gather, but returned while in flight: on CUDA the
  // caller's stream does not wait for the result until the batch's wait(), so
  // later compute overlaps it (tensors: contiguous, not bool; they must not be
  // touched before wait()). CPU tensors: complete before returning.
  P2PBatch start_all_reduce(const at::Tensor& tensor, ReduceOp op);
  P2PBatch start_reduce_scatter(const at::Tensor& input, const at::Tensor& output, ReduceOp op);
  P2PBatch start_all_gather(const at::Tensor& input, const at::Tensor& output);
  // In place: every rank receives root's tensor.
  void broadcast(const at::Tensor& tensor, int root);
  void barrier();
  // Posts every transfer of `ops` (one NCCL group on CUDA) and returns at once.
  // All tensors of a batch must be on one device. Timed and counted as op_name.
  P2PBatch start_p2p(std::vector<P2POp> ops, const std::string& op_name);

  // Makes the group ready for tensors on `device`: for CUDA, creates the NCCL
  // communicator (collective over the group: every member must call it, which
  // the first CUDA op of each kind also does implicitly). CPU: nothing to do.
  void ensure_device(const at::Device& device);
  bool has_nccl() const;

  // Seconds spent per op name (prefixed with the communicator's name). CPU ops:
  // wall time the caller spent inside the op (for overlapped transfers: posting
  // plus waiting, i.e. the time not hidden by compute). CUDA ops: time the op
  // ran on the NCCL stream (events), and as "<op>_exposed" the part the compute
  // stream stood waiting for it (events on both streams); the difference was
  // hidden behind compute. Reading does not wait: ops still running count once a
  // later read finds them done.
  std::map<std::string, double> comm_seconds();
  std::map<std::string, int64_t> comm_bytes() const;
  std::map<std::string, int64_t> comm_calls() const;
  void reset_counters();

  // After a failure on this rank: aborts the NCCL communicator (no waiting for
  // peers) and leaves the MPI communicator to process exit.
  void abandon();

  // Used by P2PBatch and the NCCL code.
  void record(const std::string& op, double seconds, int64_t bytes);
  void add_seconds(const std::string& op, double seconds);

  struct NcclState;  // defined in communicator_nccl.cpp (SSA_WITH_CUDA)

 private:
  friend class P2PBatch;  // its wait records the exposed time in nccl_
  void check_device(const at::Tensor& tensor, const char* op) const;
  void mpi_all_reduce(const at::Tensor& tensor, ReduceOp op);
  void mpi_reduce_scatter(const at::Tensor& input, const at::Tensor& output, ReduceOp op);
  void mpi_all_gather(const at::Tensor& input, const at::Tensor& output);
  void mpi_broadcast(const at::Tensor& tensor, int root);
  P2PBatch mpi_start_p2p(std::vector<P2POp> ops, const std::string& op_name);
#ifdef SSA_WITH_CUDA
  bool nccl_pair_fits(const at::Tensor& whole, const at::Tensor& part, const char* op) const;
  void init_nccl(int device);
  void nccl_all_reduce(const at::Tensor& tensor, ReduceOp op);
  void nccl_reduce_scatter(const at::Tensor& input, const at::Tensor& output, ReduceOp op);
  void nccl_all_gather(const at::Tensor& input, const at::Tensor& output);
  P2PBatch nccl_start_all_gather(const at::Tensor& input, const at::Tensor& output);
  void nccl_broadcast(const at::Tensor& tensor, int root);
  P2PBatch nccl_start_p2p(std::vector<P2POp> ops, const std::string& op_name);
  P2PBatch nccl_start_all_reduce(const at::Tensor& tensor, ReduceOp op);
  P2PBatch nccl_start_reduce_scatter(const at::Tensor& input, const at::Tensor& output, ReduceOp op);
  static P2PBatch in_flight(std::unique_ptr<P2PBatch::State> state);
  // Moves finished ops' event times into seconds_; wait: also the running ones.
  void flush_nccl_timings(bool wait);
#endif
  void destroy_nccl();
  bool abandoned_ = false;

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::string name_;
  int rank_ = 0;
  int size_ = 1;
  std::map<std::string, double> seconds_;
  std::map<std::string, int64_t> bytes_;
  std::map<std::string, int64_t> calls_;
  std::unique_ptr<NcclState> nccl_;
};

}  // namespace ssa::parallel
