#pragma once
// Attention backends for SSA: full causal attention and block-sparse attention,
// both returning the output and the log-sum-exp (so partial results can be merged
// across context-parallel chunks), plus block selection and eval statistics.
//
// Layouts (all backends):
//   q            [B, Sq, Hq, D]
//   k, v         [B, Sk, Hkv, D]       Hq % Hkv == 0 (GQA: query head h uses kv head h / (Hq/Hkv))
//   out          [B, Sq, Hq, D]        dtype of q
//   lse          [B, Hq, Sq]           fp32, natural log, -inf for a row with no key
//   block_ids    [B, Sq, Hkv, top_k]   int32 global block index (position / block_size),
//                                      ascending, -1 marks an unused slot
// Positions: q row i sits at global position q_start + i, k row j at k_start + j.
// Causal: key position <= query position. Softmax scale 1/sqrt(D).
// Every function is differentiable w.r.t. q, k, v through LibTorch autograd
// (block_ids carry no gradient).
// fp64 inputs (finite-difference tests) keep fp64 in the reference backend: its
// lse and pooled keys are then fp64 instead of fp32.
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace ssa::kernels {

struct AttentionResult {
  at::Tensor out;  // [B, Sq, Hq, D]
  at::Tensor lse;  // [B, Hq, Sq] fp32
};

// Where the query rows of a call sit: row i at position start + i; or, for a
// context-parallel rank's two zigzag chunks in one call, rows [0, split) from
// start and rows [split, Sq) from late_start (late_start >= start + split, so
// positions grow with the row). A plain position converts to one run.
struct QueryRows {
  int64_t start = 0;
  int64_t split = -1;  // -1: one run
  int64_t late_start = 0;
  QueryRows(int64_t first = 0) : start(first) {}  // NOLINT(google-explicit-constructor): a position is one run
  // split < 0: one run from start (late_start unused).
  static QueryRows two_runs(int64_t start, int64_t split, int64_t late_start) {
    QueryRows r(start);
    r.split = split;
    r.late_start = late_start;
    return r;
  }
  bool two() const { return split >= 0; }
  int64_t position(int64_t row) const { return two() && row >= split ? late_start + (row - split) : start + row; }
};

enum class SelectionMode {
  kToken,       // top-k per query token (the paper's)
  kQueryBlock,  // one top-k per block of block_size queries (MoBA-style)
};
SelectionMode parse_selection_mode(const std::string& name);  // "token" | "query_block"

// kAuto decides per call: the CUDA kernels where they take the inputs (CUDA
// tensors, bf16, head dim 64 or 128, at most 32 query heads per kv head,
// block_size a multiple of 16, top_k <= 64 for selection), the reference
// everywhere else (other dtypes or head dims, eval budgets above 64, CPU).
// kCuda insists on the kernels and throws naming what they do not support.
enum class Backend { kReference, kCuda, kAuto };
// "auto" -> kAuto when the tensors are on a GPU and the CUDA kernels are built,
// else kReference; "cuda" -> kCuda (throws without a usable GPU).
Backend resolve_backend(const std::string& name, const at::Device& device);
// Whether `backend` runs this call on the CUDA kernels (kCuda: always, after
// checking that a GPU is usable; kAuto: when the kernels take these inputs).
// k may be the pooled keys (selection, any float dtype); top_k 0: not a
// selection, so no top-k limit;
// any_float: the call converts q and k to bf16 itself (statistics).
bool runs_on_cuda(Backend backend, const at::Tensor& q, const at::Tensor& k, int64_t top_k, int64_t block_size,
                  bool any_float = false);

struct SparseOptions {
  int64_t block_size = 16;
  int64_t top_k = 16;
  SelectionMode mode = SelectionMode::kToken;
  Backend backend = Backend::kReference;
  bool deterministic = false;
};

// Causal full attention of q against k/v. Rows whose every key is in the future
// (possible when q_start < k_start) get out = 0 and lse = -inf.
AttentionResult full_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               int64_t q_start = 0, int64_t k_start = 0);

