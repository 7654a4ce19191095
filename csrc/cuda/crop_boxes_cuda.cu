// CUDA kernels of sif::crop_boxes. Two implementations, chosen per call by the environment variable
// SIF_CROP_BOXES_KERNEL: "v1" (default, measured on an H200: 873 GB/s at K = 1024) or "v2" (below, written for
// HBM bandwidth and not yet run on a GPU). Both give the same outputs.
//
// v1 crops: one launch for all boxes. Grid (x: tiles of 32 output columns, y: tiles of kRowsPerBlock output rows,
// z: boxes, grid-stride beyond 65535). A warp covers 32 consecutive output columns of one row, so every store to
// the four output planes (3 colours + depth) is a coalesced 128-byte line; each thread reads its 2x2 taps once
// for all channels (uint8 HWC: 3 bytes per tap through the read-only cache), blends in registers and applies
// the fused scale/shift. The x taps are computed once per thread and reused down its rows.
//
// v1 depth statistics: a second small launch, one block per box, over the pixels the box touches (stats_span in
// crop_boxes_geometry.h, the same rule as the CPU kernel and engine.data.boxes). The exact lower median is found
// by radix selection on the order-preserving uint32 key of each float: three passes over the box's pixels with an
// 11/11/10-bit shared-memory histogram, each pass keeping only the values that share the prefix selected so far
// (no sort, no global scratch, deterministic). The first pass also reduces sum (double) and min. Warp-aggregated
// atomics (__match_any_sync) keep smooth depth maps, whose values crowd a few bins, from serialising on one
// counter. A box's pixels are read three times (from L2 for typical depth maps); the crops dominate traffic.
// NaN anywhere in those pixels gives NaN statistics (torch's median/mean/min propagate NaN).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../crop_boxes.h"
#include "../crop_boxes_geometry.h"

namespace sif {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;   // blockDim.y
constexpr int kRowsPerThread = 2;  // each block covers kRowsPerBlock * kRowsPerThread output rows
constexpr int kMaxGridZ = 65535;

struct Norm {
  float scale[3];
  float shift[3];
};

struct Shape {
  int num_images;
  int height;
  int width;
  int num_boxes;
  int out_h;
  int out_w;
};

template <typename scalar_t>
__device__ __forceinline__ float load(const scalar_t* p) {
  return static_cast<float>(__ldg(p));
}

template <typename scalar_t, bool kChannelsLastUint8>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    crop_kernel(const scalar_t* __restrict__ images, const float* __restrict__ depth, const float* __restrict__ boxes,
                const int64_t* __restrict__ box_image_index, Shape s, Norm norm, float* __restrict__ crops,
                float* __restrict__ depth_crops) {
  const int j = blockIdx.x * kWarp + threadIdx.x;
  if (j >= s.out_w) return;
  const int64_t plane = static_cast<int64_t>(s.out_h) * s.out_w;
  const int64_t hw = static_cast<int64_t>(s.height) * s.width;
  for (int k = blockIdx.z; k < s.num_boxes; k += gridDim.z) {
    const float4 b = reinterpret_cast<const float4*>(boxes)[k];
    const int64_t n = box_image_index[k];
    const Axis ax = make_axis(b.x, b.z, s.width, s.out_w);
    const Axis ay = make_axis(b.y, b.w, s.height, s.out_h);
    const Tap tx = make_tap(ax, j);
    const bool valid = n >= 0 && n < s.num_images;  // the host checks; never read out of bounds regardless
    float* out = crops + static_cast<int64_t>(k) * 3 * plane + j;
    float* dout = depth != nullptr ? depth_crops + static_cast<int64_t>(k) * plane + j : nullptr;
    const scalar_t* img = images + (valid ? n : 0) * 3 * hw;
    const float* dep = depth != nullptr ? depth + (valid ? n : 0) * hw : nullptr;
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int i = (blockIdx.y * kRowsPerThread + r) * kRowsPerBlock + threadIdx.y;
      if (i >= s.out_h) break;
      const Tap ty = make_tap(ay, i);
      const int64_t row0 = static_cast<int64_t>(ty.i0) * s.width;
      const int64_t row1 = static_cast<int64_t>(ty.i1) * s.width;
      const int64_t o = static_cast<int64_t>(i) * s.out_w;
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        float p00, p01, p10, p11;
        if constexpr (kChannelsLastUint8) {
          p00 = load(img + (row0 + tx.i0) * 3 + c);
          p01 = load(img + (row0 + tx.i1) * 3 + c);
          p10 = load(img + (row1 + tx.i0) * 3 + c);
          p11 = load(img + (row1 + tx.i1) * 3 + c);
        } else {
          const scalar_t* ch = img + c * hw;
          p00 = load(ch + row0 + tx.i0);
          p01 = load(ch + row0 + tx.i1);
          p10 = load(ch + row1 + tx.i0);
          p11 = load(ch + row1 + tx.i1);
        }
        const float top = p00 + ty.w * (p10 - p00);
        const float bottom = p01 + ty.w * (p11 - p01);
        const float v = (top + tx.w * (bottom - top)) * norm.scale[c] + norm.shift[c];
        out[c * plane + o] = valid ? v : __int_as_float(0x7fc00000);
      }
      if (dout != nullptr) {
        const float p00 = load(dep + row0 + tx.i0), p01 = load(dep + row0 + tx.i1);
        const float p10 = load(dep + row1 + tx.i0), p11 = load(dep + row1 + tx.i1);
        const float top = p00 + ty.w * (p10 - p00);
        const float bottom = p01 + ty.w * (p11 - p01);
        dout[o] = valid ? top + tx.w * (bottom - top) : __int_as_float(0x7fc00000);
      }
    }
  }
}

// ---- depth statistics ----

constexpr int kStatsThreads = 512;
constexpr int kStatsWarps = kStatsThreads / kWarp;
constexpr int kBins = 2048;  // 11 bits per radix pass (passes: bits 31..21, 20..10, 9..0)

__device__ __forceinline__ unsigned key_of(float v) { return float_to_key(__float_as_uint(v)); }

// Adds 1 to hist[bin] for every active lane, one atomic per distinct bin in the warp.
__device__ __forceinline__ void warp_histogram_add(unsigned* hist, unsigned bin, bool active) {
  const unsigned voters = __ballot_sync(0xffffffffu, active);
  if (!active) return;
  const unsigned peers = __match_any_sync(voters, bin);
  const int leader = __ffs(peers) - 1;
  if ((threadIdx.x & (kWarp - 1)) == static_cast<unsigned>(leader)) atomicAdd(&hist[bin], __popc(peers));
}

