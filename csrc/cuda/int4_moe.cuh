// INT4 (W4A16) MoE experts on the GPU (contract: kimi_grpc/ops/__init__.py int4_moe_experts).
// CUDA-only header: no torch includes, so the kernels compile anywhere nvcc exists.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kimi {

// One MoE layer's routed experts. Shapes (compressed-tensors packing, value j of word w is nibble
// j, q = nibble - 8, W = q * scale):
//   x [T, H] bf16; w13 [E, 2I, H/8] int32 (rows 0..I-1 gate, I..2I-1 up); s13 [E, 2I, H/gs] bf16;
//   w2 [E, H, I/8] int32; s2 [E, H, I/gs] bf16; topk_weights [T, k] f32; topk_ids [T, k] int32
//   (negative = skipped; ids >= E are skipped too: validating them would need a host sync, so the
//   kernels only guarantee they cannot corrupt memory); out [T, H] bf16 (written).
// Requirements (checked by the caller): H % 32 == 0, I % 32 == 0, gs % 32 == 0, gs divides H and I,
// every pointer 16-byte aligned, tensors contiguous.
struct Int4MoeArgs {
  const __nv_bfloat16* x;
  const int32_t* w13;
  const __nv_bfloat16* s13;
  const int32_t* w2;
  const __nv_bfloat16* s2;
  const float* topk_weights;
  const int32_t* topk_ids;
  __nv_bfloat16* out;
  int64_t num_tokens, hidden, inter, num_experts, top_k, group_size;
};

// The routing metadata step on its own (the MoE launch runs it first; exposed for tests and the
// benchmark): topk_ids [n_pairs] int32 (negative or >= E skipped) -> sorted_pairs [n_pairs] (pair
// ids grouped by ascending expert, any order inside an expert), tiles of at most tile_tokens pairs
// in expert order: tile_expert / tile_start / tile_length [moe_align_max_tiles(...)] and
// num_tiles [1]. One block; no host synchronisation.
int64_t moe_align_max_tiles(int64_t n_pairs, int64_t num_experts, int64_t tile_tokens);
cudaError_t moe_align_cuda_launch(const int32_t* topk_ids, int64_t n_pairs, int64_t num_experts,
                                  int tile_tokens, int32_t* sorted_pairs, int32_t* tile_expert,
                                  int32_t* tile_start, int32_t* tile_length, int32_t* num_tiles,
                                  cudaStream_t stream);

// Tokens one launch sequence handles; longer inputs are processed in chunks of this many tokens,
// which bounds the workspace (its largest part is the [tokens * k, H] bf16 down-projection output).
int64_t int4_moe_chunk_tokens(const Int4MoeArgs& args);
// Bytes of scratch int4_moe_cuda_launch needs (256-byte aligned sub-buffers).
size_t int4_moe_workspace_bytes(const Int4MoeArgs& args);
// Runs the layer on `stream` with no host synchronisation: routing metadata (moe_align), gate/up
// GEMM + SiLU·mul, down GEMM, weighted top-k combine. Returns the first launch error, if any.
cudaError_t int4_moe_cuda_launch(const Int4MoeArgs& args, void* workspace, cudaStream_t stream);

}  // namespace kimi
