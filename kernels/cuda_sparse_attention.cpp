// LibTorch side of the CUDA block-sparse attention: checks, the autograd Function
// (forward kernel; backward = dq kernel, inverted index, dk/dv kernel), and
// cuda::available().
#include "kernels/cuda_attention.h"

#ifdef SSA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/autograd/custom_function.h>

#include <fmt/format.h>

#include <memory>
#include <optional>
#include <stdexcept>

#include "kernels/cuda_launch.h"
#include "kernels/cuda_sparse_index.h"
#include "kernels/side_stream.h"

namespace ssa::kernels::cuda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

AttentionResult forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& block_ids, const Shape& shape) {
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  ForwardParams p;
  p.shape = shape;
  p.q = bf16_ptr(q);
  p.k = bf16_ptr(k);
  p.v = bf16_ptr(v);
  p.block_ids = block_ids.data_ptr<int32_t>();
  p.out = bf16_mut(out);
  p.lse = lse.data_ptr<float>();
  SSA_CUDA_CHECK(launch_sparse_forward(p, at::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

struct Gradients {
  at::Tensor dq, dk, dv;
};

// fp32 accumulators the gradients are added into (dims 1-3 contiguous).
struct Accumulators {
  at::Tensor dq, dk, dv;
};

// What the dk/dv kernel works from: nothing (k and v need no gradient), an index
// built during the forward, or one to build now from the block ids.
struct KvGradWork {
  bool wanted = false;
  const InvertedIndex* prebuilt = nullptr;
  at::cuda::CUDAEvent* prebuilt_ready = nullptr;  // set once `prebuilt` is complete
};

// The inverted index for dk/dv depends only on the block ids, so it is built on a
// side stream beside the forward (kept for the backward) or beside dq. `ids_ready`
// was recorded on the current stream once the ids were; the stream that runs dk/dv
// waits on `done`, and `user` (the stream the index's memory goes back to) is
// recorded on its tensors.
// deterministic: the exact item count is read back (it sizes the partial sums).
struct IndexInFlight {
  InvertedIndex index;
  at::cuda::CUDAEvent done;
};

IndexInFlight index_beside(at::cuda::CUDAEvent& ids_ready, const at::Tensor& block_ids, const Shape& shape,
                           bool deterministic, const c10::cuda::CUDAStream& user) {
  const c10::cuda::CUDAStream side = side_stream_of(block_ids.device().index(), SideRole::kSparseIndex);
  ids_ready.block(side);
  block_ids.record_stream(side);  // the caller's stream may not wait for the index
  IndexInFlight flight;
  const c10::cuda::CUDAStreamGuard on_side(side);
  flight.index = build_inverted_index(block_ids, shape, deterministic);
  for (at::Tensor* t : {&flight.index.entry_token, &flight.index.item_bucket, &flight.index.item_begin,
                        &flight.index.item_end, &flight.index.bucket_item_begin, &flight.index.n_items_device}) {
    t->record_stream(user);
  }
  flight.done.record(side);
  return flight;
}

// dq runs on the current stream. The index dk/dv need (unless prebuilt) is built
// on a side stream meanwhile, and dk/dv follow there once dq has written delta
// and lse_log2 (each of the two kernels fills the SMs' registers, so they would
// not run side by side anyway). The current stream waits for the side stream
// before the gradients are returned.
Gradients backward_kernels(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& block_ids,
                           const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dout,
                           const at::Tensor& dlse, const Shape& shape, bool deterministic, const KvGradWork& kv,
                           const Accumulators* into = nullptr, SideJoin* join = nullptr) {
  const c10::cuda::CUDAStream main_stream = at::cuda::getCurrentCUDAStream();
  at::cuda::CUDAEvent inputs_ready;  // before dq: an index built here waits only for the ids
  const bool build_index = kv.wanted && kv.prebuilt == nullptr;
  if (build_index) inputs_ready.record(main_stream);
  // Allocations first: dq is queued as soon as the host gets here.
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, f32);
  at::Tensor lse_log2 = at::empty_like(delta);
  Gradients g;
  if (into == nullptr) g.dq = at::empty_like(q);
  BackwardDqParams dqp;
  if (into != nullptr) {
    dqp.dq_acc = into->dq.data_ptr<float>();
    dqp.dq_acc_batch_stride = into->dq.stride(0);
  } else {
    dqp.dq = bf16_mut(g.dq);
  }
  dqp.shape = shape;
  dqp.q = bf16_ptr(q);
  dqp.k = bf16_ptr(k);
  dqp.v = bf16_ptr(v);
  dqp.out = bf16_ptr(out);
  dqp.dout = bf16_ptr(dout);
  dqp.lse = lse.data_ptr<float>();
  dqp.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  dqp.block_ids = block_ids.data_ptr<int32_t>();
  dqp.delta = delta.data_ptr<float>();
  dqp.lse_log2 = lse_log2.data_ptr<float>();
  SSA_CUDA_CHECK(launch_backward_dq(dqp, main_stream));
  at::cuda::CUDAEvent dq_done;  // dk/dv read the delta and lse_log2 that dq wrote
  dq_done.record(main_stream);

  if (!kv.wanted) return g;  // k and v need no gradient

  // Side stream: dk/dv once dq is done, and the index (unless prebuilt) built
  // beside dq on a stream of its own.
  const c10::cuda::CUDAStream side = side_stream_of(q.device().index(), SideRole::kSparseKvGrad);
  std::optional<IndexInFlight> built;
  if (build_index) {
    built.emplace(index_beside(inputs_ready, block_ids, shape, deterministic, side));
    built->done.block(side);
  }
  // dk/dv's zeroed accumulator (atomic mode) is filled while dq runs.
  const bool fresh_acc = !deterministic && into == nullptr;
  at::Tensor acc;
  if (fresh_acc) {
    const c10::cuda::CUDAStreamGuard on_side(side);
    acc = at::zeros({2, k.size(0), k.size(1), k.size(2), k.size(3)}, f32);
  }
  dq_done.block(side);
  {
    const c10::cuda::CUDAStreamGuard on_side(side);
    if (!built && kv.prebuilt_ready != nullptr) kv.prebuilt_ready->block(side);
    const InvertedIndex& index = built ? built->index : *kv.prebuilt;
    BackwardDkdvParams kp;
    kp.shape = shape;
    kp.q = bf16_ptr(q);
    kp.k = bf16_ptr(k);
    kp.v = bf16_ptr(v);
    kp.dout = bf16_ptr(dout);
    kp.delta = delta.data_ptr<float>();
    kp.lse_log2 = lse_log2.data_ptr<float>();
    kp.entry_token = index.entry_token.data_ptr<int32_t>();
    kp.item_bucket = index.item_bucket.data_ptr<int32_t>();
    kp.item_begin = index.item_begin.data_ptr<int32_t>();
    kp.item_end = index.item_end.data_ptr<int32_t>();
    kp.n_items = index.n_items;
    kp.n_items_device = index.n_items_device.data_ptr<int32_t>();
    kp.tiles_per_block = index.tiles_per_block;
    kp.token_chunk = index.token_chunk;
    kp.n_token_chunks = index.n_token_chunks;
    kp.block_first = index.block_first;
    kp.blocks_per_chunk = index.blocks_per_chunk;
    const int64_t d = q.size(3);
    if (deterministic) {
      // Partials per (item, key tile), summed in item order: identical bits every run.
      at::Tensor partial_dk = at::empty({index.n_items * index.tiles_per_block, kKeyTile, d}, f32);
      at::Tensor partial_dv = at::empty_like(partial_dk);
      kp.partial_dk = partial_dk.data_ptr<float>();
      kp.partial_dv = partial_dv.data_ptr<float>();
      SSA_CUDA_CHECK(launch_backward_dkdv(kp, side));
      g.dk = at::empty_like(k);
      g.dv = at::empty_like(v);
      DkdvReduceParams rp;
      rp.work = kp;
      rp.bucket_item_begin = index.bucket_item_begin.data_ptr<int32_t>();
      rp.dk = bf16_mut(g.dk);
      rp.dv = bf16_mut(g.dv);
      SSA_CUDA_CHECK(launch_dkdv_reduce(rp, side));
    } else if (into != nullptr) {
      kp.dk_acc = into->dk.data_ptr<float>();
      kp.dv_acc = into->dv.data_ptr<float>();
      kp.acc_batch_stride = into->dk.stride(0);
      SSA_CUDA_CHECK(launch_backward_dkdv(kp, side));
    } else {
      // One zeroed fp32 buffer for both, one conversion of both.
      kp.dk_acc = acc[0].data_ptr<float>();
      kp.dv_acc = acc[1].data_ptr<float>();
      SSA_CUDA_CHECK(launch_backward_dkdv(kp, side));
      const at::Tensor both = acc.to(at::kBFloat16);
      g.dk = both[0];
      g.dv = both[1];
    }
    // dk, dv were allocated on the side stream and are used on the main one next.
    if (g.dk.defined()) {
      g.dk.record_stream(main_stream);
      g.dv.record_stream(main_stream);
    }
  }
  if (join != nullptr && g.dk.defined()) join = nullptr;  // returned gradients: wait now
  if (join != nullptr) {
    // The side stream reads these after this call returns: their memory must not
    // go back to the current stream's pool before it is done.
    const at::Tensor* side_reads[] = {&q, &k, &v, &dout, &block_ids, &delta, &lse_log2};
    for (const at::Tensor* t : side_reads) t->record_stream(side);
    auto side_done = std::make_shared<at::cuda::CUDAEvent>();
    side_done->record(side);
    join->defer([side_done, main_stream] { side_done->block(main_stream); });
    return g;
  }
  at::cuda::CUDAEvent side_done;
  side_done.record(side);
  side_done.block(main_stream);
  return g;
}

// The completion event of an index built beside the forward, kept in the autograd
// context until the backward's dk/dv stream waits on it.
struct IndexReady : torch::CustomClassHolder {
  at::cuda::CUDAEvent done;
};

void save_index(AutogradContext* ctx, const InvertedIndex& index) {
  ctx->saved_data["index.entry_token"] = index.entry_token;
  ctx->saved_data["index.item_bucket"] = index.item_bucket;
  ctx->saved_data["index.item_begin"] = index.item_begin;
  ctx->saved_data["index.item_end"] = index.item_end;
  ctx->saved_data["index.bucket_item_begin"] = index.bucket_item_begin;
  ctx->saved_data["index.n_items_device"] = index.n_items_device;
  ctx->saved_data["index.n_items"] = index.n_items;
  ctx->saved_data["index.tiles_per_block"] = static_cast<int64_t>(index.tiles_per_block);
  ctx->saved_data["index.token_chunk"] = static_cast<int64_t>(index.token_chunk);
  ctx->saved_data["index.n_token_chunks"] = static_cast<int64_t>(index.n_token_chunks);
  ctx->saved_data["index.block_first"] = static_cast<int64_t>(index.block_first);
  ctx->saved_data["index.blocks_per_chunk"] = static_cast<int64_t>(index.blocks_per_chunk);
}

InvertedIndex load_index(AutogradContext* ctx) {
  InvertedIndex index;
  index.entry_token = ctx->saved_data["index.entry_token"].toTensor();
  index.item_bucket = ctx->saved_data["index.item_bucket"].toTensor();
  index.item_begin = ctx->saved_data["index.item_begin"].toTensor();
  index.item_end = ctx->saved_data["index.item_end"].toTensor();
  index.bucket_item_begin = ctx->saved_data["index.bucket_item_begin"].toTensor();
  index.n_items_device = ctx->saved_data["index.n_items_device"].toTensor();
  index.n_items = ctx->saved_data["index.n_items"].toInt();
  index.tiles_per_block = static_cast<int>(ctx->saved_data["index.tiles_per_block"].toInt());
  index.token_chunk = static_cast<int>(ctx->saved_data["index.token_chunk"].toInt());
  index.n_token_chunks = static_cast<int>(ctx->saved_data["index.n_token_chunks"].toInt());
  index.block_first = static_cast<int>(ctx->saved_data["index.block_first"].toInt());
  index.blocks_per_chunk = static_cast<int>(ctx->saved_data["index.blocks_per_chunk"].toInt());
  return index;
}

// The checks shared by the forward and the merged backward: bf16 CUDA q, k, v,
// a shape the kernels take, int32 block ids on q's device.
Shape checked_shape(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& block_ids, const SparseOptions& options, QueryRows q_rows, int64_t k_start) {
  require_bf16(fn, "q", q);
  require_bf16(fn, "k", k);
  require_bf16(fn, "v", v);
  const Shape shape = make_shape(fn, q, k, block_ids.size(3), options.block_size, q_rows, k_start);
  if (block_ids.scalar_type() != at::kInt || block_ids.device() != q.device()) {
    throw std::runtime_error(fmt::format("kernels::cuda::{}: block_ids must be int32 on {}", fn, q.device().str()));
  }
  return shape;
}

// Autograd node: inputs q, k, v (bf16, contiguous), block_ids; outputs out, lse.
class SparseAttentionFunction : public torch::autograd::Function<SparseAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& block_ids, int64_t block_size, int64_t q_start, int64_t q_split,
                               int64_t q_start_late, int64_t k_start, bool deterministic, bool kv_grad) {
    const Shape shape = make_shape("sparse_attention", q, k, block_ids.size(3), block_size,
                                   QueryRows::two_runs(q_start, q_split, q_start_late), k_start);
    // Undefined output gradients stay undefined (no zero-filled dlse).
    ctx->set_materialize_grads(false);
    at::cuda::CUDAEvent ids_ready;
    if (kv_grad) ids_ready.record(at::cuda::getCurrentCUDAStream());
    AttentionResult r = forward_kernel(q, k, v, block_ids, shape);
    if (kv_grad) {
      // The backward's index, built beside the forward kernel and kept. Nothing on
      // this stream waits for it: only the backward's dk/dv does (after dq).
      IndexInFlight index = index_beside(ids_ready, block_ids, shape, deterministic, at::cuda::getCurrentCUDAStream());
      save_index(ctx, index.index);
      auto ready = c10::make_intrusive<IndexReady>();
      ready->done = std::move(index.done);
      ctx->saved_data["index.ready"] = c10::IValue::make_capsule(std::move(ready));
    }
    ctx->save_for_backward({q, k, v, block_ids, r.out, r.lse});
    ctx->saved_data["block_size"] = block_size;
    ctx->saved_data["q_start"] = q_start;
    ctx->saved_data["q_split"] = q_split;
    ctx->saved_data["q_start_late"] = q_start_late;
    ctx->saved_data["k_start"] = k_start;
    ctx->saved_data["deterministic"] = deterministic;
    ctx->saved_data["has_index"] = kv_grad;
    return {r.out, r.lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &block_ids = saved[3], &out = saved[4],
                     &lse = saved[5];
    const QueryRows q_rows = QueryRows::two_runs(ctx->saved_data["q_start"].toInt(), ctx->saved_data["q_split"].toInt(),
                                                 ctx->saved_data["q_start_late"].toInt());
    const Shape shape = make_shape("sparse_attention backward", q, k, block_ids.size(3),
                                   ctx->saved_data["block_size"].toInt(), q_rows, ctx->saved_data["k_start"].toInt());
    const c10::cuda::CUDAGuard guard(q.device());
    at::Tensor dout = grads[0].defined() ? grads[0].to(at::kBFloat16).contiguous() : at::zeros_like(out);
    at::Tensor dlse = grads[1].defined() ? grads[1].to(at::kFloat).contiguous() : at::Tensor();
    InvertedIndex index;
    c10::intrusive_ptr<IndexReady> ready;
    const bool has_index = ctx->saved_data["has_index"].toBool();
    if (has_index) {
      index = load_index(ctx);
      ready = c10::static_intrusive_pointer_cast<IndexReady>(ctx->saved_data["index.ready"].toCapsule());
    }
    Gradients g = backward_kernels(q, k, v, block_ids, out, lse, dout, dlse, shape,
                                   ctx->saved_data["deterministic"].toBool(),
                                   KvGradWork{has_index, &index, ready ? &ready->done : nullptr});
    variable_list grads_in{g.dq, g.dk, g.dv};
    grads_in.resize(11);  // block_ids and the scalar arguments have none
    return grads_in;
  }
};

}  // namespace

