// INT4 (W4A16) MoE experts: routing metadata, two grouped tensor-core GEMMs, weighted combine.
//
//   moe_align      one block: per-expert counts -> offsets, (expert, start, length) tiles of at
//   most
//                  8 or 32 (token, slot) pairs, pairs sorted by expert. No host sync: the GEMMs
//                  launch max_tiles blocks along y and the surplus ones exit.
//   gate_up        act[pos] = silu(x[t] · gate_e) * (x[t] · up_e), bf16, per sorted pair position
//   down           y[pair] = act[pos] · down_e, bf16 (the reference rounds here too)
//   combine        out[t] = Σ_slots w[t, slot] · y[t, slot], fp32, slots in ascending expert order
//                  (the reference's summation order), skipped (negative) ids contribute nothing
//
// GEMM design (kernel-targets.md §1.3): decode is weight streaming, so weights are the MMA's M
// operand ("swap-AB") and the tile's tokens its N = 8 columns; each weight byte is read once per
// tile with 16-byte non-allocating loads straight into registers and dequantized there:
// mma.sync.m16n8k16 lane (g, q) loads one uint4 = 32 consecutive K values (= one scale group of
// 32) from rows g and g + 8. The K order inside an MMA step is permuted to match the nibble
// order (a dot product does not care), and the activations are loaded in the same permuted order,
// so the compressed-tensors packing is used as stored: no repacked copy of the weights.
// Int4 -> bf16: (nibble | 0x4300) is the bf16 128 + nibble; minus 136 gives q - 8 exactly, times
// the group scale (one rounding, like the reference's bf16 dequantization).
// K is split across the warps of a block (fixed by K alone, so results do not depend on the batch)
// and reduced in a fixed order through shared memory: every output is deterministic.
#include <algorithm>

#include "cuda/int4_moe.cuh"
#include "cuda/mma.cuh"

namespace kimi {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kKBlock = 128;  // K values per warp step: 4 lanes (q) x 32-value segments
constexpr int kAlignThreads = 1024;
constexpr int kMaxExperts = 2 * kAlignThreads;
constexpr int kCombineVector = 8;  // bf16 outputs per combine thread (one 16-byte load per slot)
constexpr int64_t kWorkspaceBudget = int64_t{256} << 20;  // bytes of y per chunk, at most
constexpr int64_t kMaxChunkTokens = 4096;

size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

// ---------------------------------------------------------------------------------------------
// Routing metadata.

struct TileList {
  int32_t* sorted_pairs;  // [n_pairs] pair ids (t * k + slot) grouped by expert
  int32_t* expert;        // [max_tiles]
  int32_t* start;         // [max_tiles] first position in sorted_pairs
  int32_t* length;        // [max_tiles] 1..tile_tokens
  int32_t* count;         // [1] tiles in use
};

// Exclusive prefix sum over the block (blockDim.x == kAlignThreads); returns the block total too.
__device__ int block_exclusive_scan(int value, int* warp_sums, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int sum = warp_sums[lane];
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int other = __shfl_up_sync(0xffffffffu, sum, offset);
      if (lane >= offset) sum += other;
    }
    warp_sums[lane] = sum;  // inclusive over warps
  }
  __syncthreads();
  const int result = inclusive - value + (warp > 0 ? warp_sums[warp - 1] : 0);
  *total = warp_sums[kAlignThreads / 32 - 1];
  __syncthreads();  // warp_sums is reused by the next scan
  return result;
}

