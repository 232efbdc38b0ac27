// Block selection (ssa-method.md): for each query token and kv head, per query
// head the softmax over the token's causal blocks of q . kbar / sqrt(D), summed
// over the GQA group; the own block forced; the top_k best, ascending, -1 after.
// Nothing of size [tokens x blocks] is written: a CTA owns a tile of tokens of one
// (batch, kv head), streams the pooled keys through shared memory in chunks of 64
// blocks, and makes two passes over them:
//   1. normalisers: per (token, head) the sum of exp (log2 domain) against a
//      reference raised at most once per chunk, to |q| times the chunk's largest
//      key norm (a running max only where that bound underflows the sums);
//   2. probabilities, summed over the group in registers and shuffles, feeding a
//      running top-k per token held across the warp (lane i: entries i, i + 32).
// The mma computes S^T: M = 16 pooled blocks (from shared memory, shared by every
// token of the warp), N = 8 heads of the token's group (Q^T fragments held in
// registers), so a block's sum over heads is a thread-local sum plus one quad
// reduction. Groups of at most 8 heads pack two tokens into a 16-column unit
// (one per n-tile of 8 columns), so no mma column or exp is spent on padding
// heads of a small group (Llama-style 4 or 8 heads per kv head). The causal mask
// is applied only on the steps that cross a token's own block.
// Pooled keys come as bf16 hi + lo parts, scaled by log2(e) / sqrt(D) so that the
// products are logits in log2 units; the ranking pass uses both (near fp32
// logits, so ties and near-ties fall as in the fp32 reference), the normaliser
// pass only hi. Query-block mode: the CTA owns one query block; its tokens'
// group sums are added per block into a global row [Nb] (one per query block,
// deterministic order), then one warp ranks that row. Head dim 64 with groups of
// 8 or 16 in token mode goes to the warpgroup-mma kernel (select_blocks_wgmma.cu).
#include <cuda_bf16.h>

#include <climits>
#include <cmath>

#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/params.cuh"
#include "kernels/cuda/select_common.cuh"

namespace ssa::kernels::cuda {
namespace {

using device::kBothTiles;
using device::kChunk;
using device::kFirstTile;
using device::kFull;
using device::stream_chunks;
using device::TopK;
constexpr int kWarps = 8;

// kMT: 16-head tiles per token (group > 16: 2); kPack: tokens per 16-column unit
// (group <= 8: 2, one per n-tile; else 1).
template <int kD, int kMT, int kPack>
struct SelectConfig {
  static constexpr int kUnits = kD == 128 && kMT == 1 ? 1 : 2;  // 16-column tiles per warp
  static constexpr int kTokens = kUnits * kPack / kMT;          // tokens per warp per round
  // Token slot of unit u's n-tile nt.
  static __device__ __forceinline__ int token_of(int u, int nt) { return kPack == 2 ? u * 2 + nt : u / kMT; }
  // The chunk stream's buffers, then the per-warp column sums of a chunk.
  static constexpr int kSmem = device::chunk_stream_bytes<kD>() + kWarps * kChunk * 4;
};

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
  extern __shared__ __align__(1024) unsigned char smem[];
  float* colsum = reinterpret_cast<float*>(smem + device::chunk_stream_bytes<kD>());  // [kWarps][kChunk]
  const Shape& s = p.shape;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane >> 2, tig = lane & 3;
  const int group_size = s.hq / s.hkv, bs = s.block_size, top_k = s.top_k;

  const int tile_tokens = p.per_query_block ? bs : kWarps * kTokens;
  const device::SelectTile<kD> ct(p, tile_tokens);
  const int b = ct.b, kvh = ct.kvh, tile = ct.tile, t_begin = ct.t_begin, t_end = ct.t_end;
  const int n_blocks_cta = ct.n_blocks, n_chunks = ct.n_chunks;
  const uint32_t buffers = device::smem_address(smem);
  const int n_query_blocks = (s.sq + bs - 1) / bs;
  float* block_row = p.per_query_block
                         ? p.block_scores + ((static_cast<int64_t>(b) * s.hkv + kvh) * n_query_blocks + tile) * p.n_blocks
                         : nullptr;

  const float* chunk_norm = ct.chunk_norm;
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
      n_causal[i] = valid ? static_cast<int>(s.q_pos(token[i]) / bs) + 1 : 0;
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

