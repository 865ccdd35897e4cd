// kimi_grpc._C: thin pybind11 bindings. Argument checks and dispatch only; the kernels live in
// csrc/cpu (C++/OpenMP) and csrc/cuda (one .cu per kernel family). Contracts: kimi_grpc/ops.
#include <torch/extension.h>

#include "cpu/int4_moe.h"
#include "cpu/mla_decode.h"
#include "cpu/moe_route.h"
#include "cpu/token_bitmask.h"
#include "op_checks.h"

namespace {

std::tuple<at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& logits, const at::Tensor& bias,
                                                 int64_t top_k, int64_t n_group, int64_t topk_group,
                                                 bool renormalize, double routed_scaling_factor) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2,
              "moe_route: router_logits must be a 2-D float32 CPU tensor");
  const int64_t num_experts = kimi::check_moe_route_args(logits, bias, top_k, n_group, topk_group);
  const at::Tensor x = logits.contiguous();
  const int64_t num_tokens = x.size(0);
  const at::Tensor b = bias.contiguous();
  at::Tensor weights = at::empty({num_tokens, top_k}, x.options());
  at::Tensor ids = at::empty({num_tokens, top_k}, x.options().dtype(at::kInt));
  kimi::moe_route_cpu_impl(x.data_ptr<float>(), b.numel() ? b.data_ptr<float>() : nullptr,
                           num_tokens, num_experts, top_k, n_group, topk_group, renormalize,
                           static_cast<float>(routed_scaling_factor), weights.data_ptr<float>(),
                           ids.data_ptr<int32_t>());
  return {weights, ids};
}

at::Tensor int4_moe_experts_cpu(const at::Tensor& x, const at::Tensor& w13_packed,
                                const at::Tensor& w13_scale, const at::Tensor& w2_packed,
                                const at::Tensor& w2_scale, const at::Tensor& topk_weights,
                                const at::Tensor& topk_ids, int64_t group_size) {
  for (const at::Tensor* t :
       {&x, &w13_packed, &w13_scale, &w2_packed, &w2_scale, &topk_weights, &topk_ids}) {
    TORCH_CHECK(t->device().is_cpu(), "int4_moe_experts: all tensors must be on the CPU");
  }
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int4_moe_experts: x must be a 2-D float32 or bfloat16 tensor [T, H], got ",
              x.scalar_type(), " ", x.sizes());
  const kimi::MoeShape shape = kimi::check_int4_moe_args(
      x, w13_packed, w13_scale, w2_packed, w2_scale, topk_weights, topk_ids, group_size, 8);
  const int64_t num_tokens = shape.num_tokens, hidden = shape.hidden, inter = shape.inter;
  const int64_t num_experts = shape.num_experts;
  const at::Tensor ids = topk_ids.contiguous();
  if (ids.numel() > 0) {
    TORCH_CHECK(ids.max().item<int32_t>() < num_experts, "int4_moe_experts: topk_ids must be < ",
                num_experts, " (negative ids are skipped)");
  }
  const at::Tensor xc = x.contiguous(), w13 = w13_packed.contiguous(), s13 = w13_scale.contiguous();
  const at::Tensor w2 = w2_packed.contiguous(), s2 = w2_scale.contiguous();
  const at::Tensor weights = topk_weights.contiguous();
  at::Tensor out = at::empty_like(xc);
  kimi::int4_moe_experts_cpu_impl(
      xc.data_ptr(), xc.scalar_type() == at::kBFloat16, w13.data_ptr<int32_t>(),
      reinterpret_cast<const uint16_t*>(s13.data_ptr<at::BFloat16>()), w2.data_ptr<int32_t>(),
      reinterpret_cast<const uint16_t*>(s2.data_ptr<at::BFloat16>()), weights.data_ptr<float>(),
      ids.data_ptr<int32_t>(), num_tokens, hidden, inter, num_experts, ids.size(1), group_size,
      out.data_ptr());
  return out;
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cpu(const at::Tensor& q, const at::Tensor& kv_cache,
                                                  const at::Tensor& block_table,
                                                  const at::Tensor& seq_lens, double softmax_scale,
                                                  int64_t kv_lora_rank) {
  for (const at::Tensor* t : {&q, &kv_cache, &block_table, &seq_lens}) {
    TORCH_CHECK(t->device().is_cpu(), "mla_decode: all tensors must be on the CPU");
  }
  TORCH_CHECK(q.dim() == 3 && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "mla_decode: q must be a 3-D float32 or bfloat16 tensor [B, H, D], got ",
              q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(kv_cache.dim() == 3 && kv_cache.scalar_type() == q.scalar_type() &&
                  kv_cache.size(2) == q.size(2),
              "mla_decode: kv_cache must be [num_pages, page_size, D] with q's dtype and D, got ",
              kv_cache.scalar_type(), " ", kv_cache.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t num_pages = kv_cache.size(0), page_size = kv_cache.size(1);
  TORCH_CHECK(kv_lora_rank > 0 && kv_lora_rank <= dim, "mla_decode: kv_lora_rank ", kv_lora_rank,
              " must be in [1, D=", dim, "]");
  TORCH_CHECK(page_size > 0, "mla_decode: page_size must be positive");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 &&
                  block_table.size(0) == batch,
              "mla_decode: block_table must be int32 [B, max_pages], got ",
              block_table.scalar_type(), " ", block_table.sizes());
  TORCH_CHECK(
      seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == batch,
      "mla_decode: seq_lens must be int32 [B], got ", seq_lens.scalar_type(), " ",
      seq_lens.sizes());
  const at::Tensor table = block_table.contiguous(), lens = seq_lens.contiguous();
  const int64_t max_pages = table.size(1);
  const int32_t* table_ptr = table.data_ptr<int32_t>();
  const int32_t* lens_ptr = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = lens_ptr[b];
    TORCH_CHECK(len >= 1 && (len + page_size - 1) / page_size <= max_pages, "mla_decode: seq_lens[",
                b, "]=", len, " must be >= 1 and fit ", max_pages, " pages of ", page_size);
    for (int64_t p = 0; p < (len + page_size - 1) / page_size; ++p) {
      const int32_t page = table_ptr[b * max_pages + p];
      TORCH_CHECK(page >= 0 && page < num_pages, "mla_decode: block_table[", b, ", ", p, "]=", page,
                  " is not a page id in [0, ", num_pages, ")");
    }
  }
  const at::Tensor qc = q.contiguous(), kv = kv_cache.contiguous();
  at::Tensor out = at::empty({batch, heads, kv_lora_rank}, qc.options());
  at::Tensor lse = at::empty({batch, heads}, qc.options().dtype(at::kFloat));
  kimi::mla_decode_cpu_impl(qc.data_ptr(), kv.data_ptr(), qc.scalar_type() == at::kBFloat16,
                            table_ptr, lens_ptr, batch, heads, dim, kv_lora_rank, page_size,
                            max_pages, static_cast<float>(softmax_scale), out.data_ptr(),
                            lse.data_ptr<float>());
  return {out, lse};
}