// Thread i owns experts 2i and 2i + 1 for the scans. Positions inside an expert come from shared
// atomics (any order): the GEMMs compute every pair's outputs independently of its position.
__global__ void __launch_bounds__(kAlignThreads)
    moe_align_kernel(const int32_t* __restrict__ topk_ids, int n_pairs, int num_experts,
                     int tile_tokens, TileList tiles) {
  extern __shared__ int smem[];
  int* count = smem;                 // [num_experts]
  int* cursor = smem + num_experts;  // [num_experts]
  __shared__ int warp_sums[kAlignThreads / 32];
  for (int e = threadIdx.x; e < num_experts; e += kAlignThreads) count[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < n_pairs; p += kAlignThreads) {
    const int e = topk_ids[p];
    if (e >= 0 && e < num_experts) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  const int e0 = 2 * threadIdx.x, e1 = e0 + 1;
  const int c0 = e0 < num_experts ? count[e0] : 0, c1 = e1 < num_experts ? count[e1] : 0;
  const int t0 = (c0 + tile_tokens - 1) / tile_tokens, t1 = (c1 + tile_tokens - 1) / tile_tokens;
  int total_pairs, total_tiles;
  const int pair_offset = block_exclusive_scan(c0 + c1, warp_sums, &total_pairs);
  const int tile_offset = block_exclusive_scan(t0 + t1, warp_sums, &total_tiles);
  if (threadIdx.x == 0) *tiles.count = total_tiles;
  const int experts[2] = {e0, e1}, counts[2] = {c0, c1},
            pair_begin[2] = {pair_offset, pair_offset + c0};
  int tile = tile_offset;
  for (int i = 0; i < 2; ++i) {
    if (experts[i] >= num_experts) break;
    cursor[experts[i]] = pair_begin[i];
    for (int first = 0; first < counts[i]; first += tile_tokens, ++tile) {
      tiles.expert[tile] = experts[i];
      tiles.start[tile] = pair_begin[i] + first;
      tiles.length[tile] = min(tile_tokens, counts[i] - first);
    }
  }
  __syncthreads();
  for (int p = threadIdx.x; p < n_pairs; p += kAlignThreads) {
    const int e = topk_ids[p];
    if (e >= 0 && e < num_experts) tiles.sorted_pairs[atomicAdd(&cursor[e], 1)] = p;
  }
}

// ---------------------------------------------------------------------------------------------
// Grouped GEMMs.

struct GemmParams {
  const int32_t* w;        // [E, rows, K/8] packed int4
  const __nv_bfloat16* s;  // [E, rows, K/gs]
  const __nv_bfloat16* a;  // gate/up: x [T, K] (row = token); down: act [n_pairs, K] (row = pos)
  __nv_bfloat16* c;        // gate/up: act [n_pairs, I] (row = pos); down: y [n_pairs, H] (= pair)
  int64_t features;        // outputs per expert: I (gate/up) or H (down)
  int64_t k;               // reduction length: H (gate/up) or I (down)
  int64_t group_size;
  int top_k;
  int k_warps;  // warps splitting K inside a block: 1, 2, 4 or 8; the other factor splits rows
  TileList tiles;
};

// bf16x2 of (q_lo - 8, q_hi - 8) * scale for the nibbles at bits 0..3 and 16..19 of `u`.
__device__ __forceinline__ uint32_t dequant_pair(uint32_t u, __nv_bfloat162 scale) {
  const __nv_bfloat162 biased = mma::bits_bf162((u & 0x000F000Fu) | 0x43004300u);
  return mma::bf162_bits(__hmul2(__hsub2(biased, __float2bfloat162_rn(136.0f)), scale));
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Block = 8 warps; warp (row, k) computes two 16-row sets for the tile's 8 * kTokTiles tokens over
// the K blocks k, k + k_warps, ...: gate rows r.. and up rows I + r.. (kGateUp), or rows r.. and
// r + 16.. (down). Grid: (row blocks, max tiles).
template <bool kGateUp, int kTokTiles>
__global__ void __launch_bounds__(kThreads, 1) int4_gemm_kernel(const GemmParams p) {
  constexpr int kTileTokens = 8 * kTokTiles;
  __shared__ float partial[kWarps][2][kTokTiles][4][32];  // split-K partial sums
  __shared__ int32_t token_row[kTileTokens];              // activation row per tile token, or -1
  __shared__ int32_t token_pair[kTileTokens];
  const int tile = blockIdx.y;
  if (tile >= *p.tiles.count) return;  // uniform across the block
  const int expert = p.tiles.expert[tile], start = p.tiles.start[tile];
  const int length = p.tiles.length[tile];
  if (threadIdx.x < kTileTokens) {
    const int i = threadIdx.x;
    const int pair = i < length ? p.tiles.sorted_pairs[start + i] : -1;
    token_pair[i] = pair;
    token_row[i] = i < length ? (kGateUp ? pair / p.top_k : start + i) : -1;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int warp_k = warp % p.k_warps, warp_row = warp / p.k_warps;
  const int row_warps = kWarps / p.k_warps;
  constexpr int kRowsPerWarp = kGateUp ? 16 : 32;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * row_warps + warp_row) * kRowsPerWarp;
  const int64_t weight_rows = kGateUp ? 2 * p.features : p.features;
  const int64_t k_words = p.k / 8, k_groups = p.k / p.group_size;

  // Rows [set][half]: feature f = row0 (+16 for down set 1) + g (+8 for half 1).
  const int32_t* w_row[2][2];
  const __nv_bfloat16* s_row[2][2];
  bool row_ok[2][2];
#pragma unroll
  for (int set = 0; set < 2; ++set) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t feature = row0 + (kGateUp ? 0 : 16 * set) + g + 8 * half;
      const int64_t row = (kGateUp && set == 1 ? p.features : 0) + feature;
      row_ok[set][half] = feature < p.features;
      const int64_t index =
          static_cast<int64_t>(expert) * weight_rows + (row_ok[set][half] ? row : 0);
      w_row[set][half] = p.w + index * k_words;
      s_row[set][half] = p.s + index * k_groups;
    }
  }
  const __nv_bfloat16* a_row[kTokTiles];
#pragma unroll
  for (int j = 0; j < kTokTiles; ++j) {
    const int r = token_row[8 * j + g];
    a_row[j] = r >= 0 ? p.a + static_cast<int64_t>(r) * p.k : nullptr;
  }

  // The weights of K block kb for this lane (zeros outside the rows / K range).
  auto load_block = [&](int kb, uint4(&wv)[2][2], __nv_bfloat162(&scale)[2][2]) {
    const int64_t seg = static_cast<int64_t>(kb) * kKBlock + 32 * q;
#pragma unroll
    for (int set = 0; set < 2; ++set) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const bool ok = seg < p.k && row_ok[set][half];
        wv[set][half] =
            ok ? mma::load_streaming(w_row[set][half] + seg / 8) : make_uint4(0, 0, 0, 0);
        scale[set][half] = __bfloat162bfloat162(ok ? s_row[set][half][seg / p.group_size]
                                                   : __float2bfloat16(0.0f));
      }
    }
  };

  float acc[2][kTokTiles][4] = {};
  const int n_kblocks = static_cast<int>((p.k + kKBlock - 1) / kKBlock);
  uint4 wv[2][2];
  __nv_bfloat162 scale[2][2];
  if (warp_k < n_kblocks) load_block(warp_k, wv, scale);
  for (int kb = warp_k; kb < n_kblocks; kb += p.k_warps) {
    const int64_t seg = static_cast<int64_t>(kb) * kKBlock + 32 * q;  // this lane's 32 K values
    const bool seg_ok = seg < p.k;
    // Software pipeline: the next block's weights are in flight while this one is multiplied.
    uint4 next_wv[2][2];
    __nv_bfloat162 next_scale[2][2];
    if (kb + p.k_warps < n_kblocks) load_block(kb + p.k_warps, next_wv, next_scale);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      uint4 xv[kTokTiles];
#pragma unroll
      for (int j = 0; j < kTokTiles; ++j) {
        xv[j] = (seg_ok && a_row[j] != nullptr)
                    ? __ldg(reinterpret_cast<const uint4*>(a_row[j] + seg + 8 * w))
                    : make_uint4(0, 0, 0, 0);
      }
// Step `half` uses nibbles (2h, 2h+4) for k = 2q, 2q+1 and (2h+1, 2h+5) for k = 2q+8, 2q+9.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int shift = 8 * half;
        uint32_t a[2][4];
#pragma unroll
        for (int set = 0; set < 2; ++set) {
          const uint32_t lo = word(wv[set][0], w), hi = word(wv[set][1], w);
          a[set][0] = dequant_pair(lo >> shift, scale[set][0]);
          a[set][1] = dequant_pair(hi >> shift, scale[set][1]);
          a[set][2] = dequant_pair(lo >> (shift + 4), scale[set][0]);
          a[set][3] = dequant_pair(hi >> (shift + 4), scale[set][1]);
        }
#pragma unroll
        for (int j = 0; j < kTokTiles; ++j) {
          // Activations (x0..x7) of this word: b[0] = (x_2h, x_2h+4), b[1] = (x_2h+1, x_2h+5).
          const uint32_t first = half ? xv[j].y : xv[j].x, second = half ? xv[j].w : xv[j].z;
          const uint32_t b[2] = {__byte_perm(first, second, 0x5410),
                                 __byte_perm(first, second, 0x7632)};
          mma::bf16_16816(acc[0][j], a[0], b);
          mma::bf16_16816(acc[1][j], a[1], b);
        }
      }
    }
