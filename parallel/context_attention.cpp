#include "parallel/context_attention.h"

#include <ATen/core/grad_mode.h>

#include <torch/csrc/autograd/custom_function.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <stdexcept>

#include "parallel/error_check.h"
#include "parallel/ring_attention.h"
#include "parallel/selected_exchange.h"
#include "parallel/zigzag.h"

namespace ssa::parallel {
namespace {

std::string shape(const at::Tensor& t) {
  return t.defined() ? fmt::format("[{}]", fmt::join(t.sizes(), ", ")) : std::string("undefined");
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t seq_len, int64_t cp,
                  const kernels::SparseOptions& options, StreamRequest request) {
  if (!request.full && !request.sparse) {
    throw std::invalid_argument("parallel::attention_streams: the request asks for neither stream (full or sparse)");
  }
  if (!q.defined() || !k.defined() || !v.defined() || q.dim() != 4 || k.dim() != 4 || v.dim() != 4 ||
      k.sizes() != v.sizes() || q.size(0) != k.size(0) || q.size(1) != k.size(1) || q.size(3) != k.size(3) ||
      k.size(2) == 0 || q.size(2) % k.size(2) != 0) {
    throw std::invalid_argument(fmt::format(
        "parallel::attention_streams: need q [B, S_local, Hq, D] and k, v [B, S_local, Hkv, D] with Hq % Hkv == 0, "
        "got q {}, k {}, v {}",
        shape(q), shape(k), shape(v)));
  }
  if (seq_len <= 0 || seq_len % (2 * cp) != 0 || q.size(1) * cp != seq_len) {
    throw std::invalid_argument(fmt::format(
        "parallel::attention_streams: seq_len {} over cp = {} ranks: seq_len must be divisible by 2 * cp and each "
        "rank must hold seq_len / cp = {} rows, got S_local = {}",
        seq_len, cp, cp > 0 ? seq_len / cp : 0, q.size(1)));
  }
  if (request.sparse && cp > 1 && (seq_len / (2 * cp)) % options.block_size != 0) {
    throw std::invalid_argument(fmt::format(
        "parallel::attention_streams: the zigzag chunk of {} tokens (seq_len {} / (2 * cp {})) must be a multiple of "
        "attention.block_size {}",
        seq_len / (2 * cp), seq_len, cp, options.block_size));
  }
}

// Selection over the global blocks: block means of every rank's chunks are
// all-gathered (fp32, no gradient) and each local q chunk picks its top-k among
// the blocks up to its own. Fills setup.block_ids and setup.needed; returns the
// bytes this rank sent.
int64_t select_global_blocks(RingSetup& setup, const at::Tensor& q, const at::Tensor& k) {
  at::NoGradGuard no_grad;
  const ZigzagLayout& z = setup.layout;
  const int64_t c = z.chunk, bs = setup.options.block_size, nbc = c / bs;
  // pooled_local [2, B, nbc, Hkv, D]: my slots 0 and 1.
  const at::Tensor kd = k.detach();
  const at::Tensor pooled_local =
      at::stack({kernels::pool_keys(kd.narrow(1, 0, c), bs), kernels::pool_keys(kd.narrow(1, c, c), bs)}).contiguous();
  setup.comm->ensure_device(q.device());
  const at::Tensor gathered = setup.comm->all_gather(pooled_local);  // [2cp, B, nbc, Hkv, D], entry owner*2 + slot
  // [2cp, B, nbc, Hkv, D] in global chunk order -> [B, 2cp * nbc, Hkv, D]. Slices
  // rather than an index tensor: a host-built index would be a synchronising copy.
  std::vector<at::Tensor> in_order;
  for (int64_t g = 0; g < z.chunks(); ++g) in_order.push_back(gathered[z.owner(g) * 2 + z.slot(g)]);
  const at::Tensor by_chunk = at::stack(in_order);
  const at::Tensor pooled = by_chunk.permute({1, 0, 2, 3, 4}).reshape(
      {by_chunk.size(1), z.chunks() * nbc, by_chunk.size(3), by_chunk.size(4)});
  select_local_blocks(setup, q, pooled);
  std::vector<at::Tensor> chunk_of_block;
  for (const at::Tensor& ids : setup.block_ids) {
    // Chunk of every selected block, -1 slots to an extra bin.
    const at::Tensor ids64 = ids.to(at::kLong);
    chunk_of_block.push_back(at::where(ids64 >= 0, ids64.div(nbc, "floor"), at::full_like(ids64, z.chunks())).reshape({-1}));
  }
  // needed [2, 2cp]: one small copy to the host per layer.
  std::vector<at::Tensor> counts;
  for (const auto& t : chunk_of_block) counts.push_back(at::bincount(t, {}, z.chunks() + 1).narrow(0, 0, z.chunks()));
  const at::Tensor needed = (at::stack(counts) > 0).to(at::kByte).to(at::kCPU).contiguous();
  setup.needed.assign(needed.data_ptr<uint8_t>(), needed.data_ptr<uint8_t>() + needed.numel());
  return pooled_local.numel() * pooled_local.element_size() * (z.cp - 1);
}

// Sparse stream alone: gather every rank's block bitmask, plan the selected-block
// exchange, and pick the transport. Returns the bytes this rank sent for the masks.
int64_t choose_sparse_transport(RingSetup& setup, const at::Tensor& k, SparseTransportChoice choice,
                                bool with_backward) {
  if (choice == SparseTransportChoice::kRing) {
    setup.transport = SparseTransport::kRing;
    return 0;
  }
  at::NoGradGuard no_grad;
  const ZigzagLayout& z = setup.layout;
  const int64_t nb = z.chunks() * (z.chunk / setup.options.block_size);
  at::Tensor mask = at::zeros({nb}, k.options().dtype(at::kByte));
  for (const auto& ids : setup.block_ids) {
    const at::Tensor flat = ids.reshape({-1}).to(at::kLong);
    mask.index_fill_(0, flat.masked_select(flat >= 0), 1);
  }
  const at::Tensor masks = setup.comm->all_gather(mask).view({z.cp, nb});
  SelectedPlan plan = plan_selected(masks, z, setup.options.block_size, k.device());
  const bool selected = choice == SparseTransportChoice::kSelectedBlocks ||
                        selected_blocks_win(plan, k.element_size(), with_backward);
  if (selected) {
    setup.transport = SparseTransport::kSelectedBlocks;
    for (size_t a = 0; a < 2; ++a) setup.compact_block_ids[a] = compact_block_ids(plan, setup.block_ids[a]);
    setup.plan = std::move(plan);
  } else {
    setup.transport = SparseTransport::kRing;
    setup.plan = std::move(plan);  // kept for its byte figures
  }
  return nb * (z.cp - 1);
}

// One rank replaying a memo: the kept outputs, with the backward of each stream
// from its output and log-sum-exp (as the fused kernels' own backward does).
struct OneRankReplay : torch::CustomClassHolder {
  kernels::SparseOptions options;
  StreamRequest request;
  at::Tensor lse_full, lse_sparse, block_ids;
  at::Tensor out_full, out_sparse;  // handed to the forward, which returns them
};

class OneRankReplayFunction : public torch::autograd::Function<OneRankReplayFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v,
                                                c10::intrusive_ptr<OneRankReplay> state) {
    torch::autograd::variable_list outs;
    if (state->request.full) outs.push_back(std::move(state->out_full));
    if (state->request.sparse) outs.push_back(std::move(state->out_sparse));
    // The outputs are saved as outputs (no reference cycle through the node).
    torch::autograd::variable_list saved{q, k, v};
    saved.insert(saved.end(), outs.begin(), outs.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["state"] = c10::IValue::make_capsule(std::move(state));
    return outs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto state = c10::static_intrusive_pointer_cast<OneRankReplay>(ctx->saved_data["state"].toCapsule());
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2];
    size_t next = 0;
    at::Tensor dq, dk, dv;
    auto add = [&](const kernels::AttentionGrads& g) {
      dq = dq.defined() ? dq + g.dq : g.dq;
      dk = dk.defined() ? dk + g.dk : g.dk;
      dv = dv.defined() ? dv + g.dv : g.dv;
    };
    if (state->request.full) {
      const at::Tensor& g = grads.at(next);
      const at::Tensor& out = saved.at(3 + next++);
      if (g.defined()) add(kernels::full_attention_backward(g, q, k, v, out, state->lse_full));
    }
    if (state->request.sparse) {
      const at::Tensor& g = grads.at(next);
      const at::Tensor& out = saved.at(3 + next++);
      if (g.defined()) {
        add(kernels::sparse_attention_backward(g, q, k, v, out, state->lse_sparse, state->block_ids, state->options));
      }
    }
    if (!dq.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), at::Tensor()};
  }
};

