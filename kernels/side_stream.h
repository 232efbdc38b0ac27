#pragma once
// Work queued on a second stream beside the current one, so that two independent
// pieces of GPU work fill each other's idle tail (e.g. a context-parallel rank's
// full-stream calls beside its sparse stream). On CPU tensors, or while not open,
// the work simply runs in order on the current stream.
#include <ATen/ATen.h>

#include <functional>
#include <memory>

namespace ssa::kernels {

class SideStream {
 public:
  SideStream();
  ~SideStream();  // joins (see join)
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;

  // For a CUDA device: takes a pooled stream of it and makes it wait for all the
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
