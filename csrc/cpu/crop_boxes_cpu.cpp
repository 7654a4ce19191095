// CPU kernel of sif::crop_boxes: OpenMP over (box, output row), separable bilinear, fused normalisation.
//
// Per output row of a box: the two source rows are blended vertically over the box's column span into a
// float scratch row (contiguous, vectorisable; uint8 -> float happens here, once per source pixel), then each
// output sample blends two scratch columns and applies scale/shift for its channel. Source pixels are read
// once per output row that needs them; there is no intermediate image. Depth rows go through the same path.
// Depth statistics: one task per box (dynamic schedule, boxes differ in size) over the pixels the box touches
// (stats_span, crop_boxes_geometry.h), exact lower median (rank (n - 1) / 2, torch.median's convention) by a value
// histogram + selection, see DepthStats.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../crop_boxes.h"
#include "../crop_boxes_geometry.h"

namespace sif {
namespace {

struct BoxGeometry {
  int64_t image;
  Axis x;  // sampling
  Axis y;
  Span sx;  // depth statistics: the pixels the box touches
  Span sy;
};

// Vertical blend of two rows over `count` contiguous values: out[t] = a[t] + wy * (b[t] - a[t]).
template <typename scalar_t>
void blend_rows(const scalar_t* __restrict a, const scalar_t* __restrict b, float wy, int64_t count,
                float* __restrict out) {
#pragma omp simd
  for (int64_t t = 0; t < count; ++t) {
    const float va = static_cast<float>(a[t]);
    out[t] = va + wy * (static_cast<float>(b[t]) - va);
  }
}

// Horizontal blend of one channel from a scratch row (unit stride), then scale/shift.
void blend_columns(const float* __restrict row, const Tap* __restrict taps, int64_t base, int64_t out_w, float scale,
                   float shift, float* __restrict out) {
  for (int64_t j = 0; j < out_w; ++j) {
    const float a = row[taps[j].i0 - base];
    const float b = row[taps[j].i1 - base];
    out[j] = (a + taps[j].w * (b - a)) * scale + shift;
  }
}

// The same for three interleaved channels (uint8 HWC scratch): one tap load serves all three planes.
void blend_columns_rgb(const float* __restrict row, const Tap* __restrict taps, int64_t base, int64_t out_w,
                       const std::array<float, 3>& scale, const std::array<float, 3>& shift, int64_t plane,
                       float* __restrict out) {
  float* __restrict r = out;
  float* __restrict g = out + plane;
  float* __restrict b = out + 2 * plane;
  for (int64_t j = 0; j < out_w; ++j) {
    const float* p0 = row + (taps[j].i0 - base) * 3;
    const float* p1 = row + (taps[j].i1 - base) * 3;
    const float w = taps[j].w;
    r[j] = (p0[0] + w * (p1[0] - p0[0])) * scale[0] + shift[0];
    g[j] = (p0[1] + w * (p1[1] - p0[1])) * scale[1] + shift[1];
    b[j] = (p0[2] + w * (p1[2] - p0[2])) * scale[2] + shift[2];
  }
}

// Exact lower median, mean and min of the pixels a box touches (g.sx x g.sy) of one depth map.
// Pass 1 takes sum (double), min and max; pass 2 counts values into kBins equal-width bins over [min, max]
// (the bin index is monotone in the value, so the rank-(n-1)/2 element lies in the bin where the counts
// cross it); pass 3 gathers that bin's values and std::nth_element finishes the selection. Small boxes skip
// straight to nth_element. Three streaming passes instead of nth_element over a copy of the whole box.
class DepthStats {
 public:
  void operator()(const float* depth, int64_t width, const BoxGeometry& g, float* out) {
    const int64_t cols = g.sx.hi - g.sx.lo + 1;
    const int64_t rows = g.sy.hi - g.sy.lo + 1;
    const int64_t n = rows * cols;
    const int64_t rank = (n - 1) / 2;
    const float* first = depth + g.sy.lo * width + g.sx.lo;
    auto row = [&](int64_t r) { return first + r * width; };

    double sum = 0.0;
    float mn = std::numeric_limits<float>::infinity();
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = row(r);
      double acc[kLanes] = {};
      float lmin[kLanes], lmax[kLanes];
      std::fill(lmin, lmin + kLanes, mn);
      std::fill(lmax, lmax + kLanes, mx);
      int64_t c = 0;
      for (; c + kLanes <= cols; c += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const float v = src[c + l];
          acc[l] += v;
          lmin[l] = v < lmin[l] ? v : lmin[l];
          lmax[l] = v > lmax[l] ? v : lmax[l];
        }
      }
      for (int l = 0; l < kLanes; ++l) {
        sum += acc[l];
        mn = std::min(mn, lmin[l]);
        mx = std::max(mx, lmax[l]);
      }
      for (; c < cols; ++c) {
        sum += src[c];
        mn = std::min(mn, src[c]);
        mx = std::max(mx, src[c]);
      }
    }
    if (std::isnan(sum)) {  // a NaN in the box (or +inf with -inf): NaN statistics, as torch propagates NaN
      out[0] = out[1] = out[2] = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    out[1] = static_cast<float>(sum / static_cast<double>(n));
    out[2] = mn;
    if (!(mx > mn)) {
      out[0] = mn;  // constant region
      return;
    }
    const float scale = static_cast<float>(kBins) / (mx - mn);
    if (n <= kSmallBox || !std::isfinite(mn) || !std::isfinite(mx) || !std::isfinite(scale)) {
      values_.resize(static_cast<size_t>(n));
      for (int64_t r = 0; r < rows; ++r) std::copy(row(r), row(r) + cols, values_.begin() + r * cols);
      out[0] = select(values_.begin(), values_.end(), rank);
      return;
    }
    auto bin_of = [&](float v) {
      // In [0, kBins] and monotone in v: here every value is finite (NaN and infinities returned above).
      return static_cast<int>(std::min((v - mn) * scale, static_cast<float>(kBins - 1)));
    };
    // Four interleaved count arrays so that runs of equal bins (smooth depth) do not serialise on one counter.
    std::fill(counts_.begin(), counts_.end(), 0u);
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = row(r);
      int64_t c = 0;
      for (; c + 4 <= cols; c += 4) {
        for (int l = 0; l < 4; ++l) ++counts_[static_cast<size_t>(bin_of(src[c + l])) * 4 + l];
      }
      for (; c < cols; ++c) ++counts_[static_cast<size_t>(bin_of(src[c])) * 4];
    }
    int64_t below = 0;
    int target = 0;
    for (;; ++target) {
      const uint32_t* cnt = &counts_[static_cast<size_t>(target) * 4];
      const int64_t in_bin = static_cast<int64_t>(cnt[0]) + cnt[1] + cnt[2] + cnt[3];
      if (below + in_bin > rank) break;
      below += in_bin;
    }
    values_.clear();
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = row(r);
      for (int64_t c = 0; c < cols; ++c) {
        if (bin_of(src[c]) == target) values_.push_back(src[c]);
      }
    }
    out[0] = select(values_.begin(), values_.end(), rank - below);
  }

 private:
  static constexpr int kLanes = 8;
  static constexpr int kBins = 1024;
  static constexpr int64_t kSmallBox = 4096;

  static float select(std::vector<float>::iterator begin, std::vector<float>::iterator end, int64_t rank) {
    std::nth_element(begin, begin + rank, end);
    return begin[rank];
  }

  std::vector<float> values_;
  std::vector<uint32_t> counts_ = std::vector<uint32_t>(static_cast<size_t>(kBins) * 4);
};

