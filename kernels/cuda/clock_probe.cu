// SM clock probe (params.cuh, launch_clock_probe): cycles of the SM clock against
// the global timer over one thread's spin.
#include "kernels/cuda/params.cuh"

namespace ssa::kernels::cuda {
namespace {

__global__ void clock_probe_kernel(unsigned long long* out, long long cycles) {
  unsigned long long t0, t1;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  const long long c0 = clock64();
  long long c = c0;
  while (c - c0 < cycles) c = clock64();
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
  out[0] = static_cast<unsigned long long>(c - c0);
  out[1] = t1 - t0;
}

}  // namespace

cudaError_t launch_clock_probe(unsigned long long* out, long long cycles, cudaStream_t stream) {
  clock_probe_kernel<<<1, 1, 0, stream>>>(out, cycles);
  return cudaGetLastError();
}

}  // namespace ssa::kernels::cuda
