#include "kernels/side_stream.h"

#include <map>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#ifdef SSA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ssa::kernels {

#ifdef SSA_WITH_CUDA
c10::cuda::CUDAStream side_stream_of(c10::DeviceIndex device, SideRole role) {
  static std::mutex mutex;
  static std::map<std::pair<c10::DeviceIndex, SideRole>, c10::cuda::CUDAStream> streams;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find({device, role});
  if (it == streams.end()) {
    // The index is a chain of small kernels built beside the sparse forward: at
    // high priority they take SM slots as the forward's blocks retire instead of
    // queueing behind all of them (and behind dq's).
    const bool high_priority = role == SideRole::kSparseIndex;
    it = streams.emplace(std::make_pair(device, role), c10::cuda::getStreamFromPool(high_priority, device)).first;
  }
  return it->second;
}
#endif

struct SideStream::State {
  SideRole role;
#ifdef SSA_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> side;
  std::vector<at::Tensor> kept;
#endif
};

SideStream::SideStream(SideRole role) : state_(std::make_unique<State>()) { state_->role = role; }

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
  state_->side = side_stream_of(device.index(), state_->role);
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