bool available() { return at::hasCUDA(); }

bool supports(const at::Tensor& q, const at::Tensor& k, int64_t top_k, int64_t block_size, bool any_float) {
  if (!q.is_cuda() || !k.is_cuda() || q.dim() != 4 || k.dim() != 4 || k.size(2) == 0) return false;
  // Selection (top_k > 0) takes the pooled keys in any float dtype (it splits them).
  const bool k_ok = at::isFloatingType(k.scalar_type()) && (any_float || top_k > 0 || k.scalar_type() == at::kBFloat16);
  const bool dtype_ok = k_ok && (any_float ? at::isFloatingType(q.scalar_type()) : q.scalar_type() == at::kBFloat16);
  return dtype_ok && head_dim_supported(q.size(3)) && q.size(2) % k.size(2) == 0 &&
         q.size(2) / k.size(2) <= kMaxGroup && block_size > 0 && block_size % kKeyTile == 0 && top_k <= kMaxTopK;
}

AttentionResult sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& block_ids, const SparseOptions& options, QueryRows q_rows,
                                 int64_t k_start) {
  checked_shape("sparse_attention", q, k, v, block_ids, options, q_rows, k_start);
  const c10::cuda::CUDAGuard guard(q.device());
  // dk / dv will be asked for: build their index during the forward.
  const bool kv_grad = at::GradMode::is_enabled() && (k.requires_grad() || v.requires_grad());
  const variable_list r = SparseAttentionFunction::apply(
      q.contiguous(), k.contiguous(), v.contiguous(), block_ids.contiguous(), options.block_size, q_rows.start,
      q_rows.split, q_rows.late_start, k_start, options.deterministic, kv_grad);
  return {r[0], r[1]};
}

