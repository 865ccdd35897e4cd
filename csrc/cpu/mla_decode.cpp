// Absorbed-MLA decode attention on the CPU over the paged latent cache, fp32 online softmax.
//
// Work items are (sequence, token range) splits: a sequence is split only when there are fewer
// sequences than 2x the threads, into ranges of >= kMinSplit tokens (split-KV). Within an item,
// tokens are processed in blocks of kBlock: every cache row of the block is read once for all H
// heads (tokens outer, heads inner) for the scores and once more (from L1/L2) for the values.
// Scores and values use head tiles (8/4/2/1) with register-resident accumulators.
// Each item keeps per-head running max m, sum l and unnormalised acc [H, R]; the splits of a
// sequence are merged at the end in a fixed order (deterministic for a given thread-free plan).
#include "mla_decode.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace kimi {
namespace {

using namespace simd;  // NOLINT(build/namespaces): the helpers read as local ones

constexpr int64_t kBlock = 32;      // tokens per online-softmax block
constexpr int64_t kMinSplit = 256;  // fewest tokens per split-KV item

// e^x per lane (Cephes expf: range reduction by ln 2, degree-6 polynomial, 2^n by exponent bits);
// relative error ~1e-7, inputs clamped to [-87.3, 88.3] (e^-87.3 ~ 1e-38 stands in for 0).
KIMI_INLINE v8f exp8(v8f x) {
  const v8f hi = v8f{} + 88.3762626647949f, lo = v8f{} - 87.3365447504f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  v8f n = x * 1.44269504088896341f + 0.5f;
  v8f t = __builtin_convertvector(__builtin_convertvector(n, v8i), v8f);
  n = t + __builtin_convertvector(t > n, v8f);  // floor: truncation overshoots for negatives
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8f y = x * 1.9875691500E-4f + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * x * x + x + 1.0f;
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  return y * reinterpret_cast<v8f>(bits);
}

// Scores of a tile of HT heads against n cache rows: probs[h * kBlock + i] = q[h] · rows[i] *
// scale. q: [HT, dim] (row stride dim). The HT accumulators stay in registers; each 8-float
// chunk of a row is loaded once for all HT heads.
template <int HT>
KIMI_INLINE void scores_tile(const float* q, const float* const* rows, int64_t n, int64_t dim,
                             float scale, float* probs) {
  for (int64_t i = 0; i < n; ++i) {
    const float* r = rows[i];
    v8f acc[HT];
    for (int h = 0; h < HT; ++h) acc[h] = v8f{};
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) {
      const v8f rv = load8(r + d);
      for (int h = 0; h < HT; ++h) acc[h] += load8(q + h * dim + d) * rv;
    }
    for (int h = 0; h < HT; ++h) {
      float sum = hsum(acc[h]);
      for (int64_t e = d; e < dim; ++e) sum += q[h * dim + e] * r[e];
      probs[h * kBlock + i] = sum * scale;
    }
  }
}

// acc[h, :rank] += Σ_i probs[h * kBlock + i] · rows[i][:rank] for a tile of HT heads: per 8-float
// chunk of the values, the HT accumulators stay in registers over all n rows of the block.
template <int HT>
KIMI_INLINE void values_tile(const float* probs, const float* const* rows, int64_t n, int64_t rank,
                             float* acc) {
  int64_t d = 0;
  for (; d + 8 <= rank; d += 8) {
    v8f a[HT];
    for (int h = 0; h < HT; ++h) a[h] = load8(acc + h * rank + d);
    for (int64_t i = 0; i < n; ++i) {
      const v8f v = load8(rows[i] + d);
      for (int h = 0; h < HT; ++h) a[h] += probs[h * kBlock + i] * v;
    }
    for (int h = 0; h < HT; ++h) store8(acc + h * rank + d, a[h]);
  }
  for (; d < rank; ++d) {
    for (int h = 0; h < HT; ++h) {
      float a = acc[h * rank + d];
      for (int64_t i = 0; i < n; ++i) a += probs[h * kBlock + i] * rows[i][d];
      acc[h * rank + d] = a;
    }
  }
}

