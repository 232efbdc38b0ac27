#pragma once
// Parameters and launchers of the CUDA attention kernels. Host-only declarations
// (no device code), so the LibTorch wrappers (kernels/cuda_*.cpp) include this too.
// All tensors are contiguous, layouts as kernels/attention.h:
//   q, o, dq [B, Sq, Hq, D] bf16     k, v, dk, dv [B, Sk, Hkv, D] bf16
//   lse [B, Hq, Sq] fp32             block_ids [B, Sq, Hkv, top_k] int32
// G = Hq / Hkv query heads share a kv head. Each launcher returns the CUDA error
// of its launches (cudaSuccess when fine); the wrappers check it.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ssa::kernels::cuda {

// Keys are processed in tiles of this many positions (one mma n-dimension pair).
constexpr int kKeyTile = 16;
// Head dims with compiled kernels.
constexpr bool head_dim_supported(int64_t d) { return d == 64 || d == 128; }
constexpr int kMaxGroup = 32;  // query heads per kv head
constexpr int kMaxTopK = 64;   // selection keeps its running top-k in registers

struct Shape {
  int batch = 0, sq = 0, sk = 0, hq = 0, hkv = 0, head_dim = 0;
  int top_k = 0, block_size = 0;
  int64_t q_start = 0, k_start = 0;  // global positions of q row 0 and k row 0
  // Rows from q_split on sit at q_start_late + (row - q_split): a context-parallel
  // rank's two zigzag chunks in one call (q_start_late >= q_start + q_split, so
  // positions grow with the row). q_split >= sq: one run from q_start.
  int64_t q_split = INT64_MAX, q_start_late = 0;
#ifdef __CUDACC__
  __host__ __device__
#endif
  int64_t q_pos(int64_t row) const { return row < q_split ? q_start + row : q_start_late + (row - q_split); }
  int group() const { return hq / hkv; }
};

struct ForwardParams {
  Shape shape;
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* k = nullptr;
  const __nv_bfloat16* v = nullptr;
  const int32_t* block_ids = nullptr;
  __nv_bfloat16* out = nullptr;
  float* lse = nullptr;
};
cudaError_t launch_sparse_forward(const ForwardParams& p, cudaStream_t stream);

// Backward, step 1: dq per (token, kv head), iterating over its selected blocks.
// It first forms, per (token, head), delta = sum_d o * do - dlse and lse * log2(e)
// for its own rows, and writes both ([B, Sq, Hq] fp32, the G heads of a token
// contiguous) for the dk/dv kernel.
struct BackwardDqParams {
  Shape shape;
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* k = nullptr;
  const __nv_bfloat16* v = nullptr;
  const __nv_bfloat16* out = nullptr;
  const __nv_bfloat16* dout = nullptr;
  const float* lse = nullptr;   // [B, Hq, Sq]
  const float* dlse = nullptr;  // [B, Hq, Sq] or null (no gradient into lse)
  const int32_t* block_ids = nullptr;
  float* delta = nullptr;       // [B, Sq, Hq], written
  float* lse_log2 = nullptr;    // [B, Sq, Hq], written
  __nv_bfloat16* dq = nullptr;
  // Instead of dq: added into fp32 rows laid out like q's within a batch entry,
  // batch entries dq_acc_batch_stride elements apart.
  float* dq_acc = nullptr;
  int64_t dq_acc_batch_stride = 0;
};
cudaError_t launch_backward_dq(const BackwardDqParams& p, cudaStream_t stream);