void apply_token_bitmask_cpu(at::Tensor& logits, const at::Tensor& bitmask) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.is_contiguous(),
              "apply_token_bitmask_: logits must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(bitmask.device().is_cpu() && bitmask.scalar_type() == at::kInt &&
                  bitmask.dim() == 2 && bitmask.size(0) == logits.size(0),
              "apply_token_bitmask_: bitmask must be a 2-D int32 CPU tensor [R, W] with logits' "
              "rows, got ",
              bitmask.scalar_type(), " ", bitmask.sizes());
  const at::Tensor mask = bitmask.contiguous();
  kimi::apply_token_bitmask_cpu_impl(logits.data_ptr<float>(), mask.data_ptr<int32_t>(),
                                     logits.size(0), logits.size(1), mask.size(1));
}

}  // namespace

#ifdef KIMI_WITH_CUDA
void kimi_register_cuda_ops(pybind11::module_& m);  // csrc/bindings_cuda.cpp
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kimi-grpc native kernels";
  // The kernels release the GIL: the engine thread computes while the server's event loop
  // (another Python thread) streams tokens.
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("moe_route_cpu", &moe_route_cpu, "noaux_tc top-k routing (CPU)", nogil);
  m.def("int4_moe_experts_cpu", &int4_moe_experts_cpu, "INT4 MoE experts (CPU)", nogil);
  m.def("mla_decode_cpu", &mla_decode_cpu, "absorbed-MLA paged decode attention (CPU)", nogil);
  m.def("apply_token_bitmask_cpu", &apply_token_bitmask_cpu,
        "guided decoding: -inf where a packed token mask is clear (CPU, in place)", nogil);
#ifdef KIMI_WITH_CUDA
  kimi_register_cuda_ops(m);
#endif
}