    // Column h of unit u is a real head of a real token.
    auto head_valid = [&](int u, int h) {
      const int head = kPack == 2 ? tig * 2 + (h & 1) : (u % kMT) * 16 + (h >> 1) * 8 + tig * 2 + (h & 1);
      return head < group_size && n_causal[C::token_of(u, h >> 1)] > 0;
    };
    // The normalisers with a running max per head (log2 units), combined over
    // the 8 groups: the fallback of pass 1 for bounds that underflow.
    auto normalise_exact = [&](float (&m)[kUnits][4], float (&l)[kUnits][4]) {
#pragma unroll
      for (int u = 0; u < kUnits; ++u)
#pragma unroll
        for (int h = 0; h < 4; ++h) m[u][h] = -INFINITY, l[u][h] = 0.f;
      stream_chunks<kD, kWarps * 32>(n_chunks, kFirstTile, ct.tiles, buffers, [&](int c, uint32_t hi_tile, uint32_t) {
        for (int step = 0; step < kChunk / 16; ++step) {
          const int j0 = c * kChunk + step * 16;
          if (j0 >= n_blocks_cta) break;
          float acc[kUnits][2][4];
          block_logits<kD, kUnits, false>(acc, qb, hi_tile + step * 16 * kD * 2, 0, lane);
#pragma unroll
          for (int u = 0; u < kUnits; ++u)
#pragma unroll
            for (int h = 0; h < 4; ++h) {
              const int nc = n_causal[C::token_of(u, h >> 1)];
              const float x0 = j0 + group < nc ? acc[u][h >> 1][h & 1] : -INFINITY;
              const float x1 = j0 + group + 8 < nc ? acc[u][h >> 1][2 + (h & 1)] : -INFINITY;
              const float mx = fmaxf(m[u][h], fmaxf(x0, x1));
              if (mx == -INFINITY) continue;
              l[u][h] = l[u][h] * exp2f(m[u][h] - mx) + exp2f(x0 - mx) + exp2f(x1 - mx);
              m[u][h] = mx;
            }
        }
      });
#pragma unroll
      for (int u = 0; u < kUnits; ++u)
#pragma unroll
        for (int h = 0; h < 4; ++h)
#pragma unroll
          for (int off = 4; off < 32; off <<= 1) {
            const float mo = __shfl_xor_sync(kFull, m[u][h], off), lo2 = __shfl_xor_sync(kFull, l[u][h], off);
            const float mn = fmaxf(m[u][h], mo);
            const float a = m[u][h] == -INFINITY ? 0.f : l[u][h] * exp2f(m[u][h] - mn);
            const float c2 = mo == -INFINITY ? 0.f : lo2 * exp2f(mo - mn);
            m[u][h] = mn;
            l[u][h] = a + c2;
          }
    };

    // Pass 1: per head (this thread's 4 heads per unit) a reference m (log2
    // units) and the sum l of 2^(x - m) over the thread's blocks (x: a logit in
    // log2 units, as the chunk images are scaled). Cauchy-Schwarz gives each chunk
    // a bound |q| * (largest key norm) on
    // its logits, so m is raised at most once per chunk and the steps run without
    // branches. Bounds far above the largest logit could underflow l; then the
    // CTA redoes the pass with a running max (normalise_exact).
    float qs[kUnits][4];  // |q| of each of this thread's heads
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      float qn[2];  // |q| of head `group` of each n-tile
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        float sq = 0.f;
#pragma unroll
        for (int ks = 0; ks < kD / 16; ++ks)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float2 f = device::unpack_bf16(qb[u][nt][ks][e]);
            sq = fmaf(f.x, f.x, fmaf(f.y, f.y, sq));
          }
        qn[nt] = device::quad_sum(sq);
      }
#pragma unroll
      for (int h = 0; h < 4; ++h) qs[u][h] = sqrtf(__shfl_sync(kFull, qn[h >> 1], (tig * 2 + (h & 1)) * 4));
    }
    float m[kUnits][4], l[kUnits][4];
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
#pragma unroll
      for (int h = 0; h < 4; ++h) m[u][h] = 0.f, l[u][h] = 0.f;
    stream_chunks<kD, kWarps * 32>(n_chunks, kFirstTile, ct.tiles, buffers, [&](int c, uint32_t hi_tile, uint32_t) {
      const float norm = chunk_norm[c];
#pragma unroll
      for (int u = 0; u < kUnits; ++u)
#pragma unroll
        for (int h = 0; h < 4; ++h)
          device::raise_reference(m[u][h], l[u][h], qs[u][h] * norm);
      for (int step = 0; step < kChunk / 16; ++step) {
        const int j0 = c * kChunk + step * 16;
        if (j0 >= n_blocks_cta) break;
        float acc[kUnits][2][4];
        block_logits<kD, kUnits, false>(acc, qb, hi_tile + step * 16 * kD * 2, 0, lane);
        if (j0 + 16 <= causal_min) {
#pragma unroll
          for (int u = 0; u < kUnits; ++u)
#pragma unroll
            for (int h = 0; h < 4; ++h)
              l[u][h] += exp2f(acc[u][h >> 1][h & 1] - m[u][h]) + exp2f(acc[u][h >> 1][2 + (h & 1)] - m[u][h]);
        } else {
#pragma unroll
          for (int u = 0; u < kUnits; ++u)
#pragma unroll
            for (int h = 0; h < 4; ++h) {
              const int nc = n_causal[C::token_of(u, h >> 1)];
              const float x0 = j0 + group < nc ? acc[u][h >> 1][h & 1] : -INFINITY;
              const float x1 = j0 + group + 8 < nc ? acc[u][h >> 1][2 + (h & 1)] : -INFINITY;
              l[u][h] += exp2f(x0 - m[u][h]) + exp2f(x1 - m[u][h]);
            }
        }
      }
    });
    // m is the same on the 8 groups (lanes of one tig): the sums just add.
    bool underflow = false;
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
#pragma unroll
      for (int h = 0; h < 4; ++h) {
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) l[u][h] += __shfl_xor_sync(kFull, l[u][h], off);
        underflow |= head_valid(u, h) && !(l[u][h] >= device::kUnderflowSum);
      }
    if (__syncthreads_or(underflow)) normalise_exact(m, l);
    // bias = log2 of the normaliser: p = 2^(x - bias). Padded heads and
    // tokens get +inf (p = 0).
    float bias[kUnits][4];
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
#pragma unroll
      for (int h = 0; h < 4; ++h) bias[u][h] = head_valid(u, h) && l[u][h] > 0.f ? m[u][h] + log2f(l[u][h]) : INFINITY;

    // Pass 2: group sums of the probabilities -> running top-k (or the query block's row).
    TopK best[kTokens];
    float thr[kTokens];
