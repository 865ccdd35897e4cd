// noaux_tc top-k expert routing on the CPU: sigmoid scores, bias-corrected selection with
// optional group limiting, unbiased renormalised weights. One token per OpenMP iteration.
#include "moe_route.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace kimi {
namespace {

// Inserts (value, index) into the descending list best[0..count); equal values keep the earlier
// (lower) index first, so ties go to the lower expert id.
inline void insert_desc(float value, int32_t index, float* best_val, int32_t* best_idx,
                        int64_t& count, int64_t capacity) {
  if (count == capacity && !(value > best_val[count - 1])) return;
  int64_t pos = count < capacity ? count++ : capacity - 1;
  while (pos > 0 && value > best_val[pos - 1]) {
    best_val[pos] = best_val[pos - 1];
    best_idx[pos] = best_idx[pos - 1];
    --pos;
  }
  best_val[pos] = value;
  best_idx[pos] = index;
}

}  // namespace

void moe_route_cpu_impl(const float* logits, const float* bias, int64_t num_tokens,
                        int64_t num_experts, int64_t top_k, int64_t n_group, int64_t topk_group,
                        bool renormalize, float scaling, float* out_weights, int32_t* out_ids) {
  const int64_t per_group = num_experts / n_group;
#pragma omp parallel
  {
    std::vector<float> scores(num_experts), choice(num_experts);
    std::vector<float> group_val(n_group), best_val(top_k);
    std::vector<int32_t> group_idx(n_group), best_idx(top_k);
    std::vector<char> allowed(n_group);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < num_tokens; ++t) {
      const float* row = logits + t * num_experts;
      for (int64_t e = 0; e < num_experts; ++e) {
        scores[e] = 1.0f / (1.0f + std::exp(-row[e]));
        choice[e] = bias ? scores[e] + bias[e] : scores[e];
      }
      std::fill(allowed.begin(), allowed.end(), n_group == 1 ? 1 : 0);
      if (n_group > 1) {
        int64_t groups = 0;
        for (int64_t g = 0; g < n_group; ++g) {
          float first = -INFINITY, second = -INFINITY;
          for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
            if (choice[e] > first) {
              second = first;
              first = choice[e];
            } else if (choice[e] > second) {
              second = choice[e];
            }
          }
          insert_desc(first + second, static_cast<int32_t>(g), group_val.data(), group_idx.data(),
                      groups, topk_group);
        }
        for (int64_t i = 0; i < groups; ++i) allowed[group_idx[i]] = 1;
      }
      int64_t count = 0;
      for (int64_t e = 0; e < num_experts; ++e) {
        if (allowed[e / per_group]) {
          insert_desc(choice[e], static_cast<int32_t>(e), best_val.data(), best_idx.data(), count,
                      top_k);
        }
      }
      float sum = 0.0f;
      for (int64_t i = 0; i < top_k; ++i) sum += scores[best_idx[i]];
      const float norm = renormalize ? scaling / (sum + 1e-20f) : scaling;
      for (int64_t i = 0; i < top_k; ++i) {
        out_ids[t * top_k + i] = best_idx[i];
        out_weights[t * top_k + i] = scores[best_idx[i]] * norm;
      }
    }
  }
}

}  // namespace kimi
