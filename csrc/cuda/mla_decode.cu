// Absorbed-MLA paged decode: split-KV attention of up to 16 query heads against one shared
// 576-wide latent per token, then a log-sum-exp combine of the splits.
//
// Design (kernel-targets.md §2.3):
//  * Heads sit on the MMA's 16-row side (8 Kimi TP8 heads pad to 16, not to 64 as FlashMLA's
//    wgmma tile would: 4x less wasted tensor work); tokens and latent dims on the 8-wide side.
//  * One 64-token page (64 x 576 bf16 = 72 KB) is the pipeline unit: cp.async double buffering,
//    rows past the sequence zero-filled (never stale or poisoned memory). K and V are the same
//    bytes: S = Q Kᵀ reads the page as K (warp w: tokens 8w..8w+7 over all 576 dims), then
//    O += P V reads its first `rank` columns as V through ldmatrix.trans (warp w: latent dims
//    8w, 8w + 64, ...). Each KV byte leaves DRAM once.
//  * Online softmax in the log2 domain (scores pre-multiplied by scale * log2 e), fp32 stats;
//    P is rounded to bf16 for the PV MMA (as FlashMLA does).
//  * Split-KV: sequence b is cut into ceil(pages / pps) splits of pps = max(4, ceil(pages / 64))
//    pages, a function of its own length only, so a sequence's output does not depend on the
//    rest of the batch. Each split writes unnormalised O and (max, sum); the combine kernel
//    merges them in split order.
#include <cfloat>

#include "cuda/mla_decode.cuh"
#include "cuda/mma.cuh"

