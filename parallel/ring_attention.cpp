#include "parallel/ring_attention.h"

#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>

#include <torch/csrc/autograd/custom_function.h>

#include <fmt/format.h>

#include "kernels/side_stream.h"
#include "parallel/error_check.h"
#include "parallel/partial_attention.h"

namespace ssa::parallel {
namespace {

// MPI tags of the transfers that can be in flight together between two ranks.
constexpr int kTagKv = 1;
constexpr int kTagDkv = 2;

int64_t nbytes(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

// Sends a and b to the right neighbour and receives a pair shaped like them from
// the left one into *in_a, *in_b.
P2PBatch pass_pair(Communicator& comm, int left, int right, const at::Tensor& a, const at::Tensor& b, at::Tensor* in_a,
                   at::Tensor* in_b, int tag, const char* op) {
  *in_a = at::empty_like(a);
  *in_b = at::empty_like(b);
  return comm.start_p2p({P2POp::send(a, right, tag), P2POp::send(b, right, tag), P2POp::recv(*in_a, left, tag),
                         P2POp::recv(*in_b, left, tag)},
                        op);
}

const at::Tensor& block_ids_of(const RingSetup& s, const WorkItem& w) {
  if (w.slot < 0) return s.local_block_ids;
  return w.compact ? s.compact_block_ids[static_cast<size_t>(w.slot)] : s.block_ids[static_cast<size_t>(w.slot)];
}

// One item's call on its rows of q and of the K/V buffer.
kernels::AttentionResult attend_rows(const RingSetup& s, const WorkItem& w, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v) {
  const at::Tensor qq = q.narrow(1, w.q_row, w.q_len);
  const at::Tensor kk = k.narrow(1, w.kv_row, w.kv_len), vv = v.narrow(1, w.kv_row, w.kv_len);
  if (!w.sparse) return kernels::full_attention(qq, kk, vv, w.q_pos.start, w.k_pos);
  return kernels::sparse_attention(qq, kk, vv, block_ids_of(s, w), s.options, w.q_pos, w.k_pos);
}

WorkItem local_causal_item(const RingSetup& setup) {
  // My chunks in local order [r; 2cp-1-r] with positions 0..2c-1: every row of
  // the early chunk precedes every row of the late one, so the causal mask in
  // local positions is exactly the global one (each chunk causal on itself, the
  // late chunk sees all of the early one), in one causal call.
  const int64_t rows = 2 * setup.layout.chunk;
  return {false, 0, rows, 0, rows, 0, 0, 0, false};
}

}  // namespace

bool full_on_prefix(const RingSetup& setup) {
  return setup.request.full && setup.request.sparse && setup.transport == SparseTransport::kRing;
}

std::vector<WorkItem> diagonal_work(const RingSetup& setup) { return {local_causal_item(setup)}; }

std::vector<WorkItem> prefix_work(const RingSetup& setup) {
  const ZigzagLayout& z = setup.layout;
  const int64_t c = z.chunk, r = z.rank;
  std::vector<WorkItem> items;
  // Both my chunks see every chunk before my early one, r, unmasked...
  if (r > 0) items.push_back({false, 0, 2 * c, 0, r * c, r * c, 0, 0, false});
  // ...and my late chunk, 2cp-1-r, also sees the chunks between the two. Each
  // rank gets at most two calls with the same number of visible keys.
  const int64_t between = (z.chunks() - 2 - 2 * r) * c;
  if (between > 0) items.push_back({false, c, c, (r + 1) * c, between, between, 0, 1, false});
  return items;
}

std::vector<WorkItem> assembled_sparse_work(const RingSetup& setup) {
  const ZigzagLayout& z = setup.layout;
  const int64_t keys = (z.global_chunk(1) + 1) * z.chunk;  // causal: chunks up to my late one
  return {{true, 0, 2 * z.chunk, 0, keys, setup.local_rows(), 0, -1, false}};
}

void select_local_blocks(RingSetup& setup, const at::Tensor& q, const at::Tensor& pooled) {
  at::NoGradGuard no_grad;  // the router has no gradient
  const ZigzagLayout& z = setup.layout;
  const int64_t blocks = (z.global_chunk(1) + 1) * (z.chunk / setup.options.block_size);
  const at::Tensor ids =
      kernels::select_blocks(q.detach(), pooled.narrow(1, 0, blocks), setup.options, setup.local_rows());
  setup.local_block_ids = ids;
  for (int64_t a = 0; a < 2; ++a) setup.block_ids[static_cast<size_t>(a)] = ids.narrow(1, a * z.chunk, z.chunk);
}

std::vector<WorkItem> ring_work(const RingSetup& setup, int64_t src) {
  const ZigzagLayout& z = setup.layout;
  const int64_t c = z.chunk, r = z.rank;
  std::vector<WorkItem> items;
  if (setup.request.full) {
    // Chunk positions decide visibility: src's chunks are src (early) and
    // 2cp-1-src (late); mine are r and 2cp-1-r. Fully visible pairs are merged
    // into one call and given positions that make every key visible (the kernel
    // then runs its unmasked path); my own two chunks are one causal call in
    // local positions (local_causal_item).
    if (src == r) {
      items.push_back(local_causal_item(setup));  // my chunks on themselves
    } else if (src < r) {
      items.push_back({false, 0, 2 * c, 0, c, c, 0, 0, false});  // both my chunks see chunk src, not 2cp-1-src
    } else {
      items.push_back({false, c, c, 0, 2 * c, 2 * c, 0, 1, false});  // my late chunk sees both; my early none
    }
  }
  return items;
}

std::vector<WorkItem> selected_work(const RingSetup& setup, int64_t compact_rows) {
  const ZigzagLayout& z = setup.layout;
  const int64_t c = z.chunk;
  std::vector<WorkItem> items;
  for (int64_t a = 0; a < 2; ++a) {
    bool remote = false;
    for (int64_t g = 0; g < z.chunks(); ++g) {
      if (!setup.chunk_needed(a, g)) continue;
      if (z.owner(g) == z.rank) {
        items.push_back({true, a * c, c, z.slot(g) * c, c, z.position(a), g * c, a, false});
      } else {
        remote = true;
      }
    }
    // The compact blocks all precede the query (selection is causal and only
    // the query's own block, always local, needs the diagonal mask), so they get
    // positions [0, compact_rows) and the queries position compact_rows.
    if (remote && compact_rows > 0) items.push_back({true, a * c, c, 0, compact_rows, compact_rows, 0, a, true});
  }
  return items;
}

ContextOutputs context_forward(RingSetup& setup, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  RECORD_USER_SCOPE("ssa::ring_forward");
  const ZigzagLayout& z = setup.layout;
  const int64_t b = q.size(0), rows = q.size(1), hq = q.size(2), d = q.size(3);
  const auto acc = q.options().dtype(accumulation_type(q.scalar_type()));
  // With the sparse stream on the ring, the whole sequence's K/V is assembled
  // anyway: the full stream then computes my chunks on themselves (one causal
  // call, diagonal_work) while the K/V travel, and after the ring at most two
  // unmasked calls on earlier chunks (prefix_work): fewer, larger calls, merged
  // once.
  const bool prefix_full = full_on_prefix(setup);
  std::optional<PartialSum> full, sparse;
  std::vector<kernels::RowPartial> full_parts;  // prefix_full: merged once, at the end
  if (setup.request.full && !prefix_full) full.emplace(b, rows, hq, d, acc);
  // Merged per part only with the selected-block transport (the ring's sparse
  // stream runs once over the assembled K/V).
  if (setup.request.sparse && setup.transport == SparseTransport::kSelectedBlocks) {
    sparse.emplace(b, rows, hq, d, acc);
  }
  ContextOutputs out;
  if (setup.transport == SparseTransport::kSelectedBlocks) {
    auto [kc, vc] = fetch_selected(*setup.comm, *setup.plan, k, v);
    out.selected_bytes = setup.plan->my_selected_rows * b * k.size(2) * k.size(3) * k.element_size() * 2;
    for (const WorkItem& w : selected_work(setup, kc.size(1))) {
      const at::Tensor& kk = w.compact ? kc : k;
      const at::Tensor& vv = w.compact ? vc : v;
      sparse->add(w.q_row, attend_rows(setup, w, q, kk, vv));
    }
    out.compact_k = kc;
    out.compact_v = vc;
  } else {
    const int left = static_cast<int>((z.rank - 1 + z.cp) % z.cp), right = static_cast<int>((z.rank + 1) % z.cp);
    at::Tensor cur_k = k.contiguous(), cur_v = v.contiguous();
    // The sparse stream reads the whole sequence's K/V, assembled from the chunks
    // as they pass (small: Hkv heads), in one call per local q chunk afterwards.
    const bool gather = setup.request.sparse;
    if (gather) {
      out.k_all = at::empty({b, z.chunks() * z.chunk, k.size(2), d}, k.options());
      out.v_all = at::empty_like(out.k_all);
    }
    // One sequence per call (the long-context case): the chunks travel straight
    // between their places in the assembled K/V (contiguous there), no copies.
    const bool in_place = gather && b == 1;
    // With the full stream on the prefix: its prefix calls go on full_side, the
    // sparse stream on sparse_side, both beside my diagonal call (which needs no
    // remote K/V) and each other, so each fills the others' tails. full_side
    // opens before the diagonal call and waits for the last K/V transfer itself
    // (in place only: otherwise the K/V are copied on this stream after each hop).
    kernels::SideStream full_side(kernels::SideRole::kRingFull), sparse_side(kernels::SideRole::kRingSparse);
    P2PBatch last;  // the last K/V transfer, when full_side waits for it
    // The sparse stream on the assembled K/V: the selection (when made here),
    // then both local chunks in one call (one item).
    auto sparse_on_assembled = [&] {
      if (setup.select_on_ring) select_local_blocks(setup, q, kernels::pool_keys(out.k_all, setup.options.block_size));
      for (const WorkItem& w : assembled_sparse_work(setup)) {
        const kernels::AttentionResult r = attend_rows(setup, w, q, out.k_all, out.v_all);
        out.out_sparse = r.out.to(q.scalar_type());
        out.lse_sparse = r.lse.to(acc.dtype());
      }
    };
    auto chunk_of = [&](const at::Tensor& all, int64_t src, int64_t slot) {
      return all.narrow(1, z.global_chunk(src, slot) * z.chunk, z.chunk);
    };
    for (int64_t step = 0; step < z.cp; ++step) {
      const int64_t src = (z.rank - step + z.cp) % z.cp;
      if (gather && (step == 0 || !in_place)) {
        for (int64_t slot = 0; slot < 2; ++slot) {
          chunk_of(out.k_all, src, slot).copy_(cur_k.narrow(1, slot * z.chunk, z.chunk));
          chunk_of(out.v_all, src, slot).copy_(cur_v.narrow(1, slot * z.chunk, z.chunk));
        }
      }
      // Post the next chunk's transfer before computing on the current one.
      P2PBatch next;
      at::Tensor next_k, next_v;
      if (step + 1 < z.cp) {
        out.ring_bytes += nbytes(cur_k) + nbytes(cur_v);
        if (in_place) {
          const int64_t from = (src - 1 + z.cp) % z.cp;  // what my left neighbour holds now
          std::vector<P2POp> ops;
          for (const at::Tensor* all : {&out.k_all, &out.v_all}) {
            for (int64_t slot = 0; slot < 2; ++slot) {
              ops.push_back(P2POp::send(chunk_of(*all, src, slot), right, kTagKv));
              ops.push_back(P2POp::recv(chunk_of(*all, from, slot), left, kTagKv));
            }
          }
          next = setup.comm->start_p2p(std::move(ops), "ring_kv");
        } else {
          next = pass_pair(*setup.comm, left, right, cur_k, cur_v, &next_k, &next_v, kTagKv, "ring_kv");
        }
      }
      if (prefix_full) {
        if (step == 0) {  // my chunks on themselves, while the K/V travel
          if (in_place) full_side.open(q.device());
          for (const WorkItem& w : diagonal_work(setup)) full_parts.push_back({w.q_row, attend_rows(setup, w, q, k, v)});
        }
      } else {
        for (const WorkItem& w : ring_work(setup, src)) {  // full-stream items only
          full->add(w.q_row, attend_rows(setup, w, q, cur_k, cur_v));
        }
      }
      if (full_side.is_open() && step + 2 == z.cp) {
        last = std::move(next);
      } else {
        next.wait();
      }
      if (next_k.defined()) {
        cur_k = next_k;
        cur_v = next_v;
      }
    }
    if (prefix_full) {
      std::vector<kernels::RowPartial> prefix_parts;
      full_side.run([&] {  // inline when not open
        last.wait();
        // Opened from here: after the K/V have arrived.
        sparse_side.open(q.device());
        sparse_side.run(sparse_on_assembled);
        for (const WorkItem& w : prefix_work(setup)) {
          prefix_parts.push_back({w.q_row, attend_rows(setup, w, q, out.k_all, out.v_all)});
        }
      });
      for (kernels::RowPartial& p : prefix_parts) {
        full_side.keep(p.part.out);
        full_side.keep(p.part.lse);
        full_parts.push_back(std::move(p));
      }
      full_side.join();
      // One pass from the parts to the output dtype (no fp32 accumulator).
      kernels::AttentionResult merged = kernels::merge_row_partials(rows, full_parts, q.scalar_type());
      full_parts.clear();
      out.out_full = merged.out;
      out.lse_full = merged.lse.to(acc.dtype());
    }
    if (sparse_side.is_open()) {
      sparse_side.keep(out.out_sparse);
      sparse_side.keep(out.lse_sparse);
      sparse_side.keep(setup.local_block_ids);
      sparse_side.join();
    } else if (gather && !prefix_full) {
      sparse_on_assembled();
    }
  }
  if (full) {
    out.out_full = full->out().to(q.scalar_type());
    out.lse_full = full->lse();
  }
  if (sparse) {  // selected-block transport
    out.out_sparse = sparse->out().to(q.scalar_type());
    out.lse_sparse = sparse->lse();
  }
  return out;
}

ContextGrads context_backward(const RingSetup& setup, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const ContextOutputs& outputs, const at::Tensor& grad_full, const at::Tensor& grad_sparse) {
  RECORD_USER_SCOPE("ssa::ring_backward");
  const ZigzagLayout& z = setup.layout;
  const auto acc = q.options().dtype(accumulation_type(q.scalar_type()));
  // dq: the sparse kernels add into the fp32 sum in place; the fused full-stream
  // calls' dq (q's dtype) wait as terms and join it in one pass at the end.
  at::Tensor dq = at::zeros(q.sizes(), acc);
  std::vector<kernels::RowTerm> dq_terms;
  auto add_dq_term = [&](int64_t row, const at::Tensor& value) {
    dq_terms.push_back({row, value});
    if (dq_terms.size() < 4) return;  // a long ring (no kept K/V): fold them in, bounding what stays alive
    dq = kernels::add_row_terms(dq, dq_terms, dq.scalar_type());
    dq_terms.clear();
  };
  at::Tensor dk, dv;  // the selected-block transport's sums; the ring's are dkv ([2, ...]: dK, dV)
  at::Tensor dkv;
  // Gradients stay in their dtype (the fused and CUDA backwards take them so; the
  // formula paths convert per chunk).
  const at::Tensor g_full = grad_full.defined() ? grad_full.contiguous() : at::Tensor();
  const at::Tensor g_sparse = grad_sparse.defined() ? grad_sparse.contiguous() : at::Tensor();

  // A full-stream item's gradients (its dq joins the sum as a term), straight
  // from the merged output and lse; nullopt when that output got no gradient.
  auto full_grads = [&](const WorkItem& w, const at::Tensor& kk,
                        const at::Tensor& vv) -> std::optional<kernels::AttentionGrads> {
    if (!g_full.defined()) return std::nullopt;
    const at::Tensor gq = g_full.narrow(1, w.q_row, w.q_len), qq = q.narrow(1, w.q_row, w.q_len);
    const at::Tensor oq = outputs.out_full.narrow(1, w.q_row, w.q_len);
    const at::Tensor lq = outputs.lse_full.narrow(2, w.q_row, w.q_len);
    kernels::AttentionGrads pg =
        kernels::full_attention_backward(gq, qq, kk.narrow(1, w.kv_row, w.kv_len), vv.narrow(1, w.kv_row, w.kv_len),
                                         oq, lq, w.q_pos.start, w.k_pos);
    add_dq_term(w.q_row, pg.dq);
    return pg;
  };
  // Adds one item's gradients, straight from the merged output and lse (no
  // recomputed forward); the K/V gradients go into rows of dk_buf/dv_buf. Sparse
  // items given `join` leave their dK/dV side work for it to wait for.
  auto accumulate = [&](const WorkItem& w, const at::Tensor& kk, const at::Tensor& vv, at::Tensor& dk_buf,
                        at::Tensor& dv_buf, kernels::SideJoin* join = nullptr) {
    at::Tensor dk_rows = dk_buf.narrow(1, w.kv_row, w.kv_len), dv_rows = dv_buf.narrow(1, w.kv_row, w.kv_len);
    if (!w.sparse) {
      if (const std::optional<kernels::AttentionGrads> pg = full_grads(w, kk, vv)) {
        dk_rows.add_(pg->dk);
        dv_rows.add_(pg->dv);
      }
      return;
    }
    if (!g_sparse.defined()) return;  // that output received no gradient
    const at::Tensor gq = g_sparse.narrow(1, w.q_row, w.q_len), qq = q.narrow(1, w.q_row, w.q_len);
    const at::Tensor oq = outputs.out_sparse.narrow(1, w.q_row, w.q_len);
    const at::Tensor lq = outputs.lse_sparse.narrow(2, w.q_row, w.q_len);
    at::Tensor dq_rows = dq.narrow(1, w.q_row, w.q_len);
    // Added in place by the CUDA kernels.
    kernels::sparse_attention_backward_into(gq, qq, kk.narrow(1, w.kv_row, w.kv_len),
                                            vv.narrow(1, w.kv_row, w.kv_len), oq, lq, block_ids_of(setup, w),
                                            setup.options, w.q_pos, w.k_pos, dq_rows, dk_rows, dv_rows, join);
  };

  if (setup.transport == SparseTransport::kSelectedBlocks) {
    const at::Tensor& kc = outputs.compact_k;
    const at::Tensor& vc = outputs.compact_v;
    dk = at::zeros(k.sizes(), acc);
    dv = at::zeros(v.sizes(), acc);
    at::Tensor dkc = at::zeros(kc.sizes(), acc), dvc = at::zeros(vc.sizes(), acc);
    {
      // Several sparse calls per chunk: their kernels back to back, one join.
      kernels::SideJoin join;
      for (const WorkItem& w : selected_work(setup, kc.size(1))) {
        if (w.compact) {
          accumulate(w, kc, vc, dkc, dvc, &join);
        } else {
          accumulate(w, k, v, dk, dv, &join);
        }
      }
      join.join();
    }
    return_selected_grads(*setup.comm, *setup.plan, dkc, dvc, dk, dv);
  } else {
    // The fp32 dK/dV of each visited chunk travel the ring to their owner,
    // summing every rank's share on the way. Every rank runs every transfer,
    // with or without work or gradients.
    const int left = static_cast<int>((z.rank - 1 + z.cp) % z.cp), right = static_cast<int>((z.rank + 1) % z.cp);
    // With the K/V kept from the forward, everything that lands on other ranks'
    // chunks is computed first against the whole sequence's K/V (the sparse
    // stream, and the full stream's prefix calls), into dk_all/dv_all; the rows of
    // each rank's chunks then travel to their owner while I compute my diagonal
    // items, which touch only my own chunks.
    const bool kept = outputs.k_all.defined();
    const bool prefix_full = full_on_prefix(setup);
    // dK and dV sums live in one buffer [2, B, rows, Hkv, D] (acc dtype): dK,
    // then dV. Zeroing, cutting out a rank's rows, adding what arrives, sending
    // and converting each take one op for both.
    auto kv_zeros = [&](const at::Tensor& like) {
      std::vector<int64_t> shape{2};
      for (const int64_t s : like.sizes()) shape.push_back(s);
      return at::zeros(shape, acc);
    };
    at::Tensor dkv_all;  // the assembled sequence's rows
    if (kept) {  // everything that reads the assembled K/V (accumulate skips a stream without gradient)
      dkv_all = kv_zeros(outputs.k_all);
      at::Tensor dk_all = dkv_all[0], dv_all = dkv_all[1];
      // The sparse stream's dK/dV kernel (on its side stream) adds into these rows
      // while the prefix calls' fused backward already runs here; their dK/dV join
      // the rows after it.
      kernels::SideJoin sparse_join;
      for (const WorkItem& w : assembled_sparse_work(setup)) {
        accumulate(w, outputs.k_all, outputs.v_all, dk_all, dv_all, &sparse_join);
      }
      if (prefix_full) {
        std::vector<std::pair<WorkItem, kernels::AttentionGrads>> prefix_grads;
        for (const WorkItem& w : prefix_work(setup)) {
          if (std::optional<kernels::AttentionGrads> pg = full_grads(w, outputs.k_all, outputs.v_all)) {
            prefix_grads.emplace_back(w, std::move(*pg));
          }
        }
        sparse_join.join();
        for (const auto& [w, pg] : prefix_grads) {
          dk_all.narrow(1, w.kv_row, w.kv_len).add_(pg.dk);
          dv_all.narrow(1, w.kv_row, w.kv_len).add_(pg.dv);
        }
      }
    }
    P2PBatch dkv_batch;
    at::Tensor in_dkv;
    // One hop of an accumulator [2, B, rows, Hkv, D]: adds what the ranks before
    // me sent for it (from the second hop on) and passes it to the right,
    // receiving the next one.
    auto pass_on = [&](int64_t step, at::Tensor& acc_dkv) {
      if (step > 0) {
        dkv_batch.wait();
        acc_dkv.add_(in_dkv);
      }
      in_dkv = at::empty_like(acc_dkv);
      dkv_batch = setup.comm->start_p2p(
          {P2POp::send(acc_dkv, right, kTagDkv), P2POp::recv(in_dkv, left, kTagDkv)}, "ring_dkv");
    };
    if (kept) {
      // No rotation: step s passes on the sums for rank r-1-s's chunks. They
      // arrive from the left (where they were at step s-1) and leave to the right,
      // so they reach their owner at step cp-1; each gradient makes cp-1 hops, and
      // my diagonal items run while the first hop travels. (K/V are kept only for
      // the sparse stream; the full stream then is all prefix and diagonal work.)
      const int64_t c = z.chunk, bsz = outputs.k_all.size(0);
      // Rank src's two chunks of dkv_all as a view [2, B, 2, c, Hkv, D] (no copy):
      // dim 2 steps from the early chunk to the late one.
      auto chunks_of = [&](int64_t src) {
        const int64_t g0 = z.global_chunk(src, 0), g1 = z.global_chunk(src, 1), row = dkv_all.stride(2);
        return dkv_all.as_strided({2, bsz, 2, c, dkv_all.size(3), dkv_all.size(4)},
                                  {dkv_all.stride(0), dkv_all.stride(1), (g1 - g0) * c * row, row, dkv_all.stride(3),
                                   dkv_all.stride(4)},
                                  dkv_all.storage_offset() + g0 * c * row);
      };
      auto as_chunks = [&](const at::Tensor& rows) {  // [2, B, 2c, Hkv, D] -> [2, B, 2, c, Hkv, D]
        return rows.view({2, bsz, 2, c, rows.size(3), rows.size(4)});
      };
      // Sends and receives go by contiguous pieces (one per dK/dV, sequence, chunk).
      auto piece_ops = [&](const at::Tensor& six, bool send, std::vector<P2POp>& ops) {
        for (int64_t j = 0; j < 2; ++j) {
          for (int64_t i = 0; i < bsz; ++i) {
            for (int64_t slot = 0; slot < 2; ++slot) {
              const at::Tensor piece = six[j][i][slot];
              ops.push_back(send ? P2POp::send(piece, right, kTagDkv) : P2POp::recv(piece, left, kTagDkv));
            }
          }
        }
      };
      auto hop = [&](int64_t step, int64_t src) {
        at::Tensor sums = chunks_of(src);  // my share of src's chunks
        if (step > 0) {  // plus what the ranks before me sent for them
          dkv_batch.wait();
          sums = as_chunks(in_dkv).add_(sums);
        }
        in_dkv = at::empty({2, bsz, 2 * c, dkv_all.size(3), dkv_all.size(4)}, dkv_all.options());
        std::vector<P2POp> ops;
        piece_ops(sums, true, ops);
        piece_ops(as_chunks(in_dkv), false, ops);
        dkv_batch = setup.comm->start_p2p(std::move(ops), "ring_dkv");
      };
      const at::Tensor own = chunks_of(z.rank);
      // My own chunks on themselves (full stream; nothing without its gradient),
      // in local row order [early; late].
      auto diagonal = [&] {
        for (const WorkItem& w : diagonal_work(setup)) {
          const std::optional<kernels::AttentionGrads> pg = full_grads(w, k, v);
          if (!pg) continue;
          own[0].add_(pg->dk.view({bsz, 2, c, pg->dk.size(2), pg->dk.size(3)}));
          own[1].add_(pg->dv.view({bsz, 2, c, pg->dv.size(2), pg->dv.size(3)}));
        }
      };
      for (int64_t step = 0; step + 1 < z.cp; ++step) {
        hop(step, ((z.rank - 1 - step) % z.cp + z.cp) % z.cp);
        if (step == 0) diagonal();
      }
      if (z.cp == 1) diagonal();
      dkv_batch.wait();  // the sums of every other rank's share of my chunks
      // My chunks' total, in local row order, converted once.
      const bool one_type = k.scalar_type() == v.scalar_type();
      const at::Tensor total = at::empty({2, bsz, 2 * c, dkv_all.size(3), dkv_all.size(4)},
                                         one_type ? k.options() : dkv_all.options());
      at::Tensor total_chunks = as_chunks(total);
      if (in_dkv.defined()) {
        at::add_out(total_chunks, own, as_chunks(in_dkv));
      } else {
        total_chunks.copy_(own);
      }
      dkv = total;
    } else {
      // The K/V rotate again as in the forward, starting from my own; the fp32
      // dK/dV of the chunk being visited travel one hop behind them, so each
      // owner gets its sum after cp hops.
      at::Tensor cur_k = k.contiguous(), cur_v = v.contiguous();
      for (int64_t step = 0; step < z.cp; ++step) {
        const int64_t src = (z.rank - step + z.cp) % z.cp;
        P2PBatch next;
        at::Tensor next_k, next_v;
        if (step + 1 < z.cp) {
          next = pass_pair(*setup.comm, left, right, cur_k, cur_v, &next_k, &next_v, kTagKv, "ring_kv");
        }
        at::Tensor acc_dkv = kv_zeros(cur_k);
        at::Tensor acc_dk = acc_dkv[0], acc_dv = acc_dkv[1];
        for (const WorkItem& w : ring_work(setup, src)) accumulate(w, cur_k, cur_v, acc_dk, acc_dv);
        pass_on(step, acc_dkv);
        next.wait();
        if (next_k.defined()) {
          cur_k = next_k;
          cur_v = next_v;
        }
      }
      dkv_batch.wait();  // after cp hops my own chunk's complete dK/dV arrived
      dkv = in_dkv;
    }
  }
  const at::Tensor dq_out = kernels::add_row_terms(dq, dq_terms, q.scalar_type());
  if (dkv.defined()) {
    if (k.scalar_type() == v.scalar_type()) {
      const at::Tensor both = dkv.to(k.scalar_type());
      return {dq_out, both[0], both[1]};
    }
    dk = dkv[0];
    dv = dkv[1];
  }
  return {dq_out, dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class ContextAttentionFunction : public torch::autograd::Function<ContextAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               c10::intrusive_ptr<RingSetup> setup, int64_t* ring_bytes, int64_t* selected_bytes,
                               ContextOutputs* given) {
    ContextOutputs o = given ? std::move(*given) : context_forward(*setup, q, k, v);
    if (given) o.ring_bytes = o.selected_bytes = 0;  // nothing moved this time
    *ring_bytes = o.ring_bytes;
    *selected_bytes = o.selected_bytes;
    ctx->save_for_backward(
        {q, k, v, o.out_full, o.lse_full, o.out_sparse, o.lse_sparse, o.compact_k, o.compact_v, o.k_all, o.v_all});
    ctx->saved_data["setup"] = c10::IValue::make_capsule(std::move(setup));
    variable_list outs;
    if (o.out_full.defined()) outs.push_back(o.out_full);
    if (o.out_sparse.defined()) outs.push_back(o.out_sparse);
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto setup = c10::static_intrusive_pointer_cast<RingSetup>(ctx->saved_data["setup"].toCapsule());
    const variable_list saved = ctx->get_saved_variables();
    size_t next = 0;
    const at::Tensor g_full = setup->request.full ? grads.at(next++) : at::Tensor();
    const at::Tensor g_sparse = setup->request.sparse ? grads.at(next++) : at::Tensor();
    ContextOutputs o;
    o.out_full = saved[3];
    o.lse_full = saved[4];
    o.out_sparse = saved[5];
    o.lse_sparse = saved[6];
    o.compact_k = saved[7];
    o.compact_v = saved[8];
    o.k_all = saved[9];
    o.v_all = saved[10];
    ContextGrads g = context_backward(*setup, saved[0], saved[1], saved[2], o, g_full, g_sparse);
    return {g.dq, g.dk, g.dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::array<at::Tensor, 2> context_attention_autograd(const c10::intrusive_ptr<RingSetup>& setup, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& v, int64_t* ring_bytes,
                                                     int64_t* selected_bytes, ContextOutputs* given) {
  std::array<at::Tensor, 2> result;
  const bool needs_graph =
      at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  if (!needs_graph) {
    ContextOutputs o = given ? std::move(*given) : context_forward(*setup, q, k, v);
    *ring_bytes = given ? 0 : o.ring_bytes;
    *selected_bytes = given ? 0 : o.selected_bytes;
    return {o.out_full, o.out_sparse};
  }
  const variable_list outs = ContextAttentionFunction::apply(q, k, v, setup, ring_bytes, selected_bytes, given);
  size_t next = 0;
  if (setup->request.full) result[0] = outs.at(next++);
  if (setup->request.sparse) result[1] = outs.at(next++);
  return result;
}

}  // namespace ssa::parallel