// Gradients of one part of a merged attention result (a context-parallel chunk
// pair), computed from the MERGED output and lse without recomputing a forward:
// with P = exp(q k^T * scale - lse) on the causal positions (0 elsewhere),
//   dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * out)),
//   dQ = dS K * scale, dK = dS^T Q * scale,
// which are exactly this part's gradients in the merged result.
//   dout, out [B, Sq, Hq, D]; q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D];
//   lse [B, Hq, Sq] (natural log, -inf for a row with no key in any part).
// Returns dq [B, Sq, Hq, D], dk, dv [B, Sk, Hkv, D] (summed over each GQA group),
// in the dtypes of q, k, v. CUDA bf16/fp16 pairs that are either the same
// positions (causal) or entirely in the past use LibTorch's fused backward (cuDNN);
// everything else the matmul formula above, chunk_rows queries at a time
// (0: sized for ~64 MiB of scores), in fp32 (fp64 for fp64 inputs).
struct AttentionGrads {
  at::Tensor dq, dk, dv;
};
AttentionGrads full_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                       int64_t q_start = 0, int64_t k_start = 0, int64_t chunk_rows = 0);

// Mean of the keys of each block of block_size positions.
//   k [B, Sk, Hkv, D] with k_start % block_size == 0 -> [B, ceil(Sk / block_size), Hkv, D]
// in k's dtype: summed in fp32 (fp64 for fp64 keys) and rounded once, as a
// PyTorch mean of bf16 keys gives (MoBA's PyTorch gating pools so, then scores in
// fp32). A last partial block is the mean of the keys it has.
at::Tensor pool_keys(const at::Tensor& k, int64_t block_size);

// Selection as ssa-method.md: per query head the softmax over its causal blocks
// (blocks whose first position <= the query position) of q . kbar / sqrt(D),
// summed over the heads of each GQA group; the block holding the query is always
// kept; the top_k best, ascending ids; -1 fills slots beyond the causal blocks.
// Equal scores go to the lower block id. kQueryBlock: the queries of a query block
// share one set, ranked by the mean over those queries of the group-summed scores
// (the block's own block forced); needs the rows' starts (and split) to be
// multiples of block_size, and a last partial query block averages the queries
// it has.
//   pooled [B, Nb, Hkv, D] covers global blocks [0, Nb) (all keys the queries may see).
at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& pooled, const SparseOptions& options,
                         QueryRows q_rows = {});

// Attention of each query over the keys of its selected blocks only (causal mask
// inside the block that holds the query). k/v hold positions [k_start, k_start+Sk);
// ids outside that range are skipped, so partial results over chunks can be merged.
AttentionResult sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& block_ids, const SparseOptions& options,
                                 QueryRows q_rows = {}, int64_t k_start = 0);

// Gradients of one part of a merged result whose part is a sparse attention call
// (a context-parallel chunk pair of the sparse stream), from the MERGED out and
// lse, as full_attention_backward does for full attention: with P = exp(q k^T *
// scale - lse) on this call's selected, causal keys, the formula there gives this
// part's exact gradients. Arguments as sparse_attention plus dout, out [B, Sq,
// Hq, D] and lse [B, Hq, Sq]. The CUDA kernels (per runs_on_cuda) take the merged
// statistics directly; the reference recomputes the part under autograd and
// backpropagates its share (w dO into out, w (<dO, o> - <dO, out>) into its lse,
// w = exp(lse_part - lse)). Returns dq, dk, dv in the dtypes of q, k, v (the
// reference: its compute dtype).
AttentionGrads sparse_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                         const at::Tensor& block_ids, const SparseOptions& options,
                                         QueryRows q_rows = {}, int64_t k_start = 0);
// The current stream's waits for work a call left on side streams, held back so
// consecutive calls queue their kernels back to back (the next call's dq starts
// as the previous call's dK/dV kernels drain) and taken together by join() or
// the destructor. The inputs of every deferred call must stay alive until then.
class SideJoin {
 public:
  SideJoin() = default;
  SideJoin(const SideJoin&) = delete;
  SideJoin& operator=(const SideJoin&) = delete;
  ~SideJoin();
  // Makes the stream each deferred call ran on wait for that call's side work.
  void join();
  // For backends: one deferred wait.
  void defer(std::function<void()> wait) { waits_.push_back(std::move(wait)); }

