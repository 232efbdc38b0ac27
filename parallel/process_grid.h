#pragma once
// The process grid: world = dp x cp ranks, rank = dp_rank * cp + cp_rank, so the
// cp ranks of one model replica are neighbours (one node, NVLink). One
// communicator per axis plus the world.
//
// ProcessGrid::init initialises MPI when nobody has (MPI_Init_thread; works
// under mpirun, under `srun --mpi=pmix`, and as a singleton without a launcher)
// and checks the launch against the grid. MPI is finalised once, when the last
// grid that holds it is finalised or destroyed, and only if a grid initialised it.
#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "parallel/communicator.h"

namespace ssa::parallel {

// A launch that does not fit the grid (wrong number of ranks, too few GPUs).
class GridError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class ProcessGrid {
 public:
  // Collective over MPI_COMM_WORLD. Throws GridError when world size != dp * cp
  // (naming parallel.dp and parallel.cp) or, under Slurm, when the world size
  // differs from the step's task count. dp = 0: world size / cp.
  static ProcessGrid init(int64_t dp, int64_t cp);

  ProcessGrid(ProcessGrid&&) noexcept;
  ProcessGrid& operator=(ProcessGrid&&) noexcept;
  ~ProcessGrid();

  int64_t rank() const;
  int64_t world_size() const;
  int64_t dp_rank() const;
  int64_t cp_rank() const;
  int64_t dp() const;
  int64_t cp() const;
  int64_t local_rank() const;  // rank among the processes of this host
  int64_t local_size() const;  // processes of this host
  const std::string& host() const;
  int thread_level() const;    // MPI thread support provided
  bool cp_group_on_one_host() const;  // every rank of my cp group shares this host
  std::string describe() const;       // "rank 5/8 (dp 2/4, cp 1/2) local 1/2 on host gpu-03"

  Communicator& world();
  Communicator& dp_group();  // the ranks with my cp_rank: gradient averaging, ZeRO shards
  Communicator& cp_group();  // the ranks of my model replica: ring attention

  // Binds this rank to a device. kCPU: nothing. kCUDA: CUDA device local_rank()
  // (GridError when this host runs more ranks than it has GPUs, or the build has
  // no CUDA), made current, and NCCL communicators created for world, dp and cp
  // (collective: every rank calls it). Returns the device.
  at::Device bind_device(at::DeviceType type);

  // Sum of comm_seconds() over world, dp and cp (keys carry the group's name).
  std::map<std::string, double> comm_seconds();
  std::map<std::string, int64_t> comm_bytes() const;

  // Frees the communicators; finalises MPI if a grid initialised it and this is
  // the last grid. Idempotent; the destructor calls it, except while an
  // exception propagates: then it abandons the grid (NCCL aborted, MPI left
  // unfinalised) so a rank that fails cannot hang in MPI_Finalize waiting for
  // peers stuck in a collective; the launcher ends the job when it exits.
  void finalize();
  void abandon();

  struct State;

 private:
  explicit ProcessGrid(std::unique_ptr<State> state);
  State& state() const;
  std::unique_ptr<State> state_;
};

// The group, or nullptr for a group of one (what the optimizer and the
// attention settings take for "no communication").
inline Communicator* group_or_null(Communicator& group) { return group.size() > 1 ? &group : nullptr; }

}  // namespace ssa::parallel
