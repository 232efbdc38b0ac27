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
  // Exposed time: the compute stream reached its wait for an op at `arrive`; the
  // op finished at `done`; done - arrive > 0 is time the compute stream stood
  // still (the rest of the op's time was hidden behind compute).
  struct Exposure {
    std::string op;
    at::cuda::CUDAEvent arrive;
    at::cuda::CUDAEvent done;
  };
  std::vector<Exposure> exposures;
};
// Records, on the caller's current stream, that it now waits for `done` (an event
// recorded on the NCCL stream), and makes it wait.
void nccl_wait_exposed(Communicator::NcclState& s, const std::string& op, at::cuda::CUDAEvent done);
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