// Runs Tile<HT>::run(h0, args...) over head tiles of 8, 4, 2, 1 covering [0, heads).
template <template <int> class Tile, typename... Args>
KIMI_INLINE void for_head_tiles(int64_t heads, Args... args) {
  int64_t h0 = 0;
  for (; h0 + 8 <= heads; h0 += 8) Tile<8>::run(h0, args...);
  if (h0 + 4 <= heads) Tile<4>::run(h0, args...), h0 += 4;
  if (h0 + 2 <= heads) Tile<2>::run(h0, args...), h0 += 2;
  if (h0 < heads) Tile<1>::run(h0, args...);
}

template <int HT>
struct ScoresTile {
  static KIMI_INLINE void run(int64_t h0, const float* qf, const float* const* rows, int64_t n,
                              int64_t dim, float scale, float* probs) {
    scores_tile<HT>(qf + h0 * dim, rows, n, dim, scale, probs + h0 * kBlock);
  }
};

template <int HT>
struct ValuesTile {
  static KIMI_INLINE void run(int64_t h0, const float* probs, const float* const* rows, int64_t n,
                              int64_t rank, float* acc) {
    values_tile<HT>(probs + h0 * kBlock, rows, n, rank, acc + h0 * rank);
  }
};

struct Item {
  int64_t b, t0, t1;
};

}  // namespace

namespace mla_detail {

// One (sequence, token range) item. qf: [H, D] fp32 query of the sequence; pages: the sequence's
// block-table row. Outputs m, l: [H]; acc: [H, R] (unnormalised). scratch: kBlock * (D + H) floats.
KIMI_SIMD_CLONES void attend_range(const float* qf, const void* kv_cache, bool bf16,
                                   const int32_t* pages, int64_t t0, int64_t t1, int64_t heads,
                                   int64_t dim, int64_t rank, int64_t page_size, float scale,
                                   float* m, float* l, float* acc, float* scratch) {
  float* rows_buf = scratch;              // [kBlock, D] fp32 copies (bf16 cache only)
  float* probs = scratch + kBlock * dim;  // [H, kBlock] scores, then probabilities
  const float* rows[kBlock];
  std::fill(m, m + heads, -std::numeric_limits<float>::infinity());
  std::fill(l, l + heads, 0.0f);
  std::fill(acc, acc + heads * rank, 0.0f);
  for (int64_t start = t0; start < t1; start += kBlock) {
    const int64_t n = std::min(kBlock, t1 - start);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = start + i;
      const int64_t entry = static_cast<int64_t>(pages[t / page_size]) * page_size + t % page_size;
      if (bf16) {
        const uint16_t* src = static_cast<const uint16_t*>(kv_cache) + entry * dim;
        float* dst = rows_buf + i * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = bf16_to_f32(src[d]);
        rows[i] = dst;
      } else {
        rows[i] = static_cast<const float*>(kv_cache) + entry * dim;
      }
    }
    for_head_tiles<ScoresTile>(heads, qf, static_cast<const float* const*>(rows), n, dim, scale,
                               probs);
    for (int64_t h = 0; h < heads; ++h) {
      float* p = probs + h * kBlock;
      float block_max = p[0];
      for (int64_t i = 1; i < n; ++i) block_max = std::max(block_max, p[i]);
      if (block_max > m[h]) {
        const float corr = std::exp(m[h] - block_max);  // 0 on the first block (m = -inf)
        l[h] *= corr;
        float* a = acc + h * rank;
        for (int64_t d = 0; d < rank; ++d) a[d] *= corr;
        m[h] = block_max;
      }
      // All kBlock lanes (stale finite values past n are computed and ignored).
      for (int64_t i = 0; i < kBlock; i += 8) store8(p + i, exp8(load8(p + i) - m[h]));
      float sum = 0.0f;
      for (int64_t i = 0; i < n; ++i) sum += p[i];
      l[h] += sum;
    }
    for_head_tiles<ValuesTile>(heads, static_cast<const float*>(probs),
                               static_cast<const float* const*>(rows), n, rank, acc);
  }
}

}  // namespace mla_detail

