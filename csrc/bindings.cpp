// kimi_grpc._C: thin pybind11 bindings. Argument checks and dispatch only; the kernels live in
// csrc/cpu (C++/OpenMP) and csrc/cuda (one .cu per kernel family). Contracts: kimi_grpc/ops.
#include <torch/extension.h>

#include "cpu/moe_route.h"

namespace {

std::tuple<at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& logits, const at::Tensor& bias,
                                                 int64_t top_k, int64_t n_group, int64_t topk_group,
                                                 bool renormalize, double routed_scaling_factor) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2,
              "moe_route: router_logits must be a 2-D float32 CPU tensor");
  const at::Tensor x = logits.contiguous();
  const int64_t num_tokens = x.size(0), num_experts = x.size(1);
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.dim() == 1 &&
                                    bias.size(0) == num_experts && bias.device().is_cpu()),
              "moe_route: correction_bias must be empty or float32 [num_experts]");
  TORCH_CHECK(n_group >= 1 && num_experts % n_group == 0,
              "moe_route: num_experts must be divisible by n_group");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "moe_route: topk_group out of range");
  TORCH_CHECK(n_group == 1 || num_experts / n_group >= 2,
              "moe_route: group-limited routing needs >= 2 experts per group");
  TORCH_CHECK(top_k >= 1 && top_k <= topk_group * (num_experts / n_group),
              "moe_route: top_k exceeds the experts of the selected groups");
  const at::Tensor b = bias.contiguous();
  at::Tensor weights = at::empty({num_tokens, top_k}, x.options());
  at::Tensor ids = at::empty({num_tokens, top_k}, x.options().dtype(at::kInt));
  kimi::moe_route_cpu_impl(x.data_ptr<float>(), b.numel() ? b.data_ptr<float>() : nullptr,
                           num_tokens, num_experts, top_k, n_group, topk_group, renormalize,
                           static_cast<float>(routed_scaling_factor), weights.data_ptr<float>(),
                           ids.data_ptr<int32_t>());
  return {weights, ids};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kimi-grpc native kernels";
  m.def("moe_route_cpu", &moe_route_cpu, "noaux_tc top-k routing (CPU)");
}
