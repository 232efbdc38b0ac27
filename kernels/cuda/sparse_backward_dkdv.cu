// Block-sparse attention backward, step 3: dk and dv. Many queries select the same
// key block (always under causal top-k), so instead of scattering per-query
// contributions with atomics, each warp owns one key tile [16 keys, D] and walks
// the queries that selected its block (the inverted index built by the wrapper):
// per query token and tile of 16 query heads
//   S^T = K Q^T, P^T = exp2(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//   dV += P^T dO, dK += dS^T Q              (keys are the M dimension of the mma)
// A block selected by many queries is split into items of at most
// kMaxEntriesPerItem queries; their partial sums are either added with float
// atomics (fast) or written out and summed in a fixed order (deterministic).
#include <cuda_bf16.h>

#include <climits>
#include <cmath>

#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/params.cuh"
#include "kernels/cuda/sparse_tiles.cuh"

namespace ssa::kernels::cuda {
namespace {

// One warp per CTA: a warp's items vary in length (1 to kMaxEntriesPerItem
// queries), and a CTA of several warps would hold its registers and shared memory
// until its longest warp is done.
constexpr int kWarps = 1;

template <int kD>
__host__ __device__ constexpr int tile_bytes() {
  return kKeyTile * kD * 2;
}
// With head dim 64, K and V live in registers (A fragments) for the whole item;
// with 128 the registers go to dK and dV, and K and V are re-read from shared
// memory per unit.
template <int kD>
__host__ __device__ constexpr bool kv_in_registers() {
  return kD == 64;
}
// Stages of query rows per warp. With head dim 64 and K and V's tiles inside the
// stages, a warp takes 12.4 KB, so the register limit (12 warps) decides the SM's
// warps instead of shared memory (10 when K and V had tiles of their own): dK/dV
// took 671 against 691-695 us at 32K tokens on the H200. A fourth stage (more rows
// in flight per warp) was slower: 713 against 688 us.
template <int kD>
__host__ __device__ constexpr int dkdv_stages() {
  return kD == 64 ? 3 : 2;
}
// Per stage: Q rows, dO rows [16, kD] bf16 each, then lse2 and delta [16] fp32,
// padded so that every tile stays at a multiple of 2 * kD bytes (ldm_address).
template <int kD>
__host__ __device__ constexpr int stage_bytes() {
  return (2 * tile_bytes<kD>() + 2 * 16 * 4 + 2 * kD - 1) / (2 * kD) * (2 * kD);
}
// Per warp: the K and V tiles, then the stages. When K and V go to registers,
// their tiles are first copied into the last two stages, which take query rows
// once K and V have been read.
template <int kD>
__host__ __device__ constexpr int warp_bytes() {
  return (kv_in_registers<kD>() ? 0 : 2 * tile_bytes<kD>()) + dkdv_stages<kD>() * stage_bytes<kD>();
}
static_assert(dkdv_stages<64>() >= 3 && 2 * tile_bytes<64>() <= 2 * stage_bytes<64>(),
              "K and V fit in the last two stages, and at least one stage is free for them");

// Decoded work item of one warp.
struct Item {
  int b, kvh, sub;
  int64_t block;       // global block id
  int64_t tile_start;  // first key position of the tile
  int64_t lo, hi;      // valid key positions of the tile
  int begin, end;      // entry range
};

__device__ Item decode_item(const BackwardDkdvParams& p, int64_t warp_index) {
  const Shape& s = p.shape;
  Item it;
  const int64_t item = warp_index / p.tiles_per_block;
  it.sub = static_cast<int>(warp_index % p.tiles_per_block);
  int64_t bucket = p.item_bucket[item];
  const int64_t jr = bucket % p.blocks_per_chunk;
  bucket /= p.blocks_per_chunk;
  bucket /= p.n_token_chunks;  // the token chunk only orders the work
  it.kvh = static_cast<int>(bucket % s.hkv);
  it.b = static_cast<int>(bucket / s.hkv);
  it.block = p.block_first + jr;
  const int64_t block_start = it.block * s.block_size;
  it.tile_start = block_start + static_cast<int64_t>(it.sub) * kKeyTile;
  const int64_t block_end = block_start + s.block_size;
  const int64_t k_end = s.k_start + s.sk;
  it.lo = max(block_start, s.k_start);
  it.hi = min(block_end, k_end);
  it.begin = p.item_begin[item];
  it.end = p.item_end[item];
  return it;
}

template <int kD>
__global__ void __launch_bounds__(kWarps * 32, kD == 64 ? 12 : 4) backward_dkdv_kernel(const BackwardDkdvParams p) {
  constexpr int kStages = dkdv_stages<kD>();
  extern __shared__ __align__(1024) unsigned char smem[];
  const Shape& s = p.shape;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t n_items = p.n_items_device != nullptr ? *p.n_items_device : p.n_items;
  if (w >= n_items * p.tiles_per_block) return;
  const Item it = decode_item(p, w);
  const int group_size = s.hq / s.hkv, mtiles = (group_size + 15) / 16;
  const int group = lane >> 2, tig = lane & 3;
  const float scale = 1.f / sqrtf(static_cast<float>(kD));
  const float scale_log2 = device::kLog2e * scale;

  constexpr bool kKvInRegisters = kv_in_registers<kD>();
  const int stage0_offset = warp * warp_bytes<kD>() + (kKvInRegisters ? 0 : 2 * tile_bytes<kD>());
  const uint32_t stage0 = device::smem_address(smem) + stage0_offset;
  const uint32_t k_tile =
      kKvInRegisters ? stage0 + (kStages - 2) * stage_bytes<kD>() : device::smem_address(smem) + warp * warp_bytes<kD>();
  const uint32_t v_tile = k_tile + tile_bytes<kD>();
  const float* stage0_f = reinterpret_cast<const float*>(smem + stage0_offset);

  const int64_t k_lo = s.k_start, k_hi = s.k_start + s.sk;
  const int64_t row_stride = static_cast<int64_t>(s.hkv) * kD;
  const int64_t head_offset = static_cast<int64_t>(it.b) * s.sk * row_stride + static_cast<int64_t>(it.kvh) * kD;
  const device::RowCopier<kD> copier(lane);
  copier.copy(k_tile, p.k + head_offset, row_stride, it.tile_start, k_lo, k_hi);
  copier.copy(v_tile, p.v + head_offset, row_stride, it.tile_start, k_lo, k_hi);
  device::cp_async_commit();

  // Keys of the tile that exist: [key_lo, tile_hi) relative to its start; a query
  // at relative position rel sees keys up to rel. Positions relative to the tile
  // fit in int (token counts do).
  const int key_lo = it.lo > it.tile_start ? static_cast<int>(it.lo - it.tile_start) : 0;
  const int tile_hi = static_cast<int>(min(it.hi - it.tile_start, static_cast<int64_t>(kKeyTile)));
  const bool split = s.q_split < s.sq;  // zigzag: rows from q_split on sit at q_start_late + (row - q_split)
  const int split_row = split ? static_cast<int>(s.q_split) : INT_MAX;
  const int rel_early = static_cast<int>(s.q_start - it.tile_start);
  const int rel_late = split ? static_cast<int>(s.q_start_late - s.q_split - it.tile_start) : 0;
  auto rel_of = [&](int t) { return (t < split_row ? rel_early : rel_late) + t; };  // q_pos(t) - tile_start

  // Work units: (entry e, head tile mt), e-major; a cursor walks them without
  // dividing by mtiles.
  const int units = (it.end - it.begin) * mtiles;
  struct Cursor {
    int e, mt;
  };
  auto advance = [mtiles](Cursor& c) {
    if (++c.mt == mtiles) {
      c.mt = 0;
      ++c.e;
    }
  };
  Cursor staged{it.begin, 0}, current{it.begin, 0};
  // The item's query rows, read once: entry begin + i in lane i % 32 of tok_lo or tok_hi.
  static_assert(kMaxEntriesPerItem <= 64, "two entries per lane");
  const int n_entries = it.end - it.begin;
  const int tok_lo = lane < n_entries ? p.entry_token[it.begin + lane] : 0;
  const int tok_hi = lane + 32 < n_entries ? p.entry_token[it.begin + 32 + lane] : 0;
  auto token_of = [&](int e) {  // warp-uniform e
    const int i = e - it.begin;
    return __shfl_sync(0xffffffffu, i < 32 ? tok_lo : tok_hi, i & 31);
  };
  // The item's rows: token t's head tile mt starts at row t * hq + mt * 16 of
  // these (q, do [.., kD] bf16; lse_log2, delta fp32), one multiply per unit.
  const int64_t item_row = static_cast<int64_t>(it.b) * s.sq * s.hq + it.kvh * group_size;
  const __nv_bfloat16* const q_item = p.q + item_row * kD;
  const __nv_bfloat16* const do_item = p.dout + item_row * kD;
  const float* const stats_item = (lane < 16 ? p.lse_log2 : p.delta) + item_row;
  auto stage = [&](int slot, const Cursor& c) {
    const int mt = c.mt;
    const int rows_valid = min(16, group_size - mt * 16);
    const int64_t row = static_cast<int64_t>(token_of(c.e)) * s.hq + mt * 16;
    const uint32_t base = stage0 + slot * stage_bytes<kD>();
    device::stage_head_rows<kD>(copier, base, q_item + row * kD, rows_valid);
    device::stage_head_rows<kD>(copier, base + tile_bytes<kD>(), do_item + row * kD, rows_valid);
    const int r = lane & 15;
    const bool valid = r < rows_valid;
    device::cp_async_4(base + 2 * tile_bytes<kD>() + lane * 4, stats_item + (valid ? row + r : 0), valid);
  };
  // Units staged before K and V are read: all but the one whose stage K and V hold.
  constexpr int kEarly = kKvInRegisters ? kStages - 2 : kStages - 1;
#pragma unroll
  for (int i = 0; i < kEarly; ++i) {
    if (i < units) {
      stage(i, staged);
      advance(staged);
    }
    device::cp_async_commit();
  }

  float dk[kD / 8][4], dv[kD / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  // K and V as A operands (keys are rows; they were the first copy group).
  uint32_t kf[kD / 16][4], vf[kD / 16][4];
  auto load_kv = [&] {
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      device::ldmatrix_x4(kf[ks], device::ldm_rows_as_m<kD>(k_tile, lane, ks));
      device::ldmatrix_x4(vf[ks], device::ldm_rows_as_m<kD>(v_tile, lane, ks));
    }
  };
  if (kKvInRegisters) {
    device::cp_async_wait<kEarly>();
    __syncwarp();
    load_kv();
    __syncwarp();  // every lane has read K and V before their stage takes rows
    if (kEarly < units) {
      stage(kEarly, staged);
      advance(staged);
    }
    device::cp_async_commit();
  }

  for (int u = 0, slot = 0; u < units; ++u, slot = slot + 1 == kStages ? 0 : slot + 1) {
    device::cp_async_wait<kStages - 2>();
    __syncwarp();
    if (u + kStages - 1 < units) {
      stage(slot == 0 ? kStages - 1 : slot - 1, staged);  // the slot read one unit ago
      advance(staged);
    }
    device::cp_async_commit();
    const uint32_t q_tile = stage0 + slot * stage_bytes<kD>();
    const uint32_t do_tile = q_tile + tile_bytes<kD>();
    const float* lse2 = stage0_f + slot * (stage_bytes<kD>() / 4) + 2 * tile_bytes<kD>() / 4;
    const float* delta = lse2 + 16;
    const int rel = rel_of(token_of(current.e));
    advance(current);
    if (!kKvInRegisters) load_kv();

    float st[2][4], dpt[2][4];  // [keys x query rows]
    device::mma_a_tile_t<kD>(st, kf, q_tile, lane);
    device::mma_a_tile_t<kD>(dpt, vf, do_tile, lane);
    // Keys (rows) this query sees: [key_lo, key_hi) relative to the tile start.
    // Padded query rows have zero q, do, lse and delta and add nothing.
    const int key_hi = min(rel + 1, tile_hi);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int col = nt * 8 + tig * 2;
      const float2 l2 = *reinterpret_cast<const float2*>(lse2 + col);
      const float2 dl = *reinterpret_cast<const float2*>(delta + col);
#pragma unroll
      for (int e2 = 0; e2 < 4; ++e2) {
        const float lse_c = (e2 & 1) ? l2.y : l2.x;
        const float delta_c = (e2 & 1) ? dl.y : dl.x;
        st[nt][e2] = exp2f(fmaf(st[nt][e2], scale_log2, -lse_c));
        dpt[nt][e2] = dpt[nt][e2] - delta_c;
      }
    }
    if (key_lo != 0 || key_hi != kKeyTile) {  // warp-uniform; most units see the whole tile
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e2 = 0; e2 < 4; ++e2) {
          const int key = group + 8 * (e2 >> 1);
          if (key < key_lo || key >= key_hi) st[nt][e2] = 0.f;
        }
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e2 = 0; e2 < 4; ++e2) dpt[nt][e2] *= st[nt][e2];  // dS^T = P^T (dP^T - delta)
    uint32_t pa[4], dsa[4];
    device::c_to_a(pa, st[0], st[1]);
    device::c_to_a(dsa, dpt[0], dpt[1]);
    device::mma_p_tile<kD>(dv, pa, do_tile, lane);
    device::mma_p_tile<kD>(dk, dsa, q_tile, lane);
  }
  device::cp_async_wait<0>();

