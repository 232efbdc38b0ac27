// The log-sum-exp merge of kernels::merge_into as one kernel (params.cuh,
// MergeParams): per (batch, row, head) the weights of the accumulated and the new
// part, w = exp(lse_x - lse_merged), then out = w_acc * out + w_part * part.
#include <cuda_bf16.h>

#include <cmath>

#include "kernels/cuda/params.cuh"

namespace ssa::kernels::cuda {
namespace {

constexpr int kWarps = 8;

template <typename PartT>
__global__ void __launch_bounds__(kWarps * 32) merge_kernel(const MergeParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t total = static_cast<int64_t>(p.batch) * p.rows * p.heads;
  if (row >= total) return;
  const int lane = threadIdx.x & 31;
  const int h = static_cast<int>(row % p.heads);
  const int64_t t = (row / p.heads) % p.rows;
  const int64_t b = row / (static_cast<int64_t>(p.heads) * p.rows);
  float* lse_acc = p.acc_lse + b * p.lse_sb + h * p.lse_sh + t;
  const float la = *lse_acc;
  const float lp = p.part_lse[(b * p.heads + h) * p.rows + t];
  const float m = fmaxf(la, lp);
  float wa = 0.f, wb = 0.f, merged = -INFINITY;
  if (m != -INFINITY) {
    const float ea = expf(la - m), eb = expf(lp - m), sum = ea + eb;
    wa = ea / sum;
    wb = eb / sum;
    merged = m + logf(sum);
  }
  float* out = p.acc_out + b * p.out_sb + t * p.out_st + h * p.out_sh;
  const PartT* part = static_cast<const PartT*>(p.part_out) + ((b * p.rows + t) * p.heads + h) * p.head_dim;
  for (int i = lane; i < p.head_dim; i += 32) out[i] = out[i] * wa + static_cast<float>(part[i]) * wb;
  __syncwarp();  // every lane has read lse_acc
  if (lane == 0) *lse_acc = merged;
}

}  // namespace

cudaError_t launch_merge_partial(const MergeParams& p, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.batch) * p.rows * p.heads;
  if (total == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((total + kWarps - 1) / kWarps);
  if (p.part_bf16) {
    merge_kernel<__nv_bfloat16><<<blocks, kWarps * 32, 0, stream>>>(p);
  } else {
    merge_kernel<float><<<blocks, kWarps * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace ssa::kernels::cuda
