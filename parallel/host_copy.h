#pragma once
// A small device tensor's copy to the host, queued on the current stream now and
// waited for later: the host waits for the work queued before start(), not for
// what it queued after it (e.g. an optimizer update after the step's losses).
#include <ATen/ATen.h>
#include <c10/core/Event.h>

#include <optional>

namespace ssa::parallel {

class HostCopy {
 public:
  HostCopy() = default;
  // Starts copying `t` (any device; a CPU tensor is taken as it is).
  explicit HostCopy(const at::Tensor& t);
  bool pending() const { return value_.defined(); }
  // Waits for the copy; the host tensor (contiguous). Once.
  at::Tensor wait();

 private:
  at::Tensor value_;
  std::optional<c10::Event> ready_;
};

}  // namespace ssa::parallel
