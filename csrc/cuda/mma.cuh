// Warp-level tensor-core and async-copy helpers shared by the CUDA kernels (sm_80+ PTX; the
// build targets sm_90a). CUDA-only header: no torch includes.
//
// mma.sync m16n8k16 bf16 -> fp32 fragment layout (PTX ISA, "Matrix fragments for mma.m16n8k16"),
// with lane = 4 * g + q (g = lane / 4 in 0..7, q = lane % 4):
//   A [16 x 16] row-major, 4 x b32: a[0] = (A[g][2q], A[g][2q+1]), a[1] = (A[g+8][2q], ...),
//                                    a[2] = (A[g][2q+8], A[g][2q+9]), a[3] = (A[g+8][2q+8], ...)
//   B [16 x 8], 2 x b32:             b[0] = (B[2q][g], B[2q+1][g]), b[1] = (B[2q+8][g], B[2q+9][g])
//   C [16 x 8] fp32, 4 floats:       c[0..1] = C[g][2q..2q+1], c[2..3] = C[g+8][2q..2q+1]
// The lower 16 bits of a b32 hold the element with the lower index.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kimi {
namespace mma {

// c += a * b for one m16n8k16 tile (bf16 inputs, fp32 accumulators).
__device__ __forceinline__ void bf16_16816(float (&c)[4], const uint32_t (&a)[4],
                                           const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The B fragment of a [16 x 8] tile stored row-major (k rows, 8 contiguous n values each) in
// shared memory: lanes 0..15 pass the address of row (lane) of the tile (16-byte aligned).
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&b)[2], const void* row_address) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(b[0]), "=r"(b[1])
               : "r"(addr));
}

// 16-byte global -> shared copy that bypasses L1; copies `valid ? 16 : 0` bytes and zero-fills
// the rest, so masked rows read as zeros (never stale or poisoned memory).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Weights are streamed once: load them without allocating in L1 (read-only path).
__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t bf162_bits(__nv_bfloat162 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ __nv_bfloat162 bits_bf162(uint32_t v) {
  return *reinterpret_cast<__nv_bfloat162*>(&v);
}

}  // namespace mma
}  // namespace kimi
