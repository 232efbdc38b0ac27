#pragma once
// The one attention entry point of the SSA layer, for any cp (1 included).
//
// Layout: a sequence of S tokens is cut into 2*cp chunks of c = S/(2cp) tokens;
// cp rank r holds chunks r and 2cp-1-r (zigzag, so causal work is balanced), in
// that order, as its S_local = 2c rows. With cp = 1 the rank holds the sequence.
//
// cp > 1 (a torch::autograd::Function, differentiable w.r.t. q, k, v):
// - Full stream: ring attention. The K/V chunks rotate over the cp ring; the next
//   chunk's send/recv is posted before the current chunk is computed. Partial
//   results are merged in fp32 by log-sum-exp. Backward rotates K/V again and
//   the fp32 dK/dV accumulators travel with them back to their owners.
// - Sparse stream with the full stream (SSA): the K/V chunks passing on the ring
//   are assembled into the whole sequence's K/V (small: Hkv heads); each local q
//   chunk selects its top-k over the *global* blocks of it (kernels::select_blocks
//   with the chunk's q_start) and runs one kernels::sparse_attention over it (no
//   merge, no traffic of its own). Backward: one
//   kernels::sparse_attention_backward per q chunk; its dK/dV rows join each
//   chunk's gradients on the ring back to their owners.
// - Both streams share one rotation of K/V.
// - Sparse stream alone (attention.mode = sparse, sparse inference): block means
//   are all-gathered over cp (small) for the selection; on the ring a visiting
//   chunk nobody selected from is skipped. Instead of the ring, each rank may
//   fetch only the K/V blocks its queries selected from their owners. Every rank
//   knows every rank's selection (a gathered bitmask), so all choose the same
//   transport: the one that moves fewer bytes.
#include <ATen/ATen.h>

#include <cstdint>
#include <memory>

#include "kernels/attention.h"
#include "parallel/communicator.h"

namespace ssa::parallel {

struct StreamRequest {
  bool full = true;
  bool sparse = true;
};

// How the sparse stream's K/V travel when cp > 1.
enum class SparseTransport {
  kNone,            // cp = 1, or the sparse stream was not requested
  kRing,            // whole chunks around the ring (always when the full stream is requested too)
  kSelectedBlocks,  // only the selected blocks, fetched from their owners
};
const char* sparse_transport_name(SparseTransport transport);

struct AttentionStreams {
  at::Tensor full;    // [B, S_local, Hq, D] dtype of q; undefined if not requested
  at::Tensor sparse;  // [B, S_local, Hq, D]; undefined if not requested
  at::Tensor block_ids;  // [B, S_local, Hkv, top_k] int32 global block ids (sparse stream; eval statistics)
  // Bytes this rank sends over the cp group in the forward pass, per stream. When
  // both streams run, the shared K/V rotation is counted under full and sparse
  // counts its own extra traffic (the pooled keys when it runs alone; none with
  // the full stream). Backward moves the K/V ring
  // again plus fp32 dK/dV (or the fp32 gradients of the selected blocks); those
  // bytes appear in the cp communicator's counters ("cp_ring_kv", "cp_ring_dkv",
  // "cp_selected_kv", "cp_selected_dkv", "cp_all_gather").
  int64_t bytes_full = 0;
  int64_t bytes_sparse = 0;
  SparseTransport sparse_transport = SparseTransport::kNone;
  int64_t bytes_sparse_ring = 0;      // K/V ring bytes of this rank (what kRing moves or would move)
  int64_t bytes_sparse_selected = 0;  // selected-block bytes of this rank (0 unless they were measured)
};

// Choice of the sparse-only transport: kAuto picks the one that moves fewer bytes
// over the whole cp group; the other values force one (tests, benchmarks).
enum class SparseTransportChoice { kAuto, kRing, kSelectedBlocks };

struct ContextOptions {
  SparseTransportChoice sparse_transport = SparseTransportChoice::kAuto;
};

// What an attention_streams call without gradients computed, kept for a re-run
// of the same call on the same q, k, v that needs the backward (activation
// recomputation): the re-run returns the kept outputs, differentiable, instead
// of computing the attention (and its selection and K/V ring) a second time.
// Holds, until that re-run, each stream's output and log-sum-exp, the block ids
// and, with cp > 1, the whole sequence's K/V (see AttentionMemo in ring_attention.h).
struct AttentionMemo;
std::shared_ptr<AttentionMemo> make_attention_memo();

// q: [B, S_local, Hq, D], k, v: [B, S_local, Hkv, D], this rank's zigzag chunks
// in order; seq_len: the global S. cp_group nullptr or of size 1: one rank holds
// the whole sequence and the kernels are called directly.
// memo (optional): empty and no gradients enabled: the call fills it; filled:
// the call replays it (and empties it), with the same arguments otherwise.
AttentionStreams attention_streams(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t seq_len,
                                   const kernels::SparseOptions& options, StreamRequest request,
                                   Communicator* cp_group, const ContextOptions& context = {},
                                   AttentionMemo* memo = nullptr);

// Rows of this rank's zigzag chunks in a [*, S, ...] tensor of the whole
// sequence: chunk r then chunk 2cp-1-r along `dim` (tests, data slicing).
at::Tensor zigzag_slice(const at::Tensor& whole, int64_t dim, int64_t cp, int64_t cp_rank);

}  // namespace ssa::parallel