namespace kimi {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kHeads = 16;                               // query heads per block (MMA M)
constexpr int kMinPagesPerSplit = 4;                     // ~288 KB of KV per split at least
constexpr int kTilesPerWarp = kMlaMaxRank / 8 / kWarps;  // PV output tiles (8 dims) per warp
constexpr int kScoreStride = kMlaPageSize + 4;           // fp32 scores row stride
constexpr int kProbStride = kMlaPageSize + 8;            // bf16 probabilities row stride
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Row stride of a [*, dim] bf16 tile in shared memory: +8 values shift consecutive rows by 4 banks
// so the MMA fragment loads and ldmatrix rows are bank-conflict free.
__host__ __device__ int smem_stride(int dim) { return dim + 8; }

__host__ __device__ int pages_per_split(int pages) {
  const int even = (pages + kMlaMaxSplits - 1) / kMlaMaxSplits;
  return even > kMinPagesPerSplit ? even : kMinPagesPerSplit;
}
__host__ __device__ int num_splits(int seq_len) {
  const int pages = (seq_len + kMlaPageSize - 1) / kMlaPageSize;
  return (pages + pages_per_split(pages) - 1) / pages_per_split(pages);
}

// seq_lens[b], clamped to what the block table can address (a longer length is a caller bug;
// validating it would need a host sync, so the kernels only guarantee no out-of-bounds reads).
__device__ int sequence_length(const MlaDecodeArgs& args, int b) {
  const int64_t capacity = args.max_pages * kMlaPageSize;
  const int len = args.seq_lens[b];
  return len < 0 ? 0 : (len > capacity ? static_cast<int>(capacity) : len);
}

size_t split_smem_bytes(int dim) {
  const size_t stride = smem_stride(dim);
  return (2 * kMlaPageSize + kHeads) * stride * sizeof(__nv_bfloat16) +
         kHeads * kScoreStride * sizeof(float) + kHeads * kProbStride * sizeof(__nv_bfloat16) +
         3 * kHeads * sizeof(float);
}

struct Partials {
  float* o;   // [B, max_splits, H, rank] unnormalised outputs
  float* ml;  // [B, max_splits, H, 2] running max (log2 units) and sum of each split
  int max_splits;
};

// Grid: (B, max_splits, ceil(H / 16)); splits past a sequence's own count exit at once.
__global__ void __launch_bounds__(kThreads, 1)
    mla_split_kernel(const MlaDecodeArgs args, const Partials parts) {
  const int b = blockIdx.x, split = blockIdx.y, h0 = blockIdx.z * kHeads;
  const int seq_len = sequence_length(args, b);
  if (split >= num_splits(seq_len)) return;
  const int dim = static_cast<int>(args.dim), rank = static_cast<int>(args.rank);
  const int heads = static_cast<int>(args.heads), stride = smem_stride(dim);
  const int pages = (seq_len + kMlaPageSize - 1) / kMlaPageSize, pps = pages_per_split(pages);
  const int first_page = split * pps, end_page = min(pages, first_page + pps);

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* kv = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [2][64][stride]
  __nv_bfloat16* qs = kv + 2 * kMlaPageSize * stride;              // [16][stride]
  float* scores = reinterpret_cast<float*>(qs + kHeads * stride);  // [16][kScoreStride]
  __nv_bfloat16* probs = reinterpret_cast<__nv_bfloat16*>(scores + kHeads * kScoreStride);
  float* row_max = reinterpret_cast<float*>(probs + kHeads * kProbStride);  // [16] log2 units
  float* row_sum = row_max + kHeads;                                        // [16]
  float* row_rescale = row_sum + kHeads;                                    // [16]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, q = lane % 4;
  const int chunks_per_row = dim / 8;  // 16-byte chunks

  // Q tile (heads past H read as zeros), stats.
  for (int c = tid; c < kHeads * chunks_per_row; c += kThreads) {
    const int r = c / chunks_per_row, col = (c % chunks_per_row) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (h0 + r < heads) {
      v = *reinterpret_cast<const uint4*>(args.q +
                                          ((static_cast<int64_t>(b) * heads + h0 + r) * dim + col));
    }
    *reinterpret_cast<uint4*>(qs + r * stride + col) = v;
  }
  if (tid < kHeads) {
    row_max[tid] = -INFINITY;
    row_sum[tid] = 0.0f;
  }

  auto load_page = [&](int page, int buf) {
    const int32_t page_id = args.block_table[static_cast<int64_t>(b) * args.max_pages + page];
    const __nv_bfloat16* src = args.kv_cache + static_cast<int64_t>(page_id) * kMlaPageSize * dim;
    __nv_bfloat16* dst = kv + buf * kMlaPageSize * stride;
    for (int c = tid; c < kMlaPageSize * chunks_per_row; c += kThreads) {
      const int row = c / chunks_per_row, col = (c % chunks_per_row) * 8;
      const bool valid = page * kMlaPageSize + row < seq_len;
      mma::cp_async_16(dst + row * stride + col, valid ? src + row * dim + col : args.kv_cache,
                       valid);
    }
    mma::cp_async_commit();
  };

  float o[kTilesPerWarp][4] = {};
  const float scale_log2 = args.softmax_scale * kLog2e;
  load_page(first_page, 0);
  for (int page = first_page; page < end_page; ++page) {
    const int buf = (page - first_page) & 1;
    if (page + 1 < end_page) {
      load_page(page + 1, buf ^ 1);
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const __nv_bfloat16* page_kv = kv + buf * kMlaPageSize * stride;

    // S = Q Kᵀ for tokens 8w .. 8w + 7 of the page.
    {
      // Two accumulators (even / odd K steps) halve the dependent MMA chain; summed in a fixed
      // order, so the result stays deterministic.
      float s_even[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s_odd[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const __nv_bfloat16* k_row = page_kv + (8 * warp + g) * stride;
      auto qk_step = [&](int k0, float (&acc)[4]) {
        const uint32_t a[4] = {
            *reinterpret_cast<const uint32_t*>(qs + g * stride + k0 + 2 * q),
            *reinterpret_cast<const uint32_t*>(qs + (g + 8) * stride + k0 + 2 * q),
            *reinterpret_cast<const uint32_t*>(qs + g * stride + k0 + 8 + 2 * q),
            *reinterpret_cast<const uint32_t*>(qs + (g + 8) * stride + k0 + 8 + 2 * q)};
        const uint32_t bk[2] = {*reinterpret_cast<const uint32_t*>(k_row + k0 + 2 * q),
                                *reinterpret_cast<const uint32_t*>(k_row + k0 + 8 + 2 * q)};
        mma::bf16_16816(acc, a, bk);
      };
      int k0 = 0;
      for (; k0 + 32 <= dim; k0 += 32) {
        qk_step(k0, s_even);
        qk_step(k0 + 16, s_odd);
      }
      if (k0 < dim) qk_step(k0, s_even);
      float s[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) s[i] = s_even[i] + s_odd[i];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int head = g + 8 * (i / 2), token = 8 * warp + 2 * q + (i % 2);
        const bool valid = page * kMlaPageSize + token < seq_len;
        scores[head * kScoreStride + token] = valid ? s[i] * scale_log2 : -INFINITY;
      }
    }
    __syncthreads();

    // Online softmax: warp w owns head rows 2w and 2w + 1.
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = 2 * warp + rr;
      const float v0 = scores[r * kScoreStride + lane], v1 = scores[r * kScoreStride + lane + 32];
      float page_max = fmaxf(v0, v1);
      for (int off = 16; off > 0; off >>= 1) {
        page_max = fmaxf(page_max, __shfl_xor_sync(0xffffffffu, page_max, off));
      }
      const float old_max = row_max[r], new_max = fmaxf(old_max, page_max);
      const bool empty = new_max == -INFINITY;  // nothing valid yet (only on a fully masked page)
      const float p0 = empty ? 0.0f : exp2f(v0 - new_max), p1 = empty ? 0.0f : exp2f(v1 - new_max);
      const float rescale = empty ? 1.0f : exp2f(old_max - new_max);
      float sum = p0 + p1;
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      probs[r * kProbStride + lane] = __float2bfloat16(p0);
      probs[r * kProbStride + lane + 32] = __float2bfloat16(p1);
      __syncwarp();
      if (lane == 0) {
        row_sum[r] = row_sum[r] * rescale + sum;
        row_max[r] = new_max;
        row_rescale[r] = rescale;
      }
    }
    __syncthreads();

    // O = O * rescale + P V over this page; warp w owns latent dims 8 (w + 8 i) .. + 7.
    {
      const float rescale_lo = row_rescale[g], rescale_hi = row_rescale[g + 8];
#pragma unroll
      for (int i = 0; i < kTilesPerWarp; ++i) {
        o[i][0] *= rescale_lo;
        o[i][1] *= rescale_lo;
        o[i][2] *= rescale_hi;
        o[i][3] *= rescale_hi;
      }
#pragma unroll
      for (int t0 = 0; t0 < kMlaPageSize; t0 += 16) {
        const uint32_t a[4] = {
            *reinterpret_cast<const uint32_t*>(probs + g * kProbStride + t0 + 2 * q),
            *reinterpret_cast<const uint32_t*>(probs + (g + 8) * kProbStride + t0 + 2 * q),
            *reinterpret_cast<const uint32_t*>(probs + g * kProbStride + t0 + 8 + 2 * q),
            *reinterpret_cast<const uint32_t*>(probs + (g + 8) * kProbStride + t0 + 8 + 2 * q)};
#pragma unroll
        for (int i = 0; i < kTilesPerWarp; ++i) {
          const int d0 = 8 * (warp + kWarps * i);
          if (d0 >= rank) break;
          uint32_t bv[2];
          mma::ldmatrix_x2_trans(bv, page_kv + (t0 + (lane & 15)) * stride + d0);
          mma::bf16_16816(o[i], a, bv);
        }
      }
    }
    __syncthreads();  // the next iteration refills this buffer and the score/prob tiles
  }

  // Unnormalised partial output and (max, sum) of this split.
  const int64_t part = (static_cast<int64_t>(b) * parts.max_splits + split) * heads;
#pragma unroll
  for (int i = 0; i < kTilesPerWarp; ++i) {
    const int d0 = 8 * (warp + kWarps * i);
    if (d0 >= rank) break;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int head = h0 + g + 8 * half;
      if (head >= heads) continue;
      float* dst = parts.o + (part + head) * rank + d0 + 2 * q;
      dst[0] = o[i][2 * half];
      dst[1] = o[i][2 * half + 1];
    }
  }
  if (tid < kHeads && h0 + tid < heads) {
    parts.ml[(part + h0 + tid) * 2] = row_max[tid];
    parts.ml[(part + h0 + tid) * 2 + 1] = row_sum[tid];
  }
}

// Grid: (B, H); thread i owns latent dims 4i .. 4i + 3. Splits are merged in split order.
__global__ void __launch_bounds__(kMlaMaxRank / 4)
    mla_combine_kernel(const MlaDecodeArgs args, const Partials parts) {
  const int b = blockIdx.x, head = blockIdx.y;
  const int rank = static_cast<int>(args.rank), heads = static_cast<int>(args.heads);
  const int splits = min(num_splits(sequence_length(args, b)), parts.max_splits);
  const int64_t first = static_cast<int64_t>(b) * parts.max_splits * heads + head;
  float max_all = -INFINITY;
  for (int s = 0; s < splits; ++s) max_all = fmaxf(max_all, parts.ml[(first + s * heads) * 2]);
  float total = 0.0f;
  if (max_all != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float* ml = parts.ml + (first + s * heads) * 2;
      total += ml[1] * exp2f(ml[0] - max_all);
    }
  }
  const int64_t out_row = (static_cast<int64_t>(b) * heads + head) * rank;
  const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
  for (int d = threadIdx.x * 4; d < rank; d += blockDim.x * 4) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int s = 0; s < splits && total > 0.0f; ++s) {
      const float weight = exp2f(parts.ml[(first + s * heads) * 2] - max_all);
      const float4 v = *reinterpret_cast<const float4*>(parts.o + (first + s * heads) * rank + d);
      acc[0] += weight * v.x;
      acc[1] += weight * v.y;
      acc[2] += weight * v.z;
      acc[3] += weight * v.w;
    }
    for (int i = 0; i < 4 && d + i < rank; ++i) {
      args.out[out_row + d + i] = __float2bfloat16(acc[i] * inv_total);
    }
  }
  if (threadIdx.x == 0) {
    args.lse[static_cast<int64_t>(b) * heads + head] =
        total > 0.0f ? (max_all + log2f(total)) * kLn2 : -INFINITY;
  }
}

