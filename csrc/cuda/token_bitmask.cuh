// Guided decoding's token mask on the GPU (contract: kimi_grpc/ops/__init__.py
// apply_token_bitmask_). CUDA-only header: no torch includes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kimi {

// logits [rows, vocab] f32 (row-major, in place); bitmask [rows, words] int32 packed masks (bit
// t % 32 of word t / 32 set = token t allowed). Clear bits, and ids at or past 32 * words, become
// -inf. Returns the launch error, if any.
cudaError_t apply_token_bitmask_cuda_launch(float* logits, const int32_t* bitmask, int64_t rows,
                                            int64_t vocab, int64_t words, cudaStream_t stream);

}  // namespace kimi
