// Guided decoding's token mask: one thread per 4 consecutive tokens, their mask word read through
// the read-only path. Memory-bound: each banned logit is written once (predicted, not measured:
// B = 256 rows of Kimi's 163,840 ids write at most 168 MB, ~40 us at an H200's bandwidth).
#include "cuda/token_bitmask.cuh"

namespace kimi {
namespace {

constexpr int kThreads = 256;
constexpr int kTokensPerThread = 4;

__global__ void apply_token_bitmask_kernel(float* __restrict__ logits,
                                           const int32_t* __restrict__ bitmask, int64_t vocab,
                                           int64_t words) {
  const int64_t row = blockIdx.y;
  const int64_t first =
      (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kTokensPerThread;
  if (first >= vocab) return;
  float* out = logits + row * vocab;
  const int32_t* mask = bitmask + row * words;
  const float neg_inf = -__int_as_float(0x7f800000);
#pragma unroll
  for (int i = 0; i < kTokensPerThread; ++i) {
    const int64_t t = first + i;
    if (t >= vocab) break;
    const int64_t word = t >> 5;
    const bool allowed = word < words && ((__ldg(mask + word) >> (t & 31)) & 1);
    if (!allowed) out[t] = neg_inf;
  }
}

}  // namespace

cudaError_t apply_token_bitmask_cuda_launch(float* logits, const int32_t* bitmask, int64_t rows,
                                            int64_t vocab, int64_t words, cudaStream_t stream) {
  if (rows == 0 || vocab == 0) return cudaSuccess;
  const int64_t per_block = static_cast<int64_t>(kThreads) * kTokensPerThread;
  const dim3 grid(static_cast<unsigned>((vocab + per_block - 1) / per_block),
                  static_cast<unsigned>(rows));
  apply_token_bitmask_kernel<<<grid, kThreads, 0, stream>>>(logits, bitmask, vocab, words);
  return cudaGetLastError();
}

}  // namespace kimi
