// noaux_tc top-k expert routing on the GPU (contract: kimi_grpc/ops/__init__.py moe_route).
// CUDA-only header: no torch includes, so the kernel compiles anywhere nvcc exists.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kimi {

// The most experts one block routes (scores and choices live in shared memory).
constexpr int kMoeRouteMaxExperts = 1024;
constexpr int kMoeRouteMaxTopK = 32;

// logits [num_tokens, num_experts] f32, bias [num_experts] f32 or nullptr
// -> weights [num_tokens, top_k] f32, ids [num_tokens, top_k] int32, in descending order of the
// biased score; ties go to the lower expert index. Returns the launch error, if any.
cudaError_t moe_route_cuda_launch(const float* logits, const float* bias, int64_t num_tokens,
                                  int64_t num_experts, int64_t top_k, int64_t n_group,
                                  int64_t topk_group, bool renormalize, float routed_scaling_factor,
                                  float* weights, int32_t* ids, cudaStream_t stream);

}  // namespace kimi