void mla_decode_cpu_impl(const void* q, const void* kv_cache, bool bf16, const int32_t* block_table,
                         const int32_t* seq_lens, int64_t batch, int64_t heads, int64_t dim,
                         int64_t kv_lora_rank, int64_t page_size, int64_t max_pages,
                         float softmax_scale, void* out, float* lse) {
  const int64_t rank = kv_lora_rank;
  // fp32 query [B, H, D].
  std::vector<float> qf(batch * heads * dim);
  for (int64_t i = 0; i < batch * heads * dim; ++i) {
    qf[i] =
        bf16 ? bf16_to_f32(static_cast<const uint16_t*>(q)[i]) : static_cast<const float*>(q)[i];
  }
  // Split plan: item_begin[b]..item_begin[b + 1] are sequence b's items, in token order.
  const int64_t threads = omp_get_max_threads();
  const int64_t want = batch >= 2 * threads ? 1 : (2 * threads + batch - 1) / batch;
  std::vector<Item> items;
  std::vector<int64_t> item_begin(batch + 1, 0);
  int64_t total_tokens = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = seq_lens[b];
    total_tokens += len;
    const int64_t splits = std::max<int64_t>(1, std::min(want, len / kMinSplit));
    const int64_t per = (len + splits - 1) / splits;
    for (int64_t t0 = 0; t0 < len; t0 += per) items.push_back({b, t0, std::min(len, t0 + per)});
    item_begin[b + 1] = static_cast<int64_t>(items.size());
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<float> part_m(n_items * heads), part_l(n_items * heads);
  std::vector<float> part_acc(n_items * heads * rank);
  const bool big = total_tokens * heads * dim >= (int64_t{1} << 15);  // else one thread is faster

#pragma omp parallel if (big)
  {
    std::vector<float> scratch(kBlock * (dim + heads));
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item& item = items[it];
      mla_detail::attend_range(
          qf.data() + item.b * heads * dim, kv_cache, bf16, block_table + item.b * max_pages,
          item.t0, item.t1, heads, dim, rank, page_size, softmax_scale, part_m.data() + it * heads,
          part_l.data() + it * heads, part_acc.data() + it * heads * rank, scratch.data());
    }
  }

  // Merge the splits of each (b, h): M = max m_i, L = Σ l_i e^(m_i - M), out = Σ acc_i e^(..) / L.
#pragma omp parallel for schedule(static) if (big && batch * heads > 1)
  for (int64_t bh = 0; bh < batch * heads; ++bh) {
    const int64_t b = bh / heads, h = bh % heads;
    float big_m = -std::numeric_limits<float>::infinity();
    for (int64_t it = item_begin[b]; it < item_begin[b + 1]; ++it) {
      big_m = std::max(big_m, part_m[it * heads + h]);
    }
    float sum = 0.0f;
    std::vector<float> o(rank, 0.0f);
    for (int64_t it = item_begin[b]; it < item_begin[b + 1]; ++it) {
      const float c = std::exp(part_m[it * heads + h] - big_m);
      sum += part_l[it * heads + h] * c;
      const float* a = part_acc.data() + (it * heads + h) * rank;
      for (int64_t d = 0; d < rank; ++d) o[d] += c * a[d];
    }
    lse[bh] = big_m + std::log(sum);
    const float inv = 1.0f / sum;
    if (bf16) {
      uint16_t* dst = static_cast<uint16_t*>(out) + bh * rank;
      for (int64_t d = 0; d < rank; ++d) dst[d] = f32_to_bf16(o[d] * inv);
    } else {
      float* dst = static_cast<float*>(out) + bh * rank;
      for (int64_t d = 0; d < rank; ++d) dst[d] = o[d] * inv;
    }
  }
}

}  // namespace kimi
