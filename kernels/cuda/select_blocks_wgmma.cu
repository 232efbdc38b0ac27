// Block selection with warpgroup mma (sm_90a) for head dim 64 and GQA groups of
// 8 or 16, per-token mode: the same result as select_blocks.cu (see there for the
// two passes and the pooled keys' hi + lo parts), with the roles turned around.
// bf16 pooled keys come as exact images (params.cuh): both passes then take
// their products with the keys themselves, scaled to log2 units in fp32.
// Here a warp owns whole tokens: its 16 A rows are the query heads of one token
// (group 16) or of two (group 8), held in registers for the whole stream, and
// one m64n64k16 product per k-step gives every warp of the warpgroup the logits
// of its rows against all 64 pooled blocks of a chunk (B, the chunk in shared
// memory). So a token's block scores, normalisers and running top-k stay inside
// one warp: a block's sum over the token's heads is a sum over the 8 row groups,
// done as a halving exchange that leaves lane l with blocks 2l and 2l + 1.
#include <cuda_bf16.h>

#include <climits>
#include <cmath>
#include <type_traits>

#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/params.cuh"
#include "kernels/cuda/select_common.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace ssa::kernels::cuda {
namespace {

using device::kChunk;
using device::kFull;
using device::stream_chunks;
using device::TopK;

constexpr int kD = 64;
constexpr int kWarps = 4;  // one warpgroup
constexpr int kUnits = 2;  // A tiles (16 rows) per warp
// A chunk whose candidates above a token's threshold sit in at least this many
// lanes is sorted and merged into the top-k at once (TopK::merge_candidates);
// fewer are inserted one by one. On random scores a token's first chunk brings
// ~k (1 + ln 4) insertions, the next ~k ln 2, then fewer.
constexpr int kMergeLanes = 10;
static_assert(kChunk == 64, "one m64n64 product covers a chunk");
// Logits within +-kPlainBound (log2 units) keep 2^x and its sums over up to 2^27
// blocks inside fp32's normal range with no reference subtracted.
constexpr float kPlainBound = 96.f;
enum class Reference { kNone, kBounds, kMax };
// The kernel is latency-bound (neither its exps nor its products fill their
// pipes), so CTAs per SM count most. Group 16 runs 5 per SM: two chunk buffers
// (33 KB of shared memory) and at most 96 registers, a few spilled outside the
// inner loops; at 32K that took 1133-1157 us against 1189 us with 4 CTAs of three
// buffers (two buffers alone: 1198). Group 8 holds twice the tokens' state per
// warp and would spill more, so it keeps 4 CTAs of three buffers.
template <int kG>
struct Occupancy {
  static constexpr int kBuffers = kG == 16 ? 2 : 3;
  static constexpr int kCtasPerSm = kG == 16 ? 5 : 4;
  static constexpr int kSmem = device::chunk_stream_bytes<kD, kBuffers>() + 1024;  // with 1024-byte alignment slack
};

// Sums v[c] (c = 2 * j + e: column 8 j + tig * 2 + e of this lane's row group) over
// the 8 row groups of the warp. Lane (group, tig) ends with columns 2 * lane + i
// in x[i].
__device__ __forceinline__ void sum_over_groups(const float (&v)[16], float (&x)[2], int group) {
  float w8[8], w4[4];
  const bool b2 = group & 4, b1 = group & 2, b0 = group & 1;
#pragma unroll
  for (int i = 0; i < 8; ++i) w8[i] = (b2 ? v[i + 8] : v[i]) + __shfl_xor_sync(kFull, b2 ? v[i] : v[i + 8], 16);
#pragma unroll
  for (int i = 0; i < 4; ++i) w4[i] = (b1 ? w8[i + 4] : w8[i]) + __shfl_xor_sync(kFull, b1 ? w8[i] : w8[i + 4], 8);
#pragma unroll
  for (int i = 0; i < 2; ++i) x[i] = (b0 ? w4[i + 2] : w4[i]) + __shfl_xor_sync(kFull, b0 ? w4[i] : w4[i + 2], 4);
}

// kG: heads per kv head (8 or 16). Row r of a thread (0: group, 1: group + 8) is
// head group + 8 r of token 0 of the unit (kG = 16), or head group of token r (kG = 8).
// kWide: top_k > 32, so the lists hold 64 entries; otherwise their second halves
// stay constant and take no registers. kExact: exact images (bf16 pooled keys).
template <int kG, bool kWide, bool kExact>
__global__ void __launch_bounds__(kWarps * 32, Occupancy<kG>::kCtasPerSm) select_wgmma_kernel(const SelectParams p) {
  constexpr int kBuffers = Occupancy<kG>::kBuffers;
  constexpr int kRowTokens = 16 / kG;             // tokens per unit
  constexpr int kTokens = kUnits * kRowTokens;    // tokens per warp
  extern __shared__ unsigned char smem[];
  const uint32_t buffers = (device::smem_address(smem) + 1023u) & ~1023u;
  const Shape& s = p.shape;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane >> 2, tig = lane & 3;
  const int bs = s.block_size, top_k = s.top_k;

  const device::SelectTile<kD> ct(p, kWarps * kTokens);
  const int b = ct.b, kvh = ct.kvh, t_begin = ct.t_begin, t_end = ct.t_end, n_chunks = ct.n_chunks;
  const float* chunk_norm = ct.chunk_norm;

  int token[kTokens], n_causal[kTokens];
#pragma unroll
  for (int i = 0; i < kTokens; ++i) {
    token[i] = t_begin + warp * kTokens + i;
    n_causal[i] = token[i] < t_end ? static_cast<int>(s.q_pos(token[i]) / bs) + 1 : 0;
  }
  auto token_of = [](int u, int r) { return u * kRowTokens + (kRowTokens == 2 ? r : 0); };

  // A fragments (q rows), and |q| of each of this thread's two rows.
  uint32_t qa[kUnits][kD / 16][4];
  float qs[kUnits][2];
#pragma unroll
  for (int u = 0; u < kUnits; ++u) {
    const uint32_t* rows[2];
    bool ok[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = token_of(u, r);
      ok[r] = n_causal[i] > 0;
      const int head = kvh * kG + (kG == 16 ? group + 8 * r : group);
      const int64_t row = (static_cast<int64_t>(b) * s.sq + (ok[r] ? token[i] : 0)) * s.hq + head;
      rows[r] = reinterpret_cast<const uint32_t*>(p.q + row * kD + tig * 2);
    }
    float sq[2] = {0.f, 0.f};
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint32_t x = ok[r] ? __ldg(rows[r] + ks * 8 + half * 4) : 0u;
          qa[u][ks][half * 2 + r] = x;
          const float2 f = device::unpack_bf16(x);
          sq[r] = fmaf(f.x, f.x, fmaf(f.y, f.y, sq[r]));
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) qs[u][r] = sqrtf(device::quad_sum(sq[r]));
  }

