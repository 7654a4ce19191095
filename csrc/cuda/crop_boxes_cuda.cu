// CUDA kernels of sif::crop_boxes.
//
// Crops: one launch for all boxes. Grid (x: tiles of 32 output columns, y: tiles of kRowsPerBlock output rows,
// z: boxes, grid-stride beyond 65535). A warp covers 32 consecutive output columns of one row, so every store to
// the four output planes (3 colours + depth) is a coalesced 128-byte line; each thread reads its 2x2 taps once
// for all channels (uint8 HWC: 3 bytes per tap through the read-only cache), blends in registers and applies
// the fused scale/shift. The x taps are computed once per thread and reused down its rows.
//
// Depth statistics: a second small launch, one block per box, over the pixels the box touches (stats_span in
// crop_boxes_geometry.h, the same rule as the CPU kernel and engine.data.boxes). The exact lower median is found
// by radix selection on the order-preserving uint32 key of each float: three passes over the box's pixels with an
// 11/11/10-bit shared-memory histogram, each pass keeping only the values that share the prefix selected so far
// (no sort, no global scratch, deterministic). The first pass also reduces sum (double) and min. Warp-aggregated
// atomics (__match_any_sync) keep smooth depth maps, whose values crowd a few bins, from serialising on one
// counter. A box's pixels are read three times (from L2 for typical depth maps); the crops dominate traffic.
// NaN anywhere in those pixels gives NaN statistics (torch's median/mean/min propagate NaN).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

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
  const int64_t rows_per_block = kRowsPerBlock * kRowsPerThread;
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((plan.out_w + kWarp - 1) / kWarp),
                  static_cast<unsigned>((plan.out_h + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>(std::min<int64_t>(plan.num_boxes, kMaxGridZ)));
  float* dout = plan.with_depth ? depth_crops.mutable_data_ptr<float>() : nullptr;
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
