// INT4 (W4A16) MoE experts on the CPU: dequantize-on-the-fly grouped GEMVs with SiLU·mul and the
// weighted combine, fp32 math throughout.
//
// Plan of one call:
//  1. Counting-sort the (token, slot) pairs by expert (tokens ascending within an expert), so each
//     active expert's weights are read once per call however many tokens picked it.
//  2. Copy x to fp32 in a "deinterleaved" layout matching the packing: for a row of n_words int32
//     words, element 8w + j is stored at j * n_words + w. Unpacking nibble j of every word is then
//     one uniform shift across SIMD lanes, and dot products run over contiguous memory.
//  3. Gate/up (parallel over (expert, chunk of I rows), dynamic): dequantize gate row i and up row
//     I + i into thread-local fp32 rows, dot them with every token of the expert, store
//     silu(gate) * up per pair, again deinterleaved (for the down projection's packing).
//  4. Down (parallel over chunks of H output rows, static): for each active expert in ascending id
//     order (the reference's summation order), dequantize row h and accumulate w[t,k] · dot into
//     the fp32 output of each of the expert's tokens. Rows are owned by one thread: no races.
#include "int4_moe.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "simd.h"

namespace kimi {
namespace {

using namespace simd;  // NOLINT(build/namespaces): the helpers read as local ones

constexpr int64_t kPack = 8;          // int4 values per int32 word
constexpr int64_t kGateUpChunk = 32;  // gate/up rows per work item

// src: [n_words * 8] in natural order -> dst deinterleaved (dst[j * n_words + w] = src[8w + j]).
template <typename Load>
KIMI_INLINE void deinterleave(Load load, int64_t n_words, float* dst) {
  for (int64_t w = 0; w < n_words; ++w) {
    for (int64_t j = 0; j < kPack; ++j) dst[j * n_words + w] = load(w * kPack + j);
  }
}

// Dequantizes one packed row of n_words words into dst in the deinterleaved layout:
// dst[j * n_words + w] = (nibble j of words[w] - 8) * scale of group (8w + j) / group_size.
// word_scale: scratch [n_words]. A group is group_size / 8 whole words, so the scale of every
// nibble of word w is the same. n_words % 8 == 0 takes the vector path only.
KIMI_INLINE void dequant_row(const int32_t* words, const uint16_t* scales, int64_t n_words,
                             int64_t words_per_group, float* word_scale, float* dst) {
  for (int64_t g = 0, w = 0; w < n_words; ++g) {
    const float s = bf16_to_f32(scales[g]);
    for (const int64_t end = w + words_per_group; w < end; ++w) word_scale[w] = s;
  }
  int64_t w = 0;
  for (; w + 8 <= n_words; w += 8) {
    v8u u;
    std::memcpy(&u, words + w, sizeof(u));
    const v8f s = load8(word_scale + w);
    for (int j = 0; j < kPack; ++j) {
      const v8i q = reinterpret_cast<v8i>((u >> static_cast<uint32_t>(4 * j)) & 0xFu) - 8;
      store8(dst + j * n_words + w, __builtin_convertvector(q, v8f) * s);
    }
  }
  for (; w < n_words; ++w) {
    for (int64_t j = 0; j < kPack; ++j) {
      const int32_t q = static_cast<int32_t>((static_cast<uint32_t>(words[w]) >> (4 * j)) & 0xFu);
      dst[j * n_words + w] = static_cast<float>(q - 8) * word_scale[w];
    }
  }
}

// Σ a[i] b[i] with four independent 8-wide accumulators.
KIMI_INLINE float dot(const float* a, const float* b, int64_t n) {
  v8f acc0{}, acc1{}, acc2{}, acc3{};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 += load8(a + i) * load8(b + i);
    acc1 += load8(a + i + 8) * load8(b + i + 8);
    acc2 += load8(a + i + 16) * load8(b + i + 16);
    acc3 += load8(a + i + 24) * load8(b + i + 24);
  }
  for (; i + 8 <= n; i += 8) acc0 += load8(a + i) * load8(b + i);
  float sum = hsum((acc0 + acc1) + (acc2 + acc3));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

namespace moe_detail {

// Gate/up rows [row_begin, row_end) of one expert for its n_pairs pairs.
// w13: [2I, H/8] of the expert; s13: [2I, H/gs]; xp: [T, H] deinterleaved x;
// act: [n_pairs, I] deinterleaved silu(gate) * up of this expert's pairs; scratch: 2H + H/8 floats.
KIMI_SIMD_CLONES void gate_up_rows(const int32_t* w13, const uint16_t* s13, int64_t hidden,
                                   int64_t inter, int64_t group_size, int64_t row_begin,
                                   int64_t row_end, const float* xp, const int32_t* pair_token,
                                   int64_t n_pairs, float* act, float* scratch) {
  const int64_t n_words = hidden / kPack, n_groups = hidden / group_size;
  const int64_t wpg = group_size / kPack, act_words = inter / kPack;
  float* gate = scratch;
  float* up = scratch + hidden;
  float* word_scale = scratch + 2 * hidden;
  for (int64_t i = row_begin; i < row_end; ++i) {
    dequant_row(w13 + i * n_words, s13 + i * n_groups, n_words, wpg, word_scale, gate);
    dequant_row(w13 + (inter + i) * n_words, s13 + (inter + i) * n_groups, n_words, wpg, word_scale,
                up);
    const int64_t dst = (i % kPack) * act_words + i / kPack;
    for (int64_t p = 0; p < n_pairs; ++p) {
      const float* xt = xp + static_cast<int64_t>(pair_token[p]) * hidden;
      const float g = dot(gate, xt, hidden);
      const float u = dot(up, xt, hidden);
      act[p * inter + dst] = g / (1.0f + std::exp(-g)) * u;
    }
  }
}

// Down rows [row_begin, row_end) of one expert: out[t, h] += weight · (w2[h] · act[pair]).
// w2: [H, I/8] of the expert; s2: [H, I/gs]; out: [T, H] fp32; scratch: I + I/8 floats.
KIMI_SIMD_CLONES void down_rows(const int32_t* w2, const uint16_t* s2, int64_t hidden,
                                int64_t inter, int64_t group_size, int64_t row_begin,
                                int64_t row_end, const float* act, const int32_t* pair_token,
                                const float* pair_weight, int64_t n_pairs, float* out,
                                float* scratch) {
  const int64_t n_words = inter / kPack, n_groups = inter / group_size;
  const int64_t wpg = group_size / kPack;
  float* row = scratch;
  float* word_scale = scratch + inter;
  for (int64_t h = row_begin; h < row_end; ++h) {
    dequant_row(w2 + h * n_words, s2 + h * n_groups, n_words, wpg, word_scale, row);
    for (int64_t p = 0; p < n_pairs; ++p) {
      out[static_cast<int64_t>(pair_token[p]) * hidden + h] +=
          pair_weight[p] * dot(row, act + p * inter, inter);
    }
  }
}

}  // namespace moe_detail

void int4_moe_experts_cpu_impl(const void* x, bool x_bf16, const int32_t* w13_packed,
                               const uint16_t* w13_scale, const int32_t* w2_packed,
                               const uint16_t* w2_scale, const float* topk_weights,
                               const int32_t* topk_ids, int64_t num_tokens, int64_t hidden,
                               int64_t inter, int64_t num_experts, int64_t top_k,
                               int64_t group_size, void* out) {
  const int64_t n_pairs = num_tokens * top_k;
  // 1. Pairs sorted by expert; expert_begin[e]..expert_begin[e + 1] index pair_token/pair_weight.
  std::vector<int64_t> expert_begin(num_experts + 1, 0);
  for (int64_t p = 0; p < n_pairs; ++p) {
    if (topk_ids[p] >= 0) ++expert_begin[topk_ids[p] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) expert_begin[e + 1] += expert_begin[e];
  const int64_t n_routed = expert_begin[num_experts];  // pairs with a local expert
  std::vector<int32_t> pair_token(n_routed);
  std::vector<float> pair_weight(n_routed);
  {
    std::vector<int64_t> fill(expert_begin.begin(), expert_begin.end() - 1);
    for (int64_t p = 0; p < n_pairs; ++p) {  // p = t * top_k + slot: tokens ascending
      if (topk_ids[p] < 0) continue;         // an expert of another rank
      const int64_t slot = fill[topk_ids[p]]++;
      pair_token[slot] = static_cast<int32_t>(p / top_k);
      pair_weight[slot] = topk_weights[p];
    }
  }
  std::vector<int32_t> active;  // experts with >= 1 pair, ascending
  for (int64_t e = 0; e < num_experts; ++e) {
    if (expert_begin[e + 1] > expert_begin[e]) active.push_back(static_cast<int32_t>(e));
  }
  const int64_t n_active = static_cast<int64_t>(active.size());

  // fp32 output: written in place for fp32 x, converted at the end for bf16.
  std::vector<float> out_buf(x_bf16 ? num_tokens * hidden : 0);
  float* out_f = x_bf16 ? out_buf.data() : static_cast<float*>(out);
  std::fill(out_f, out_f + num_tokens * hidden, 0.0f);
  if (n_routed == 0) {
    if (x_bf16) std::fill_n(static_cast<uint16_t*>(out), num_tokens * hidden, uint16_t{0});
    return;
  }

  // 2. Deinterleaved fp32 copy of x: xp[t * H + j * (H/8) + w] = x[t, 8w + j].
  std::vector<float> xp(num_tokens * hidden);
  const int64_t x_words = hidden / kPack;
  const bool big = n_routed * hidden * inter >= (int64_t{1} << 16);  // else one thread is faster
#pragma omp parallel for schedule(static) if (big && num_tokens > 1)
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (x_bf16) {
      const uint16_t* xt = static_cast<const uint16_t*>(x) + t * hidden;
      deinterleave([&](int64_t i) { return bf16_to_f32(xt[i]); }, x_words, xp.data() + t * hidden);
    } else {
      const float* xt = static_cast<const float*>(x) + t * hidden;
      deinterleave([&](int64_t i) { return xt[i]; }, x_words, xp.data() + t * hidden);
    }
  }

  // 3. Gate/up: act[pair, I] (pairs in expert order), deinterleaved.
  std::vector<float> act(n_routed * inter);
  const int64_t chunks = (inter + kGateUpChunk - 1) / kGateUpChunk;
  const int64_t h_scales = hidden / group_size, i_scales = inter / group_size;
#pragma omp parallel if (big)
  {
    std::vector<float> scratch(2 * hidden + hidden / kPack);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_active * chunks; ++item) {
      const int64_t e = active[item / chunks];
      const int64_t row_begin = (item % chunks) * kGateUpChunk;
      const int64_t first = expert_begin[e];
      moe_detail::gate_up_rows(w13_packed + e * 2 * inter * x_words,
                               w13_scale + e * 2 * inter * h_scales, hidden, inter, group_size,
                               row_begin, std::min(inter, row_begin + kGateUpChunk), xp.data(),
                               pair_token.data() + first, expert_begin[e + 1] - first,
                               act.data() + first * inter, scratch.data());
    }
  }

  // 4. Down projection + weighted combine; thread-owned output rows [h0, h1).
#pragma omp parallel if (big)
  {
    std::vector<float> scratch(inter + inter / kPack);
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t per = (hidden + nt - 1) / nt;
    const int64_t h0 = std::min(hidden, tid * per), h1 = std::min(hidden, h0 + per);
    for (int64_t a = 0; a < n_active && h0 < h1; ++a) {
      const int64_t e = active[a];
      const int64_t first = expert_begin[e];
      moe_detail::down_rows(
          w2_packed + e * hidden * (inter / kPack), w2_scale + e * hidden * i_scales, hidden, inter,
          group_size, h0, h1, act.data() + first * inter, pair_token.data() + first,
          pair_weight.data() + first, expert_begin[e + 1] - first, out_f, scratch.data());
    }
  }

  if (x_bf16) {
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t i = 0; i < num_tokens * hidden; ++i) o[i] = f32_to_bf16(out_f[i]);
  }
}

}  // namespace kimi
