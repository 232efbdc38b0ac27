#pragma once
// Warp-level building blocks of the attention kernels (sm_80+ instructions that
// Hopper runs at full rate for these small tiles): cp.async copies into shared
// memory, ldmatrix fragment loads, bf16 mma.sync m16n8k16 with fp32 accumulators,
// and the swizzled [rows, D] tile layout they share.
//
// Fragment layouts of mma.m16n8k16 (lane = 4 * group + tig):
//   A [16 x 16] row-major: a0 (row group,   k tig*2..+1)  a1 (row group+8, k tig*2..+1)
//                          a2 (row group,   k tig*2+8..)  a3 (row group+8, k tig*2+8..)
//   B [16 x 8]:            b0 (k tig*2..+1, n group)      b1 (k tig*2+8.., n group)
//   C [16 x 8] fp32:       c0,c1 (row group, n tig*2..+1) c2,c3 (row group+8, n tig*2..+1)
#include <cuda_bf16.h>

#include <cstdint>

namespace ssa::kernels::cuda::device {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; with valid == false the 16 bytes are zero-filled
// and nothing is read (src must still be a mapped address).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
// 16-byte global -> shared copy.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
// 4-byte global -> shared copy, zero-filled when !valid.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// c += a * b  (bf16 inputs, fp32 accumulators)
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two bf16 (lo in the low half, the lower column).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// One register of two bf16 -> two floats (x: the low half).
__device__ __forceinline__ float2 unpack_bf16(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// The A fragment of P [16 x 16] from the two C fragments of its columns 0-7 and 8-15.
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}

// Swizzled tile of bf16 rows of kD elements (kD / 8 chunks of 16 bytes): chunk c of
// row r is stored at chunk c ^ (r & 7), so the 8 rows an ldmatrix reads hit 8
// different bank groups. Needs kD >= 64.
template <int kD>
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
  static_assert(kD % 64 == 0, "swizzled tiles need rows of a multiple of 64 bf16");
  return static_cast<uint32_t>((row * kD + ((chunk ^ (row & 7)) << 3)) * 2);  // bytes
}

// ldmatrix address of this lane for the fragments of a [16 x kD] tile at k-step
// ks. The tile's address must be a multiple of 2 * kD bytes (every tile here is:
// tiles are whole multiples of that size apart from a 1024-byte aligned base).
// Then row r's chunk c sits at (tile + r * 2 kD) | ((c ^ (r & 7)) << 4), and for a
// fixed lane (r, c = 2 ks + b) that is (tile + r * 2 kD + ((b ^ (r & 7)) << 4))
// ^ (ks << 5): one xor per k-step.
template <int kD>
__device__ __forceinline__ uint32_t ldm_address(uint32_t tile, int row, int low_chunk_bit, int ks) {
  return (tile + row * kD * 2 + ((low_chunk_bit ^ (row & 7)) << 4)) ^ (ks << 5);
}
//  b_operand_rows: B fragments of two n-tiles, tile rows are n (K for Q K^T):
//    returns {b0, b1} of rows 0-7 and {b0, b1} of rows 8-15.
template <int kD>
__device__ __forceinline__ uint32_t ldm_rows_as_n(uint32_t tile, int lane, int ks) {
  return ldm_address<kD>(tile, (lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1, ks);
}
//  A fragment of rows 0-15 at k-step ks (tile rows are m): a0..a3.
template <int kD>
__device__ __forceinline__ uint32_t ldm_rows_as_m(uint32_t tile, int lane, int ks) {
  return ldm_address<kD>(tile, (lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4, ks);
}
//  With .trans: B fragments where tile rows are k (V for P V): n-tiles 2*dn and
//  2*dn+1 (columns dn*16 .. dn*16+15): {b0, b1} of the first, {b0, b1} of the second.
template <int kD>
__device__ __forceinline__ uint32_t ldm_rows_as_k(uint32_t tile, int lane, int dn) {
  return ldm_address<kD>(tile, (lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4, dn);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

}  // namespace ssa::kernels::cuda::device
