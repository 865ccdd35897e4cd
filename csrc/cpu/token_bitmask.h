// CPU implementation of kimi_grpc.ops.apply_token_bitmask_ (contract in kimi_grpc/ops/__init__.py).
#pragma once

#include <cstdint>

namespace kimi {

// logits: [rows, vocab] fp32, row-major, modified in place; bitmask: [rows, words] int32 with
// words >= ceil(vocab / 32): bit t % 32 of word t / 32 set = token t allowed. Every token whose
// bit is clear, and every token at or past 32 * words, becomes -inf.
void apply_token_bitmask_cpu_impl(float* logits, const int32_t* bitmask, int64_t rows,
                                  int64_t vocab, int64_t words);

}  // namespace kimi
