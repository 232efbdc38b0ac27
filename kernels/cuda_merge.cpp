// LibTorch side of the fused log-sum-exp merges (kernels/cuda/merge_partial.cu)
// and of the row-range combinations (kernels/cuda/row_parts.cu).
#include "kernels/cuda_attention.h"

#ifdef SSA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

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

AttentionResult merge_row_partials(int64_t rows, const std::vector<RowPartial>& parts, at::ScalarType out_type) {
  constexpr const char* fn = "merge_row_partials";
  if (parts.empty() || parts.size() > static_cast<size_t>(kMaxRowParts)) return {};
  if (out_type != at::kBFloat16 && out_type != at::kFloat) return {};
  const at::Tensor& first = parts.front().part.out;
  if (!first.is_cuda() || first.size(3) % 8 != 0) return {};
  for (const RowPartial& p : parts) {
    const at::Tensor &o = p.part.out, &l = p.part.lse;
    if (o.device() != first.device() || l.device() != first.device() || o.scalar_type() != at::kBFloat16 ||
        l.scalar_type() != at::kFloat || !o.is_contiguous() || !l.is_contiguous()) {
      return {};
    }
  }
  const c10::cuda::CUDAGuard guard(first.device());
  const int64_t b = first.size(0), h = first.size(2), d = first.size(3);
  AttentionResult out{at::empty({b, rows, h, d}, first.options().dtype(out_type)),
                      at::empty({b, h, rows}, first.options().dtype(at::kFloat))};
  RowMergeParams p;
  p.batch = to_int(fn, "batch", b);
  p.rows = to_int(fn, "rows", rows);
  p.heads = to_int(fn, "heads", h);
  p.head_dim = to_int(fn, "head dim", d);
  p.count = static_cast<int>(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    p.part_out[i] = reinterpret_cast<const __nv_bfloat16*>(parts[i].part.out.data_ptr());
    p.part_lse[i] = parts[i].part.lse.data_ptr<float>();
    p.row[i] = to_int(fn, "row", parts[i].row);
    p.rows_of[i] = to_int(fn, "part rows", parts[i].part.out.size(1));
  }
  p.out = out.out.data_ptr();
  p.out_bf16 = out_type == at::kBFloat16;
  p.lse = out.lse.data_ptr<float>();
  SSA_CUDA_CHECK(launch_merge_rows(p, at::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor add_row_terms(const at::Tensor& base, const std::vector<RowTerm>& terms, at::ScalarType out_type) {
  if (terms.size() > static_cast<size_t>(kMaxRowParts) || !base.is_cuda() || base.scalar_type() != at::kFloat ||
      !base.is_contiguous() || (out_type != at::kBFloat16 && out_type != at::kFloat)) {
    return {};
  }
  const int64_t width = base.numel() / std::max<int64_t>(1, base.size(0) * base.size(1));
  if (width % 8 != 0) return {};
  for (const RowTerm& t : terms) {
    if (t.value.device() != base.device() || t.value.scalar_type() != at::kBFloat16 || !t.value.is_contiguous()) return {};
  }
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(out_type));
  RowSumParams p;
  p.batch = base.size(0);
  p.rows = base.size(1);
  p.width = width;
  p.base = base.data_ptr<float>();
  p.count = static_cast<int>(terms.size());
  for (size_t i = 0; i < terms.size(); ++i) {
    p.term[i] = reinterpret_cast<const __nv_bfloat16*>(terms[i].value.data_ptr());
    p.row[i] = terms[i].row;
    p.rows_of[i] = terms[i].value.size(1);
  }
  p.out = out.data_ptr();
  p.out_bf16 = out_type == at::kBFloat16;
  SSA_CUDA_CHECK(launch_sum_rows(p, at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
