// Guided decoding's mask on the logits: one pass over each row, a word (32 tokens) at a time.
// Masks are often all-clear (inside JSON syntax: a few allowed ids) or all-set (free text), so
// whole words take fast paths. Mixed words (inside JSON strings most words are) go a byte at a
// time through a 256-entry table of 8 lane masks (all ones where the bit is set): each float's
// bits become (logit & keep) | (-inf & ~keep), branch-free and vectorizable, and a banned NaN
// logit becomes -inf like any other.
#include "cpu/token_bitmask.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>

namespace kimi {
namespace {

using ByteTable = std::array<std::array<uint32_t, 8>, 256>;
constexpr uint32_t kNegInfBits = 0xFF800000u;

ByteTable make_byte_table() {
  ByteTable table{};
  for (int byte = 0; byte < 256; ++byte) {
    for (int bit = 0; bit < 8; ++bit) table[byte][bit] = ((byte >> bit) & 1) ? ~0u : 0u;
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
        const uint32_t* keep = kByteTable[(bits >> (base - start)) & 0xFFu].data();
        const int lanes = static_cast<int>(std::min<int64_t>(8, end - base));
        uint32_t lane[8] = {};
        std::memcpy(lane, row + base, sizeof(float) * lanes);
        for (int i = 0; i < 8; ++i) lane[i] = (lane[i] & keep[i]) | (kNegInfBits & ~keep[i]);
        std::memcpy(row + base, lane, sizeof(float) * lanes);
      }
    }
    std::fill(row + covered, row + vocab, neg_inf);
  }
}

}  // namespace kimi
