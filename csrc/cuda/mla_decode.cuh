// Absorbed-MLA decode over the paged latent cache on the GPU (contract: kimi_grpc/ops/__init__.py
// mla_decode). CUDA-only header: no torch includes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kimi {

constexpr int kMlaPageSize = 64;   // tokens per cache page (the kernel's tile)
constexpr int kMlaMaxDim = 576;    // kv_lora_rank + rope dim (Kimi: 512 + 64)
constexpr int kMlaMaxRank = 512;   // kv_lora_rank (the value width)
constexpr int kMlaMaxSplits = 64;  // KV splits per sequence, at most

// q [B, H, D] bf16; kv_cache [num_pages, 64, D] bf16; block_table [B, max_pages] int32;
// seq_lens [B] int32 (0 allowed: zero output, lse = -inf) -> out [B, H, rank] bf16 and
// lse [B, H] f32 (natural log). Requirements (checked by the caller): D % 16 == 0, D <= 576,
// rank % 8 == 0, rank <= min(D, 512), every used page id valid, tensors contiguous.
struct MlaDecodeArgs {
  const __nv_bfloat16* q;
  const __nv_bfloat16* kv_cache;
  const int32_t* block_table;
  const int32_t* seq_lens;
  __nv_bfloat16* out;
  float* lse;
  int64_t batch, heads, dim, rank, max_pages;
  float softmax_scale;
};

size_t mla_decode_workspace_bytes(const MlaDecodeArgs& args);
// Split-KV pass then the combine pass, on `stream`, no host synchronisation.
cudaError_t mla_decode_cuda_launch(const MlaDecodeArgs& args, void* workspace, cudaStream_t stream);

}  // namespace kimi
