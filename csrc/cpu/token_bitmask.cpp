// Guided decoding's mask on the logits: one pass over each row, a word (32 tokens) at a time.
// Masks are often all-clear (inside JSON syntax: a few allowed ids) or all-set (free text), so
// whole words take fast paths. Mixed words (inside JSON strings most words are) go a byte at a
// time through a 256-entry table of 8 floats, +inf where the bit is set and -inf where it is
// clear: min(logit, entry) keeps or bans each token without a branch, and vectorizes.
#include "cpu/token_bitmask.h"

#include <algorithm>
#include <array>
#include <limits>

namespace kimi {
namespace {

using ByteTable = std::array<std::array<float, 8>, 256>;

ByteTable make_byte_table() {
  const float inf = std::numeric_limits<float>::infinity();
  ByteTable table{};
  for (int byte = 0; byte < 256; ++byte) {
    for (int bit = 0; bit < 8; ++bit) table[byte][bit] = ((byte >> bit) & 1) ? inf : -inf;
  }
  return table;
}

const ByteTable kByteTable = make_byte_table();

}  // namespace

void apply_token_bitmask_cpu_impl(float* logits, const int32_t* bitmask, int64_t rows,
                                  int64_t vocab, int64_t words) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for schedule(static) if (rows * vocab >= (1 << 20))
  for (int64_t r = 0; r < rows; ++r) {
    float* row = logits + r * vocab;
    const uint32_t* mask = reinterpret_cast<const uint32_t*>(bitmask + r * words);
    const int64_t covered = std::min(vocab, 32 * words);
    for (int64_t w = 0; 32 * w < covered; ++w) {
      const uint32_t bits = mask[w];
      const int64_t start = 32 * w, end = std::min(start + 32, covered);
      if (bits == 0xFFFFFFFFu) continue;
      if (bits == 0) {
        std::fill(row + start, row + end, neg_inf);
        continue;
      }
      for (int64_t base = start; base < end; base += 8) {
        const float* entry = kByteTable[(bits >> (base - start)) & 0xFFu].data();
        float* dst = row + base;
        if (base + 8 <= end) {
          for (int i = 0; i < 8; ++i) dst[i] = std::min(dst[i], entry[i]);
        } else {
          for (int64_t i = 0; i < end - base; ++i) dst[i] = std::min(dst[i], entry[i]);
        }
      }
    }
    std::fill(row + covered, row + vocab, neg_inf);
  }
}

}  // namespace kimi
