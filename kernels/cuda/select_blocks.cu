// Block selection (ssa-method.md): for each query token and kv head, per query
// head the softmax over the token's causal blocks of q . kbar / sqrt(D), summed
// over the GQA group; the own block forced; the top_k best, ascending, -1 after.
// Nothing of size [tokens x blocks] is written: a CTA owns a tile of tokens of one
// (batch, kv head), streams the pooled keys through shared memory in chunks of 64
// blocks, and makes two passes over them:
//   1. normalisers: per (token, head) the running max and sum of exp (log2 domain);
//   2. probabilities, summed over the group in registers and shuffles, feeding a
//      running top-k per token held across the warp (lane i: entries i, i + 32).
// The mma computes S^T: M = 16 pooled blocks (from shared memory, shared by every
// token of the warp), N = 8 heads of the token's group (Q^T fragments held in
// registers), so a block's sum over heads is a thread-local sum plus one quad
// reduction. Groups of at most 8 heads pack two tokens into a 16-column unit
// (one per n-tile of 8 columns), so no mma column or exp is spent on padding
// heads of a small group (Llama-style 4 or 8 heads per kv head). The causal mask
// is applied only on the steps that cross a token's own block.
// Pooled keys come as bf16 hi + lo parts; the ranking pass uses both (near fp32
// logits, so ties and near-ties fall as in the fp32 reference), the normaliser
// pass only hi. Query-block mode: the CTA owns one query block; its tokens'
// group sums are added per block into a global row [Nb] (one per query block,
// deterministic order), then one warp ranks that row.
#include <cuda_bf16.h>

#include <climits>
#include <cmath>

#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/params.cuh"
#include "kernels/cuda/sparse_tiles.cuh"

namespace ssa::kernels::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 8;
constexpr int kChunk = 64;  // pooled blocks per shared-memory chunk

// kMT: 16-head tiles per token (group > 16: 2); kPack: tokens per 16-column unit
// (group <= 8: 2, one per n-tile; else 1).
template <int kD, int kMT, int kPack>
struct SelectConfig {
  static constexpr int kUnits = kD == 128 && kMT == 1 ? 1 : 2;  // 16-column tiles per warp
  static constexpr int kTokens = kUnits * kPack / kMT;          // tokens per warp per round
  // Token slot of unit u's n-tile nt.
  static __device__ __forceinline__ int token_of(int u, int nt) { return kPack == 2 ? u * 2 + nt : u / kMT; }
  static constexpr int kChunkBytes = kChunk * kD * 2;
  // Two buffers of (hi, lo) chunks, then the per-warp column sums of a chunk.
  static constexpr int kSmem = 2 * 2 * kChunkBytes + kWarps * kChunk * 4;
};

// Running top-k of one query over the warp, sorted by descending score; equal
// scores keep the earlier (lower) block id first.
struct TopK {
  float s0, s1;  // scores of entries lane and lane + 32
  int i0, i1;    // their block ids (-1: empty)

  __device__ void init(int lane, int forced) {
    s0 = lane == 0 ? INFINITY : -1.f;
    i0 = lane == 0 ? forced : -1;
    s1 = -1.f;
    i1 = -1;
  }
  __device__ float threshold(int k) const {
    const float v = k - 1 < 32 ? s0 : s1;
    return __shfl_sync(kFull, v, (k - 1) & 31);
  }
  // Inserts after every entry with score >= s (the list shifts down by one).
  // wide (k > 32, warp-uniform): the second list (entries 32..63) shifts too.
  __device__ void insert(float s, int id, int lane, bool wide) {
    float pa = __shfl_up_sync(kFull, s0, 1);
    int ia = __shfl_up_sync(kFull, i0, 1);
    if (lane == 0) pa = INFINITY;
    if (wide) {
      float pb = __shfl_up_sync(kFull, s1, 1);
      int ib = __shfl_up_sync(kFull, i1, 1);
      const float a31 = __shfl_sync(kFull, s0, 31);
      const int ia31 = __shfl_sync(kFull, i0, 31);
      if (lane == 0) {
        pb = a31;
        ib = ia31;
      }
      if (!(s1 >= s)) {
        i1 = pb >= s ? id : ib;
        s1 = pb >= s ? s : pb;
      }
    }
    if (!(s0 >= s)) {
      i0 = pa >= s ? id : ia;
      s0 = pa >= s ? s : pa;
    }
  }
  // The first k entries' ids in ascending order, -1 slots last.
  __device__ void write_sorted(int32_t* out, int k, int lane) const {
    const int key0 = lane < k && i0 >= 0 ? i0 : INT_MAX;
    const int key1 = lane + 32 < k && i1 >= 0 ? i1 : INT_MAX;
    int rank0 = 0, rank1 = 0;
    for (int j = 0; j < 32 && j < k; ++j) {
      const int kj = __shfl_sync(kFull, key0, j);
      rank0 += kj < key0 || (kj == key0 && j < lane);
      rank1 += kj < key1 || kj == key1;  // entry j (< 32) precedes entry lane + 32
    }
    for (int j = 32; j < k; ++j) {
      const int kj = __shfl_sync(kFull, key1, j - 32);
      rank0 += kj < key0;
      rank1 += kj < key1 || (kj == key1 && j < lane + 32);
    }
    if (lane < k) out[rank0] = key0 == INT_MAX ? -1 : key0;
    if (lane + 32 < k) out[rank1] = key1 == INT_MAX ? -1 : key1;
  }
};