#pragma unroll
    for (int set = 0; set < 2; ++set) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        wv[set][half] = next_wv[set][half];
        scale[set][half] = next_scale[set][half];
      }
    }
  }

  if (p.k_warps > 1) {  // fixed-order split-K reduction
#pragma unroll
    for (int set = 0; set < 2; ++set)
#pragma unroll
      for (int j = 0; j < kTokTiles; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) partial[warp][set][j][r][lane] = acc[set][j][r];
    __syncthreads();
    if (warp_k != 0) return;
#pragma unroll
    for (int set = 0; set < 2; ++set) {
#pragma unroll
      for (int j = 0; j < kTokTiles; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          float sum = 0.0f;
          for (int kw = 0; kw < p.k_warps; ++kw) sum += partial[warp + kw][set][j][r][lane];
          acc[set][j][r] = sum;
        }
      }
    }
  }

// C fragment: acc[set][j][2 * half + c] is (feature g + 8 * half, tile token 8j + 2q + c).
#pragma unroll
  for (int j = 0; j < kTokTiles; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int token = 8 * j + 2 * q + c;
        if (token >= length) continue;
        const int r = 2 * half + c;
        if (kGateUp) {
          const int64_t feature = row0 + g + 8 * half;
          if (feature >= p.features) continue;
          const float gate = acc[0][j][r], up = acc[1][j][r];
          const float act = gate / (1.0f + expf(-gate)) * up;
          p.c[static_cast<int64_t>(start + token) * p.features + feature] = __float2bfloat16(act);
        } else {
#pragma unroll
          for (int set = 0; set < 2; ++set) {
            const int64_t feature = row0 + 16 * set + g + 8 * half;
            if (feature >= p.features) continue;
            p.c[static_cast<int64_t>(token_pair[token]) * p.features + feature] =
                __float2bfloat16(acc[set][j][r]);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Weighted top-k combine: grid (T, H / (kThreads * 8)); each thread owns 8 consecutive outputs.

__global__ void __launch_bounds__(kThreads)
    moe_combine_kernel(const __nv_bfloat16* __restrict__ y, const float* __restrict__ weights,
                       const int32_t* __restrict__ ids, int top_k, int num_experts, int64_t hidden,
                       __nv_bfloat16* __restrict__ out) {
  __shared__ int order[32];  // valid slots by ascending expert id
  __shared__ int n_valid;
  const int64_t t = blockIdx.x;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int slot = 0; slot < top_k; ++slot) {
      const int e = ids[t * top_k + slot];
      if (e < 0 || e >= num_experts) continue;
      int i = n++;
      for (; i > 0 && ids[t * top_k + order[i - 1]] > e; --i) order[i] = order[i - 1];
      order[i] = slot;
    }
    n_valid = n;
  }
  __syncthreads();
  const int64_t h = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * kCombineVector;
  if (h >= hidden) return;
  float acc[kCombineVector] = {};
  for (int i = 0; i < n_valid; ++i) {
    const int64_t pair = t * top_k + order[i];
    const float w = weights[pair];
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(y + pair * hidden + h));
    const __nv_bfloat16* yv = reinterpret_cast<const __nv_bfloat16*>(&v);
// Product then sum, each rounded to fp32: the reference's (y.float() * w) then index_add_.
#pragma unroll
    for (int e = 0; e < kCombineVector; ++e) {
      acc[e] = __fadd_rn(acc[e], __fmul_rn(__bfloat162float(yv[e]), w));
    }
  }
  uint4 packed;
  __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&packed);
