#include "parallel/host_copy.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <stdexcept>
#include <utility>

namespace ssa::parallel {

HostCopy::HostCopy(const at::Tensor& t) {
  if (!t.defined()) throw std::invalid_argument("parallel::HostCopy: the tensor is undefined");
  if (t.is_cpu()) {
    value_ = t.contiguous();
    return;
  }
  value_ = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
  value_.copy_(t, /*non_blocking=*/true);
  const c10::impl::VirtualGuardImpl guard(t.device().type());
  ready_.emplace(t.device().type());
  ready_->record(guard.getStream(t.device()));
}

at::Tensor HostCopy::wait() {
  if (!value_.defined()) throw std::logic_error("parallel::HostCopy::wait: no copy was started");
  if (ready_) ready_->synchronize();
  ready_.reset();
  return std::exchange(value_, at::Tensor());
}

}  // namespace ssa::parallel
