// LibTorch side of the CUDA block selection and attention statistics.
#include "kernels/cuda_attention.h"

#ifdef SSA_WITH_CUDA
#include <ATen/core/grad_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <fmt/format.h>

#include <cmath>
#include <numbers>
#include <stdexcept>

#include "kernels/cuda_launch.h"

namespace ssa::kernels::cuda {

at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& pooled, const SparseOptions& options,
                         QueryRows q_rows) {
  const char* fn = "select_blocks";
  at::NoGradGuard no_grad;  // the router receives no gradient
  require_bf16(fn, "q", q);
  if (!pooled.is_cuda() || pooled.device() != q.device() || pooled.dim() != 4) {
    throw std::runtime_error(fmt::format("kernels::cuda::{}: pooled must be [B, Nb, Hkv, D] on {}", fn,
                                         q.device().str()));
  }
  if (options.top_k > kMaxTopK) {
    throw std::runtime_error(fmt::format("kernels::cuda::{}: top_k {} is above the CUDA kernel's limit {}", fn,
                                         options.top_k, kMaxTopK));
  }
  // pooled [B, Nb, Hkv, D] is laid out like k for make_shape (Sk unused here).
  const Shape shape = make_shape(fn, q, pooled, options.top_k, options.block_size, q_rows, 0);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor ids = at::empty({q.size(0), q.size(1), pooled.size(2), options.top_k}, q.options().dtype(at::kInt));
  if (q.size(1) == 0) return ids;

  SelectParams p;
  p.shape = shape;
  p.n_blocks = to_int(fn, "Nb", pooled.size(1));
  p.per_query_block = options.mode == SelectionMode::kQueryBlock;
  // The chunk images (one kernel): exact ones from bf16 pooled keys where the
  // warpgroup-mma kernel runs, else hi + lo parts of the fp32 keys.
  p.exact_keys = pooled.scalar_type() == at::kBFloat16 && select_wgmma_fits(p);
  at::Tensor pk = pooled.detach().to(p.exact_keys ? at::kBFloat16 : at::kFloat);
  const int64_t d = pk.size(3), hkv = pk.size(2);
  if (pk.stride(3) != 1 || pk.stride(2) != d || pk.stride(1) != hkv * d) pk = pk.contiguous();
  const int64_t n_chunks = (pk.size(1) + kSelectChunk - 1) / kSelectChunk;
  at::Tensor tiles = at::empty({pk.size(0), hkv, n_chunks, 2, kSelectChunk * d}, pk.options().dtype(at::kBFloat16));
  at::Tensor chunk_norm = at::empty({pk.size(0), hkv, n_chunks}, pk.options().dtype(at::kFloat));
  SplitParams sp;
  sp.pooled = pk.data_ptr();
  sp.exact = p.exact_keys;
  sp.pooled_batch_stride = pk.stride(0);
  sp.logit_scale = static_cast<float>(std::numbers::log2e / std::sqrt(static_cast<double>(d)));
  sp.batch = to_int(fn, "batch", pk.size(0));
  sp.n_blocks = to_int(fn, "Nb", pk.size(1));
  sp.heads = to_int(fn, "Hkv", hkv);
  sp.head_dim = to_int(fn, "head dim", d);
  sp.tiles = bf16_mut(tiles);
  sp.chunk_norm = chunk_norm.data_ptr<float>();
  SSA_CUDA_CHECK(launch_split(sp, at::cuda::getCurrentCUDAStream()));
  const at::Tensor qc = q.detach().contiguous();
  p.q = bf16_ptr(qc);
  p.pooled_tiles = bf16_ptr(tiles);
  p.chunk_norm = chunk_norm.data_ptr<float>();
  p.logit_scale = sp.logit_scale;
  at::Tensor scratch;
  if (p.per_query_block) {
    const int64_t n_query_blocks = (q.size(1) + options.block_size - 1) / options.block_size;
    scratch = at::empty({q.size(0), pooled.size(2), n_query_blocks, pooled.size(1)}, q.options().dtype(at::kFloat));
    p.block_scores = scratch.data_ptr<float>();
  }
  p.block_ids = ids.data_ptr<int32_t>();
  SSA_CUDA_CHECK(launch_select(p, at::cuda::getCurrentCUDAStream()));
  return ids;
}

at::Tensor pool_keys(const at::Tensor& k, int64_t block_size) {
  const at::ScalarType t = k.scalar_type();
  const bool fits = k.is_cuda() && k.dim() == 4 && (t == at::kBFloat16 || t == at::kHalf || t == at::kFloat) &&
                    !(at::GradMode::is_enabled() && k.requires_grad());
  if (!fits) return at::Tensor();
  const char* fn = "pool_keys";
  const c10::cuda::CUDAGuard guard(k.device());
  at::Tensor kc = k;
  if (k.stride(3) != 1 || k.stride(2) != k.size(3)) kc = k.contiguous();
  const int64_t n_blocks = (k.size(1) + block_size - 1) / block_size;
  at::Tensor pooled = at::empty({k.size(0), n_blocks, k.size(2), k.size(3)}, k.options());
  PoolParams p;
  p.dtype = t == at::kFloat ? PoolParams::kF32 : t == at::kHalf ? PoolParams::kF16 : PoolParams::kBF16;
  p.k = kc.data_ptr();
  p.k_batch_stride = kc.stride(0);
  p.k_row_stride = kc.stride(1);
  p.batch = to_int(fn, "batch", k.size(0));
  p.keys = to_int(fn, "keys", k.size(1));
  p.heads = to_int(fn, "Hkv", k.size(2));
  p.head_dim = to_int(fn, "head dim", k.size(3));
  p.block_size = to_int(fn, "block_size", block_size);
  p.n_blocks = to_int(fn, "blocks", n_blocks);
  p.pooled = pooled.data_ptr();
  SSA_CUDA_CHECK(launch_pool(p, at::cuda::getCurrentCUDAStream()));
  return pooled;
}

AttentionStats attention_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& block_ids,
                               int64_t block_size) {
  const char* fn = "attention_stats";
  at::NoGradGuard no_grad;
  if (!q.is_cuda() || !k.is_cuda() || !block_ids.is_cuda()) {
    throw std::runtime_error(fmt::format("kernels::cuda::{}: q, k and block_ids must be CUDA tensors", fn));
  }
  const Shape shape = make_shape(fn, q, k, block_ids.size(3), block_size, 0, 0);
  const c10::cuda::CUDAGuard guard(q.device());
  // Statistics only: other float dtypes are read as bf16, like the attention itself.
  const at::Tensor qc = q.detach().to(at::kBFloat16).contiguous();
  const at::Tensor kc = k.detach().to(at::kBFloat16).contiguous();
  const at::Tensor ids = block_ids.to(at::kInt).contiguous();
  at::Tensor sparsity = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  at::Tensor entropy = at::empty_like(sparsity);
  StatsParams p;
  p.shape = shape;
  p.q = bf16_ptr(qc);
  p.k = bf16_ptr(kc);
  p.block_ids = ids.data_ptr<int32_t>();
  p.sparsity = sparsity.data_ptr<float>();
  p.entropy_bits = entropy.data_ptr<float>();
  SSA_CUDA_CHECK(launch_stats(p, at::cuda::getCurrentCUDAStream()));
  AttentionStats stats;
  stats.count = sparsity.numel();
  if (stats.count > 0) {
    stats.sparsity = sparsity.sum(at::kDouble).item<double>() / static_cast<double>(stats.count);
    stats.entropy_bits = entropy.sum(at::kDouble).item<double>() / static_cast<double>(stats.count);
  }
  return stats;
}

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