#pragma unroll
  for (int e = 0; e < kCombineVector; ++e) o[e] = __float2bfloat16(acc[e]);
  *reinterpret_cast<uint4*>(out + t * hidden + h) = packed;
}

// ---------------------------------------------------------------------------------------------
// Host side.

int k_warps_for(int64_t k) {
  const int64_t blocks = (k + kKBlock - 1) / kKBlock;
  return blocks >= 8 ? 8 : blocks >= 4 ? 4 : blocks >= 2 ? 2 : 1;
}

struct Workspace {
  TileList tiles;
  __nv_bfloat16* act;  // [n_pairs, I]
  __nv_bfloat16* y;    // [n_pairs, H]
};

Workspace carve(void* base, int64_t n_pairs, int64_t num_experts, int64_t inter, int64_t hidden) {
  char* at = static_cast<char*>(base);
  auto take = [&at](size_t bytes) {
    char* p = at;
    at += align_up(bytes);
    return p;
  };
  const int64_t tiles =
      moe_align_max_tiles(n_pairs, num_experts, 8);  // 8-token tiles need the most
  Workspace ws;
  ws.tiles.sorted_pairs = reinterpret_cast<int32_t*>(take(n_pairs * sizeof(int32_t)));
  ws.tiles.expert = reinterpret_cast<int32_t*>(take(tiles * sizeof(int32_t)));
  ws.tiles.start = reinterpret_cast<int32_t*>(take(tiles * sizeof(int32_t)));
  ws.tiles.length = reinterpret_cast<int32_t*>(take(tiles * sizeof(int32_t)));
  ws.tiles.count = reinterpret_cast<int32_t*>(take(sizeof(int32_t)));
  ws.act = reinterpret_cast<__nv_bfloat16*>(take(n_pairs * inter * sizeof(__nv_bfloat16)));
  ws.y = reinterpret_cast<__nv_bfloat16*>(take(n_pairs * hidden * sizeof(__nv_bfloat16)));
  return ws;
}

