#include "kernels/side_stream.h"

#include <optional>
#include <vector>

#ifdef SSA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ssa::kernels {

struct SideStream::State {
#ifdef SSA_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> side;
  std::vector<at::Tensor> kept;
#endif
};

SideStream::SideStream() : state_(std::make_unique<State>()) {}

SideStream::~SideStream() {
  try {
    join();
  } catch (...) {  // a destructor must not throw; the wait only orders streams
  }
}

void SideStream::open(const at::Device& device) {
#ifdef SSA_WITH_CUDA
  if (!device.is_cuda() || state_->side) return;
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device.index());
  state_->side = c10::cuda::getStreamFromPool(false, device.index());
  at::cuda::CUDAEvent ready;
  ready.record(current);
  ready.block(*state_->side);
#else
  (void)device;
#endif
}

bool SideStream::is_open() const {
#ifdef SSA_WITH_CUDA
  return state_->side.has_value();
#else
  return false;
#endif
}

void SideStream::run(const std::function<void()>& work) const {
#ifdef SSA_WITH_CUDA
  if (state_->side) {
    const c10::cuda::CUDAStreamGuard on_side(*state_->side);
    work();
    return;
  }
#endif
  work();
}

void SideStream::keep(const at::Tensor& tensor) {
#ifdef SSA_WITH_CUDA
  if (state_->side && tensor.defined() && tensor.is_cuda()) state_->kept.push_back(tensor);
#else
  (void)tensor;
#endif
}

void SideStream::join() {
#ifdef SSA_WITH_CUDA
  if (!state_->side) return;
  const c10::cuda::CUDAStream side = *state_->side;
  state_->side.reset();
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(side.device_index());
  at::cuda::CUDAEvent done;
  done.record(side);
  done.block(current);
  for (const at::Tensor& t : state_->kept) t.record_stream(current);
  state_->kept.clear();
#endif
}

}  // namespace ssa::kernels
