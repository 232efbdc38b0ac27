// LibTorch side of the fused log-sum-exp merge (kernels/cuda/merge_partial.cu).
#include "kernels/cuda_attention.h"

#ifdef SSA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/cuda_launch.h"

namespace ssa::kernels::cuda {

bool merge_into(at::Tensor& acc_out, at::Tensor& acc_lse, const AttentionResult& part) {
  const at::ScalarType pt = part.out.scalar_type();
  const bool fits = acc_out.is_cuda() && acc_out.scalar_type() == at::kFloat && acc_lse.scalar_type() == at::kFloat &&
                    (pt == at::kBFloat16 || pt == at::kFloat) && part.out.device() == acc_out.device() &&
                    part.lse.device() == acc_out.device() && acc_lse.device() == acc_out.device() &&
                    acc_out.stride(3) == 1 && acc_lse.stride(2) == 1;
  if (!fits) return false;
  const c10::cuda::CUDAGuard guard(acc_out.device());
  const at::Tensor po = part.out.detach().contiguous();
  const at::Tensor pl = part.lse.detach().to(at::kFloat).contiguous();
  MergeParams p;
  p.batch = to_int("merge_into", "batch", acc_out.size(0));
  p.rows = to_int("merge_into", "rows", acc_out.size(1));
  p.heads = to_int("merge_into", "heads", acc_out.size(2));
  p.head_dim = to_int("merge_into", "head dim", acc_out.size(3));
  p.acc_out = acc_out.data_ptr<float>();
  p.out_sb = acc_out.stride(0);
  p.out_st = acc_out.stride(1);
  p.out_sh = acc_out.stride(2);
  p.acc_lse = acc_lse.data_ptr<float>();
  p.lse_sb = acc_lse.stride(0);
  p.lse_sh = acc_lse.stride(1);
  p.part_out = po.data_ptr();
  p.part_bf16 = pt == at::kBFloat16;
  p.part_lse = pl.data_ptr<float>();
  SSA_CUDA_CHECK(launch_merge_partial(p, at::cuda::getCurrentCUDAStream()));
  return true;
}

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