// Streams chunks [0, n_chunks) of pooled rows (hi, and lo when with_lo) through two
// shared-memory buffers; f(chunk, hi_tile, lo_tile) runs between CTA barriers.
template <int kD, typename F>
__device__ void stream_chunks(int n_chunks, int n_rows, bool with_lo, const __nv_bfloat16* hi,
                              const __nv_bfloat16* lo, uint32_t buffers, F&& f) {
  constexpr int kChunkBytes = kChunk * kD * 2;
  constexpr int kPieces = kChunk * kD / 8;  // 16-byte pieces per chunk
  auto stage = [&](int c) {
    const uint32_t base = buffers + (c & 1) * 2 * kChunkBytes;
    for (int i = threadIdx.x; i < kPieces; i += kWarps * 32) {
      const int row = i / (kD / 8), piece = i % (kD / 8);
      const int64_t r = static_cast<int64_t>(c) * kChunk + row;
      const bool valid = r < n_rows;
      const int64_t off = valid ? r * kD + piece * 8 : 0;
      const uint32_t dst = device::tile_offset<kD>(row, piece);
      device::cp_async_16(base + dst, hi + off, valid);
      if (with_lo) device::cp_async_16(base + kChunkBytes + dst, lo + off, valid);
    }
    device::cp_async_commit();
  };
  stage(0);
  for (int c = 0; c < n_chunks; ++c) {
    if (c + 1 < n_chunks) {
      stage(c + 1);
    } else {
      device::cp_async_commit();
    }
    device::cp_async_wait<1>();
    __syncthreads();
    const uint32_t base = buffers + (c & 1) * 2 * kChunkBytes;
    f(c, base, base + kChunkBytes);
    __syncthreads();
  }
}

// B fragments of Q^T for one unit of 16 columns, n-tile nt holding heads
// rows[nt] + c * kD for c < valid[nt] (zero above): [n-tile][k-step][b0, b1].
template <int kD>
__device__ __forceinline__ void load_q_as_b(uint32_t (&f)[2][kD / 16][2], const __nv_bfloat16* const (&rows)[2],
                                            const int (&valid)[2], int lane) {
  const int group = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    const bool ok = group < valid[nt];
    const uint32_t* r = reinterpret_cast<const uint32_t*>(rows[nt] + group * kD + tig * 2);
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      f[nt][ks][0] = ok ? __ldg(r + ks * 8) : 0u;
      f[nt][ks][1] = ok ? __ldg(r + ks * 8 + 4) : 0u;
    }
  }
}

// S^T [16 blocks x 16 heads] per unit for the m-tile of blocks at `tile` (rows are
// blocks): acc[u][nt] holds blocks group / group + 8, heads nt * 8 + tig * 2 (+1).
template <int kD, int kUnits, bool kWithLo>
__device__ __forceinline__ void block_logits(float (&acc)[kUnits][2][4], const uint32_t (&qb)[kUnits][2][kD / 16][2],
                                             uint32_t hi_tile, uint32_t lo_tile, int lane) {
#pragma unroll
  for (int u = 0; u < kUnits; ++u)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[u][nt][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    uint32_t a[4];
    device::ldmatrix_x4(a, device::ldm_rows_as_m<kD>(hi_tile, lane, ks));
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) device::mma_bf16(acc[u][nt], a, qb[u][nt][ks][0], qb[u][nt][ks][1]);
    if (kWithLo) {
      device::ldmatrix_x4(a, device::ldm_rows_as_m<kD>(lo_tile, lane, ks));
#pragma unroll
      for (int u = 0; u < kUnits; ++u)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) device::mma_bf16(acc[u][nt], a, qb[u][nt][ks][0], qb[u][nt][ks][1]);
    }
  }
}