  // Products of unit u with a chunk: acc = Q K^T over the first tile (and the
  // second). Logits in log2 units are acc * scale: hi + lo images come scaled
  // (scale 1, which the compiler drops).
  const float scale = kExact ? p.logit_scale : 1.f;
  float acc[32];
  auto logits = [&](int u, uint32_t first_tile, uint32_t second_tile, bool with_second) {
    const uint64_t dh = device::sw128_kmajor_desc(first_tile);
    device::fence_registers(acc);
    device::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) device::wgmma_m64n64k16(acc, qa[u][ks], dh + 2 * ks, ks > 0);
    if (with_second) {
      const uint64_t dl = device::sw128_kmajor_desc(second_tile);
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) device::wgmma_m64n64k16(acc, qa[u][ks], dl + 2 * ks, true);
    }
    device::wgmma_commit();
    device::wgmma_wait<0>();
    device::fence_registers(acc);
  };
  // Column of accumulator entry i, and its row (0: group, 1: group + 8).
  auto col_of = [&](int i) { return 8 * (i >> 2) + tig * 2 + (i & 1); };
  auto row_of = [](int i) { return (i >> 1) & 1; };

  // Pass 1: per row (head) a reference m and l = sum of 2^(x - m) over its causal
  // blocks. Where |q| times the CTA's largest chunk norm bounds every row's logits
  // by kPlainBound, 2^x neither overflows nor flushes, so m = 0 and a logit costs
  // an exp and an add (Reference::kNone); otherwise m follows the chunks' norm
  // bounds |q| * norm (kBounds, select_blocks.cu), or is the exact max, set
  // beforehand (kMax, the fallback where the bounds underflow the sums).
  float m[kUnits][2], l[kUnits][2];
  auto normalise = [&](auto reference) {
    constexpr Reference kRef = decltype(reference)::value;
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (kRef != Reference::kMax) m[u][r] = 0.f;
        l[u][r] = 0.f;
      }
    stream_chunks<kD, kWarps * 32, true, kBuffers>(n_chunks, device::kFirstTile, ct.tiles, buffers,
                                         [&](int c, uint32_t first_tile, uint32_t) {
      if (kRef == Reference::kBounds) {
        const float norm = chunk_norm[c];
#pragma unroll
        for (int u = 0; u < kUnits; ++u)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            device::raise_reference(m[u][r], l[u][r], qs[u][r] * norm);
      }
      // 2^(x * scale - m), with m = 0 known at compile time where there is none.
      auto term = [&](float x, int u, int r) {
        return exp2f(kRef == Reference::kNone ? x * scale : fmaf(x, scale, -m[u][r]));
      };
#pragma unroll
      for (int u = 0; u < kUnits; ++u) {
        logits(u, first_tile, 0, false);
        const int j0 = c * kChunk;
        if (j0 + kChunk <= min(n_causal[token_of(u, 0)], n_causal[token_of(u, 1)])) {
#pragma unroll
          for (int i = 0; i < 32; ++i) l[u][row_of(i)] += term(acc[i], u, row_of(i));
        } else {
#pragma unroll
          for (int i = 0; i < 32; ++i) {
            const int r = row_of(i);
            l[u][r] += term(j0 + col_of(i) < n_causal[token_of(u, r)] ? acc[i] : -INFINITY, u, r);
          }
        }
      }
    });
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
#pragma unroll
      for (int r = 0; r < 2; ++r) l[u][r] = device::quad_sum(l[u][r]);
  };
  // The exact max of each row's causal logits, for the fallback.
  auto row_max = [&]() {
#pragma unroll
    for (int u = 0; u < kUnits; ++u) m[u][0] = m[u][1] = -INFINITY;
    stream_chunks<kD, kWarps * 32, true, kBuffers>(n_chunks, device::kFirstTile, ct.tiles, buffers,
                                         [&](int c, uint32_t first_tile, uint32_t) {
#pragma unroll
      for (int u = 0; u < kUnits; ++u) {
        logits(u, first_tile, 0, false);
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          const int r = row_of(i);
          if (c * kChunk + col_of(i) < n_causal[token_of(u, r)]) m[u][r] = fmaxf(m[u][r], acc[i]);
        }
      }
    });
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float mx = device::quad_max(m[u][r]);
        m[u][r] = mx == -INFINITY ? 0.f : mx * scale;  // scale > 0
      }
  };

  float top_norm = 0.f;  // the largest key norm of the CTA's chunks
  for (int c = lane; c < n_chunks; c += 32) top_norm = fmaxf(top_norm, chunk_norm[c]);
  top_norm = device::warp_max(top_norm);
  bool plain = true;
