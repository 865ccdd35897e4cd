// CPU implementation of kimi_grpc.ops.mla_decode (contract in kimi_grpc/ops/__init__.py).
#pragma once

#include <cstdint>

namespace kimi {

// q: [B, H, D]; kv_cache: [num_pages, page_size, D]; both fp32, or bf16 bit patterns when bf16
// (then out is bf16 too; all math is fp32). block_table: [B, max_pages] int32; seq_lens: [B]
// int32 >= 1 with every used page id in [0, num_pages) (checked by the caller).
// out: [B, H, kv_lora_rank] = softmax(q·kᵀ·scale) · kv[:, :kv_lora_rank]; lse: [B, H] fp32.
void mla_decode_cpu_impl(const void* q, const void* kv_cache, bool bf16, const int32_t* block_table,
                         const int32_t* seq_lens, int64_t batch, int64_t heads, int64_t dim,
                         int64_t kv_lora_rank, int64_t page_size, int64_t max_pages,
                         float softmax_scale, void* out, float* lse);

}  // namespace kimi