// Opts the split kernel into > 48 KB of dynamic shared memory, once per device and size (a
// function attribute, not a stream operation: done on the first call, outside any graph capture,
// since the first call of a process is never captured by the engine or the benchmarks).
cudaError_t allow_split_smem(size_t bytes) {
  constexpr int kMaxDevices = 64;
  static size_t granted[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && granted[device] >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(mla_split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(split_smem_bytes(kMlaMaxDim)));
  if (err == cudaSuccess && device < kMaxDevices) granted[device] = split_smem_bytes(kMlaMaxDim);
  return err;
}

// An upper bound of num_splits over every length up to max_pages pages (num_splits itself is not
// monotonic: at 257 pages the split size grows from 4 to 5 pages and the count drops).
int max_splits_for(int64_t max_pages) {
  const int64_t bound = (max_pages + kMinPagesPerSplit - 1) / kMinPagesPerSplit;
  return static_cast<int>(bound < kMlaMaxSplits ? bound : kMlaMaxSplits);
}

}  // namespace

size_t mla_decode_workspace_bytes(const MlaDecodeArgs& args) {
  const size_t rows = static_cast<size_t>(args.batch) * max_splits_for(args.max_pages) * args.heads;
  const size_t o_bytes = (rows * args.rank * sizeof(float) + 255) / 256 * 256;
  return o_bytes + rows * 2 * sizeof(float);
}