// Backward, step 2 (after dq, which writes delta and lse_log2): dk/dv per key
// tile from the inverted index (the queries that selected each block). A work
// item is one key tile of one block and a run of at most kMaxEntriesPerItem
// consecutive entries of the block's query list:
//   entry_token [n_entries]  query row (0..Sq-1) of each entry, grouped by bucket
//   item_bucket, item_begin, item_end [n_items]: the item's bucket and entry range
// A bucket is (b, kv head, token chunk, block); block_first is the global id of
// bucket block 0 and blocks_per_chunk the number of blocks per (b, head, chunk).
// The item of warp w is w / tiles_per_block, its key tile w % tiles_per_block.
// Atomic mode (partial == null): dk_acc/dv_acc [B, Sk, Hkv, D] fp32, zeroed, get
// float atomics. Deterministic mode: each warp writes its partial [16, D] fp32
// into partial_dk/partial_dv[w], and launch_dkdv_reduce sums them in item order.
constexpr int kMaxEntriesPerItem = 64;
struct BackwardDkdvParams {
  Shape shape;
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* k = nullptr;
  const __nv_bfloat16* v = nullptr;
  const __nv_bfloat16* dout = nullptr;
  const float* delta = nullptr;     // [B, Sq, Hq]
  const float* lse_log2 = nullptr;  // [B, Sq, Hq]
  const int32_t* entry_token = nullptr;
  const int32_t* item_bucket = nullptr;
  const int32_t* item_begin = nullptr;
  const int32_t* item_end = nullptr;
  int64_t n_items = 0;             // items to launch for (an upper bound when n_items_device is set)
  const int32_t* n_items_device = nullptr;  // the exact count, read on the GPU; warps past it exit
  int tiles_per_block = 0;
  int token_chunk = 0;       // tokens per chunk of the bucket key
  int n_token_chunks = 0;
  int block_first = 0;
  int blocks_per_chunk = 0;
  float* dk_acc = nullptr;  // atomic mode; rows laid out like k's within a batch entry,
  float* dv_acc = nullptr;  // batch entries acc_batch_stride elements apart (0: Sk * Hkv * D)
  int64_t acc_batch_stride = 0;
  float* partial_dk = nullptr;  // deterministic mode: [n_items * tiles_per_block, 16, D]
  float* partial_dv = nullptr;
};
cudaError_t launch_backward_dkdv(const BackwardDkdvParams& p, cudaStream_t stream);

// Deterministic mode: dk/dv [B, Sk, Hkv, D] bf16 = sum of the partials of every
// item of the key's block, token chunk by token chunk, in item order.
//   bucket_item_begin [n_buckets + 1]: first item of each bucket.
struct DkdvReduceParams {
  BackwardDkdvParams work;
  const int32_t* bucket_item_begin = nullptr;
  __nv_bfloat16* dk = nullptr;
  __nv_bfloat16* dv = nullptr;
};
cudaError_t launch_dkdv_reduce(const DkdvReduceParams& p, cudaStream_t stream);

// The inverted index for launch_backward_dkdv, built without host syncs. Buckets are
// (b, kv head, token chunk, block); each token chunk is cut into sub-chunks of
// sub_chunk tokens, one placement warp each. Steps (the scans are LibTorch cumsums
// between the launches):
//   count:  counts[(bucket, sub)] = entries of that sub-chunk in the bucket (counts zeroed)
//   place:  entry_token[inclusive - counts--] = token (the exclusive scan, onwards),
//           in a fixed order (sub-chunk, 32-token group, slot, lane): deterministic
//   items:  item_count[bucket] = ceil(entries / kMaxEntriesPerItem), from `inclusive`
//   fill:   item_bucket / item_begin / item_end from bucket_item_begin (0, then the
//           scan of item_count)
struct InvertedIndexParams {
  Shape shape;
  const int32_t* block_ids = nullptr;
  int token_chunk = 0, sub_chunk = 0, subs_per_chunk = 0, n_token_chunks = 0;
  int block_first = 0, blocks_per_chunk = 0;
  int64_t n_buckets = 0;
  int32_t* counts = nullptr;           // [n_buckets * subs_per_chunk]; placing consumes them
  const int32_t* inclusive = nullptr;  // [n_buckets * subs_per_chunk]: scan of the counts
  int32_t* entry_token = nullptr;      // [B * Sq * Hkv * top_k]
  int32_t* item_count = nullptr;       // [n_buckets]
  // [n_buckets + 1]: 0 (written by the items kernel), then the scan of item_count.
  int32_t* bucket_item_begin = nullptr;
  int32_t* item_bucket = nullptr;      // [upper bound of items]
  int32_t* item_begin = nullptr;
  int32_t* item_end = nullptr;
};
cudaError_t launch_index_count(const InvertedIndexParams& p, cudaStream_t stream);
cudaError_t launch_index_place(const InvertedIndexParams& p, cudaStream_t stream);
cudaError_t launch_index_items(const InvertedIndexParams& p, cudaStream_t stream);
cudaError_t launch_index_fill(const InvertedIndexParams& p, cudaStream_t stream);

// Block means of the keys: pooled [B, Nb, Hkv, D] (contiguous) from k [B, keys,
// Hkv, D] (heads and head dim contiguous; batch and row strides in elements), the
// last block holding keys - (Nb - 1) * block_size keys. Summed in fp32, written
// in k's dtype (one rounding, as a mean of bf16 keys in PyTorch gives).
struct PoolParams {
  enum Dtype { kF32, kBF16, kF16 };
  Dtype dtype = kBF16;  // of k and pooled
  const void* k = nullptr;
  int64_t k_batch_stride = 0, k_row_stride = 0;
  int batch = 0, keys = 0, heads = 0, head_dim = 0, block_size = 0, n_blocks = 0;
  void* pooled = nullptr;
};
cudaError_t launch_pool(const PoolParams& p, cudaStream_t stream);