#pragma unroll
  for (int u = 0; u < kUnits; ++u)
#pragma unroll
    for (int r = 0; r < 2; ++r) plain &= qs[u][r] * top_norm <= kPlainBound;
  if (__syncthreads_and(plain)) {
    normalise(std::integral_constant<Reference, Reference::kNone>());
  } else {
    normalise(std::integral_constant<Reference, Reference::kBounds>());
  }
  bool underflow = false;
#pragma unroll
  for (int u = 0; u < kUnits; ++u)
#pragma unroll
    for (int r = 0; r < 2; ++r) underflow |= n_causal[token_of(u, r)] > 0 && !(l[u][r] >= device::kUnderflowSum);
  if (__syncthreads_or(underflow)) {
    row_max();
    normalise(std::integral_constant<Reference, Reference::kMax>());
  }
  float bias[kUnits][2];  // p = 2^(x - bias); +inf for rows of no token
#pragma unroll
  for (int u = 0; u < kUnits; ++u)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      bias[u][r] = n_causal[token_of(u, r)] > 0 && l[u][r] > 0.f ? m[u][r] + log2f(l[u][r]) : INFINITY;

  // Pass 2: group sums of the probabilities -> running top-k per token.
  TopK best[kTokens];
  float thr[kTokens];
#pragma unroll
  for (int i = 0; i < kTokens; ++i) {
    best[i].init(lane, n_causal[i] - 1);
    thr[i] = best[i].threshold(top_k);
  }
  // 2^(x * scale - bias): one fused multiply-add before the exp either way.
  auto prob = [&](float x, int u, int r) { return exp2f(fmaf(x, scale, -bias[u][r])); };
  stream_chunks<kD, kWarps * 32, true, kBuffers>(n_chunks, kExact ? device::kFirstTile : device::kBothTiles, ct.tiles,
                                                 buffers, [&](int c, uint32_t first_tile, uint32_t second_tile) {
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      logits(u, first_tile, second_tile, !kExact);
#pragma unroll
      for (int t = 0; t < kRowTokens; ++t) {
        float v[16];
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (kRowTokens == 1) {
              v[2 * j + e] = prob(acc[4 * j + e], u, 0) + prob(acc[4 * j + 2 + e], u, 1);
            } else {
              v[2 * j + e] = prob(acc[4 * j + 2 * t + e], u, t);
            }
          }
        float x[2];
        sum_over_groups(v, x, group);
        const int i = u * kRowTokens + t;
        const int own = n_causal[i] - 1;
        // Blocks c * 64 + 2 * lane + e, taken in ascending order (the tie rule);
        // blocks that may not join score -1, below every threshold.
        float cand[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = c * kChunk + 2 * lane + e;
          cand[e] = j < n_causal[i] && j != own ? x[e] : -1.f;
        }
        unsigned lanes = __ballot_sync(kFull, fmaxf(cand[0], cand[1]) > thr[i]);
        if (!kWide && __popc(lanes) >= kMergeLanes) {
          const int cand_id[2] = {c * kChunk + 2 * lane, c * kChunk + 2 * lane + 1};
          best[i].merge_candidates(cand, cand_id, thr[i], lane);
          thr[i] = best[i].threshold(top_k);
          lanes = 0;
        }
        while (lanes != 0) {
          const int src = __ffs(lanes) - 1;
          lanes &= lanes - 1;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float score = __shfl_sync(kFull, cand[e], src);
            if (score > thr[i]) {
              best[i].insert(score, c * kChunk + 2 * src + e, lane, kWide);
              thr[i] = best[i].threshold(top_k);
            }
          }
        }
      }
    }
  });