template <int kD, int kMT, int kPack>
__global__ void __launch_bounds__(kWarps * 32, kD == 128 && kMT == 2 ? 1 : 2) select_kernel(const SelectParams p) {
  using C = SelectConfig<kD, kMT, kPack>;
  constexpr int kUnits = C::kUnits, kTokens = C::kTokens;
  extern __shared__ __align__(128) unsigned char smem[];
  float* colsum = reinterpret_cast<float*>(smem + 4 * C::kChunkBytes);  // [kWarps][kChunk]
  const Shape& s = p.shape;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane >> 2, tig = lane & 3;
  const int group_size = s.hq / s.hkv, bs = s.block_size, top_k = s.top_k;
  const float scale = device::kLog2e / sqrtf(static_cast<float>(kD));  // logits -> log2 units

  // CTA -> (b, kv head, token tile), the latest (heaviest) tiles first.
  const int tile_tokens = p.per_query_block ? bs : kWarps * kTokens;
  const int n_tiles = (s.sq + tile_tokens - 1) / tile_tokens;
  int64_t cta = blockIdx.x;
  const int tile = n_tiles - 1 - static_cast<int>(cta % n_tiles);
  cta /= n_tiles;
  const int kvh = static_cast<int>(cta % s.hkv);
  const int b = static_cast<int>(cta / s.hkv);
  const int t_begin = tile * tile_tokens;
  const int t_end = min(s.sq, t_begin + tile_tokens);
  const int n_blocks_cta = min(p.n_blocks, static_cast<int>((s.q_start + t_end - 1) / bs) + 1);
  const int n_chunks = (n_blocks_cta + kChunk - 1) / kChunk;
  const int64_t head_rows = (static_cast<int64_t>(b) * s.hkv + kvh) * p.n_blocks * kD;
  const __nv_bfloat16* hi = p.pooled_hi + head_rows;
  const __nv_bfloat16* lo = p.pooled_lo + head_rows;
  const uint32_t buffers = device::smem_address(smem);
  const int n_query_blocks = (s.sq + bs - 1) / bs;
  float* block_row = p.per_query_block
                         ? p.block_scores + ((static_cast<int64_t>(b) * s.hkv + kvh) * n_query_blocks + tile) * p.n_blocks
                         : nullptr;

  const int per_round = kWarps * kTokens;
  const int rounds = (t_end - t_begin + per_round - 1) / per_round;
  for (int round = 0; round < rounds; ++round) {
    int token[kTokens], n_causal[kTokens];
    int causal_min = INT_MAX;  // blocks every valid token of this warp sees
    uint32_t qb[kUnits][2][kD / 16][2];
#pragma unroll
    for (int i = 0; i < kTokens; ++i) {
      token[i] = t_begin + round * per_round + warp * kTokens + i;
      const bool valid = token[i] < t_end;
      n_causal[i] = valid ? static_cast<int>((s.q_start + token[i]) / bs) + 1 : 0;
      if (valid) causal_min = min(causal_min, n_causal[i]);
    }
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const __nv_bfloat16* rows[2];
      int valid_heads[2];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int i = C::token_of(u, nt);
        const bool valid = token[i] < t_end;
        const int first = kPack == 2 ? 0 : (u % kMT) * 16 + nt * 8;  // first head of the n-tile
        const int64_t row0 =
            (static_cast<int64_t>(b) * s.sq + (valid ? token[i] : 0)) * s.hq + kvh * group_size + first;
        rows[nt] = p.q + row0 * kD;
        valid_heads[nt] = valid ? max(0, min(8, group_size - first)) : 0;
      }
      load_q_as_b<kD>(qb[u], rows, valid_heads, lane);
    }

    // Pass 1: per head (this thread's 4 heads per unit) the running max m (raw
    // logits) and sum l of 2^((x - m) * scale) over the thread's blocks.
    float m[kUnits][4], l[kUnits][4];
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
#pragma unroll
      for (int h = 0; h < 4; ++h) m[u][h] = -INFINITY, l[u][h] = 0.f;
    stream_chunks<kD>(n_chunks, p.n_blocks, false, hi, lo, buffers, [&](int c, uint32_t hi_tile, uint32_t) {
      for (int step = 0; step < kChunk / 16; ++step) {
        const int j0 = c * kChunk + step * 16;
        if (j0 >= n_blocks_cta) break;
        float acc[kUnits][2][4];
        block_logits<kD, kUnits, false>(acc, qb, hi_tile + step * 16 * kD * 2, 0, lane);
        const bool full = j0 + 16 <= causal_min;
#pragma unroll
        for (int u = 0; u < kUnits; ++u) {
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            const int nc = n_causal[C::token_of(u, h >> 1)];
            float x0 = acc[u][h >> 1][h & 1], x1 = acc[u][h >> 1][2 + (h & 1)];
            if (!full) {
              x0 = j0 + group < nc ? x0 : -INFINITY;
              x1 = j0 + group + 8 < nc ? x1 : -INFINITY;
            }
            const float mx = fmaxf(x0, x1);
            if (mx == -INFINITY) continue;
            if (mx > m[u][h]) {
              l[u][h] *= exp2f((m[u][h] - mx) * scale);
              m[u][h] = mx;
            }
            const float ms = m[u][h] * scale;
            l[u][h] += exp2f(fmaf(x0, scale, -ms)) + exp2f(fmaf(x1, scale, -ms));
          }
        }
      }
    });
    // Combine over the 8 groups (blocks), then bias = log2 of the normaliser in
    // scaled units: p = 2^(x * scale - bias). Padded heads and tokens get +inf (p = 0).
    float bias[kUnits][4];
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        float mu = m[u][h], lu = l[u][h];
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
          const float mo = __shfl_xor_sync(kFull, mu, off), lo2 = __shfl_xor_sync(kFull, lu, off);
          const float mn = fmaxf(mu, mo);
          const float a = mu == -INFINITY ? 0.f : lu * exp2f((mu - mn) * scale);
          const float c2 = mo == -INFINITY ? 0.f : lo2 * exp2f((mo - mn) * scale);
          mu = mn;
          lu = a + c2;
        }
        const int head = kPack == 2 ? tig * 2 + (h & 1) : (u % kMT) * 16 + (h >> 1) * 8 + tig * 2 + (h & 1);
        const bool ok = head < group_size && n_causal[C::token_of(u, h >> 1)] > 0 && lu > 0.f;
        bias[u][h] = ok ? mu * scale + log2f(lu) : INFINITY;
      }

    // Pass 2: group sums of the probabilities -> running top-k (or the query block's row).
    TopK best[kTokens];
    float thr[kTokens];
