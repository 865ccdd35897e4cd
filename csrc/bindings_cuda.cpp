// Thin bindings of the CUDA kernels (compiled only in CUDA builds; bindings.cpp registers them).
// Argument checks, device guard, stream, dispatch; the kernels live in csrc/cuda/*.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "cuda/moe_route.cuh"

namespace {

std::tuple<at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& logits, const at::Tensor& bias,
                                                  int64_t top_k, int64_t n_group,
                                                  int64_t topk_group, bool renormalize,
                                                  double routed_scaling_factor) {
  TORCH_CHECK(logits.is_cuda() && logits.scalar_type() == at::kFloat && logits.dim() == 2,
              "moe_route: router_logits must be a 2-D float32 CUDA tensor");
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  TORCH_CHECK(num_experts <= kimi::kMoeRouteMaxExperts, "moe_route: at most ",
              kimi::kMoeRouteMaxExperts, " experts on CUDA, got ", num_experts);
  TORCH_CHECK(
      bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.dim() == 1 &&
                            bias.size(0) == num_experts && bias.device() == logits.device()),
      "moe_route: correction_bias must be empty or float32 [num_experts] on the logits' "
      "device");
  TORCH_CHECK(n_group >= 1 && num_experts % n_group == 0,
              "moe_route: num_experts must be divisible by n_group");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "moe_route: topk_group out of range");
  TORCH_CHECK(n_group == 1 || num_experts / n_group >= 2,
              "moe_route: group-limited routing needs >= 2 experts per group");
  TORCH_CHECK(top_k >= 1 && top_k <= kimi::kMoeRouteMaxTopK &&
                  top_k <= topk_group * (num_experts / n_group),
              "moe_route: top_k out of range");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor b = bias.contiguous();
  at::Tensor weights = at::empty({num_tokens, top_k}, x.options());
  at::Tensor ids = at::empty({num_tokens, top_k}, x.options().dtype(at::kInt));
  const cudaError_t err = kimi::moe_route_cuda_launch(
      x.data_ptr<float>(), b.numel() ? b.data_ptr<float>() : nullptr, num_tokens, num_experts,
      top_k, n_group, topk_group, renormalize, static_cast<float>(routed_scaling_factor),
      weights.data_ptr<float>(), ids.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "moe_route: kernel launch failed: ", cudaGetErrorString(err));
  return {weights, ids};
}

}  // namespace

void kimi_register_cuda_ops(pybind11::module_& m) {
  m.def("moe_route_cuda", &moe_route_cuda, "noaux_tc top-k routing (CUDA)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
