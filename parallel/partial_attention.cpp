#include "parallel/partial_attention.h"

#include <cmath>
#include <limits>

namespace ssa::parallel {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

}  // namespace

at::ScalarType accumulation_type(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

PartialSum::PartialSum(int64_t batch, int64_t rows, int64_t heads, int64_t head_dim,
                       const at::TensorOptions& options)
    : out_(at::zeros({batch, rows, heads, head_dim}, options)), lse_(at::full({batch, heads, rows}, -kInf, options)) {}

void PartialSum::add(int64_t row, const kernels::AttentionResult& part) {
  const int64_t n = part.out.size(1);
  at::Tensor out = out_.narrow(1, row, n);  // views: updated in place
  at::Tensor lse = lse_.narrow(2, row, n);
  kernels::merge_into(out, lse, part);
}

}  // namespace ssa::parallel