// Pooled blocks per chunk of the selection kernel's stream.
constexpr int kSelectChunk = 64;

// pooled [B, Nb, Hkv, D] (dims 1-3 contiguous) -> the selection kernels' operands:
// chunk images [B, Hkv, ceil(Nb / kSelectChunk), 2, kSelectChunk * D] bf16, two
// tiles per chunk, each laid out exactly as the kernels' swizzled shared-memory
// tile (tile_offset, mma.cuh; rows past Nb zero), so a chunk streams in as one
// contiguous copy; and chunk_norm [B, Hkv, ceil(Nb / kSelectChunk)]: the largest
// |x row| of each chunk, x = pooled * logit_scale (log2(e) / sqrt(D): a product
// with q is then a logit in log2 units, ready for exp2). The tiles:
// - fp32 pooled (exact = false): hi = bf16(x), then lo = bf16(x - hi); hi + lo
//   carry x to about 16 bits of mantissa;
// - bf16 pooled (exact = true): the pooled keys themselves, unscaled and exact
//   (their products, times logit_scale in fp32, are the logits of the fp32
//   reference on the same keys); the second tile is not written.
struct SplitParams {
  const void* pooled = nullptr;  // fp32, or bf16 when exact
  bool exact = false;
  float logit_scale = 1.f;
  int64_t pooled_batch_stride = 0;
  int batch = 0, n_blocks = 0, heads = 0, head_dim = 0;
  __nv_bfloat16* tiles = nullptr;
  float* chunk_norm = nullptr;
};
cudaError_t launch_split(const SplitParams& p, cudaStream_t stream);

// Selection on the chunk images (SplitParams): the normaliser pass reads hi (or
// the exact keys), the ranking pass hi + lo (or the exact keys); products with
// exact images are scaled by logit_scale in the kernel. Exact images go to the
// warpgroup-mma kernel only (select_wgmma_fits).
struct SelectParams {
  Shape shape;  // sk unused; block_size, top_k, q_start used
  int n_blocks = 0;
  bool per_query_block = false;
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* pooled_tiles = nullptr;  // SplitParams::tiles
  const float* chunk_norm = nullptr;            // SplitParams::chunk_norm
  bool exact_keys = false;                      // SplitParams::exact
  float logit_scale = 1.f;                      // SplitParams::logit_scale
  float* block_scores = nullptr;  // query-block mode: [B, Hkv, n_query_blocks, Nb] fp32 scratch
  int32_t* block_ids = nullptr;
};
// Runs the warpgroup-mma kernel (select_blocks_wgmma.cu) where it fits (head dim
// 64, groups of 8 or 16, per-token mode), the mma.sync kernel otherwise.
cudaError_t launch_select(const SelectParams& p, cudaStream_t stream);
bool select_wgmma_fits(const SelectParams& p);
cudaError_t launch_select_wgmma(const SelectParams& p, cudaStream_t stream);

// Eval statistics of the full causal attention (q row i and k row j at positions
// i and j), per (b, head, query): the attention mass inside the selected blocks and
// the entropy in bits, written to sparsity/entropy [B, Hq, Sq] fp32.
struct StatsParams {
  Shape shape;
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* k = nullptr;
  const int32_t* block_ids = nullptr;
  float* sparsity = nullptr;
  float* entropy_bits = nullptr;
};
cudaError_t launch_stats(const StatsParams& p, cudaStream_t stream);

// In-place log-sum-exp merge of a partial attention result into fp32
// accumulators (context-parallel chunks). One warp per (batch, row, head):
//   acc_out [B, n, H, D] fp32 with strides (out_sb, out_st, out_sh, 1) — a row
//   range of a larger buffer; acc_lse [B, H, n] fp32 with strides (lse_sb,
//   lse_sh, 1); part_out [B, n, H, D] (bf16 or fp32, contiguous), part_lse
//   [B, H, n] fp32 contiguous. Rows empty in both stay out 0, lse -inf.
struct MergeParams {
  int batch = 0, rows = 0, heads = 0, head_dim = 0;
  float* acc_out = nullptr;
  int64_t out_sb = 0, out_st = 0, out_sh = 0;
  float* acc_lse = nullptr;
  int64_t lse_sb = 0, lse_sh = 0;
  const void* part_out = nullptr;
  bool part_bf16 = true;
  const float* part_lse = nullptr;
};
cudaError_t launch_merge_partial(const MergeParams& p, cudaStream_t stream);

