// Shared CPU kernel helpers: the AVX2 function-clone attribute, bf16 <-> f32 conversions and
// 8-lane float vectors (GCC vector extensions). Everything is forced inline so it is compiled
// into each clone of the kernel that uses it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// AVX2/FMA clone selected at load time (ifunc) next to the baseline x86-64 one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KIMI_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KIMI_SIMD_CLONES
#endif
#define KIMI_INLINE inline __attribute__((always_inline))

namespace kimi::simd {

KIMI_INLINE float bf16_to_f32(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round-to-nearest-even, NaN kept quiet (as torch's float -> bfloat16 conversion).
KIMI_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if (std::isnan(f)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// 8-float / 8-int vectors: one AVX2 register in the x86-64-v3 clone, two SSE registers in the
// baseline one. Unaligned loads and stores go through memcpy.
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

KIMI_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

KIMI_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

KIMI_INLINE float hsum(v8f v) {
  float s = 0.0f;
  for (int j = 0; j < 8; ++j) s += v[j];
  return s;
}

}  // namespace kimi::simd
