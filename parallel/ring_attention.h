#pragma once
// Context-parallel attention for cp > 1 (see context_attention.h): the work each
// visiting K/V chunk brings, the forward and backward ring loops, and the
// autograd Function around them. Internal to parallel/.
#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "kernels/attention.h"
#include "parallel/communicator.h"
#include "parallel/context_attention.h"
#include "parallel/selected_exchange.h"
#include "parallel/zigzag.h"

namespace ssa::parallel {

// Everything a cp > 1 attention call needs besides q, k, v; shared by forward
// and backward (held by the autograd node).
struct RingSetup : torch::CustomClassHolder {
  Communicator* comm = nullptr;
  ZigzagLayout layout;
  kernels::SparseOptions options;
  StreamRequest request;
  SparseTransport transport = SparseTransport::kNone;
  // kRing with the full stream: block_ids are chosen inside the forward from the
  // K/V assembled on the ring (no pooled-key all-gather); else before it.
  bool select_on_ring = false;
  // [B, 2c, Hkv, K] int32: both local q chunks' block ids (sparse stream), chosen
  // in one call (select_local_blocks); block_ids[a] are chunk a's rows of it.
  at::Tensor local_block_ids;
  std::array<at::Tensor, 2> block_ids;
  // needed[a * 2cp + g]: local q chunk a selected some block of global chunk g
  // (sparse stream alone: it plans the selected-block transport).
  std::vector<uint8_t> needed;
  std::optional<SelectedPlan> plan;             // kSelectedBlocks
  std::array<at::Tensor, 2> compact_block_ids;  // kSelectedBlocks: ids into the compact K/V

  bool chunk_needed(int64_t slot, int64_t g) const {
    return needed[static_cast<size_t>(slot * layout.chunks() + g)] != 0;
  }
  // Both chunks' query rows: [0, c) at my early chunk's position, [c, 2c) at the late one's.
  kernels::QueryRows local_rows() const {
    return kernels::QueryRows::two_runs(layout.position(0), layout.chunk, layout.position(1));
  }
};

// Selects both local q chunks' blocks in one call from the pooled keys of the
// global blocks [0, Nb) (Nb reaching at least my late chunk); fills
// setup.local_block_ids and setup.block_ids.
void select_local_blocks(RingSetup& setup, const at::Tensor& q, const at::Tensor& pooled);

// One kernel call: rows of the local q against rows of a K/V buffer.
struct WorkItem {
  bool sparse = false;
  int64_t q_row = 0, q_len = 0;
  int64_t kv_row = 0, kv_len = 0;
  kernels::QueryRows q_pos;       // positions given to the kernel (see ring_work): one run, except
  int64_t k_pos = 0;              // a sparse item over both local chunks (RingSetup::local_rows)
  int64_t slot = 0;               // local q chunk (which block ids); -1: both chunks
  bool compact = false;          // reads the compact selected-block buffer
};

// Both streams on the ring: the K/V are assembled for the sparse stream, and the
// full stream runs on them as diagonal items plus one call per q chunk over the
// prefix of earlier chunks (instead of ring_work's items per visiting chunk).
bool full_on_prefix(const RingSetup& setup);

// Calls against the whole sequence's K/V assembled on the ring (kv rows index
// it, except the diagonal items, which read my own K/V):
//   diagonal_work: my two chunks on themselves in one call (full stream, causal
//                  in local order; reads my own K/V);
//   prefix_work:   my chunks on every earlier chunk (full stream, unmasked; one
//                  call for both chunks' common prefix, one for the late chunk's rest);
//   assembled_sparse_work: one sparse call for both local q chunks over the chunks
//                  up to the late one (each query sees only its causal blocks).
std::vector<WorkItem> diagonal_work(const RingSetup& setup);
std::vector<WorkItem> prefix_work(const RingSetup& setup);
std::vector<WorkItem> assembled_sparse_work(const RingSetup& setup);

// The full stream's calls for the K/V of cp rank `src` (both its chunks, rows
// [0, 2c)). The sparse stream on the ring runs once over the assembled K/V.
std::vector<WorkItem> ring_work(const RingSetup& setup, int64_t src);
// kSelectedBlocks: calls on my own K/V and on the compact buffer (compact_rows rows).
std::vector<WorkItem> selected_work(const RingSetup& setup, int64_t compact_rows);

struct ContextOutputs {
  at::Tensor out_full, lse_full;      // [B, 2c, Hq, D] dtype of q; [B, Hq, 2c] fp32
  at::Tensor out_sparse, lse_sparse;
  at::Tensor compact_k, compact_v;    // kSelectedBlocks: the fetched blocks
  at::Tensor k_all, v_all;            // kRing with the sparse stream: [B, S, Hkv, D], the whole sequence's K/V
  int64_t ring_bytes = 0;             // K/V bytes this rank sent around the ring
  int64_t selected_bytes = 0;         // K/V bytes this rank sent to requesters
};

// Fills setup.block_ids when setup.select_on_ring.
ContextOutputs context_forward(RingSetup& setup, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

struct ContextGrads {
  at::Tensor dq, dk, dv;  // dtypes of q, k, v
};
// grad_full / grad_sparse: gradients of the two outputs (undefined = zero).
ContextGrads context_backward(const RingSetup& setup, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const ContextOutputs& outputs, const at::Tensor& grad_full, const at::Tensor& grad_sparse);

// Differentiable cp > 1 attention: returns {full, sparse} (undefined when not
// requested) and fills `outputs` with the forward's byte counts. given: outputs
// an earlier context_forward with this setup computed for the same q, k, v (a
// layer re-run for its backward); they are returned, with their backward, instead
// of running the forward again (moved from, no bytes counted).
std::array<at::Tensor, 2> context_attention_autograd(const c10::intrusive_ptr<RingSetup>& setup, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& v, int64_t* ring_bytes,
                                                     int64_t* selected_bytes, ContextOutputs* given = nullptr);

// What one attention_streams call without gradients computed (context_attention.h).
struct AttentionMemo {
  bool filled = false;
  int64_t rows = 0;                     // q rows of the call, checked on replay
  // cp = 1: the block ids (sparse stream), the streams' outputs and log-sum-exps.
  at::Tensor block_ids;
  kernels::AttentionResult full, sparse;
  // cp > 1: the setup (selection, transport) and the ring's outputs.
  c10::intrusive_ptr<RingSetup> setup;
  ContextOutputs outputs;
};

}  // namespace ssa::parallel