namespace {

// The backward of one part of a merged result from the merged out and lse: the
// kernels take the merged statistics as they take their own (P = exp2(s log2e -
// lse log2e) over this call's keys, delta = rowsum(dO * out)). into: add the
// gradients there instead of returning them.
Gradients merged_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, const at::Tensor& block_ids,
                          const SparseOptions& options, QueryRows q_rows, int64_t k_start,
                          const Accumulators* into, SideJoin* join = nullptr) {
  const Shape shape = checked_shape("sparse_attention_backward", q, k, v, block_ids, options, q_rows, k_start);
  const c10::cuda::CUDAGuard guard(q.device());
  at::NoGradGuard no_grad;
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), ids = block_ids.contiguous();
  const at::Tensor o = out.to(at::kBFloat16).contiguous();
  const at::Tensor l = lse.to(at::kFloat).contiguous();
  const at::Tensor d = dout.to(at::kBFloat16).contiguous();
  return backward_kernels(qc, kc, vc, ids, o, l, d, at::Tensor(), shape, options.deterministic,
                          KvGradWork{true, nullptr}, into, join);
}

}  // namespace

bool sparse_attention_backward_into(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                    const at::Tensor& block_ids, const SparseOptions& options, QueryRows q_rows,
                                    int64_t k_start, at::Tensor& dq_acc, at::Tensor& dk_acc, at::Tensor& dv_acc,
                                    SideJoin* join) {
  auto fits = [](const at::Tensor& acc, const at::Tensor& like) {
    return acc.scalar_type() == at::kFloat && acc.device() == like.device() && acc.sizes() == like.sizes() &&
           acc.stride(3) == 1 && acc.stride(2) == acc.size(3) && acc.stride(1) == acc.size(2) * acc.size(3);
  };
  if (options.deterministic || !fits(dq_acc, q) || !fits(dk_acc, k) || !fits(dv_acc, v)) return false;
  const Accumulators into{dq_acc, dk_acc, dv_acc};
  merged_backward(dout, q, k, v, out, lse, block_ids, options, q_rows, k_start, &into, join);
  return true;
}

AttentionGrads sparse_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                         const at::Tensor& block_ids, const SparseOptions& options, QueryRows q_rows,
                                         int64_t k_start) {
  const Gradients g = merged_backward(dout, q, k, v, out, lse, block_ids, options, q_rows, k_start, nullptr);
  return {g.dq, g.dk, g.dv};
}

}  // namespace ssa::kernels::cuda
#endif  // SSA_WITH_CUDA
