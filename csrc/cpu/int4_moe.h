// CPU implementation of kimi_grpc.ops.int4_moe_experts (contract in kimi_grpc/ops/__init__.py).
#pragma once

#include <cstdint>

namespace kimi {

// x: [T, H] fp32, or bf16 bit patterns when x_bf16 (then out is bf16 too; all math is fp32).
// w13_packed: [E, 2I, H/8] int32 (rows 0..I-1 gate, I..2I-1 up), w13_scale: [E, 2I, H/gs] bf16
// bits. w2_packed: [E, H, I/8] int32, w2_scale: [E, H, I/gs] bf16 bits. Packing: value j of word w
// is nibble j (bits 4j..4j+3), q = nibble - 8, W = q * scale. topk_weights: [T, k] fp32; topk_ids:
// [T, k] int32 < E (checked by the caller); a negative id is skipped (under expert parallelism: a
// slot routed to another rank's expert). out: [T, H] (written, not accumulated). Requires
// H % 8 == 0, I % 8 == 0, gs % 8 == 0, and gs dividing H and I. Weights are dequantized one row at
// a time, never per expert.
void int4_moe_experts_cpu_impl(const void* x, bool x_bf16, const int32_t* w13_packed,
                               const uint16_t* w13_scale, const int32_t* w2_packed,
                               const uint16_t* w2_scale, const float* topk_weights,
                               const int32_t* topk_ids, int64_t num_tokens, int64_t hidden,
                               int64_t inter, int64_t num_experts, int64_t top_k,
                               int64_t group_size, void* out);

}  // namespace kimi
