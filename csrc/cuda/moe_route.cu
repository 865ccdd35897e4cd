// noaux_tc top-k routing: one thread block per token.
//
//   scores = sigmoid(logits); choice = scores + bias (selection only)
//   n_group > 1: keep the topk_group groups with the largest sum of their top-2 choices
//   top_k rounds of a block-wide argmax over choice (ties -> lower index), each removing its winner
//   weights = scores[ids] (/ their sum + 1e-20 when renormalize) * routed_scaling_factor
//
// Kimi K2.x routes 384 experts with n_group = 1, top-8: per token 384 sigmoids and 8 block
// reductions over 3 values per thread; the whole layer's routing is one launch.
#include <cfloat>

#include "cuda/moe_route.cuh"

namespace kimi {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// (value, index) pairs: the larger value wins, equal values go to the lower index.
struct Candidate {
  float value;
  int index;
};

__device__ __forceinline__ Candidate better(Candidate a, Candidate b) {
  if (a.value > b.value || (a.value == b.value && a.index < b.index)) return a;
  return b;
}

__device__ Candidate block_argmax(Candidate mine, Candidate* warp_best) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Candidate other;
    other.value = __shfl_xor_sync(0xffffffffu, mine.value, offset);
    other.index = __shfl_xor_sync(0xffffffffu, mine.index, offset);
    mine = better(mine, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_best[warp] = mine;
  __syncthreads();
  Candidate best = warp_best[0];
  for (int w = 1; w < kWarps; ++w) best = better(best, warp_best[w]);
  __syncthreads();  // warp_best is reused by the next round
  return best;
}

__global__ void __launch_bounds__(kThreads)
    moe_route_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                     int num_experts, int top_k, int n_group, int topk_group, bool renormalize,
                     float routed_scaling_factor, float* __restrict__ weights,
                     int32_t* __restrict__ ids) {
  extern __shared__ float smem[];
  float* scores = smem;                // [num_experts] sigmoid scores
  float* choice = smem + num_experts;  // [num_experts] biased, -inf once taken or masked
  __shared__ Candidate warp_best[kWarps];
  __shared__ int chosen[kMoeRouteMaxTopK];
  const int64_t token = blockIdx.x;
  const float* row = logits + token * num_experts;

  for (int e = threadIdx.x; e < num_experts; e += kThreads) {
    const float s = 1.0f / (1.0f + expf(-row[e]));
    scores[e] = s;
    choice[e] = bias != nullptr ? s + bias[e] : s;
  }
  __syncthreads();

  if (n_group > 1) {
    // Group score = sum of its two largest choices; thread g scores group g (n_group <= kThreads).
    __shared__ float group_score[kThreads];
    __shared__ bool keep[kThreads];
    const int group_size = num_experts / n_group;
    if (threadIdx.x < n_group) {
      float first = -FLT_MAX, second = -FLT_MAX;
      for (int e = threadIdx.x * group_size; e < (threadIdx.x + 1) * group_size; ++e) {
        const float c = choice[e];
        if (c > first) {
          second = first;
          first = c;
        } else if (c > second) {
          second = c;
        }
      }
      group_score[threadIdx.x] = first + second;
      keep[threadIdx.x] = false;
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // n_group is small (8 for DeepSeek-V3): a serial selection
      for (int round = 0; round < topk_group; ++round) {
        int best = -1;
        for (int g = 0; g < n_group; ++g) {
          if (!keep[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
        }
        keep[best] = true;
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += kThreads) {
      if (!keep[e / group_size]) choice[e] = -INFINITY;
    }
    __syncthreads();
  }

  for (int round = 0; round < top_k; ++round) {
    Candidate mine{-INFINITY, num_experts};
    for (int e = threadIdx.x; e < num_experts; e += kThreads) mine = better(mine, {choice[e], e});
    const Candidate best = block_argmax(mine, warp_best);
    if (threadIdx.x == 0) {
      chosen[round] = best.index;
      choice[best.index] = -INFINITY;
    }
    __syncthreads();
  }

  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (int i = 0; i < top_k; ++i) sum += scores[chosen[i]];
    const float norm = renormalize ? routed_scaling_factor / (sum + 1e-20f) : routed_scaling_factor;
    for (int i = 0; i < top_k; ++i) {
      weights[token * top_k + i] = scores[chosen[i]] * norm;
      ids[token * top_k + i] = chosen[i];
    }
  }
}

}  // namespace

cudaError_t moe_route_cuda_launch(const float* logits, const float* bias, int64_t num_tokens,
                                  int64_t num_experts, int64_t top_k, int64_t n_group,
                                  int64_t topk_group, bool renormalize, float routed_scaling_factor,
                                  float* weights, int32_t* ids, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kMoeRouteMaxExperts || top_k < 1 ||
      top_k > kMoeRouteMaxTopK || n_group < 1 || n_group > kThreads || num_experts % n_group != 0 ||
      topk_group < 1 || topk_group > n_group) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens == 0) return cudaSuccess;
  const size_t smem = 2 * static_cast<size_t>(num_experts) * sizeof(float);
  moe_route_kernel<<<static_cast<unsigned>(num_tokens), kThreads, smem, stream>>>(
      logits, bias, static_cast<int>(num_experts), static_cast<int>(top_k),
      static_cast<int>(n_group), static_cast<int>(topk_group), renormalize, routed_scaling_factor,
      weights, ids);
  return cudaGetLastError();
}

}  // namespace kimi