template <int kTokTiles>
cudaError_t launch_gemms(GemmParams gate_up, GemmParams down, int64_t tiles, cudaStream_t stream) {
  const int64_t up_rows = (kWarps / gate_up.k_warps) * 16, down_rows = (kWarps / down.k_warps) * 32;
  const dim3 grid_up((gate_up.features + up_rows - 1) / up_rows, tiles);
  int4_gemm_kernel<true, kTokTiles><<<grid_up, kThreads, 0, stream>>>(gate_up);
  const dim3 grid_down((down.features + down_rows - 1) / down_rows, tiles);
  int4_gemm_kernel<false, kTokTiles><<<grid_down, kThreads, 0, stream>>>(down);
  return cudaGetLastError();
}

}  // namespace

int64_t moe_align_max_tiles(int64_t n_pairs, int64_t num_experts, int64_t tile_tokens) {
  return (n_pairs + tile_tokens - 1) / tile_tokens + std::min(num_experts, n_pairs);
}

cudaError_t moe_align_cuda_launch(const int32_t* topk_ids, int64_t n_pairs, int64_t num_experts,
                                  int tile_tokens, int32_t* sorted_pairs, int32_t* tile_expert,
                                  int32_t* tile_start, int32_t* tile_length, int32_t* num_tiles,
                                  cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kMaxExperts || tile_tokens < 1 || n_pairs > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  const TileList tiles{sorted_pairs, tile_expert, tile_start, tile_length, num_tiles};
  moe_align_kernel<<<1, kAlignThreads, 2 * num_experts * sizeof(int), stream>>>(
      topk_ids, static_cast<int>(n_pairs), static_cast<int>(num_experts), tile_tokens, tiles);
  return cudaGetLastError();
}

