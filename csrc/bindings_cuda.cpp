// Thin bindings of the CUDA kernels (compiled only in CUDA builds; bindings.cpp registers them).
// Argument checks, device guard, stream, dispatch; the kernels live in csrc/cuda/*.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "cuda/int4_moe.cuh"
#include "cuda/mla_decode.cuh"
#include "cuda/moe_route.cuh"
#include "cuda/token_bitmask.cuh"
#include "op_checks.h"

namespace {

void check_cuda_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& logits, const at::Tensor& bias,
                                                  int64_t top_k, int64_t n_group,
                                                  int64_t topk_group, bool renormalize,
                                                  double routed_scaling_factor) {
  TORCH_CHECK(logits.is_cuda() && logits.scalar_type() == at::kFloat && logits.dim() == 2,
              "moe_route: router_logits must be a 2-D float32 CUDA tensor");
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = kimi::check_moe_route_args(logits, bias, top_k, n_group, topk_group);
  TORCH_CHECK(num_experts <= kimi::kMoeRouteMaxExperts && top_k <= kimi::kMoeRouteMaxTopK,
              "moe_route: at most ", kimi::kMoeRouteMaxExperts, " experts and top_k ",
              kimi::kMoeRouteMaxTopK, " on CUDA, got ", num_experts, " and top_k ", top_k);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor b = bias.contiguous();
  at::Tensor weights = at::empty({num_tokens, top_k}, x.options());
  at::Tensor ids = at::empty({num_tokens, top_k}, x.options().dtype(at::kInt));
  const cudaError_t err = kimi::moe_route_cuda_launch(
      x.data_ptr<float>(), b.numel() ? b.data_ptr<float>() : nullptr, num_tokens, num_experts,
      top_k, n_group, topk_group, renormalize, static_cast<float>(routed_scaling_factor),
      weights.data_ptr<float>(), ids.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream());
  check_cuda_launch(err, "moe_route");
  return {weights, ids};
}

// The kernels read with 16-byte vector loads: a contiguous view at an unaligned storage offset is
// copied to a fresh (aligned) allocation.
at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

at::Tensor int4_moe_experts_cuda(const at::Tensor& x, const at::Tensor& w13_packed,
                                 const at::Tensor& w13_scale, const at::Tensor& w2_packed,
                                 const at::Tensor& w2_scale, const at::Tensor& topk_weights,
                                 const at::Tensor& topk_ids, int64_t group_size) {
  for (const at::Tensor* t :
       {&x, &w13_packed, &w13_scale, &w2_packed, &w2_scale, &topk_weights, &topk_ids}) {
    TORCH_CHECK(t->is_cuda() && t->device() == x.device(),
                "int4_moe_experts: all tensors must be on the same CUDA device");
  }
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16,
              "int4_moe_experts: x must be a 2-D bfloat16 tensor [T, H] on CUDA, got ",
              x.scalar_type(), " ", x.sizes());
  const kimi::MoeShape shape = kimi::check_int4_moe_args(
      x, w13_packed, w13_scale, w2_packed, w2_scale, topk_weights, topk_ids, group_size, 32);
  TORCH_CHECK(shape.num_experts <= 2048 && shape.top_k <= 32,
              "int4_moe_experts: CUDA routes at most 2048 experts and top-32, got ",
              shape.num_experts, " experts, top-", shape.top_k);
  const int64_t num_tokens = shape.num_tokens;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = aligned16(x), w13 = aligned16(w13_packed), s13 = w13_scale.contiguous();
  const at::Tensor w2 = aligned16(w2_packed), s2 = w2_scale.contiguous();
  const at::Tensor weights = topk_weights.contiguous(), ids = topk_ids.contiguous();
  at::Tensor out = at::empty_like(xc);
  if (num_tokens == 0 || ids.size(1) == 0) return out.zero_();
  kimi::Int4MoeArgs args{cptr<__nv_bfloat16>(xc),
                         w13.data_ptr<int32_t>(),
                         cptr<__nv_bfloat16>(s13),
                         w2.data_ptr<int32_t>(),
                         cptr<__nv_bfloat16>(s2),
                         weights.data_ptr<float>(),
                         ids.data_ptr<int32_t>(),
                         reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                         num_tokens,
                         shape.hidden,
                         shape.inter,
                         shape.num_experts,
                         shape.top_k,
                         group_size};
  at::Tensor workspace = at::empty({static_cast<int64_t>(kimi::int4_moe_workspace_bytes(args))},
                                   xc.options().dtype(at::kByte));
  check_cuda_launch(
      kimi::int4_moe_cuda_launch(args, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()),
      "int4_moe_experts");
  return out;
}

