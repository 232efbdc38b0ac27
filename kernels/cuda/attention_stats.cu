// Eval statistics of the full causal attention without forming S x S: per (b, head,
// query) one flash-style pass over the causal keys keeps, per row, the running max
// m, the sum l of 2^(x - m), e = sum 2^(x - m) (x - m) and the part ls of l inside
// the query's selected blocks (x = q . k / sqrt(D) in log2 units). Then
//   entropy (bits) = log2(l) - e / l,  sparsity = ls / l.
// A CTA owns 64 consecutive queries of one (b, head), 16 per warp as the mma's M;
// key chunks of 64 positions are staged in shared memory for all four warps.
#include <cuda_bf16.h>

#include <cmath>

#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/params.cuh"
#include "kernels/cuda/sparse_tiles.cuh"

namespace ssa::kernels::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kRows = kWarps * 16;  // queries per CTA
constexpr int kChunk = 64;          // keys per shared-memory chunk

template <int kD>
__host__ __device__ constexpr int chunk_bytes() {
  return kChunk * kD * 2;
}

struct RowStats {
  float m = -INFINITY, l = 0.f, e = 0.f, ls = 0.f;

  __device__ void add(float x, bool selected) {
    if (x == -INFINITY) return;
    if (x > m) {
      if (m != -INFINITY) {
        const float alpha = exp2f(m - x);
        e = alpha * (e + (m - x) * l);
        l *= alpha;
        ls *= alpha;
      }
      m = x;
    }
    const float d = x - m;
    const float w = exp2f(d);
    l += w;
    e += w * d;
    ls += selected ? w : 0.f;
  }
  // Combines the four lanes of a quad (same row, different columns).
  __device__ void quad_combine() {
    const float mx = device::quad_max(m);
    const float alpha = m == -INFINITY ? 0.f : exp2f(m - mx);
    const float shift = m == -INFINITY ? 0.f : (m - mx) * l;
    e = device::quad_sum(alpha * (e + shift));
    l = device::quad_sum(alpha * l);
    ls = device::quad_sum(alpha * ls);
    m = mx;
  }
};

