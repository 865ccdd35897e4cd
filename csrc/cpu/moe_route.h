// CPU implementation of kimi_grpc.ops.moe_route (contract in kimi_grpc/ops/__init__.py).
#pragma once

#include <cstdint>

namespace kimi {

// logits: [num_tokens, num_experts] fp32; bias: [num_experts] fp32 or nullptr.
// out_weights: [num_tokens, top_k] fp32; out_ids: [num_tokens, top_k] int32, descending by the
// biased score, ties to the lower expert id.
void moe_route_cpu_impl(const float* logits, const float* bias, int64_t num_tokens,
                        int64_t num_experts, int64_t top_k, int64_t n_group, int64_t topk_group,
                        bool renormalize, float scaling, float* out_weights, int32_t* out_ids);

}  // namespace kimi