void check_replay(const AttentionMemo& memo, const at::Tensor& q, int64_t cp) {
  if (memo.rows != q.size(1) || (cp > 1) != static_cast<bool>(memo.setup)) {
    throw std::invalid_argument(fmt::format(
        "parallel::attention_streams: the memo was filled by a call on {} rows {}; this call has {} rows and cp = {}",
        memo.rows, memo.setup ? "with cp > 1" : "on one rank", q.size(1), cp));
  }
}

}  // namespace

std::shared_ptr<AttentionMemo> make_attention_memo() { return std::make_shared<AttentionMemo>(); }

const char* sparse_transport_name(SparseTransport transport) {
  switch (transport) {
    case SparseTransport::kNone: return "none";
    case SparseTransport::kRing: return "ring";
    case SparseTransport::kSelectedBlocks: return "selected_blocks";
  }
  return "?";
}

at::Tensor zigzag_slice(const at::Tensor& whole, int64_t dim, int64_t cp, int64_t cp_rank) {
  if (cp < 1 || cp_rank < 0 || cp_rank >= cp || whole.size(dim) % (2 * cp) != 0) {
    throw std::invalid_argument(fmt::format(
        "parallel::zigzag_slice: length {} along dim {} must divide into 2 * cp = {} chunks, and cp_rank {} be in "
        "[0, {})",
        whole.size(dim), dim, 2 * cp, cp_rank, cp));
  }
  const int64_t c = whole.size(dim) / (2 * cp);
  return at::cat({whole.narrow(dim, cp_rank * c, c), whole.narrow(dim, (2 * cp - 1 - cp_rank) * c, c)}, dim);
}