  // Epilogue: rows are keys tile_start + group (+ 8), columns dims i * 8 + tig * 2.
  if (p.partial_dk != nullptr) {
    float* pk = p.partial_dk + w * kKeyTile * kD;
    float* pv = p.partial_dv + w * kKeyTile * kD;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int i = 0; i < kD / 8; ++i) {
        const int off = (group + 8 * r) * kD + i * 8 + tig * 2;
        *reinterpret_cast<float2*>(pk + off) = make_float2(dk[i][2 * r] * scale, dk[i][2 * r + 1] * scale);
        *reinterpret_cast<float2*>(pv + off) = make_float2(dv[i][2 * r], dv[i][2 * r + 1]);
      }
    return;
  }
  if (units == 0) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t kp = it.tile_start + group + 8 * r;
    if (kp < it.lo || kp >= it.hi) continue;
    const int64_t batch_stride = p.acc_batch_stride > 0 ? p.acc_batch_stride : s.sk * row_stride;
    const int64_t base = it.b * batch_stride + (kp - k_lo) * row_stride + static_cast<int64_t>(it.kvh) * kD + tig * 2;
#pragma unroll
    for (int i = 0; i < kD / 8; ++i) {
      atomicAdd(reinterpret_cast<float2*>(p.dk_acc + base + i * 8), make_float2(dk[i][2 * r] * scale, dk[i][2 * r + 1] * scale));
      atomicAdd(reinterpret_cast<float2*>(p.dv_acc + base + i * 8), make_float2(dv[i][2 * r], dv[i][2 * r + 1]));
    }
  }
}

