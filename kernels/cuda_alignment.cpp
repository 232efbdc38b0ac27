// LibTorch side of the fused gate-and-align kernels (kernels/cuda/alignment.cu).
#include "kernels/cuda_attention.h"

#ifdef SSA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/cuda_launch.h"

namespace ssa::kernels::cuda {
namespace {

AlignParams params_of(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& gate, bool pass_full,
                      bool after_gate, double beta) {
  AlignParams p;
  p.rows = full.numel() / full.size(-1);
  p.head_dim = to_int("gate_and_align", "head dim", full.size(-1));
  p.full = bf16_ptr(full);
  p.sparse = bf16_ptr(sparse);
  p.gate = bf16_ptr(gate);
  p.pass_full = pass_full;
  p.after_gate = after_gate;
  p.beta = static_cast<float>(beta);
  p.inv_count = full.numel() > 0 ? 1.f / static_cast<float>(full.numel()) : 0.f;
  return p;
}

}  // namespace

bool align_fits(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& gate) {
  return full.is_cuda() && full.scalar_type() == at::kBFloat16 && sparse.scalar_type() == at::kBFloat16 &&
         gate.scalar_type() == at::kBFloat16 && sparse.device() == full.device() && gate.device() == full.device() &&
         full.dim() == 4 && sparse.sizes() == full.sizes() && gate.dim() == 4 && gate.size(3) == 1 &&
         gate.size(0) == full.size(0) && gate.size(1) == full.size(1) && gate.size(2) == full.size(2) &&
         full.size(3) % 2 == 0;
}

std::array<at::Tensor, 2> align_forward(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& gate,
                                        bool pass_full, bool after_gate, double beta) {
  const c10::cuda::CUDAGuard guard(full.device());
  const at::Tensor f = full.contiguous(), s = sparse.contiguous(), g = gate.contiguous();
  AlignParams p = params_of(f, s, g, pass_full, after_gate, beta);
  at::Tensor out = at::empty_like(f);
  at::Tensor partial = at::empty({align_blocks(p.rows)}, f.options().dtype(at::kFloat));
  p.out = bf16_mut(out);
  p.partial = partial.data_ptr<float>();
  SSA_CUDA_CHECK(launch_align_forward(p, at::cuda::getCurrentCUDAStream()));
  return {out, partial.sum()};  // a fixed-order sum of the blocks' partial sums
}

std::array<at::Tensor, 3> align_backward(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& gate,
                                         const at::Tensor& grad_out, const at::Tensor& grad_ls,
                                         const at::Tensor& grad_lc, bool pass_full, bool after_gate, double beta) {
  const c10::cuda::CUDAGuard guard(full.device());
  const at::Tensor f = full.contiguous(), s = sparse.contiguous(), g = gate.contiguous();
  AlignParams p = params_of(f, s, g, pass_full, after_gate, beta);
  at::Tensor go, ls, lc;
  if (grad_out.defined()) go = grad_out.to(at::kBFloat16).contiguous();
  if (grad_ls.defined()) ls = grad_ls.to(at::kFloat).contiguous();
  if (grad_lc.defined()) lc = grad_lc.to(at::kFloat).contiguous();
  at::Tensor df = at::empty_like(f), ds = at::empty_like(s), dg = at::empty_like(g);
  p.grad_out = go.defined() ? bf16_ptr(go) : nullptr;
  p.grad_ls = ls.defined() ? ls.data_ptr<float>() : nullptr;
  p.grad_lc = lc.defined() ? lc.data_ptr<float>() : nullptr;
  p.grad_full = bf16_mut(df);
  p.grad_sparse = bf16_mut(ds);
  p.grad_gate = bf16_mut(dg);
  SSA_CUDA_CHECK(launch_align_backward(p, at::cuda::getCurrentCUDAStream()));
  return {df, ds, dg};
}

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
