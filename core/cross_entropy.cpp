#include "core/cross_entropy.h"

#include <torch/csrc/autograd/custom_function.h>

namespace ssa::core {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class ChunkedCrossEntropy : public torch::autograd::Function<ChunkedCrossEntropy> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& labels, int64_t chunk) {
    const int64_t n = hidden.size(0);
    auto w = weight.to(at::kFloat);
    auto total = at::zeros({}, hidden.options().dtype(at::kDouble));
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t len = std::min(chunk, n - start);
      auto logits = at::matmul(hidden.narrow(0, start, len).to(at::kFloat), w.t());  // [len, V]
      auto picked = logits.gather(1, labels.narrow(0, start, len).unsqueeze(1)).squeeze(1);
      total += (at::logsumexp(logits, 1) - picked).sum().to(at::kDouble);
    }
    ctx->save_for_backward({hidden, weight, labels});
    ctx->saved_data["chunk"] = chunk;
    return (total / static_cast<double>(n)).to(at::kFloat);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const auto& hidden = saved[0];
    const auto& weight = saved[1];
    const auto& labels = saved[2];
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const int64_t n = hidden.size(0);
    auto w = weight.to(at::kFloat);
    auto scale = grad_outputs[0].to(at::kFloat) / static_cast<double>(n);
    auto grad_hidden = at::empty_like(hidden);
    auto grad_weight = at::zeros_like(w);
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t len = std::min(chunk, n - start);
      auto h = hidden.narrow(0, start, len).to(at::kFloat);
      auto probs = at::softmax(at::matmul(h, w.t()), 1);  // [len, V]
      probs.scatter_add_(1, labels.narrow(0, start, len).unsqueeze(1),
                         at::full({len, 1}, -1.0f, probs.options()));
      probs.mul_(scale);  // d loss / d logits
      grad_hidden.narrow(0, start, len).copy_(at::matmul(probs, w));
      grad_weight.addmm_(probs.t(), h);
    }
    return {grad_hidden, grad_weight.to(weight.scalar_type()), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                 int64_t chunk_tokens) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "chunked_cross_entropy: hidden [N, H] and weight [V, H] expected, got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), "chunked_cross_entropy: labels must be [N]");
  TORCH_CHECK(chunk_tokens > 0, "chunked_cross_entropy: chunk_tokens must be > 0");
  return ChunkedCrossEntropy::apply(hidden, weight, labels.to(at::kLong), chunk_tokens);
}

}  // namespace ssa::core
