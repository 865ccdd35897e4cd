// Argument checks every backend of an op shares (dtypes and shapes of the contract in
// kimi_grpc/ops); device placement and each backend's own limits stay in its binding.
#pragma once

#include <torch/extension.h>

namespace kimi {

// moe_route: logits [T, E] (dtype and device checked by the backend), bias empty or float32 [E] on
// the logits' device, a valid group layout and top_k. Returns E.
inline int64_t check_moe_route_args(const at::Tensor& logits, const at::Tensor& bias, int64_t top_k,
                                    int64_t n_group, int64_t topk_group) {
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(
      bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.dim() == 1 &&
                            bias.size(0) == num_experts && bias.device() == logits.device()),
      "moe_route: correction_bias must be empty or float32 [num_experts] on the logits' device");
  TORCH_CHECK(n_group >= 1 && num_experts % n_group == 0,
              "moe_route: num_experts must be divisible by n_group");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "moe_route: topk_group out of range");
  TORCH_CHECK(n_group == 1 || num_experts / n_group >= 2,
              "moe_route: group-limited routing needs >= 2 experts per group");
  TORCH_CHECK(top_k >= 1 && top_k <= topk_group * (num_experts / n_group),
              "moe_route: top_k exceeds the experts of the selected groups");
  return num_experts;
}

struct MoeShape {
  int64_t num_tokens, hidden, inter, num_experts, top_k;
};

// int4_moe_experts: packed int32 weights [E, 2I, H/8] and [E, H, I/8], bf16 scales per group,
// float32 weights / int32 ids [T, k]. H, I and group_size must be multiples of `multiple` (the
// backend's granularity) with group_size dividing H and I.
inline MoeShape check_int4_moe_args(const at::Tensor& x, const at::Tensor& w13_packed,
                                    const at::Tensor& w13_scale, const at::Tensor& w2_packed,
                                    const at::Tensor& w2_scale, const at::Tensor& topk_weights,
                                    const at::Tensor& topk_ids, int64_t group_size,
                                    int64_t multiple) {
  TORCH_CHECK(w13_packed.scalar_type() == at::kInt && w2_packed.scalar_type() == at::kInt,
              "int4_moe_experts: w13_packed and w2_packed must be int32");
  TORCH_CHECK(w13_scale.scalar_type() == at::kBFloat16 && w2_scale.scalar_type() == at::kBFloat16,
              "int4_moe_experts: w13_scale and w2_scale must be bfloat16");
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat && topk_ids.scalar_type() == at::kInt,
              "int4_moe_experts: topk_weights must be float32 and topk_ids int32");
  TORCH_CHECK(
      w13_packed.dim() == 3 && w2_packed.dim() == 3 && w13_scale.dim() == 3 && w2_scale.dim() == 3,
      "int4_moe_experts: packed weights and scales must be 3-D [E, rows, cols]");
  const int64_t num_tokens = x.size(0), hidden = x.size(1);
  const int64_t num_experts = w13_packed.size(0), inter = w13_packed.size(1) / 2;
  TORCH_CHECK(hidden % multiple == 0, "int4_moe_experts: hidden size ", hidden,
              " must be a multiple of ", multiple, " here");
  TORCH_CHECK(inter % multiple == 0 && w13_packed.size(1) == 2 * inter && inter > 0,
              "int4_moe_experts: w13_packed rows must be 2 * I with I a positive multiple of ",
              multiple, " here, got ", w13_packed.size(1));
  TORCH_CHECK(group_size > 0 && group_size % multiple == 0 && hidden % group_size == 0 &&
                  inter % group_size == 0,
              "int4_moe_experts: group_size ", group_size, " must be a multiple of ", multiple,
              " dividing H=", hidden, " and I=", inter);
  TORCH_CHECK(w13_packed.sizes() == at::IntArrayRef({num_experts, 2 * inter, hidden / 8}),
              "int4_moe_experts: w13_packed must be [E, 2I, H/8], got ", w13_packed.sizes());
  TORCH_CHECK(w13_scale.sizes() == at::IntArrayRef({num_experts, 2 * inter, hidden / group_size}),
              "int4_moe_experts: w13_scale must be [E, 2I, H/group_size], got ", w13_scale.sizes());
  TORCH_CHECK(w2_packed.sizes() == at::IntArrayRef({num_experts, hidden, inter / 8}),
              "int4_moe_experts: w2_packed must be [E, H, I/8], got ", w2_packed.sizes());
  TORCH_CHECK(w2_scale.sizes() == at::IntArrayRef({num_experts, hidden, inter / group_size}),
              "int4_moe_experts: w2_scale must be [E, H, I/group_size], got ", w2_scale.sizes());
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == num_tokens &&
                  topk_weights.sizes() == topk_ids.sizes(),
              "int4_moe_experts: topk_weights and topk_ids must both be [T, k], got ",
              topk_weights.sizes(), " and ", topk_ids.sizes());
  return {num_tokens, hidden, inter, num_experts, topk_ids.size(1)};
}

}  // namespace kimi
