// `ssa attn bench`: the sparse path (selection, forward, forward + backward) and
// cuDNN dense causal attention on the same shapes, timed with CUDA events, with
// the SM clock each case ran at.
// FLOPs: dense causal forward 2 B Hq S^2 D (half of 4 B Hq S^2 D); sparse forward
// 4 D per (query head, visible selected key); forward + backward 3.5x forward
// (the usual count: recomputed products not counted). Selection: 2 D per (query
// head, causal block) for the logits.
#include "kernels/cuda_attention_tools.h"

#ifdef SSA_WITH_CUDA
#include <ATen/core/grad_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime_api.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "kernels/cuda_launch.h"

namespace ssa::kernels::cuda {
namespace {

// The SM clock now, in MHz: ~200k cycles of one thread's spin against the global
// timer (about 0.1 ms, outside the timed region).
double sm_clock_mhz() {
  const at::Tensor out = at::empty({2}, at::TensorOptions().device(at::kCUDA).dtype(at::kLong));
  SSA_CUDA_CHECK(launch_clock_probe(reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()), 200000,
                                    at::cuda::getCurrentCUDAStream()));
  const at::Tensor host = out.cpu();
  const double ns = static_cast<double>(host[1].item<int64_t>());
  return ns > 0 ? static_cast<double>(host[0].item<int64_t>()) / ns * 1e3 : 0.0;
}

struct Timing {
  double ms = 0;
  double mhz_first = 0, mhz_last = 0;  // SM clock right after the first and the last timed run
};

// Median milliseconds of fn over iters runs after warmup runs, and the SM clock
// they ran at: under sustained load the GPU lowers its clock, which slows every
// kernel alike, so each row says which clock its time belongs to. The clock is
// sampled twice only (after the first and the last run), so the probes hardly
// change how busy the runs keep the GPU.
Timing time_ms(const std::function<void()>& fn, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) fn();
  SSA_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  SSA_CUDA_CHECK(cudaEventCreate(&start));
  SSA_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> times;
  Timing t;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int i = 0; i < iters; ++i) {
    SSA_CUDA_CHECK(cudaEventRecord(start, stream));
    fn();
    SSA_CUDA_CHECK(cudaEventRecord(stop, stream));
    SSA_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    SSA_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
    if (i == 0) t.mhz_first = sm_clock_mhz();
  }
  t.mhz_last = sm_clock_mhz();
  SSA_CUDA_CHECK(cudaEventDestroy(start));
  SSA_CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  t.ms = times[times.size() / 2];
  return t;
}

// (query head, key) pairs the sparse kernels compute: selected keys <= the query.
double visible_pairs(const at::Tensor& ids, int64_t block_size, int64_t group) {
  const at::Tensor idl = ids.to(at::kLong);
  const at::Tensor pos = at::arange(ids.size(1), idl.options()).view({1, -1, 1, 1});
  const at::Tensor keys = at::clamp(at::minimum(pos - idl * block_size + 1, at::full_like(idl, block_size)), 0);
  return at::where(idl >= 0, keys, at::zeros_like(keys)).sum().item<double>() * static_cast<double>(group);
}

struct Inputs {
  at::Tensor q, k, v, dout;
};

Inputs random_inputs(const BenchShape& shape) {
  const int64_t b = shape.batch, s = shape.seq;
  const auto bf16 = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  at::manual_seed(0);
  Inputs in;
  in.q = at::randn({b, s, shape.heads, shape.head_dim}, bf16);
  in.k = at::randn({b, s, shape.kv_heads, shape.head_dim}, bf16);
  in.v = at::randn({b, s, shape.kv_heads, shape.head_dim}, bf16);
  in.dout = at::randn({b, s, shape.heads, shape.head_dim}, bf16);
  return in;
}

SparseOptions cuda_options(const BenchShape& shape) {
  SparseOptions opt = shape.options;
  opt.backend = Backend::kCuda;
  return opt;
}

// Selection on the pooled keys, then the sparse forward and backward of out.
void select_forward_backward(const Inputs& in, const at::Tensor& qg, const at::Tensor& kg, const at::Tensor& vg,
                             const SparseOptions& opt, const at::Tensor* given_ids) {
  const at::Tensor ids = given_ids != nullptr ? *given_ids : select_blocks(in.q, pool_keys(in.k, opt.block_size), opt);
  const AttentionResult r = sparse_attention(qg, kg, vg, ids, opt);
  torch::autograd::grad({r.out}, {qg, kg, vg}, {in.dout});
}

BenchRow row(const std::string& name, const Timing& t, double flops, double bytes) {
  return {name, t.ms, flops / (t.ms * 1e-3) / 1e12, bytes / (t.ms * 1e-3) / 1e9, t.mhz_first, t.mhz_last};
}

}  // namespace

