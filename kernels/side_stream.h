#pragma once
// Work queued on a second stream beside the current one, so that two independent
// pieces of GPU work fill each other's idle tail (e.g. a context-parallel rank's
// full-stream calls beside its sparse stream). On CPU tensors, or while not open,
// the work simply runs in order on the current stream.
#include <ATen/ATen.h>
#ifdef SSA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

#include <functional>
#include <memory>

namespace ssa::kernels {

// What a side stream carries. Each role has one stream per device, the same on
// every call: the caching allocator keeps freed blocks per stream, so side work on
// a fresh pooled stream each time allocated its memory anew (cudaMalloc, on the
// host's path to the next launch) until the pool came round again, and left a copy
// cached on each of the pool's streams. Work of one role is thus ordered call after
// call; work that must overlap takes different roles.
enum class SideRole {
  kRingFull,      // ring attention: the full stream's calls
  kRingSparse,    // ring attention: the sparse stream's calls
  kSparseIndex,   // the dK/dV inverted index (high priority: see side_stream.cpp)
  kSparseKvGrad,  // the sparse backward's dK/dV
};

#ifdef SSA_WITH_CUDA
// The stream of `role` on `device`.
c10::cuda::CUDAStream side_stream_of(c10::DeviceIndex device, SideRole role);
#endif

class SideStream {
 public:
  explicit SideStream(SideRole role);
  ~SideStream();  // joins (see join)
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;

  // For a CUDA device: takes its role's stream of it and makes it wait for all the
  // work queued so far on the current stream. Otherwise (CPU) stays closed.
  void open(const at::Device& device);
  bool is_open() const;
  // Runs `work` with the side stream current (inline when closed).
  void run(const std::function<void()>& work) const;
  // A tensor the side work made and later work reads: at the join it is marked as
  // used by the joining stream, so the caching allocator does not hand its memory
  // out before that stream's work on it is done. (Inputs the side work reads must
  // outlive the join.)
  void keep(const at::Tensor& tensor);
  // Makes the stream current now wait for everything queued on the side stream,
  // then closes it.
  void join();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace ssa::kernels