#pragma unroll
    for (int i = 0; i < kTokens; ++i) {
      best[i].init(lane, n_causal[i] - 1);
      thr[i] = best[i].threshold(top_k);
    }
    stream_chunks<kD>(n_chunks, p.n_blocks, true, hi, lo, buffers, [&](int c, uint32_t hi_tile, uint32_t lo_tile) {
      for (int step = 0; step < kChunk / 16; ++step) {
        const int j0 = c * kChunk + step * 16;
        if (j0 >= n_blocks_cta) break;
        float acc[kUnits][2][4];
        block_logits<kD, kUnits, true>(acc, qb, hi_tile + step * 16 * kD * 2, lo_tile + step * 16 * kD * 2, lane);
        float warp_sum[2] = {0.f, 0.f};  // query-block mode: blocks group, group + 8 over the warp's tokens
#pragma unroll
        for (int i = 0; i < kTokens; ++i) {
          float v[2] = {0.f, 0.f};
          if (kPack == 2) {  // token i: n-tile i % 2 of unit i / 2
            const int u = i / 2, nt = i % 2;
#pragma unroll
            for (int h = nt * 2; h < nt * 2 + 2; ++h) {
              v[0] += exp2f(fmaf(acc[u][nt][h & 1], scale, -bias[u][h]));
              v[1] += exp2f(fmaf(acc[u][nt][2 + (h & 1)], scale, -bias[u][h]));
            }
          } else {
#pragma unroll
            for (int ms = 0; ms < kMT; ++ms) {
              const int u = i * kMT + ms;
#pragma unroll
              for (int h = 0; h < 4; ++h) {
                v[0] += exp2f(fmaf(acc[u][h >> 1][h & 1], scale, -bias[u][h]));
                v[1] += exp2f(fmaf(acc[u][h >> 1][2 + (h & 1)], scale, -bias[u][h]));
              }
            }
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            v[r] += __shfl_xor_sync(kFull, v[r], 1);
            v[r] += __shfl_xor_sync(kFull, v[r], 2);
            v[r] = j0 + group + 8 * r < n_causal[i] ? v[r] : 0.f;
            warp_sum[r] += v[r];
          }
          if (p.per_query_block) continue;
          const int own = n_causal[i] - 1;
          // Blocks j0 .. j0 + 7 (r = 0) then j0 + 8 .. j0 + 15, each in lane order:
          // ascending ids keep the tie rule.
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int j = j0 + group + 8 * r;
            unsigned want = __ballot_sync(kFull, tig == 0 && j < n_causal[i] && j != own && v[r] > thr[i]);
            while (want != 0) {
              const int src = __ffs(want) - 1;
              want &= want - 1;
              const float score = __shfl_sync(kFull, v[r], src);
              if (score > thr[i]) {
                best[i].insert(score, j0 + (src >> 2) + 8 * r, lane, top_k > 32);
                thr[i] = best[i].threshold(top_k);
              }
            }
          }
        }
        if (p.per_query_block && tig == 0) {
          colsum[warp * kChunk + step * 16 + group] = warp_sum[0];
          colsum[warp * kChunk + step * 16 + group + 8] = warp_sum[1];
        }
      }
      if (p.per_query_block) {
        __syncthreads();
        if (warp == 0) {
          for (int col = lane; col < kChunk; col += 32) {
            const int j = c * kChunk + col;
            if (j >= n_blocks_cta) break;
            float total = 0.f;
            for (int w2 = 0; w2 < kWarps; ++w2) total += colsum[w2 * kChunk + col];
            block_row[j] = round == 0 ? total : block_row[j] + total;
          }
        }
      }
    });
    if (!p.per_query_block) {
#pragma unroll
      for (int i = 0; i < kTokens; ++i) {
        if (n_causal[i] == 0) continue;
        int32_t* out = p.block_ids + ((static_cast<int64_t>(b) * s.sq + token[i]) * s.hkv + kvh) * top_k;
        best[i].write_sorted(out, top_k, lane);
      }
    }
  }
  if (!p.per_query_block) return;

  // Query-block mode: rank the block's row (warp 0), then copy the set to its tokens.
  int32_t* chosen = reinterpret_cast<int32_t*>(colsum);  // reuse: [top_k]
  __syncthreads();
  if (warp == 0) {
    const int n_causal = static_cast<int>((s.q_start + t_begin) / bs) + 1;
    const int own = n_causal - 1;
    TopK best;
    best.init(lane, own);
    float thr = best.threshold(top_k);
    for (int base = 0; base < n_causal; base += 32) {
      const int j = base + lane;
      const float v = j < n_causal ? block_row[j] : -1.f;
      unsigned want = __ballot_sync(kFull, j < n_causal && j != own && v > thr);
      while (want != 0) {
        const int src = __ffs(want) - 1;
        want &= want - 1;
        const float score = __shfl_sync(kFull, v, src);
        if (score > thr) {
          best.insert(score, base + src, lane, top_k > 32);
          thr = best.threshold(top_k);
        }
      }
    }
    best.write_sorted(chosen, top_k, lane);
  }
  __syncthreads();
  const int n = (t_end - t_begin) * top_k;
  for (int i = threadIdx.x; i < n; i += kWarps * 32) {
    const int t = t_begin + i / top_k, slot = i % top_k;
    p.block_ids[((static_cast<int64_t>(b) * s.sq + t) * s.hkv + kvh) * top_k + slot] = chosen[slot];
  }
}