// Finds the bin where the cumulative count passes `rank` (0-based): (bin, count below it), for every thread.
// All threads of the block call it.
__device__ __forceinline__ uint2 select_bin(const unsigned* hist, int num_bins, unsigned rank, unsigned* shared_sums,
                                            unsigned* result) {
  constexpr int per_thread = kBins / kStatsThreads;  // 4 consecutive bins per thread
  const int t = threadIdx.x;
  unsigned local = 0;
  for (int q = 0; q < per_thread; ++q) {
    const int bin = t * per_thread + q;
    local += bin < num_bins ? hist[bin] : 0u;
  }
  // Block-wide exclusive scan of `local`: warp inclusive scans, then a scan over warp totals.
  const int lane = t & (kWarp - 1), warp = t / kWarp;
  unsigned inclusive = local;
#pragma unroll
  for (int d = 1; d < kWarp; d <<= 1) {
    const unsigned v = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += v;
  }
  if (lane == kWarp - 1) shared_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    unsigned w = lane < kStatsWarps ? shared_sums[lane] : 0u;
#pragma unroll
    for (int d = 1; d < kWarp; d <<= 1) {
      const unsigned v = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += v;
    }
    if (lane < kStatsWarps) shared_sums[lane] = w;  // inclusive totals per warp
  }
  __syncthreads();
  const unsigned exclusive = inclusive - local + (warp > 0 ? shared_sums[warp - 1] : 0u);
  if (exclusive <= rank && rank < exclusive + local) {  // exactly one thread
    unsigned below = exclusive;
    for (int q = 0; q < per_thread; ++q) {
      const unsigned c = hist[t * per_thread + q];
      if (rank < below + c) {
        result[0] = t * per_thread + q;
        result[1] = below;
        break;
      }
      below += c;
    }
  }
  __syncthreads();
  const uint2 found = make_uint2(result[0], result[1]);
  __syncthreads();  // result[] and shared_sums[] are reused by the next call
  return found;
}

__global__ void __launch_bounds__(kStatsThreads, 2)
    depth_stats_kernel(const float* __restrict__ depth, const float* __restrict__ boxes,
                       const int64_t* __restrict__ box_image_index, Shape s, float* __restrict__ stats) {
  __shared__ unsigned hist[kBins];
  __shared__ unsigned sums[kStatsWarps];
  __shared__ unsigned result[2];
  __shared__ double red_sum[kStatsWarps];
  __shared__ float red_min[kStatsWarps];
  __shared__ int red_nan[kStatsWarps];
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  const int64_t hw = static_cast<int64_t>(s.height) * s.width;

  for (int k = blockIdx.x; k < s.num_boxes; k += gridDim.x) {
    const float4 b = reinterpret_cast<const float4*>(boxes)[k];
    const int64_t n = box_image_index[k];
    float* out = stats + 3 * static_cast<int64_t>(k);
    if (n < 0 || n >= s.num_images) {  // uniform across the block
      if (threadIdx.x == 0) out[0] = out[1] = out[2] = __int_as_float(0x7fc00000);
      continue;
    }
    const Span ax = stats_span(b.x, b.z, s.width);
    const Span ay = stats_span(b.y, b.w, s.height);
    const int cols = ax.hi - ax.lo + 1, rows = ay.hi - ay.lo + 1;
    const float* base = depth + n * hw + static_cast<int64_t>(ay.lo) * s.width + ax.lo;
    const unsigned count = static_cast<unsigned>(rows) * static_cast<unsigned>(cols);
    unsigned rank = (count - 1) / 2;

    unsigned prefix = 0;  // key bits selected so far
    for (int pass = 0; pass < 3; ++pass) {
      const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
      const int num_bins = pass == 2 ? 1024 : kBins;
      const int known_shift = pass == 0 ? 32 : (pass == 1 ? 21 : 10);  // bits above `shift` already fixed
      for (int t = threadIdx.x; t < kBins; t += kStatsThreads) hist[t] = 0u;
      __syncthreads();
      double sum = 0.0;
      float mn = __int_as_float(0x7f800000);
      bool nan = false;
      // Warps walk rows, lanes walk columns: coalesced reads of each row.
      for (int r = warp; r < rows; r += kStatsWarps) {
        const float* row = base + static_cast<int64_t>(r) * s.width;
        for (int c0 = 0; c0 < cols; c0 += kWarp) {
          const int c = c0 + lane;
          const bool in = c < cols;
          const float v = in ? __ldg(row + c) : 0.f;
          const unsigned key = key_of(v);
          const bool match = in && (known_shift == 32 || (key >> known_shift) == prefix);
          warp_histogram_add(hist, (key >> shift) & (num_bins - 1), match);
          if (pass == 0 && in) {
            sum += v;
            mn = fminf(mn, v);
            nan |= isnan(v);
          }
        }
      }
      if (pass == 0) {
#pragma unroll
        for (int d = kWarp / 2; d > 0; d >>= 1) {
          sum += __shfl_xor_sync(0xffffffffu, sum, d);
          mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, d));
          nan |= __shfl_xor_sync(0xffffffffu, static_cast<int>(nan), d) != 0;
        }
        if (lane == 0) {
          red_sum[warp] = sum;
          red_min[warp] = mn;
          red_nan[warp] = nan;
        }
      }
      __syncthreads();
      const uint2 found = select_bin(hist, num_bins, rank, sums, result);
      prefix = (prefix << (known_shift - shift)) | found.x;
      rank -= found.y;
    }
    if (threadIdx.x == 0) {
      double total = 0.0;
      float mn = __int_as_float(0x7f800000);
      bool nan = false;
      for (int w = 0; w < kStatsWarps; ++w) {
        total += red_sum[w];
        mn = fminf(mn, red_min[w]);
        nan |= red_nan[w] != 0;
      }
      const float qnan = __int_as_float(0x7fc00000);
      out[0] = nan ? qnan : __uint_as_float(key_to_float_bits(prefix));
      out[1] = nan ? qnan : static_cast<float>(total / static_cast<double>(count));
      out[2] = nan ? qnan : mn;
    }
    __syncthreads();  // red_* are rewritten by the next box
  }
}