AttentionStreams attention_streams(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t seq_len,
                                   const kernels::SparseOptions& options, StreamRequest request,
                                   Communicator* cp_group, const ContextOptions& context, AttentionMemo* memo) {
  const int64_t cp = cp_group ? cp_group->size() : 1;
  if (cp == 1 && seq_len == 0 && q.defined() && q.dim() == 4) seq_len = q.size(1);  // one rank: the whole sequence
  check_inputs(q, k, v, seq_len, cp, options, request);
  AttentionStreams result;
  const bool replay = memo != nullptr && memo->filled;
  const bool record = memo != nullptr && !replay && !at::GradMode::is_enabled();
  if (replay) check_replay(*memo, q, cp);

  if (cp == 1) {
    if (replay) {
      auto state = c10::make_intrusive<OneRankReplay>();
      state->options = options;
      state->request = request;
      state->lse_full = memo->full.lse;
      state->lse_sparse = memo->sparse.lse;
      state->block_ids = memo->block_ids;
      state->out_full = memo->full.out;
      state->out_sparse = memo->sparse.out;
      result.block_ids = memo->block_ids;
      *memo = AttentionMemo();
      const bool needs_graph =
          at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
      if (!needs_graph) {
        result.full = state->out_full;
        result.sparse = state->out_sparse;
        return result;
      }
      const auto outs = OneRankReplayFunction::apply(q, k, v, state);
      size_t next = 0;
      if (request.full) result.full = outs.at(next++);
      if (request.sparse) result.sparse = outs.at(next++);
      return result;
    }
    kernels::AttentionResult full, sparse;
    if (request.full) full = kernels::full_attention(q, k, v);
    if (request.sparse) {
      {
        at::NoGradGuard no_grad;  // the router has no gradient
        const at::Tensor pooled = kernels::pool_keys(k.detach(), options.block_size);
        result.block_ids = kernels::select_blocks(q.detach(), pooled, options, 0);
      }
      sparse = kernels::sparse_attention(q, k, v, result.block_ids, options);
    }
    result.full = full.out;
    result.sparse = sparse.out;
    if (record) {
      memo->filled = true;
      memo->rows = q.size(1);
      memo->block_ids = result.block_ids;
      memo->full = full;
      memo->sparse = sparse;
    }
    return result;
  }

  if (replay) {
    const c10::intrusive_ptr<RingSetup> setup = memo->setup;
    ContextOutputs given = std::move(memo->outputs);
    *memo = AttentionMemo();
    int64_t ring_bytes = 0, selected_bytes = 0;
    const auto outs = context_attention_autograd(setup, q, k, v, &ring_bytes, &selected_bytes, &given);
    if (request.sparse) result.block_ids = setup->local_block_ids;
    result.full = outs[0];
    result.sparse = outs[1];
    result.sparse_transport = request.sparse ? setup->transport : SparseTransport::kNone;
    return result;
  }

  auto setup = c10::make_intrusive<RingSetup>();
  setup->comm = cp_group;
  setup->layout = ZigzagLayout{cp, cp_group->rank(), seq_len / (2 * cp)};
  setup->options = options;
  setup->request = request;
  cp_group->ensure_device(q.device());  // NCCL set up by every cp rank before any transfer
  int64_t sparse_extra = 0;
  if (request.sparse) {
    if (request.full) {
      // Rides along with the full stream's rotation, which also brings every
      // chunk's keys: selection happens there, from the assembled K/V.
      setup->transport = SparseTransport::kRing;
      setup->select_on_ring = true;
    } else {
      sparse_extra += select_global_blocks(*setup, q, k);
      const bool with_backward =
          at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
      sparse_extra += choose_sparse_transport(*setup, k, context.sparse_transport, with_backward);
    }
  }
  int64_t ring_bytes = 0, selected_bytes = 0;
  std::array<at::Tensor, 2> outs;
  if (record) {
    ContextOutputs o = context_forward(*setup, q, k, v);
    ring_bytes = o.ring_bytes;
    selected_bytes = o.selected_bytes;
    outs = {o.out_full, o.out_sparse};
    memo->filled = true;
    memo->rows = q.size(1);
    memo->setup = setup;
    memo->outputs = std::move(o);
  } else {
    outs = context_attention_autograd(setup, q, k, v, &ring_bytes, &selected_bytes);
  }
  if (request.sparse) result.block_ids = setup->local_block_ids;
  result.full = outs[0];
  result.sparse = outs[1];
  result.sparse_transport = request.sparse ? setup->transport : SparseTransport::kNone;
  // The ring's bytes per rank, whether or not it ran: (cp - 1) hops of my K and V.
  const int64_t ring_per_rank = (cp - 1) * 2 * k.numel() * k.element_size();
  if (request.full) {
    result.bytes_full = ring_bytes;
    result.bytes_sparse = sparse_extra;
  } else {
    result.bytes_sparse = sparse_extra + ring_bytes + selected_bytes;
  }
  if (request.sparse) {
    result.bytes_sparse_ring = ring_per_rank;
    if (setup->plan) {
      result.bytes_sparse_selected = setup->plan->my_selected_rows * k.size(0) * k.size(2) * k.size(3) *
                                     k.element_size() * 2;
    }
  }
  return result;
}

}  // namespace ssa::parallel