BenchReport run_bench(const BenchShape& shape, int warmup, int iters) {
  const int64_t b = shape.batch, s = shape.seq, hq = shape.heads, hkv = shape.kv_heads, d = shape.head_dim;
  const int64_t group = hq / hkv, bs = shape.options.block_size, top_k = shape.options.top_k;
  const SparseOptions opt = cuda_options(shape);
  const Inputs in = random_inputs(shape);
  const at::Tensor &q = in.q, &k = in.k, &v = in.v, &dout = in.dout;
  const double e = 2.0;  // bytes per bf16 element
  const double q_bytes = static_cast<double>(b * s * hq * d) * e, kv_bytes = static_cast<double>(b * s * hkv * d) * e;
  const double ids_bytes = static_cast<double>(b * s * hkv * top_k) * 4, lse_bytes = static_cast<double>(b * s * hq) * 4;
  BenchReport report;

  // Selection: pooling (reference ops) plus the CUDA ranking kernel.
  at::Tensor ids;
  const Timing t_select = time_ms([&] { ids = select_blocks(q, pool_keys(k, bs), opt); }, warmup, iters);
  const double nb = static_cast<double>((s + bs - 1) / bs);
  const double causal_blocks = static_cast<double>(b) * static_cast<double>(s) * (nb + 1) / 2;  // about
  report.rows.push_back(row("select (pool + rank)", t_select, 2.0 * d * hq * causal_blocks, q_bytes + kv_bytes + ids_bytes));

  const double pairs = visible_pairs(ids, bs, group);
  const double causal_pairs = static_cast<double>(b * hq) * static_cast<double>(s) * static_cast<double>(s + 1) / 2;
  report.kept_pairs = pairs / causal_pairs;
  const double fwd_flops = 4.0 * d * pairs;
  const double fwd_bytes = 2 * q_bytes + 2 * kv_bytes + ids_bytes + lse_bytes;  // q, k, v, ids in; o, lse out
  const double bwd_bytes = fwd_bytes + 3 * q_bytes + 2 * kv_bytes + lse_bytes;  // + do, o, lse in; dq, dk, dv out
  {
    at::NoGradGuard no_grad;
    const Timing t = time_ms([&] { sparse_attention(q, k, v, ids, opt); }, warmup, iters);
    report.rows.push_back(row("sparse fwd", t, fwd_flops, fwd_bytes));
  }
  const at::Tensor qg = q.detach().requires_grad_(true), kg = k.detach().requires_grad_(true),
                   vg = v.detach().requires_grad_(true);
  const Timing t_fb = time_ms([&] { select_forward_backward(in, qg, kg, vg, opt, &ids); }, warmup, iters);
  report.rows.push_back(row("sparse fwd+bwd", t_fb, 3.5 * fwd_flops, bwd_bytes));
  const Timing t_total = time_ms([&] { select_forward_backward(in, qg, kg, vg, opt, nullptr); }, warmup, iters);
  report.rows.push_back(row("sparse total: select+fwd+bwd", t_total, 3.5 * fwd_flops, bwd_bytes));

  // cuDNN dense causal attention, GQA by expanding k/v to every query head
  // (outside the timed region). Layout [B, H, S, D].
  const at::Tensor qh = q.transpose(1, 2).contiguous();
  const at::Tensor kh = k.repeat_interleave(group, 2).transpose(1, 2).contiguous();
  const at::Tensor vh = v.repeat_interleave(group, 2).transpose(1, 2).contiguous();
  const at::Tensor doh = dout.transpose(1, 2).contiguous();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const double dense_flops = 2.0 * static_cast<double>(b * hq) * static_cast<double>(s) * static_cast<double>(s) * d;
  const double dense_fwd_bytes = 2 * q_bytes + 2 * q_bytes + lse_bytes;  // expanded k, v count as read
  {
    at::NoGradGuard no_grad;
    const Timing t = time_ms([&] { at::_scaled_dot_product_cudnn_attention(qh, kh, vh, {}, true, 0.0, true, false, scale); },
                              warmup, iters);
    report.rows.push_back(row("cuDNN dense fwd", t, dense_flops, dense_fwd_bytes));
  }
  const at::Tensor qhg = qh.detach().requires_grad_(true), khg = kh.detach().requires_grad_(true),
                   vhg = vh.detach().requires_grad_(true);
  const Timing t_dense_fb = time_ms(
      [&] {
        const auto r = at::_scaled_dot_product_cudnn_attention(qhg, khg, vhg, {}, true, 0.0, true, false, scale);
        torch::autograd::grad({std::get<0>(r)}, {qhg, khg, vhg}, {doh});
      },
      warmup, iters);
  report.rows.push_back(row("cuDNN dense fwd+bwd", t_dense_fb, 3.5 * dense_flops, 2 * dense_fwd_bytes + 4 * q_bytes));
  return report;
}

std::function<void()> sparse_total_step(const BenchShape& shape) {
  const Inputs in = random_inputs(shape);
  const at::Tensor qg = in.q.detach().requires_grad_(true), kg = in.k.detach().requires_grad_(true),
                   vg = in.v.detach().requires_grad_(true);
  return [in, qg, kg, vg, opt = cuda_options(shape)] { select_forward_backward(in, qg, kg, vg, opt, nullptr); };
}

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
