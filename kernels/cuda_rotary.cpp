// LibTorch side of the fused rotary embedding (kernels/cuda/rotary.cu).
#include "kernels/cuda_attention.h"

#ifdef SSA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/cuda_launch.h"

namespace ssa::kernels::cuda {

at::Tensor rotate_pairs(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  const at::ScalarType t = x.scalar_type();
  const bool fits = x.is_cuda() && x.dim() == 4 && x.size(3) % 2 == 0 && (t == at::kBFloat16 || t == at::kFloat) &&
                    cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                    cos.device() == x.device() && sin.device() == x.device() && cos.dim() == 2 &&
                    cos.size(0) == x.size(1) && cos.size(1) == x.size(3) / 2 && sin.sizes() == cos.sizes();
  if (!fits) return at::Tensor();
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor y = at::empty_like(xc);
  RotaryParams p;
  p.tokens = x.size(0) * x.size(1);
  p.seq = to_int("rotate_pairs", "sequence length", x.size(1));
  p.heads = to_int("rotate_pairs", "heads", x.size(2));
  p.half = to_int("rotate_pairs", "head dim / 2", x.size(3) / 2);
  p.x = xc.data_ptr();
  p.y = y.data_ptr();
  p.bf16 = t == at::kBFloat16;
  p.cos = cc.data_ptr<float>();
  p.sin = sc.data_ptr<float>();
  p.inverse = inverse;
  SSA_CUDA_CHECK(launch_rotary(p, at::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