std::vector<at::Tensor> moe_align_cuda(const at::Tensor& topk_ids, int64_t num_experts,
                                       int64_t tile_tokens) {
  TORCH_CHECK(topk_ids.is_cuda() && topk_ids.scalar_type() == at::kInt && topk_ids.dim() == 2,
              "moe_align: topk_ids must be a 2-D int32 CUDA tensor [T, k]");
  TORCH_CHECK(num_experts >= 1 && num_experts <= 2048, "moe_align: 1..2048 experts, got ",
              num_experts);
  TORCH_CHECK(tile_tokens >= 1 && tile_tokens <= 1024, "moe_align: tile_tokens out of range");
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t n_pairs = ids.numel();
  const auto opts = ids.options();
  const int64_t tiles = kimi::moe_align_max_tiles(n_pairs, num_experts, tile_tokens);
  at::Tensor sorted = at::empty({n_pairs}, opts), expert = at::empty({tiles}, opts);
  at::Tensor start = at::empty({tiles}, opts), length = at::empty({tiles}, opts);
  at::Tensor count = at::empty({1}, opts);
  check_cuda_launch(
      kimi::moe_align_cuda_launch(
          ids.data_ptr<int32_t>(), n_pairs, num_experts, static_cast<int>(tile_tokens),
          sorted.data_ptr<int32_t>(), expert.data_ptr<int32_t>(), start.data_ptr<int32_t>(),
          length.data_ptr<int32_t>(), count.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream()),
      "moe_align");
  return {sorted, expert, start, length, count};
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cuda(const at::Tensor& q, const at::Tensor& kv_cache,
                                                   const at::Tensor& block_table,
                                                   const at::Tensor& seq_lens, double softmax_scale,
                                                   int64_t kv_lora_rank) {
  for (const at::Tensor* t : {&q, &kv_cache, &block_table, &seq_lens}) {
    TORCH_CHECK(t->is_cuda() && t->device() == q.device(),
                "mla_decode: all tensors must be on the same CUDA device");
  }
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kBFloat16,
              "mla_decode: q must be a 3-D bfloat16 tensor [B, H, D] on CUDA");
  TORCH_CHECK(kv_cache.dim() == 3 && kv_cache.scalar_type() == at::kBFloat16 &&
                  kv_cache.size(1) == kimi::kMlaPageSize && kv_cache.size(2) == q.size(2),
              "mla_decode: kv_cache must be bfloat16 [num_pages, ", kimi::kMlaPageSize,
              ", D] on CUDA, got ", kv_cache.sizes());
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kInt &&
                  block_table.size(0) == q.size(0) && block_table.size(1) >= 1,
              "mla_decode: block_table must be int32 [B, max_pages]");
  TORCH_CHECK(
      seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kInt && seq_lens.size(0) == q.size(0),
      "mla_decode: seq_lens must be int32 [B]");
  const int64_t dim = q.size(2);
  TORCH_CHECK(dim % 16 == 0 && dim <= kimi::kMlaMaxDim,
              "mla_decode: CUDA needs D a multiple of 16 and <= ", kimi::kMlaMaxDim, ", got ", dim);
  TORCH_CHECK(kv_lora_rank > 0 && kv_lora_rank % 8 == 0 && kv_lora_rank <= dim &&
                  kv_lora_rank <= kimi::kMlaMaxRank,
              "mla_decode: kv_lora_rank must be a multiple of 8 in (0, min(D, ", kimi::kMlaMaxRank,
              ")], got ", kv_lora_rank);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = aligned16(q), kv = aligned16(kv_cache);
  const at::Tensor table = block_table.contiguous(), lens = seq_lens.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1);
  at::Tensor out = at::empty({batch, heads, kv_lora_rank}, q.options());
  at::Tensor lse = at::empty({batch, heads}, q.options().dtype(at::kFloat));
  kimi::MlaDecodeArgs args{cptr<__nv_bfloat16>(qc),
                           cptr<__nv_bfloat16>(kv),
                           table.data_ptr<int32_t>(),
                           lens.data_ptr<int32_t>(),
                           reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                           lse.data_ptr<float>(),
                           batch,
                           heads,
                           dim,
                           kv_lora_rank,
                           table.size(1),
                           static_cast<float>(softmax_scale)};
  if (batch == 0) return {out, lse};
  at::Tensor workspace = at::empty({static_cast<int64_t>(kimi::mla_decode_workspace_bytes(args))},
                                   q.options().dtype(at::kByte));
  check_cuda_launch(
      kimi::mla_decode_cuda_launch(args, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()),
      "mla_decode");
  return {out, lse};
}

void apply_token_bitmask_cuda(at::Tensor& logits, const at::Tensor& bitmask) {
  TORCH_CHECK(logits.is_cuda() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.is_contiguous(),
              "apply_token_bitmask_: logits must be a contiguous 2-D float32 CUDA tensor");
  TORCH_CHECK(bitmask.is_cuda() && bitmask.device() == logits.device() &&
                  bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 &&
                  bitmask.size(0) == logits.size(0),
              "apply_token_bitmask_: bitmask must be a 2-D int32 tensor [R, W] on logits' device "
              "with logits' rows, got ",
              bitmask.scalar_type(), " ", bitmask.sizes());
  TORCH_CHECK(logits.size(0) <= 65535, "apply_token_bitmask_: at most 65535 rows on CUDA");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor mask = bitmask.contiguous();
  check_cuda_launch(kimi::apply_token_bitmask_cuda_launch(
                        logits.data_ptr<float>(), mask.data_ptr<int32_t>(), logits.size(0),
                        logits.size(1), mask.size(1), c10::cuda::getCurrentCUDAStream()),
                    "apply_token_bitmask_");
}

}  // namespace

void kimi_register_cuda_ops(pybind11::module_& m) {
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("moe_route_cuda", &moe_route_cuda, "noaux_tc top-k routing (CUDA)", nogil);
  m.def("int4_moe_experts_cuda", &int4_moe_experts_cuda, "INT4 MoE experts (CUDA)", nogil);
  m.def("moe_align_cuda", &moe_align_cuda, "MoE routing metadata (CUDA; tests, benchmarks)", nogil);
  m.def("mla_decode_cuda", &mla_decode_cuda, "absorbed-MLA paged decode (CUDA)", nogil);
  m.def("apply_token_bitmask_cuda", &apply_token_bitmask_cuda,
        "guided decoding: -inf where a packed token mask is clear (CUDA, in place)", nogil);
}
