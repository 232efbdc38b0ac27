#include "core/runtime.h"

#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <optional>

#ifdef SSA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace ssa::core {

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
bool cuda_present() {
#ifdef SSA_WITH_CUDA
  return at::cuda::is_available();
#else
  return false;
#endif
}
}  // namespace

std::string apply_cuda_connections(const TrainConfig& train) {
  constexpr const char* kName = "CUDA_DEVICE_MAX_CONNECTIONS";
  if (train.device != "cpu" && train.cuda_connections > 0) {
    ::setenv(kName, std::to_string(train.cuda_connections).c_str(), /*overwrite=*/0);
  }
  const char* value = std::getenv(kName);
  return value != nullptr ? value : "";
}

Runtime choose_runtime(const TrainConfig& train, int64_t local_rank) {
  Runtime rt;
  const bool want_cuda = train.device == "cuda" || (train.device == "auto" && cuda_present());
  if (want_cuda && !cuda_present())
    throw ConfigError(fmt::format("config key 'train.device' = 'cuda': no CUDA GPU is available{}",
#ifdef SSA_WITH_CUDA
                                  ""
#else
                                  " (this build has no CUDA support)"
#endif
                                  ));
  if (want_cuda) {
#ifdef SSA_WITH_CUDA
    const int64_t count = at::cuda::device_count();
    rt.device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(local_rank % count));
    c10::cuda::set_device(rt.device.index());
    rt.peak_flops = 989e12;  // H100/H200 SXM dense bf16
#endif
  }
  if (train.dtype == "bf16" || (train.dtype == "auto" && rt.device.is_cuda())) rt.dtype = at::kBFloat16;
  return rt;
}

void Runtime::synchronize() const {
#ifdef SSA_WITH_CUDA
  if (device.is_cuda()) at::cuda::getCurrentCUDAStream(device.index()).synchronize();
#endif
}

struct DeviceClock::Impl {
  at::Device device{at::kCPU};
  std::chrono::steady_clock::time_point host_before, host_last;
#ifdef SSA_WITH_CUDA
  std::optional<at::cuda::CUDAEvent> before, last;
#endif
};

DeviceClock::DeviceClock(const at::Device& device) : impl_(std::make_unique<Impl>()) {
  impl_->device = device;
  impl_->host_last = std::chrono::steady_clock::now();
#ifdef SSA_WITH_CUDA
  if (device.is_cuda()) {
    impl_->last.emplace(cudaEventDefault);
    impl_->last->record(at::cuda::getCurrentCUDAStream(device.index()));
  }
#endif
}

DeviceClock::~DeviceClock() = default;

void DeviceClock::mark() {
  impl_->host_before = impl_->host_last;
  impl_->host_last = std::chrono::steady_clock::now();
#ifdef SSA_WITH_CUDA
  if (impl_->device.is_cuda()) {
    impl_->before = std::move(impl_->last);
    impl_->last.emplace(cudaEventDefault);
    impl_->last->record(at::cuda::getCurrentCUDAStream(impl_->device.index()));
  }
#endif
}

double DeviceClock::seconds_to_last_mark() {
#ifdef SSA_WITH_CUDA
  if (impl_->device.is_cuda() && impl_->before) {
    impl_->last->synchronize();
    return static_cast<double>(impl_->before->elapsed_time(*impl_->last)) / 1000.0;
  }
#endif
  return std::chrono::duration<double>(impl_->host_last - impl_->host_before).count();
}

int64_t Runtime::peak_memory_bytes() const {
#ifdef SSA_WITH_CUDA
  if (device.is_cuda()) {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return stats.allocated_bytes[0].peak;
  }
#endif
  return 0;
}

kernels::SparseOptions sparse_options(const AttentionConfig& attention, const at::Device& device) {
  kernels::SparseOptions o;
  o.block_size = attention.block_size;
  o.top_k = attention.top_k;
  o.mode = kernels::parse_selection_mode(attention.selection);
  o.backend = kernels::resolve_backend(attention.backend, device);
  o.deterministic = attention.deterministic;
  return o;
}

bool draw_full_stream(uint64_t seed, int64_t step, int64_t first_sequence, double p) {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ static_cast<uint64_t>(step));
  h = splitmix64(h ^ (static_cast<uint64_t>(first_sequence) << 24));
  const double u = static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
  return u < p;
}

}  // namespace ssa::core
