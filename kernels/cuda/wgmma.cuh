#pragma once
// Hopper warpgroup mma (sm_90a): four warps issue one asynchronous
// m64nNk16 product. A comes from registers — each warp w supplies rows
// 16w .. 16w + 15 in the mma.m16n8k16 A-fragment layout (mma.cuh) — and B from
// shared memory through a matrix descriptor. The fp32 accumulator of warp w
// holds rows 16w + group (+8) and, per 8 columns n0, columns n0 + tig * 2 (+1):
//   d[4 * (n0 / 8) + 0, 1] = (row group,     cols n0 + tig * 2, + 1)
//   d[4 * (n0 / 8) + 2, 3] = (row group + 8, cols n0 + tig * 2, + 1)
#include <cstdint>

namespace ssa::kernels::cuda::device {

// Descriptor of a K-major B operand whose rows are 64 bf16 (128 bytes) in the
// 128-byte swizzle that tile_offset<64> writes (16-byte chunk c of row r at chunk
// c ^ (r & 7)), 1024-byte aligned: 8-row groups 1024 bytes apart. Adding 2 to the
// descriptor moves the start 32 bytes on, to the next k-step of 16.
__device__ __forceinline__ uint64_t sw128_kmajor_desc(uint32_t smem_addr) {
  uint64_t d = (smem_addr & 0x3FFFFu) >> 4;         // start address
  d |= static_cast<uint64_t>(1) << 16;               // leading byte offset (unused when swizzled)
  d |= static_cast<uint64_t>(1024 >> 4) << 32;       // stride byte offset: next 8 rows
  d |= static_cast<uint64_t>(1) << 62;               // 128-byte swizzle
  return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accumulator reads or writes across wgmma calls.
template <int kN>
__device__ __forceinline__ void fence_registers(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (+)= A x B for m64n64k16, bf16 inputs, fp32 accumulators; accumulate == false
// overwrites d.
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], const uint32_t (&a)[4], uint64_t b_desc,
                                                bool accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %38, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, %37;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "n"(0), "r"(static_cast<int>(accumulate)));
}

}  // namespace ssa::kernels::cuda::device