// One thread per (b, key row, kv head, 4 dims): the key's partials in bucket order.
template <int kD>
__global__ void __launch_bounds__(256) dkdv_reduce_kernel(const DkdvReduceParams rp) {
  const BackwardDkdvParams& p = rp.work;
  const Shape& s = p.shape;
  constexpr int kQuads = kD / 4;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(s.batch) * s.sk * s.hkv * kQuads) return;
  const int quad = static_cast<int>(i % kQuads);
  i /= kQuads;
  const int h = static_cast<int>(i % s.hkv);
  i /= s.hkv;
  const int row = static_cast<int>(i % s.sk);
  const int b = static_cast<int>(i / s.sk);
  const int64_t kp = s.k_start + row;
  const int64_t block = kp / s.block_size;
  const int64_t jr = block - p.block_first;
  const int64_t in_block = kp - block * s.block_size;
  const int sub = static_cast<int>(in_block / kKeyTile), key = static_cast<int>(in_block % kKeyTile);
  float4 ak = make_float4(0.f, 0.f, 0.f, 0.f), av = ak;
  for (int tc = 0; tc < p.n_token_chunks; ++tc) {
    const int64_t bucket = ((static_cast<int64_t>(b) * s.hkv + h) * p.n_token_chunks + tc) * p.blocks_per_chunk + jr;
    for (int item = rp.bucket_item_begin[bucket]; item < rp.bucket_item_begin[bucket + 1]; ++item) {
      const int64_t off = ((static_cast<int64_t>(item) * p.tiles_per_block + sub) * kKeyTile + key) * kD + quad * 4;
      const float4 pk = *reinterpret_cast<const float4*>(p.partial_dk + off);
      const float4 pv = *reinterpret_cast<const float4*>(p.partial_dv + off);
      ak.x += pk.x, ak.y += pk.y, ak.z += pk.z, ak.w += pk.w;
      av.x += pv.x, av.y += pv.y, av.z += pv.z, av.w += pv.w;
    }
  }
  const int64_t out = ((static_cast<int64_t>(b) * s.sk + row) * s.hkv + h) * kD + quad * 4;
  uint2 k2, v2;
  k2.x = device::pack_bf16(ak.x, ak.y);
  k2.y = device::pack_bf16(ak.z, ak.w);
  v2.x = device::pack_bf16(av.x, av.y);
  v2.y = device::pack_bf16(av.z, av.w);
  *reinterpret_cast<uint2*>(rp.dk + out) = k2;
  *reinterpret_cast<uint2*>(rp.dv + out) = v2;
}