template <int kD, int kMT, int kPack>
cudaError_t launch(const SelectParams& p, cudaStream_t stream) {
  using C = SelectConfig<kD, kMT, kPack>;
  const Shape& s = p.shape;
  const int tile_tokens = p.per_query_block ? s.block_size : kWarps * C::kTokens;
  const int64_t ctas = static_cast<int64_t>(s.batch) * s.hkv * ((s.sq + tile_tokens - 1) / tile_tokens);
  if (ctas == 0) return cudaSuccess;
  cudaError_t err =
      cudaFuncSetAttribute(select_kernel<kD, kMT, kPack>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return err;
  select_kernel<kD, kMT, kPack><<<static_cast<unsigned>(ctas), kWarps * 32, C::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_select(const SelectParams& p, cudaStream_t stream) {
  const int group = p.shape.group();
  if (group < 1 || group > kMaxGroup || p.shape.top_k < 1 || p.shape.top_k > kMaxTopK) return cudaErrorInvalidValue;
  const bool two = group > 16, packed = group <= 8;
  switch (p.shape.head_dim) {
    case 64:
      return two ? launch<64, 2, 1>(p, stream) : packed ? launch<64, 1, 2>(p, stream) : launch<64, 1, 1>(p, stream);
    case 128:
      return two ? launch<128, 2, 1>(p, stream) : packed ? launch<128, 1, 2>(p, stream) : launch<128, 1, 1>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ssa::kernels::cuda