#pragma unroll
  for (int i = 0; i < kTokens; ++i) {
    if (n_causal[i] == 0) continue;
    int32_t* out = p.block_ids + ((static_cast<int64_t>(b) * s.sq + token[i]) * s.hkv + kvh) * top_k;
    best[i].write_sorted(out, top_k, lane);
  }
}

template <int kG, bool kWide, bool kExact>
cudaError_t launch(const SelectParams& p, cudaStream_t stream) {
  const Shape& s = p.shape;
  const int tile_tokens = kWarps * kUnits * (16 / kG);
  const int64_t ctas = static_cast<int64_t>(s.batch) * s.hkv * ((s.sq + tile_tokens - 1) / tile_tokens);
  if (ctas == 0) return cudaSuccess;
  constexpr int kSmem = Occupancy<kG>::kSmem;
  cudaError_t err =
      cudaFuncSetAttribute(select_wgmma_kernel<kG, kWide, kExact>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  select_wgmma_kernel<kG, kWide, kExact><<<static_cast<unsigned>(ctas), kWarps * 32, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <int kG, bool kExact>
cudaError_t launch(const SelectParams& p, cudaStream_t stream) {
  return p.shape.top_k > 32 ? launch<kG, true, kExact>(p, stream) : launch<kG, false, kExact>(p, stream);
}

template <int kG>
cudaError_t launch(const SelectParams& p, cudaStream_t stream) {
  return p.exact_keys ? launch<kG, true>(p, stream) : launch<kG, false>(p, stream);
}

}  // namespace

bool select_wgmma_fits(const SelectParams& p) {
  const int group = p.shape.group();
  return p.shape.head_dim == kD && (group == 8 || group == 16) && !p.per_query_block;
}

cudaError_t launch_select_wgmma(const SelectParams& p, cudaStream_t stream) {
  if (!select_wgmma_fits(p)) return cudaErrorInvalidValue;
  return p.shape.group() == 16 ? launch<16>(p, stream) : launch<8>(p, stream);
}

}  // namespace ssa::kernels::cuda
