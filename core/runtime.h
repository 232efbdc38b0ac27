#pragma once
// Where and how a rank computes: device, dtype, the peak FLOP rate used for MFU,
// and the per-forward-pass stream draw of SSA.
#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>

#include "core/config.h"
#include "kernels/attention.h"

namespace ssa::core {

struct Runtime {
  at::Device device{at::kCPU};
  at::ScalarType dtype = at::kFloat;
  double peak_flops = 0;  // dense bf16 peak of the GPU (0 on CPU: no MFU)
  std::string dtype_name() const { return dtype == at::kBFloat16 ? "bf16" : "fp32"; }
  void synchronize() const;             // waits for queued GPU work (timing)
  int64_t peak_memory_bytes() const;    // peak allocated on this device, 0 on CPU
};

// Marks in the device's queue and the time between them: on a GPU by timing
// events (the device's own clock, whatever the host was doing), on the CPU by
// the host clock at the mark.
class DeviceClock {
 public:
  explicit DeviceClock(const at::Device& device);
  ~DeviceClock();
  DeviceClock(const DeviceClock&) = delete;
  DeviceClock& operator=(const DeviceClock&) = delete;
  // Queues a mark; the seconds from the previous mark (or construction) to it,
  // read by seconds_to_last_mark() (which waits for the device to reach it).
  void mark();
  double seconds_to_last_mark();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// train.cuda_connections as CUDA_DEVICE_MAX_CONNECTIONS, unless the environment
// already sets it or the value is 0. Call before anything creates a CUDA
// context (the driver reads it then); returns the value in effect ("" when
// unset: the driver's default).
std::string apply_cuda_connections(const TrainConfig& train);

// train.device / train.dtype: auto picks CUDA device `local_rank` and bf16 when
// a GPU is present, else CPU and fp32. Asking for cuda without one is an error.
Runtime choose_runtime(const TrainConfig& train, int64_t local_rank);

kernels::SparseOptions sparse_options(const AttentionConfig& attention, const at::Device& device);

// The SSA stream drawn for one forward pass (a micro-batch): full with
// probability p. A pure function of (seed, step, first_sequence), where
// first_sequence is the index within the step's global batch of the micro-batch's
// first sequence: a resumed run draws the same modes, every cp rank of a replica
// draws the same one, and a run resumed at another dp size (same micro-batch
// size, so the same sequences share a micro-batch) draws the same stream for
// every sequence.
bool draw_full_stream(uint64_t seed, int64_t step, int64_t first_sequence, double p);

}  // namespace ssa::core