// Parts covering row ranges of a whole [B, rows, ...] (kernels::merge_row_partials
// and kernels::add_row_terms): part i covers rows [row[i], row[i] + rows_of[i]).
constexpr int kMaxRowParts = 4;

// kernels::merge_row_partials: part_out[i] [B, n_i, H, D] bf16 and part_lse[i]
// [B, H, n_i] fp32 merged by log-sum-exp into out [B, rows, H, D] (bf16 or fp32)
// and lse [B, H, rows] fp32; D % 8 == 0. Rows no part covers: out 0, lse -inf.
struct RowMergeParams {
  int batch = 0, rows = 0, heads = 0, head_dim = 0;
  int count = 0;
  const __nv_bfloat16* part_out[kMaxRowParts] = {};
  const float* part_lse[kMaxRowParts] = {};
  int row[kMaxRowParts] = {}, rows_of[kMaxRowParts] = {};
  void* out = nullptr;
  bool out_bf16 = true;
  float* lse = nullptr;
};
cudaError_t launch_merge_rows(const RowMergeParams& p, cudaStream_t stream);

// kernels::add_row_terms: out [B, rows, width] (bf16 or fp32) = base (fp32, same
// shape) + each term [B, n_i, width] bf16 on its rows; width % 8 == 0.
struct RowSumParams {
  int64_t batch = 0, rows = 0, width = 0;
  const float* base = nullptr;
  int count = 0;
  const __nv_bfloat16* term[kMaxRowParts] = {};
  int64_t row[kMaxRowParts] = {}, rows_of[kMaxRowParts] = {};
  void* out = nullptr;
  bool out_bf16 = true;
};
cudaError_t launch_sum_rows(const RowSumParams& p, cudaStream_t stream);

// Rotary embedding of x [B, S, H, D] (contiguous; x and y bf16 or both fp32) by
// the angles of cos/sin [S, D/2] fp32: y1 = x1 c - x2 s, y2 = x2 c + x1 s on the
// halves; inverse (the backward) rotates the other way (s -> -s).
struct RotaryParams {
  int64_t tokens = 0;  // B * S
  int seq = 0, heads = 0, half = 0;
  const void* x = nullptr;
  void* y = nullptr;
  bool bf16 = true;
  const float* cos = nullptr;
  const float* sin = nullptr;
  bool inverse = false;
};
cudaError_t launch_rotary(const RotaryParams& p, cudaStream_t stream);

// kernels::gate_and_align on bf16 streams (rows = B * S * H of head_dim each,
// gate one value per row). Forward: out and, per block, a partial sum of the
// SmoothL1 terms times inv_count into partial[blockIdx.x]. Backward: the
// gradients of full, sparse and gate from those of out (may be null) and of the
// two losses (device scalars, may be null).
struct AlignParams {
  int64_t rows = 0;
  int head_dim = 0;  // even
  const __nv_bfloat16* full = nullptr;
  const __nv_bfloat16* sparse = nullptr;
  const __nv_bfloat16* gate = nullptr;
  bool pass_full = true, after_gate = true;
  float beta = 1.f;       // 0: L1
  float inv_count = 0.f;  // 1 / (rows * head_dim)
  __nv_bfloat16* out = nullptr;
  float* partial = nullptr;  // [align_blocks(rows)]
  const __nv_bfloat16* grad_out = nullptr;
  const float* grad_ls = nullptr;
  const float* grad_lc = nullptr;
  __nv_bfloat16* grad_full = nullptr;
  __nv_bfloat16* grad_sparse = nullptr;
  __nv_bfloat16* grad_gate = nullptr;
};
int align_blocks(int64_t rows);  // grid of the forward (the partial count)
cudaError_t launch_align_forward(const AlignParams& p, cudaStream_t stream);
cudaError_t launch_align_backward(const AlignParams& p, cudaStream_t stream);

// The SM clock the GPU runs at now (for `ssa attn bench`): one thread spins for
// `cycles` SM cycles and reads the global nanosecond timer at both ends;
// out[0] = cycles counted, out[1] = nanoseconds taken.
cudaError_t launch_clock_probe(unsigned long long* out, long long cycles, cudaStream_t stream);

}  // namespace ssa::kernels::cuda