template <int kD>
cudaError_t launch_dkdv(const BackwardDkdvParams& p, cudaStream_t stream) {
  const int64_t warps = p.n_items * p.tiles_per_block;
  if (warps == 0) return cudaSuccess;
  constexpr int bytes = kWarps * warp_bytes<kD>();
  cudaError_t err = cudaFuncSetAttribute(backward_dkdv_kernel<kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  backward_dkdv_kernel<kD><<<static_cast<unsigned>((warps + kWarps - 1) / kWarps), kWarps * 32, bytes, stream>>>(p);
  return cudaGetLastError();
}

template <int kD>
cudaError_t launch_reduce(const DkdvReduceParams& p, cudaStream_t stream) {
  const Shape& s = p.work.shape;
  const int64_t threads = static_cast<int64_t>(s.batch) * s.sk * s.hkv * (kD / 4);
  if (threads == 0) return cudaSuccess;
  dkdv_reduce_kernel<kD><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_backward_dkdv(const BackwardDkdvParams& p, cudaStream_t stream) {
  switch (p.shape.head_dim) {
    case 64: return launch_dkdv<64>(p, stream);
    case 128: return launch_dkdv<128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_dkdv_reduce(const DkdvReduceParams& p, cudaStream_t stream) {
  switch (p.work.shape.head_dim) {
    case 64: return launch_reduce<64>(p, stream);
    case 128: return launch_reduce<128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ssa::kernels::cuda