template <int kD>
__global__ void __launch_bounds__(kWarps * 32) stats_kernel(const StatsParams p) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const Shape& s = p.shape;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane >> 2, tig = lane & 3;
  const int group_size = s.hq / s.hkv;
  const float scale_log2 = device::kLog2e / sqrtf(static_cast<float>(kD));

  const int n_tiles = (s.sq + kRows - 1) / kRows;
  int64_t cta = blockIdx.x;
  const int tile = n_tiles - 1 - static_cast<int>(cta % n_tiles);  // latest queries (most keys) first
  cta /= n_tiles;
  const int h = static_cast<int>(cta % s.hq);
  const int b = static_cast<int>(cta / s.hq);
  const int kvh = h / group_size;
  const int t0 = tile * kRows + warp * 16;  // this warp's first query
  const int cta_last = min(s.sq, (tile + 1) * kRows) - 1;
  const int n_keys = min(s.sk, cta_last + 1);
  const int n_chunks = (n_keys + kChunk - 1) / kChunk;

  // Q rows t0 .. t0 + 15 of head h: stride Hq * D between rows.
  uint32_t qf[kD / 16][4];
  {
    const int rows_valid = max(0, min(16, s.sq - t0));
    const int64_t stride = static_cast<int64_t>(s.hq) * kD;
    const __nv_bfloat16* q0 = p.q + ((static_cast<int64_t>(b) * s.sq + t0) * s.hq + h) * kD + tig * 2;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      const bool lo_ok = group < rows_valid, hi_ok = group + 8 < rows_valid;
      const __nv_bfloat16* r0 = q0 + group * stride + ks * 16;
      const __nv_bfloat16* r1 = q0 + (group + 8) * stride + ks * 16;
      qf[ks][0] = lo_ok ? __ldg(reinterpret_cast<const uint32_t*>(r0)) : 0u;
      qf[ks][1] = hi_ok ? __ldg(reinterpret_cast<const uint32_t*>(r1)) : 0u;
      qf[ks][2] = lo_ok ? __ldg(reinterpret_cast<const uint32_t*>(r0 + 8)) : 0u;
      qf[ks][3] = hi_ok ? __ldg(reinterpret_cast<const uint32_t*>(r1 + 8)) : 0u;
    }
  }
  // Per row: its query position and a cursor into its ascending block list.
  int t_row[2], cursor[2], next_id[2];
  const int32_t* ids_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    t_row[r] = t0 + group + 8 * r;
    const int t_safe = min(t_row[r], s.sq - 1);
    ids_row[r] = p.block_ids + ((static_cast<int64_t>(b) * s.sq + t_safe) * s.hkv + kvh) * s.top_k;
    cursor[r] = 0;
    next_id[r] = ids_row[r][0];
  }
  RowStats st[2];

  const int64_t row_stride = static_cast<int64_t>(s.hkv) * kD;
  const __nv_bfloat16* k_head = p.k + static_cast<int64_t>(b) * s.sk * row_stride + static_cast<int64_t>(kvh) * kD;
  const uint32_t buffers = device::smem_address(smem);
  auto stage = [&](int c) {
    const uint32_t base = buffers + (c & 1) * chunk_bytes<kD>();
    for (int i = threadIdx.x; i < kChunk * kD / 8; i += kWarps * 32) {
      const int row = i / (kD / 8), piece = i % (kD / 8);
      const int kp = c * kChunk + row;
      const bool valid = kp < s.sk;
      device::cp_async_16(base + device::tile_offset<kD>(row, piece),
                          valid ? k_head + kp * row_stride + piece * 8 : k_head, valid);
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
    const uint32_t base = buffers + (c & 1) * chunk_bytes<kD>();
#pragma unroll
    for (int kt = 0; kt < kChunk / kKeyTile; ++kt) {
      const int k0 = c * kChunk + kt * kKeyTile;
      if (k0 > t0 + 15 || k0 >= s.sk) break;  // warp-uniform: no key of the tile is visible
      float sc[2][4];
      device::mma_a_tile_t<kD>(sc, qf, base + kt * kKeyTile * kD * 2, lane);
      // The tile lies in one block (block_size % 16 == 0): one membership test per row.
      const int block = k0 / s.block_size;
      bool selected[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        while (next_id[r] >= 0 && next_id[r] < block) {
          ++cursor[r];
          next_id[r] = cursor[r] < s.top_k ? ids_row[r][cursor[r]] : -1;
        }
        selected[r] = next_id[r] == block;
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const int kp = k0 + nt * 8 + tig * 2 + (e & 1);
          const bool valid = kp <= t_row[r] && kp < s.sk && t_row[r] < s.sq;
          st[r].add(valid ? sc[nt][e] * scale_log2 : -INFINITY, selected[r]);
        }
    }
    __syncthreads();
  }
  device::cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st[r].quad_combine();
    if (tig == 0 && t_row[r] < s.sq) {
      const int64_t out = (static_cast<int64_t>(b) * s.hq + h) * s.sq + t_row[r];
      const bool any = st[r].l > 0.f;
      p.sparsity[out] = any ? st[r].ls / st[r].l : 0.f;
      p.entropy_bits[out] = any ? log2f(st[r].l) - st[r].e / st[r].l : 0.f;
    }
  }
}

template <int kD>
cudaError_t launch(const StatsParams& p, cudaStream_t stream) {
  const Shape& s = p.shape;
  const int64_t ctas = static_cast<int64_t>(s.batch) * s.hq * ((s.sq + kRows - 1) / kRows);
  if (ctas == 0) return cudaSuccess;
  stats_kernel<kD><<<static_cast<unsigned>(ctas), kWarps * 32, 2 * chunk_bytes<kD>(), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_stats(const StatsParams& p, cudaStream_t stream) {
  switch (p.shape.head_dim) {
    case 64: return launch<64>(p, stream);
    case 128: return launch<128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ssa::kernels::cuda