// Asks Linux for transparent huge pages on a large output before its first touch (a hint; THP's usual
// "madvise" mode honours it, errors are ignored). Faulting in and zeroing fresh 4 KiB pages is otherwise about
// half of this op's CPU time (~1.2 GB of outputs at K=256, 448x448); 2 MiB pages cut that several-fold. It is
// what torch's THP_MEM_ALLOC_ENABLE=1 does for every large CPU tensor, applied to these buffers only.
void advise_huge_pages(at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.mutable_data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (start + t.nbytes()) & ~(kHuge - 1);
  if (end >= begin + 4 * kHuge) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

template <typename scalar_t>
void crop_kernel(const at::Tensor& images, const std::optional<at::Tensor>& depth, const CropPlan& plan,
                 const std::vector<BoxGeometry>& geo, const std::vector<Tap>& xtaps, const std::vector<Tap>& ytaps,
                 at::Tensor& crops, at::Tensor& depth_crops, at::Tensor& depth_stats) {
  const int64_t K = plan.num_boxes, H = plan.height, W = plan.width, oh = plan.out_h, ow = plan.out_w;
  const scalar_t* img = images.const_data_ptr<scalar_t>();
  const float* dep = plan.with_depth ? depth->const_data_ptr<float>() : nullptr;
  float* out = crops.mutable_data_ptr<float>();
  float* dout = plan.with_depth ? depth_crops.mutable_data_ptr<float>() : nullptr;
  float* stats = plan.with_depth ? depth_stats.mutable_data_ptr<float>() : nullptr;
  const int64_t plane = oh * ow;
  const int num_threads = at::get_num_threads();

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> scratch(static_cast<size_t>(W) * 3);
    std::vector<float> dscratch(plan.with_depth ? static_cast<size_t>(W) : 0);
    // Rows cost more in wide boxes (the vertical blend spans the box): dynamic chunks balance the threads.
#pragma omp for collapse(2) schedule(dynamic, 32)
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t i = 0; i < oh; ++i) {
        const BoxGeometry& g = geo[k];
        const Tap ty = ytaps[k * oh + i];
        const Tap* tx = xtaps.data() + k * ow;
        const int64_t x0 = tx[0].i0;  // taps are monotone: the row span is [first i0, last i1]
        const int64_t span = tx[ow - 1].i1 - x0 + 1;
        float* o = out + k * 3 * plane + i * ow;
        if constexpr (std::is_same_v<scalar_t, uint8_t>) {  // uint8 [N, H, W, 3]
          const scalar_t* base = img + g.image * H * W * 3;
          blend_rows(base + (ty.i0 * W + x0) * 3, base + (ty.i1 * W + x0) * 3, ty.w, span * 3, scratch.data());
          blend_columns_rgb(scratch.data(), tx, x0, ow, plan.scale, plan.shift, plane, o);
        } else {  // float32 [N, 3, H, W]
          for (int c = 0; c < 3; ++c) {
            const scalar_t* base = img + (g.image * 3 + c) * H * W;
            blend_rows(base + ty.i0 * W + x0, base + ty.i1 * W + x0, ty.w, span, scratch.data());
            blend_columns(scratch.data(), tx, x0, ow, plan.scale[c], plan.shift[c], o + c * plane);
          }
        }
        if (dep != nullptr) {
          const float* base = dep + g.image * H * W;
          blend_rows(base + ty.i0 * W + x0, base + ty.i1 * W + x0, ty.w, span, dscratch.data());
          blend_columns(dscratch.data(), tx, x0, ow, 1.f, 0.f, dout + k * plane + i * ow);
        }
      }
    }
    if (dep != nullptr) {
      DepthStats depth_stats_of_box;
#pragma omp for schedule(dynamic, 1)
      for (int64_t k = 0; k < K; ++k) {
        depth_stats_of_box(dep + geo[k].image * H * W, W, geo[k], stats + 3 * k);
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> crop_boxes_cpu(const at::Tensor& images, const at::Tensor& boxes,
                                                              const at::Tensor& box_image_index,
                                                              c10::IntArrayRef out_size,
                                                              const std::optional<at::Tensor>& depth,
                                                              std::optional<c10::ArrayRef<double>> mean,
                                                              std::optional<c10::ArrayRef<double>> std) {
  const CropPlan plan = check_crop_args(images, boxes, box_image_index, out_size, depth, mean, std);
  auto [crops, depth_crops, depth_stats] = allocate_outputs(images, plan);
  const int64_t K = plan.num_boxes;
  if (K == 0) return {crops, depth_crops, depth_stats};
  advise_huge_pages(crops);
  if (plan.with_depth) advise_huge_pages(depth_crops);

  const at::Tensor img = images.contiguous();
  const at::Tensor b = boxes.contiguous();
  const at::Tensor idx = box_image_index.contiguous();
  const std::optional<at::Tensor> dep = depth.has_value() ? std::optional<at::Tensor>(depth->contiguous()) : depth;

  // Geometry tables: K * (out_w + out_h) taps, computed once (the per-pixel work only gathers and blends).
  const float* bp = b.const_data_ptr<float>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  std::vector<BoxGeometry> geo(static_cast<size_t>(K));
  std::vector<Tap> xtaps(static_cast<size_t>(K * plan.out_w));
  std::vector<Tap> ytaps(static_cast<size_t>(K * plan.out_h));
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static)
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = bp + 4 * k;
    BoxGeometry& g = geo[k];
    g.image = ip[k];
    g.x = make_axis(bk[0], bk[2], static_cast<int>(plan.width), static_cast<int>(plan.out_w));
    g.y = make_axis(bk[1], bk[3], static_cast<int>(plan.height), static_cast<int>(plan.out_h));
    g.sx = stats_span(bk[0], bk[2], static_cast<int>(plan.width));
    g.sy = stats_span(bk[1], bk[3], static_cast<int>(plan.height));
    for (int64_t j = 0; j < plan.out_w; ++j) xtaps[k * plan.out_w + j] = make_tap(g.x, static_cast<int>(j));
    for (int64_t i = 0; i < plan.out_h; ++i) ytaps[k * plan.out_h + i] = make_tap(g.y, static_cast<int>(i));
  }

  if (plan.channels_last_uint8) {
    crop_kernel<uint8_t>(img, dep, plan, geo, xtaps, ytaps, crops, depth_crops, depth_stats);
  } else {
    crop_kernel<float>(img, dep, plan, geo, xtaps, ytaps, crops, depth_crops, depth_stats);
  }
  return {crops, depth_crops, depth_stats};
}

TORCH_LIBRARY_IMPL(sif, CPU, m) { m.impl("crop_boxes", &crop_boxes_cpu); }

}  // namespace sif
