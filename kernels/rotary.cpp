#include "kernels/rotary.h"

#include <torch/csrc/autograd/custom_function.h>

#include "kernels/cuda_attention.h"

namespace ssa::kernels {

at::Tensor rotate_pairs_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor x1 = xf.narrow(-1, 0, half), x2 = xf.narrow(-1, half, half);
  // cos/sin: [S, D/2] -> [1, S, 1, D/2] to broadcast over batch and heads.
  const at::Tensor c = cos.unsqueeze(0).unsqueeze(2), s = sin.unsqueeze(0).unsqueeze(2);
  return at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1).to(x.scalar_type());
}

#ifdef SSA_WITH_CUDA
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Forward: the rotation; backward: the inverse rotation of the incoming gradient
// (the rotation is orthogonal per pair).
class RotaryFunction : public torch::autograd::Function<RotaryFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    at::Tensor y = cuda::rotate_pairs(x, cos, sin, /*inverse=*/false);
    return y.defined() ? y : rotate_pairs_reference(x, cos, sin);  // e.g. fp16
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    at::Tensor dx = cuda::rotate_pairs(grads[0], saved[0], saved[1], /*inverse=*/true);
    if (!dx.defined()) dx = rotate_pairs_reference(grads[0], saved[0], -saved[1]);  // e.g. an fp16 gradient
    return {dx, at::Tensor(), at::Tensor()};
  }
};

}  // namespace
#endif

at::Tensor rotate_pairs(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.size(-1) % 2 == 0, "kernels::rotate_pairs: x must be [B, S, H, D] with D even, got ",
              x.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == x.size(1) && cos.size(1) == x.size(-1) / 2 && sin.sizes() == cos.sizes(),
              "kernels::rotate_pairs: cos and sin must be [S, D/2] = [", x.size(1), ", ", x.size(-1) / 2, "], got ",
              cos.sizes(), " and ", sin.sizes());
#ifdef SSA_WITH_CUDA
  if (x.is_cuda()) return RotaryFunction::apply(x, cos.detach(), sin.detach());
#endif
  return rotate_pairs_reference(x, cos, sin);
}

}  // namespace ssa::kernels
