#pragma once
// Internal to communicator*.cpp: the state behind Communicator::NcclState and
// P2PBatch::State, shared by the MPI and the NCCL halves of the communicator.
#include <ATen/ATen.h>
#include <mpi.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "parallel/communicator.h"

#ifdef SSA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <nccl.h>
#endif

namespace ssa::parallel {

#ifdef SSA_WITH_CUDA
struct Communicator::NcclState {
  ncclComm_t comm = nullptr;
  int device = -1;
  std::optional<c10::cuda::CUDAStream> stream;  // the side stream every op of this group runs on
  // Events of ops whose duration has not been read yet (read lazily: reading waits).
  struct Timing {
    std::string op;
    at::cuda::CUDAEvent start;
    at::cuda::CUDAEvent end;
  };
  std::vector<Timing> pending;
};
#else
struct Communicator::NcclState {};
#endif

struct P2PBatch::State {
  Communicator* comm = nullptr;
  std::string op;
  int64_t bytes = 0;
  std::chrono::steady_clock::time_point posted;
  double post_seconds = 0;            // time spent posting (CPU)
  std::vector<MPI_Request> requests;  // CPU transfers
  std::vector<at::Tensor> tensors;    // kept alive until the transfers complete
#ifdef SSA_WITH_CUDA
  bool cuda = false;
  int device = -1;
  std::optional<at::cuda::CUDAEvent> done;  // recorded on the NCCL stream after the group
#endif
};

// Seconds since t.
inline double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace ssa::parallel