// ============================================================================================================
// v2 kernels (SIF_CROP_BOXES_KERNEL=v2). Not yet run on a GPU: v1 above stays the default until a GPU pass
// (`benchmarks/run_gpu.sh DEST build crop-v2`: the gpu-marked comparison with the CPU kernel, then the benchmark)
// validates and times it.
//
// Crops: one block of 256 threads per output tile of 64 columns x 16 rows of one box (grid x: tiles of a box,
// y: boxes, grid-stride beyond 65535). Thread (tx, ty) makes output row ty, columns 4 tx .. 4 tx + 3. The
// block first copies the source rectangle its tile samples (plus its part of the box's statistics pixels, below) into
// shared memory, one plane at a time (uint8 HWC: the three interleaved colours; float CHW: each colour; then
// depth), with 16-byte loads for every aligned 16 bytes inside the rectangle's rows and byte loads at the two
// ends of each row, so nothing outside the rectangle is read; then every thread blends its taps from shared
// memory and writes 4 consecutive outputs per plane with one 16-byte store (out_w % 4 == 0; else scalar
// stores). A rectangle too large for the 32 KiB stage (downscales beyond ~2.6x) is sampled straight from
// global memory instead, as v1 does.
//
// Depth statistics without a second pass over the box for sum / min / NaN, and with the first radix pass of
// the median in the same read. They are taken over the pixels the box touches (stats_span in
// crop_boxes_geometry.h, as v1 and the CPU kernel), which can differ from the sampling support at fractional
// edges. Those pixels are split into disjoint parts, one per tile (columns [tap(X0).i0, tap(X0 + 64).i0) clamped
// to the span, the first tile from the span's first pixel, the last to its end; rows alike), and each tile's
// staged rectangle is widened to hold its part. The tile block reduces its part from shared memory to one
// (sum, min, NaN) partial, written per tile (reduced in a fixed order later: deterministic), and adds its
// 11-bit key histogram to the box's global histogram. The lower median then needs the values again: two more
// radix passes (bits 20..10, 9..0) over the box's statistics pixels only, each a kernel of many blocks per box
// (`refine_kernel`) followed by a small per-box selection (`select_kernel`), where v1 made three passes with
// one block per box. Same outputs as v1: the same taps and blend, the same radix selection (bit-exact median),
// the min exact, the mean from double partial sums (summed in a different order than v1, so equal to float
// rounding). For outputs so large that the per-tile partials would exceed 4 Mi entries, v1's statistics kernel
// runs instead.
// ============================================================================================================
namespace v2 {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kTileW = 64;  // 16 threads x 4 consecutive columns
constexpr int kTileH = 16;  // one row per thread row
constexpr int kCols = 4;
constexpr int kStageBytes = 32 * 1024;  // one plane of a tile's source rectangle
constexpr int kHistBins = kBins;        // 2048: the 11/11/10-bit radix passes of v1
constexpr int kUnroll = 4;              // loads in flight per thread in the copy and refine loops
constexpr int64_t kMaxTilePartials = int64_t{1} << 22;
constexpr int kTileBlocksPerSM = 3;  // uint8 images: <= 80 registers, no spills on sm_90; smem allows 5 blocks

// ---- The statistics of one box: their one definition on the GPU (a change to them is an edit here) ----
// Over the pixels v the box touches (stats_span): sum (double), min, a NaN flag; and the exact lower median (rank
// (count - 1) / 2, torch.median's convention) by a 3-pass radix selection on float_to_key(v): bits 31..21,
// 20..10, 9..0. Output: (median, sum / count, min), all three NaN when any value is NaN.
struct Partial {
  double sum;
  float min;
  int nan;
};

__device__ __forceinline__ Partial partial_identity() { return {0.0, __int_as_float(0x7f800000), 0}; }

__device__ __forceinline__ void partial_add(Partial& p, float v) {
  p.sum += v;
  p.min = fminf(p.min, v);
  p.nan |= isnan(v) ? 1 : 0;
}

__device__ __forceinline__ Partial partial_merge(Partial a, const Partial& b) {
  a.sum += b.sum;
  a.min = fminf(a.min, b.min);
  a.nan |= b.nan;
  return a;
}

__device__ __forceinline__ void write_stats(float* out, const Partial& p, unsigned median_key, unsigned count) {
  const float qnan = __int_as_float(0x7fc00000);
  out[0] = p.nan ? qnan : __uint_as_float(key_to_float_bits(median_key));
  out[1] = p.nan ? qnan : static_cast<float>(p.sum / static_cast<double>(count));
  out[2] = p.nan ? qnan : p.min;
}

// Radix pass p: bins are (key >> shift) & (bins - 1) over the values whose bits above `known` match the prefix.
__device__ __forceinline__ int pass_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
__device__ __forceinline__ int pass_bins(int pass) { return pass == 2 ? 1024 : kHistBins; }
__device__ __forceinline__ int pass_known(int pass) { return pass == 0 ? 32 : (pass == 1 ? 21 : 10); }

// Per box, between the kernels.
struct BoxState {
  Partial partial;
  unsigned prefix;  // key bits selected so far
  unsigned rank;    // rank of the median among the values sharing the prefix
  unsigned count;   // pixels the box touches
  int valid;        // the image index is in range
};
// ---- end of the statistics' definition ----

// Adds 1 to hist[bin] for every active lane: one atomic when all active lanes share a bin (smooth depth maps
// crowd a few bins), else one per lane. All 32 lanes must call it.
__device__ __forceinline__ void hist_add(unsigned* hist, unsigned bin, bool active) {
  const unsigned voters = __ballot_sync(0xffffffffu, active);
  if (voters == 0u) return;
  const unsigned lo = __reduce_min_sync(0xffffffffu, active ? bin : 0xffffffffu);
  const unsigned hi = __reduce_max_sync(0xffffffffu, active ? bin : 0u);
  if (lo == hi) {
    if (static_cast<int>(threadIdx.x & (kWarp - 1)) == __ffs(static_cast<int>(voters)) - 1) {
      atomicAdd(&hist[lo], static_cast<unsigned>(__popc(voters)));
    }
  } else if (active) {
    atomicAdd(&hist[bin], 1u);
  }
}

// Sum / min / NaN of the block's partials; the result is valid in thread 0. All threads call it.
__device__ Partial block_reduce(Partial p, Partial* red) {
#pragma unroll
  for (int d = kWarp / 2; d > 0; d >>= 1) {
    p.sum += __shfl_xor_sync(0xffffffffu, p.sum, d);
    p.min = fminf(p.min, __shfl_xor_sync(0xffffffffu, p.min, d));
    p.nan |= __shfl_xor_sync(0xffffffffu, p.nan, d);
  }
  const int warps = static_cast<int>(blockDim.x) / kWarp;
  if ((threadIdx.x & (kWarp - 1)) == 0) red[threadIdx.x / kWarp] = p;
  __syncthreads();
  Partial total = partial_identity();
  if (threadIdx.x == 0) {
    for (int w = 0; w < warps; ++w) total = partial_merge(total, red[w]);  // fixed order: deterministic
  }
  __syncthreads();  // red is reused by the next call
  return total;
}

// Adds the block's shared histogram to the box's global one and clears it. All threads call it.
__device__ __forceinline__ void flush_hist(unsigned* shared_hist, unsigned* box_hist) {
  __syncthreads();
  for (int b = threadIdx.x; b < kHistBins; b += blockDim.x) {
    const unsigned c = shared_hist[b];
    if (c != 0u) {
      atomicAdd(&box_hist[b], c);
      shared_hist[b] = 0u;
    }
  }
  __syncthreads();
}

// The span of one tile along one axis (output positions [o0, o0 + len) of `out`): its part [p0, p1) of the box's
// statistics pixels `st` and the source range [s0, s1] it reads (its taps and its part). Interior part bounds are
// the first tap pixel of a tile clamped to [st.lo, st.hi + 1]; taps are monotone in the output position, so the
// parts of a box's tiles are disjoint and cover [st.lo, st.hi].
__device__ __forceinline__ void tile_span(const Axis& a, const Span& st, int out, int o0, int len, int& p0, int& p1,
                                          int& s0, int& s1) {
  const int o_last = min(o0 + len, out) - 1;
  const Tap first = make_tap(a, o0);
  const Tap last = make_tap(a, o_last);
  const auto bound = [&](int p) { return min(max(p, st.lo), st.hi + 1); };
  p0 = o0 == 0 ? st.lo : bound(first.i0);
  p1 = o0 + len >= out ? st.hi + 1 : bound(make_tap(a, o0 + len).i0);
  const bool has_part = p1 > p0;
  s0 = has_part ? min(p0, first.i0) : first.i0;
  s1 = has_part ? max(p1 - 1, last.i1) : last.i1;
}

// Stage row stride for a rectangle `cols` pixels of `bpp` bytes wide: room for a row start's 0..15-byte offset
// from 16-byte alignment.
__device__ __forceinline__ int stage_stride(int cols, int bpp) { return (cols * bpp + 15 + 15) & ~15; }

// Copies rows [y0, y0 + rows) x pixels [x0, x0 + cols) of a plane (bpp bytes per pixel, pitch bytes per row) into
// the stage; stage row r holds the 16-byte-aligned chunks covering its source bytes, so pixel x of row y lies at
// stage_row(y) + (x - x0) * bpp. All threads call it; it ends with __syncthreads.
__device__ void stage_rect(const unsigned char* __restrict__ plane, int64_t pitch, int x0, int y0, int cols, int rows,
                           int bpp, int stride, unsigned char* stage) {
  const int chunks = stride / 16;
  const int total = rows * chunks;
  for (int base = 0; base < total; base += kThreads * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      const int t = base + q * kThreads + static_cast<int>(threadIdx.x);
      v[q] = make_uint4(0u, 0u, 0u, 0u);
      if (t < total) {
        const int r = t / chunks;
        const int c = t - r * chunks;
        const unsigned char* g0 = plane + (y0 + r) * pitch + static_cast<int64_t>(x0) * bpp;
        const unsigned char* g1 = g0 + static_cast<int64_t>(cols) * bpp;
        const unsigned char* chunk =
            reinterpret_cast<const unsigned char*>((reinterpret_cast<uintptr_t>(g0) & ~uintptr_t{15}) + 16u * c);
        if (chunk >= g0 && chunk + 16 <= g1) {
          v[q] = __ldg(reinterpret_cast<const uint4*>(chunk));
        } else {  // the row's first or last chunk: only its bytes inside the rectangle
          unsigned w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
          for (int i = 0; i < 16; ++i) {
            const unsigned char* p = chunk + i;
            if (p >= g0 && p < g1) w[i >> 2] |= static_cast<unsigned>(__ldg(p)) << (8 * (i & 3));
          }
          v[q] = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      const int t = base + q * kThreads + static_cast<int>(threadIdx.x);
      if (t < total) reinterpret_cast<uint4*>(stage)[t] = v[q];  // byte (t / chunks) * stride + 16 (t % chunks)
    }
  }
  __syncthreads();
}

// Address of pixel x0 of row y: in the stage (kStaged) or in global memory.
template <bool kStaged>
__device__ __forceinline__ const unsigned char* row_at(const unsigned char* stage, int stride, const unsigned char* plane,
                                                       int64_t pitch, int y, int x0, int y0, int bpp) {
  const unsigned char* g = plane + y * pitch + static_cast<int64_t>(x0) * bpp;
  if constexpr (kStaged) {
    return stage + (y - y0) * stride + static_cast<int>(reinterpret_cast<uintptr_t>(g) & 15u);
  } else {
    return g;
  }
}

template <bool kStaged, typename T>
__device__ __forceinline__ float value_at(const unsigned char* p) {
  if constexpr (kStaged) {
    return static_cast<float>(*reinterpret_cast<const T*>(p));
  } else {
    return static_cast<float>(__ldg(reinterpret_cast<const T*>(p)));
  }
}

// Bilinear samples of a thread's 4 columns in one output row, for kChannels interleaved channels of type T
// (uint8 HWC: 3; a float plane: 1); r0 / r1 address pixel x0 of source rows ty.i0 / ty.i1. The blend is v1's.
template <bool kStaged, typename T, int kChannels>
__device__ __forceinline__ void blend4(const unsigned char* r0, const unsigned char* r1, const Tap (&tx)[kCols], int x0,
                                       float wy, float (&out)[kChannels][kCols]) {
  constexpr int bpp = static_cast<int>(sizeof(T)) * kChannels;
#pragma unroll
  for (int q = 0; q < kCols; ++q) {
    const int a0 = (tx[q].i0 - x0) * bpp;
    const int a1 = (tx[q].i1 - x0) * bpp;
#pragma unroll
    for (int c = 0; c < kChannels; ++c) {
      const int o = c * static_cast<int>(sizeof(T));
      const float p00 = value_at<kStaged, T>(r0 + a0 + o), p01 = value_at<kStaged, T>(r0 + a1 + o);
      const float p10 = value_at<kStaged, T>(r1 + a0 + o), p11 = value_at<kStaged, T>(r1 + a1 + o);
      const float top = p00 + wy * (p10 - p00);
      const float bottom = p01 + wy * (p11 - p01);
      out[c][q] = top + tx[q].w * (bottom - top);
    }
  }
}

// Writes 4 consecutive outputs starting at column j0 (one 16-byte store when out_w % 4 == 0).
__device__ __forceinline__ void store4(float* p, const float (&v)[kCols], int j0, int out_w, bool vec4) {
  if (vec4) {
    if (j0 < out_w) *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    return;
  }
#pragma unroll
  for (int q = 0; q < kCols; ++q) {
    if (j0 + q < out_w) p[q] = v[q];
  }
}

struct TileGeometry {
  int px0, px1, py0, py1;  // the tile's part of the box's statistics pixels: [px0, px1) x [py0, py1)
  int sx0, sy0;            // first source column / row of the rectangle it reads
  int cols, rows;          // the rectangle's size
  Tap tx[kCols];           // taps of the thread's columns (clamped to the last column)
  Tap ty;                  // tap of the thread's row (clamped to the last row)
};

// One plane of colour or depth for the thread's 4 outputs: staged (or read from global memory) then blended.
template <typename T, int kChannels>
__device__ __forceinline__ void sample_plane(const unsigned char* plane, int64_t pitch, const TileGeometry& g,
                                             unsigned char* stage, bool& staged, bool row_on,
                                             float (&out)[kChannels][kCols]) {
  constexpr int bpp = static_cast<int>(sizeof(T)) * kChannels;
  const int stride = stage_stride(g.cols, bpp);
  staged = static_cast<int64_t>(g.rows) * stride <= kStageBytes;  // uniform across the block
  if (staged) stage_rect(plane, pitch, g.sx0, g.sy0, g.cols, g.rows, bpp, stride, stage);
  if (!row_on) return;
  if (staged) {
    const unsigned char* r0 = row_at<true>(stage, stride, plane, pitch, g.ty.i0, g.sx0, g.sy0, bpp);
    const unsigned char* r1 = row_at<true>(stage, stride, plane, pitch, g.ty.i1, g.sx0, g.sy0, bpp);
    blend4<true, T, kChannels>(r0, r1, g.tx, g.sx0, g.ty.w, out);
  } else {
    const unsigned char* r0 = row_at<false>(stage, stride, plane, pitch, g.ty.i0, g.sx0, g.sy0, bpp);
    const unsigned char* r1 = row_at<false>(stage, stride, plane, pitch, g.ty.i1, g.sx0, g.sy0, bpp);
    blend4<false, T, kChannels>(r0, r1, g.tx, g.sx0, g.ty.w, out);
  }
}

// The first pass of the statistics over the tile's part of the box's pixels (from the stage when staged): warps walk
// rows, lanes walk columns (warp-uniform trip counts, as hist_add needs).
template <bool kStaged>
__device__ __forceinline__ Partial part_stats(const unsigned char* plane, int64_t pitch, const TileGeometry& g,
                                              const unsigned char* stage, unsigned* shared_hist) {
  const int stride = stage_stride(g.cols, 4);
  const int lane = static_cast<int>(threadIdx.x) & (kWarp - 1);
  const int pw = g.px1 - g.px0;
  Partial p = partial_identity();
  for (int y = g.py0 + static_cast<int>(threadIdx.x) / kWarp; y < g.py1; y += kWarps) {
    const unsigned char* row = row_at<kStaged>(stage, stride, plane, pitch, y, g.sx0, g.sy0, 4);
    for (int c0 = 0; c0 < pw; c0 += kWarp) {
      const int c = c0 + lane;
      const bool in = c < pw;
      const float v = in ? value_at<kStaged, float>(row + (g.px0 + c - g.sx0) * 4) : 0.f;
      if (in) partial_add(p, v);
      hist_add(shared_hist, key_of(v) >> pass_shift(0), in);
    }
  }
  return p;
}

// Crops of one output tile (and the first statistics pass over its part of the box's pixels) per block.
// Grid (tiles per box, min(K, 65535)), 256 threads. Per block and box: reads the tile's source rectangle once
// per plane (about (64 s + 2) x (16 s + 2) pixels at a downscale s; 3 bytes of uint8 RGB or 4 per float plane),
// writes 64 x 16 outputs x 4 planes x 4 bytes (16 KiB), one 16-byte partial and at most 2048 counter atomics.
template <bool kU8>
__global__ void __launch_bounds__(kThreads, kU8 ? kTileBlocksPerSM : 2)
    crop_tile_kernel(const void* __restrict__ images, const float* __restrict__ depth, const float* __restrict__ boxes,
                     const int64_t* __restrict__ box_image_index, Shape s, Norm norm, int tiles_x, int tiles_per_box,
                     float* __restrict__ crops, float* __restrict__ depth_crops, unsigned* __restrict__ hist,
                     Partial* __restrict__ tile_partials) {
  __shared__ __align__(16) unsigned char stage[kStageBytes];
  __shared__ unsigned shared_hist[kHistBins];
  __shared__ Partial red[kWarps];
  const bool with_stats = depth != nullptr && hist != nullptr;
  const int tile = static_cast<int>(blockIdx.x);
  const int X0 = (tile % tiles_x) * kTileW;
  const int Y0 = (tile / tiles_x) * kTileH;
  const int j0 = X0 + kCols * static_cast<int>(threadIdx.x % (kTileW / kCols));
  const int i = Y0 + static_cast<int>(threadIdx.x / (kTileW / kCols));
  const bool row_on = i < s.out_h;
  const int64_t plane = static_cast<int64_t>(s.out_h) * s.out_w;
  const int64_t hw = static_cast<int64_t>(s.height) * s.width;
  const bool vec4 = s.out_w % kCols == 0;
  const float qnan = __int_as_float(0x7fc00000);
  if (with_stats) {
    for (int b = threadIdx.x; b < kHistBins; b += kThreads) shared_hist[b] = 0u;
  }
  __syncthreads();

  for (int k = blockIdx.y; k < s.num_boxes; k += gridDim.y) {
    const float4 b = reinterpret_cast<const float4*>(boxes)[k];
    const int64_t n = box_image_index[k];
    const bool valid = n >= 0 && n < s.num_images;  // the host checks; never read out of bounds regardless
    const Axis ax = make_axis(b.x, b.z, s.width, s.out_w);
    const Axis ay = make_axis(b.y, b.w, s.height, s.out_h);
    TileGeometry g;
    int sx1, sy1;
    tile_span(ax, stats_span(b.x, b.z, s.width), s.out_w, X0, kTileW, g.px0, g.px1, g.sx0, sx1);
    tile_span(ay, stats_span(b.y, b.w, s.height), s.out_h, Y0, kTileH, g.py0, g.py1, g.sy0, sy1);
    g.cols = sx1 - g.sx0 + 1;
    g.rows = sy1 - g.sy0 + 1;
#pragma unroll
    for (int q = 0; q < kCols; ++q) g.tx[q] = make_tap(ax, min(j0 + q, s.out_w - 1));
    g.ty = make_tap(ay, min(i, s.out_h - 1));
    float* out = crops + static_cast<int64_t>(k) * 3 * plane + static_cast<int64_t>(i) * s.out_w + j0;
    float* dout = depth != nullptr ? depth_crops + static_cast<int64_t>(k) * plane + static_cast<int64_t>(i) * s.out_w + j0
                                   : nullptr;
    if (!valid) {  // uniform across the block
      if (row_on) {
        const float nans[kCols] = {qnan, qnan, qnan, qnan};
        for (int c = 0; c < 3; ++c) store4(out + c * plane, nans, j0, s.out_w, vec4);
        if (dout != nullptr) store4(dout, nans, j0, s.out_w, vec4);
      }
      continue;
    }
    bool staged = false;
    if constexpr (kU8) {
      const unsigned char* img = static_cast<const unsigned char*>(images) + n * hw * 3;
      float v[3][kCols];
      sample_plane<uint8_t, 3>(img, int64_t{3} * s.width, g, stage, staged, row_on, v);
      if (row_on) {
#pragma unroll
        for (int c = 0; c < 3; ++c) {
          float o[kCols];
#pragma unroll
          for (int q = 0; q < kCols; ++q) o[q] = v[c][q] * norm.scale[c] + norm.shift[c];
          store4(out + c * plane, o, j0, s.out_w, vec4);
        }
      }
      if (staged) __syncthreads();  // the stage is refilled next
    } else {
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        const unsigned char* img =
            reinterpret_cast<const unsigned char*>(static_cast<const float*>(images) + (n * 3 + c) * hw);
        float v[1][kCols];
        sample_plane<float, 1>(img, int64_t{4} * s.width, g, stage, staged, row_on, v);
        if (row_on) {
          float o[kCols];
#pragma unroll
          for (int q = 0; q < kCols; ++q) o[q] = v[0][q] * norm.scale[c] + norm.shift[c];
          store4(out + c * plane, o, j0, s.out_w, vec4);
        }
        if (staged) __syncthreads();
      }
    }
    if (depth == nullptr) continue;
    const unsigned char* dep = reinterpret_cast<const unsigned char*>(depth + n * hw);
    const int64_t dpitch = int64_t{4} * s.width;
    float d[1][kCols];
    sample_plane<float, 1>(dep, dpitch, g, stage, staged, row_on, d);
    if (row_on) store4(dout, d[0], j0, s.out_w, vec4);
    if (with_stats) {
      const Partial p = staged ? part_stats<true>(dep, dpitch, g, stage, shared_hist)
                               : part_stats<false>(dep, dpitch, g, stage, shared_hist);
      const Partial total = block_reduce(p, red);
      if (threadIdx.x == 0) tile_partials[static_cast<int64_t>(k) * tiles_per_box + tile] = total;
      flush_hist(shared_hist, hist + static_cast<int64_t>(k) * kHistBins);
    }
    __syncthreads();  // the stage is refilled by the next box
  }
}

// Radix passes 1 and 2 of the median: block (c, k) histograms the values of rows [c R / C, (c + 1) R / C) of box
// k's statistics pixels (R rows, C = gridDim.x blocks per box) that share the prefix selected so far.
// Grid (C, min(K, 65535)), 256 threads. Per block and box: reads its rows of the box's pixels (4 bytes per pixel)
// and a 32-byte state, at most 2048 counter atomics.
__global__ void __launch_bounds__(kThreads)
    refine_kernel(const float* __restrict__ depth, const float* __restrict__ boxes,
                  const int64_t* __restrict__ box_image_index, Shape s, const BoxState* __restrict__ state,
                  unsigned* __restrict__ hist, int pass) {
  __shared__ unsigned shared_hist[kHistBins];
  for (int b = threadIdx.x; b < kHistBins; b += kThreads) shared_hist[b] = 0u;
  __syncthreads();
  const int shift = pass_shift(pass), known = pass_known(pass);
  const unsigned bin_mask = static_cast<unsigned>(pass_bins(pass) - 1);
  const int64_t hw = static_cast<int64_t>(s.height) * s.width;
  for (int k = blockIdx.y; k < s.num_boxes; k += gridDim.y) {
    const BoxState st = state[k];
    if (!st.valid) continue;  // uniform
    const float4 b = reinterpret_cast<const float4*>(boxes)[k];
    const Span ax = stats_span(b.x, b.z, s.width);
    const Span ay = stats_span(b.y, b.w, s.height);
    const int cols = ax.hi - ax.lo + 1;
    const int64_t rows = ay.hi - ay.lo + 1;
    const int r0 = static_cast<int>(rows * blockIdx.x / gridDim.x);
    const int r1 = static_cast<int>(rows * (blockIdx.x + 1) / gridDim.x);
    if (r1 == r0) continue;  // uniform
    const float* base = depth + box_image_index[k] * hw + static_cast<int64_t>(ay.lo) * s.width + ax.lo;
    const int lane = static_cast<int>(threadIdx.x) & (kWarp - 1);
    // Warps walk rows, lanes walk columns, kUnroll loads in flight per lane (warp-uniform trip counts).
    for (int r = r0 + static_cast<int>(threadIdx.x) / kWarp; r < r1; r += kWarps) {
      const float* row = base + static_cast<int64_t>(r) * s.width;
      for (int c0 = 0; c0 < cols; c0 += kWarp * kUnroll) {
        float v[kUnroll];
#pragma unroll
        for (int q = 0; q < kUnroll; ++q) {
          const int c = c0 + q * kWarp + lane;
          v[q] = c < cols ? __ldg(row + c) : 0.f;
        }
#pragma unroll
        for (int q = 0; q < kUnroll; ++q) {
          const unsigned key = key_of(v[q]);
          const bool in = c0 + q * kWarp + lane < cols;
          hist_add(shared_hist, (key >> shift) & bin_mask, in && (key >> known) == st.prefix);
        }
      }
    }
    flush_hist(shared_hist, hist + static_cast<int64_t>(k) * kHistBins);
  }
}

// After radix pass `pass`: per box, the bin holding the median's rank; pass 0 also reduces the tiles' partials
// (fixed order) and sets up the box's state, pass 2 writes the statistics. Clears the box's histogram for the
// next pass. One block of kStatsThreads (= 512, select_bin's width) per box.
// Grid min(K, 2^20), 512 threads. Per block and box: reads and clears 2048 counters (8 KiB; pass 0 also reads the
// box's tile partials, 16 bytes each), reads / writes a 32-byte state; pass 2 writes the 12-byte statistics.
__global__ void __launch_bounds__(kStatsThreads)
    select_kernel(const float* __restrict__ boxes, const int64_t* __restrict__ box_image_index, Shape s,
                  const Partial* __restrict__ tile_partials, int tiles_per_box, BoxState* __restrict__ state,
                  unsigned* __restrict__ hist, int pass, float* __restrict__ stats) {
  __shared__ unsigned h[kHistBins];
  __shared__ unsigned sums[kStatsWarps];
  __shared__ unsigned result[2];
  __shared__ Partial red[kStatsWarps];
  const int shift = pass_shift(pass), known = pass_known(pass);
  for (int k = blockIdx.x; k < s.num_boxes; k += gridDim.x) {
    BoxState st;
    if (pass == 0) {
      const float4 b = reinterpret_cast<const float4*>(boxes)[k];
      const int64_t n = box_image_index[k];
      const Span ax = stats_span(b.x, b.z, s.width);
      const Span ay = stats_span(b.y, b.w, s.height);
      st.valid = n >= 0 && n < s.num_images;
      st.count = static_cast<unsigned>(ax.hi - ax.lo + 1) * static_cast<unsigned>(ay.hi - ay.lo + 1);
      st.rank = (st.count - 1) / 2;
      st.prefix = 0u;
      Partial p = partial_identity();
      if (st.valid) {
        for (int t = threadIdx.x; t < tiles_per_box; t += kStatsThreads) {
          p = partial_merge(p, tile_partials[static_cast<int64_t>(k) * tiles_per_box + t]);
        }
      }
      st.partial = block_reduce(p, red);  // thread 0's is the total; only thread 0 writes the state
    } else {
      st = state[k];
    }
    unsigned* box_hist = hist + static_cast<int64_t>(k) * kHistBins;
    if (!st.valid) {  // uniform
      if (threadIdx.x == 0) {
        if (pass == 2) {
          stats[3 * static_cast<int64_t>(k)] = stats[3 * static_cast<int64_t>(k) + 1] =
              stats[3 * static_cast<int64_t>(k) + 2] = __int_as_float(0x7fc00000);
        } else {
          state[k] = st;
        }
      }
      continue;
    }
    for (int b = threadIdx.x; b < kHistBins; b += kStatsThreads) {
      h[b] = box_hist[b];
      box_hist[b] = 0u;
    }
    __syncthreads();
    const uint2 found = select_bin(h, pass_bins(pass), st.rank, sums, result);
    if (threadIdx.x == 0) {
      st.prefix = (st.prefix << (known - shift)) | found.x;
      st.rank -= found.y;
      if (pass == 2) {
        write_stats(stats + 3 * static_cast<int64_t>(k), st.partial, st.prefix, st.count);
      } else {
        state[k] = st;
      }
    }
    __syncthreads();  // h is refilled by the next box
  }
}

// Launches the v2 kernels for validated arguments (see crop_boxes_cuda).
void launch(const CropPlan& plan, const Shape& s, const Norm& norm, const void* img, const float* dep,
            const at::Tensor& boxes, const at::Tensor& index, float* crops, float* dout, at::Tensor& depth_stats,
            cudaStream_t stream) {
  const int64_t tiles_x = (plan.out_w + kTileW - 1) / kTileW;
  const int64_t tiles_per_box = tiles_x * ((plan.out_h + kTileH - 1) / kTileH);
  TORCH_CHECK_VALUE(tiles_per_box < (int64_t{1} << 31), "crop_boxes: out_size too large for one launch: ",
                    plan.out_h, " x ", plan.out_w);
  const bool fused_stats = plan.with_depth && plan.num_boxes * tiles_per_box <= kMaxTilePartials;
  const float* b = boxes.const_data_ptr<float>();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const auto bytes = [&](int64_t n) { return at::empty({n}, boxes.options().dtype(at::kByte)); };
  at::Tensor hist, partials, state;
  if (fused_stats) {
    hist = bytes(plan.num_boxes * kHistBins * int64_t{sizeof(unsigned)});
    partials = bytes(plan.num_boxes * tiles_per_box * int64_t{sizeof(Partial)});
    state = bytes(plan.num_boxes * int64_t{sizeof(BoxState)});
    C10_CUDA_CHECK(cudaMemsetAsync(hist.mutable_data_ptr(), 0, hist.nbytes(), stream));
  }
  unsigned* hist_ptr = fused_stats ? static_cast<unsigned*>(hist.mutable_data_ptr()) : nullptr;
  Partial* partial_ptr = fused_stats ? static_cast<Partial*>(partials.mutable_data_ptr()) : nullptr;
  BoxState* state_ptr = fused_stats ? static_cast<BoxState*>(state.mutable_data_ptr()) : nullptr;

  const dim3 grid(static_cast<unsigned>(tiles_per_box), static_cast<unsigned>(std::min<int64_t>(plan.num_boxes, kMaxGridZ)));
  if (plan.channels_last_uint8) {
    crop_tile_kernel<true><<<grid, kThreads, 0, stream>>>(img, dep, b, idx, s, norm, static_cast<int>(tiles_x),
                                                          static_cast<int>(tiles_per_box), crops, dout, hist_ptr,
                                                          partial_ptr);
  } else {
    crop_tile_kernel<false><<<grid, kThreads, 0, stream>>>(img, dep, b, idx, s, norm, static_cast<int>(tiles_x),
                                                           static_cast<int>(tiles_per_box), crops, dout, hist_ptr,
                                                           partial_ptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!plan.with_depth) return;
  float* stats = depth_stats.mutable_data_ptr<float>();
  const unsigned select_blocks = static_cast<unsigned>(std::min<int64_t>(plan.num_boxes, int64_t{1} << 20));
  if (!fused_stats) {
    depth_stats_kernel<<<select_blocks, kStatsThreads, 0, stream>>>(dep, b, idx, s, stats);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Blocks per box for the refine passes: enough blocks in all to fill the GPU several times over.
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t per_box = std::clamp<int64_t>((int64_t{16} * sms + plan.num_boxes - 1) / plan.num_boxes, 4, 64);
  const dim3 refine_grid(static_cast<unsigned>(per_box),
                         static_cast<unsigned>(std::min<int64_t>(plan.num_boxes, kMaxGridZ)));
  for (int pass = 0; pass < 3; ++pass) {
    if (pass > 0) {
      refine_kernel<<<refine_grid, kThreads, 0, stream>>>(dep, b, idx, s, state_ptr, hist_ptr, pass);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    select_kernel<<<select_blocks, kStatsThreads, 0, stream>>>(b, idx, s, partial_ptr,
                                                               static_cast<int>(tiles_per_box), state_ptr, hist_ptr,
                                                               pass, stats);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace v2

// Which kernels crop_boxes_cuda runs: SIF_CROP_BOXES_KERNEL=v1 (default, the measured one) or v2.
bool use_v2() {
  const char* v = std::getenv("SIF_CROP_BOXES_KERNEL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "v1") == 0) return false;
  TORCH_CHECK_VALUE(std::strcmp(v, "v2") == 0, "SIF_CROP_BOXES_KERNEL must be v1 (default) or v2, got '", v, "'");
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crop_boxes_cuda(const at::Tensor& images, const at::Tensor& boxes,
                                                               const at::Tensor& box_image_index,
                                                               c10::IntArrayRef out_size,
                                                               const std::optional<at::Tensor>& depth,
                                                               std::optional<c10::ArrayRef<double>> mean,
                                                               std::optional<c10::ArrayRef<double>> std) {
  const CropPlan plan = check_crop_args(images, boxes, box_image_index, out_size, depth, mean, std);
  const c10::cuda::CUDAGuard guard(images.device());
  auto [crops, depth_crops, depth_stats] = allocate_outputs(images, plan);
  if (plan.num_boxes == 0) return {crops, depth_crops, depth_stats};
  TORCH_CHECK_VALUE(plan.num_images * plan.height * plan.width * 3 < (int64_t{1} << 62), "crop_boxes: images too large");

  const at::Tensor img = images.contiguous();
  at::Tensor b = boxes.contiguous();
  if (reinterpret_cast<uintptr_t>(b.const_data_ptr()) % alignof(float4) != 0) b = b.clone();  // read as float4
  const at::Tensor idx = box_image_index.contiguous();
  const at::Tensor dep = plan.with_depth ? depth->contiguous() : at::Tensor();
  const float* dep_ptr = plan.with_depth ? dep.const_data_ptr<float>() : nullptr;

  const Shape s{static_cast<int>(plan.num_images), static_cast<int>(plan.height), static_cast<int>(plan.width),
                static_cast<int>(plan.num_boxes),  static_cast<int>(plan.out_h),  static_cast<int>(plan.out_w)};
  TORCH_CHECK_VALUE(plan.num_boxes < (int64_t{1} << 31) && plan.num_images < (int64_t{1} << 31),
                    "crop_boxes: too many boxes or images for one launch");
  TORCH_CHECK_VALUE(plan.out_h <= int64_t{kMaxGridZ} * kRowsPerBlock * kRowsPerThread,
                    "crop_boxes: out_size height too large for one launch: ", plan.out_h);
  Norm norm;
  for (int c = 0; c < 3; ++c) {
    norm.scale[c] = plan.scale[c];
    norm.shift[c] = plan.shift[c];
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* dout = plan.with_depth ? depth_crops.mutable_data_ptr<float>() : nullptr;
  if (use_v2()) {
    v2::launch(plan, s, norm, img.const_data_ptr(), dep_ptr, b, idx, crops.mutable_data_ptr<float>(), dout, depth_stats,
               stream);
    return {crops, depth_crops, depth_stats};
  }
  const int64_t rows_per_block = kRowsPerBlock * kRowsPerThread;
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((plan.out_w + kWarp - 1) / kWarp),
                  static_cast<unsigned>((plan.out_h + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>(std::min<int64_t>(plan.num_boxes, kMaxGridZ)));
  if (plan.channels_last_uint8) {
    crop_kernel<uint8_t, true><<<grid, block, 0, stream>>>(img.const_data_ptr<uint8_t>(), dep_ptr,
                                                           b.const_data_ptr<float>(), idx.const_data_ptr<int64_t>(), s,
                                                           norm, crops.mutable_data_ptr<float>(), dout);
  } else {
    crop_kernel<float, false><<<grid, block, 0, stream>>>(img.const_data_ptr<float>(), dep_ptr,
                                                          b.const_data_ptr<float>(), idx.const_data_ptr<int64_t>(), s,
                                                          norm, crops.mutable_data_ptr<float>(), dout);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (plan.with_depth) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(plan.num_boxes, int64_t{1} << 20));
    depth_stats_kernel<<<blocks, kStatsThreads, 0, stream>>>(dep_ptr, b.const_data_ptr<float>(),
                                                             idx.const_data_ptr<int64_t>(), s,
                                                             depth_stats.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {crops, depth_crops, depth_stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(sif, CUDA, m) { m.impl("crop_boxes", &crop_boxes_cuda); }

}  // namespace sif