cudaError_t mla_decode_cuda_launch(const MlaDecodeArgs& args, void* workspace,
                                   cudaStream_t stream) {
  if (args.dim % 16 != 0 || args.dim > kMlaMaxDim || args.rank % 8 != 0 ||
      args.rank > kMlaMaxRank || args.rank > args.dim || args.heads < 1 || args.max_pages < 1) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0) return cudaSuccess;
  const int max_splits = max_splits_for(args.max_pages);
  const size_t rows = static_cast<size_t>(args.batch) * max_splits * args.heads;
  Partials parts;
  parts.o = static_cast<float*>(workspace);
  parts.ml = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                      (rows * args.rank * sizeof(float) + 255) / 256 * 256);
  parts.max_splits = max_splits;
  const size_t smem = split_smem_bytes(static_cast<int>(args.dim));
  cudaError_t err = allow_split_smem(smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(args.batch), max_splits,
                  static_cast<unsigned>((args.heads + kHeads - 1) / kHeads));
  mla_split_kernel<<<grid, kThreads, smem, stream>>>(args, parts);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 combine_grid(static_cast<unsigned>(args.batch), static_cast<unsigned>(args.heads));
  mla_combine_kernel<<<combine_grid, kMlaMaxRank / 4, 0, stream>>>(args, parts);
  return cudaGetLastError();
}

}  // namespace kimi