#pragma unroll
    for (int i = 0; i < kTokens; ++i) {
      best[i].init(lane, n_causal[i] - 1);
      thr[i] = best[i].threshold(top_k);
    }
    stream_chunks<kD, kWarps * 32>(n_chunks, kBothTiles, ct.tiles, buffers, [&](int c, uint32_t hi_tile, uint32_t lo_tile) {
      for (int step = 0; step < kChunk / 16; ++step) {
        const int j0 = c * kChunk + step * 16;
        if (j0 >= n_blocks_cta) break;
        float acc[kUnits][2][4];
        block_logits<kD, kUnits, true>(acc, qb, hi_tile + step * 16 * kD * 2, lo_tile + step * 16 * kD * 2, lane);
        // Every token's block scores first (one stretch of independent exp and
        // shuffle work), then the top-k insertions.
        float v[kTokens][2];
#pragma unroll
        for (int i = 0; i < kTokens; ++i) {
          v[i][0] = v[i][1] = 0.f;
          if (kPack == 2) {  // token i: n-tile i % 2 of unit i / 2
            const int u = i / 2, nt = i % 2;
#pragma unroll
            for (int h = nt * 2; h < nt * 2 + 2; ++h) {
              v[i][0] += exp2f(acc[u][nt][h & 1] - bias[u][h]);
              v[i][1] += exp2f(acc[u][nt][2 + (h & 1)] - bias[u][h]);
            }
          } else {
#pragma unroll
            for (int ms = 0; ms < kMT; ++ms) {
              const int u = i * kMT + ms;
#pragma unroll
              for (int h = 0; h < 4; ++h) {
                v[i][0] += exp2f(acc[u][h >> 1][h & 1] - bias[u][h]);
                v[i][1] += exp2f(acc[u][h >> 1][2 + (h & 1)] - bias[u][h]);
              }
            }
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            v[i][r] += __shfl_xor_sync(kFull, v[i][r], 1);
            v[i][r] += __shfl_xor_sync(kFull, v[i][r], 2);
            v[i][r] = j0 + group + 8 * r < n_causal[i] ? v[i][r] : 0.f;
          }
        }
        float warp_sum[2] = {0.f, 0.f};  // query-block mode: blocks group, group + 8 over the warp's tokens
        if (p.per_query_block) {
#pragma unroll
          for (int i = 0; i < kTokens; ++i) warp_sum[0] += v[i][0], warp_sum[1] += v[i][1];
        } else {
#pragma unroll
          for (int i = 0; i < kTokens; ++i) {
            const int own = n_causal[i] - 1;
            // Blocks j0 .. j0 + 7 (r = 0) then j0 + 8 .. j0 + 15, each in lane order:
            // ascending ids keep the tie rule.
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int j = j0 + group + 8 * r;
              unsigned want = __ballot_sync(kFull, tig == 0 && j < n_causal[i] && j != own && v[i][r] > thr[i]);
              while (want != 0) {
                const int src = __ffs(want) - 1;
                want &= want - 1;
                const float score = __shfl_sync(kFull, v[i][r], src);
                if (score > thr[i]) {
                  best[i].insert(score, j0 + (src >> 2) + 8 * r, lane, top_k > 32);
                  thr[i] = best[i].threshold(top_k);
                }
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
    const int n_causal = static_cast<int>(s.q_pos(t_begin) / bs) + 1;
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
  if (select_wgmma_fits(p)) return launch_select_wgmma(p, stream);
  if (p.exact_keys) return cudaErrorInvalidValue;  // this kernel reads hi + lo images only
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