 private:
  std::vector<std::function<void()>> waits_;
};

// The same gradients added into accumulators shaped like q, k, v (e.g. fp32 rows
// of a context-parallel rank's sums): the CUDA kernels add them in place (no
// bf16 copies, no separate additions) when the accumulators are fp32 with
// dims 1-3 contiguous and the options are not deterministic. With `join`, the
// CUDA dK/dV side work is not waited for here but by join (see SideJoin).
void sparse_attention_backward_into(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                    const at::Tensor& block_ids, const SparseOptions& options, QueryRows q_rows,
                                    int64_t k_start, at::Tensor& dq_acc, at::Tensor& dk_acc, at::Tensor& dv_acc,
                                    SideJoin* join = nullptr);

// Merges two partial attention results over disjoint key sets (fp32 LSE merge).
AttentionResult merge_partials(const AttentionResult& a, const AttentionResult& b);

// In-place merge of a partial result into accumulators over disjoint key sets
// (no gradient; context-parallel forward): acc_out [B, n, H, D] fp32 (fp64 for
// fp64 parts) with a unit last stride, e.g. a row range of a larger buffer, and
// acc_lse [B, H, n] (unit stride along n) become the merge of themselves and
// part. Rows empty in both stay out 0, lse -inf. fp32 accumulators on a GPU
// with the CUDA kernels: one fused kernel; otherwise the same formula in ATen ops.
void merge_into(at::Tensor& acc_out, at::Tensor& acc_lse, const AttentionResult& part);

// A partial attention result on rows [row, row + n) of a longer q (n: its row count).
struct RowPartial {
  int64_t row = 0;
  AttentionResult part;
};
// Partial results over disjoint key sets, each on a row range of a q of `rows`
// rows, merged by log-sum-exp without gradient: out [B, rows, H, D] in out_type
// and lse [B, H, rows] fp32 (fp64 for fp64 parts). Rows no part covers get out 0,
// lse -inf. On a GPU with bf16 parts (at most 4, D % 8 == 0): one kernel writing
// out_type directly; otherwise merge_into on fp32 (fp64) accumulators.
AttentionResult merge_row_partials(int64_t rows, const std::vector<RowPartial>& parts, at::ScalarType out_type);

// A term added to rows [row, row + n) of dim 1 of a sum (n: its size there).
struct RowTerm {
  int64_t row = 0;
  at::Tensor value;
};
// base [B, S, ...] (fp32 or fp64) plus every term on its rows, summed in base's
// dtype and returned in out_type, without gradient: e.g. a context-parallel
// rank's fp32 dq plus the bf16 dq of its fused full-attention calls. On a GPU
// with contiguous bf16 terms (at most 4, rows of a multiple of 8 elements): one
// pass; otherwise ATen additions.
at::Tensor add_row_terms(const at::Tensor& base, const std::vector<RowTerm>& terms, at::ScalarType out_type);

// Eval statistics of the full attention distribution (ssa-method.md), without
// gradient: per query and head, the fraction of the full attention mass inside the
// selected blocks (sparsity) and the Shannon entropy in bits.
struct AttentionStats {
  double sparsity = 0;      // mean over batch, queries, heads
  double entropy_bits = 0;  // mean over batch, queries, heads
  int64_t count = 0;        // (query, head) pairs averaged
};
// q row i and k row j sit at positions i and j (one whole sequence); Sk > 0.
// block_ids [B, Sq, Hkv, top_k] as select_blocks gives them. The backend is
// resolve_backend("auto", q.device()); the overload below names it.
AttentionStats attention_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& block_ids,
                               int64_t block_size);
AttentionStats attention_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& block_ids,
                               int64_t block_size, Backend backend);

}  // namespace ssa::kernels