int64_t int4_moe_chunk_tokens(const Int4MoeArgs& args) {
  const int64_t per_token = args.top_k * args.hidden * static_cast<int64_t>(sizeof(__nv_bfloat16));
  const int64_t budget = std::max<int64_t>(1, kWorkspaceBudget / std::max<int64_t>(per_token, 1));
  return std::max<int64_t>(1, std::min({args.num_tokens, budget, kMaxChunkTokens}));
}

size_t int4_moe_workspace_bytes(const Int4MoeArgs& args) {
  const int64_t n_pairs = int4_moe_chunk_tokens(args) * args.top_k;
  const int64_t tiles = moe_align_max_tiles(n_pairs, args.num_experts, 8);
  return align_up(n_pairs * sizeof(int32_t)) + 3 * align_up(tiles * sizeof(int32_t)) +
         align_up(sizeof(int32_t)) + align_up(n_pairs * args.inter * sizeof(__nv_bfloat16)) +
         align_up(n_pairs * args.hidden * sizeof(__nv_bfloat16));
}

cudaError_t int4_moe_cuda_launch(const Int4MoeArgs& args, void* workspace, cudaStream_t stream) {
  if (args.num_experts < 1 || args.num_experts > kMaxExperts || args.top_k < 1 || args.top_k > 32 ||
      args.hidden % 32 != 0 || args.inter % 32 != 0 || args.group_size % 32 != 0 ||
      args.hidden % args.group_size != 0 || args.inter % args.group_size != 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t chunk = int4_moe_chunk_tokens(args);
  const Workspace ws =
      carve(workspace, chunk * args.top_k, args.num_experts, args.inter, args.hidden);
  for (int64_t t0 = 0; t0 < args.num_tokens; t0 += chunk) {
    const int64_t tokens = std::min(chunk, args.num_tokens - t0);
    const int64_t n_pairs = tokens * args.top_k;
    const int32_t* ids = args.topk_ids + t0 * args.top_k;
    // Prefill-like chunks (>= 16 pairs per expert on average) use 32-token tiles: each weight
    // byte then feeds 4x the MMAs. The per-output arithmetic is the same for both tile sizes.
    const bool wide = n_pairs >= 16 * args.num_experts;
    const int tile_tokens = wide ? 32 : 8;
    const TileList& t = ws.tiles;
    const cudaError_t aligned =
        moe_align_cuda_launch(ids, n_pairs, args.num_experts, tile_tokens, t.sorted_pairs, t.expert,
                              t.start, t.length, t.count, stream);
    if (aligned != cudaSuccess) return aligned;
    GemmParams gate_up{args.w13,
                       args.s13,
                       args.x + t0 * args.hidden,
                       ws.act,
                       args.inter,
                       args.hidden,
                       args.group_size,
                       static_cast<int>(args.top_k),
                       k_warps_for(args.hidden),
                       ws.tiles};
    GemmParams down{args.w2,
                    args.s2,
                    ws.act,
                    ws.y,
                    args.hidden,
                    args.inter,
                    args.group_size,
                    static_cast<int>(args.top_k),
                    k_warps_for(args.inter),
                    ws.tiles};
    const int64_t tiles = moe_align_max_tiles(n_pairs, args.num_experts, tile_tokens);
    const cudaError_t err = wide ? launch_gemms<4>(gate_up, down, tiles, stream)
                                 : launch_gemms<1>(gate_up, down, tiles, stream);
    if (err != cudaSuccess) return err;
    const dim3 grid_combine(
        static_cast<unsigned>(tokens),
        (args.hidden + kThreads * kCombineVector - 1) / (kThreads * kCombineVector));
    moe_combine_kernel<<<grid_combine, kThreads, 0, stream>>>(
        ws.y, args.topk_weights + t0 * args.top_k, ids, static_cast<int>(args.top_k),
        static_cast<int>(args.num_experts), args.hidden, args.out + t0 * args.hidden);
    const cudaError_t launch = cudaGetLastError();
    if (launch != cudaSuccess) return launch;
  }
  return cudaSuccess;
}

}  // namespace kimi
