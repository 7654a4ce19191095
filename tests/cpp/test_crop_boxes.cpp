// C++ test of the CPU kernel of sif::crop_boxes (run by ctest): compares it with a naive per-pixel loop written
// from the sampling definition in double precision (independent of crop_boxes_geometry.h), on a few boxes
// (integer, fractional, partly outside, sub-pixel), uint8 HWC and float CHW images, with depth; checks that the
// op is registered with the dispatcher and that a bad box raises c10::ValueError / c10::IndexError.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "crop_boxes.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

struct Taps {
  int i0, i1;
  double w;
  int lo, hi;
};

// The definition, per axis: clamp, support = pixels with centres in [c1, c2) (else the pixel holding the box
// centre), src = c1 + (j + 0.5) * (c2 - c1) / out - 0.5 clamped to the support, linear between floor and next.
Taps naive_axis(double a, double b, int size, int out, int j) {
  const double c1 = std::clamp(a, 0.0, static_cast<double>(size));
  const double c2 = std::clamp(b, 0.0, static_cast<double>(size));
  int lo = static_cast<int>(std::ceil(c1 - 0.5));
  int hi = static_cast<int>(std::ceil(c2 - 0.5)) - 1;
  if (hi < lo) lo = hi = std::min(static_cast<int>(std::floor((c1 + c2) / 2)), size - 1);
  const double src = c1 + (j + 0.5) * (c2 - c1) / out - 0.5;
  const double s = std::clamp(src, static_cast<double>(lo), static_cast<double>(hi));
  const int i0 = static_cast<int>(std::floor(s));
  return {i0, std::min(i0 + 1, hi), s - i0, lo, hi};
}

uint32_t lcg(uint32_t& state) {
  state = state * 1664525u + 1013904223u;
  return state >> 8;
}

void run_case(bool uint8_input) {
  const int N = 2, H = 23, W = 31, OH = 9, OW = 14;
  const double mean[3] = {0.48, 0.46, 0.41}, stdv[3] = {0.27, 0.26, 0.28};
  uint32_t seed = 12345;
  std::vector<uint8_t> rgb(static_cast<size_t>(N) * H * W * 3);
  for (auto& v : rgb) v = static_cast<uint8_t>(lcg(seed) & 255u);
  std::vector<float> dep(static_cast<size_t>(N) * H * W);
  for (auto& v : dep) v = static_cast<float>(lcg(seed) % 100000u) / 100000.f;

  auto rgb_at = [&](int n, int y, int x, int c) { return rgb[((static_cast<size_t>(n) * H + y) * W + x) * 3 + c]; };
  at::Tensor images;
  if (uint8_input) {
    images = at::empty({N, H, W, 3}, at::kByte);
    std::copy(rgb.begin(), rgb.end(), images.mutable_data_ptr<uint8_t>());
  } else {
    images = at::empty({N, 3, H, W}, at::kFloat);
    float* p = images.mutable_data_ptr<float>();
    for (int n = 0; n < N; ++n)
      for (int c = 0; c < 3; ++c)
        for (int y = 0; y < H; ++y)
          for (int x = 0; x < W; ++x) *p++ = rgb_at(n, y, x, c) / 255.f;
  }
  at::Tensor depth = at::empty({N, H, W}, at::kFloat);
  std::copy(dep.begin(), dep.end(), depth.mutable_data_ptr<float>());

  const std::vector<std::vector<float>> box_list = {
      {0, 0, 31, 23}, {3, 4, 20, 22}, {2.3f, 5.7f, 9.1f, 6.2f}, {-5, -3, 10, 40}, {10.2f, 10.3f, 10.4f, 10.5f},
      {29.5f, 0.25f, 31, 7.75f}};
  const std::vector<int64_t> index_list = {0, 1, 0, 1, 0, 1};
  const int64_t K = static_cast<int64_t>(box_list.size());
  at::Tensor boxes = at::empty({K, 4}, at::kFloat);
  at::Tensor index = at::empty({K}, at::kLong);
  for (int64_t k = 0; k < K; ++k) {
    std::copy(box_list[k].begin(), box_list[k].end(), boxes.mutable_data_ptr<float>() + 4 * k);
    index.mutable_data_ptr<int64_t>()[k] = index_list[k];
  }

  const std::vector<int64_t> size = {OH, OW};
  auto [crops, depth_crops, stats] = sif::crop_boxes_cpu(images, boxes, index, size, depth,
                                                         c10::ArrayRef<double>(mean, 3), c10::ArrayRef<double>(stdv, 3));
  expect(crops.sizes() == c10::IntArrayRef({K, 3, OH, OW}), "crops shape");
  expect(depth_crops.sizes() == c10::IntArrayRef({K, 1, OH, OW}), "depth_crops shape");
  expect(stats.sizes() == c10::IntArrayRef({K, 3}), "depth_stats shape");
  const float* got = crops.const_data_ptr<float>();
  const float* dgot = depth_crops.const_data_ptr<float>();
  const float* sgot = stats.const_data_ptr<float>();

  double worst = 0.0, dworst = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const auto& b = box_list[k];
    const int n = static_cast<int>(index_list[k]);
    for (int i = 0; i < OH; ++i) {
      const Taps ty = naive_axis(b[1], b[3], H, OH, i);
      for (int j = 0; j < OW; ++j) {
        const Taps tx = naive_axis(b[0], b[2], W, OW, j);
        auto bilinear = [&](auto&& at_px) {
          const double top = at_px(ty.i0, tx.i0) * (1 - tx.w) + at_px(ty.i0, tx.i1) * tx.w;
          const double bottom = at_px(ty.i1, tx.i0) * (1 - tx.w) + at_px(ty.i1, tx.i1) * tx.w;
          return top * (1 - ty.w) + bottom * ty.w;
        };
        for (int c = 0; c < 3; ++c) {
          const double v = bilinear([&](int y, int x) { return rgb_at(n, y, x, c) / 255.0; });
          const double want = (v - mean[c]) / stdv[c];
          worst = std::max(worst, std::abs(want - got[((k * 3 + c) * OH + i) * OW + j]));
        }
        const double d = bilinear([&](int y, int x) { return static_cast<double>(dep[(n * H + y) * W + x]); });
        dworst = std::max(dworst, std::abs(d - dgot[(k * OH + i) * OW + j]));
      }
    }
    // Statistics over the pixels the box touches: floor(x1) .. ceil(x2) - 1 of the clamped box, rows alike.
    auto touched = [](double a, double z, int size) {
      const int lo = std::min(static_cast<int>(std::floor(std::clamp(a, 0.0, static_cast<double>(size)))), size - 1);
      const int hi = std::max(static_cast<int>(std::ceil(std::clamp(z, 0.0, static_cast<double>(size)))) - 1, lo);
      return std::pair<int, int>(lo, hi);
    };
    const auto [sxlo, sxhi] = touched(b[0], b[2], W);
    const auto [sylo, syhi] = touched(b[1], b[3], H);
    std::vector<float> values;
    for (int y = sylo; y <= syhi; ++y)
      for (int x = sxlo; x <= sxhi; ++x) values.push_back(dep[(n * H + y) * W + x]);
    std::sort(values.begin(), values.end());
    double sum = 0.0;
    for (float v : values) sum += v;
    const float median = values[(values.size() - 1) / 2];
    const std::string box = "box " + std::to_string(k) + (uint8_input ? " (uint8)" : " (float)");
    expect(sgot[3 * k] == median, box + ": median " + std::to_string(sgot[3 * k]) + " vs " + std::to_string(median));
    expect(std::abs(sgot[3 * k + 1] - sum / values.size()) < 1e-6, box + ": mean");
    expect(sgot[3 * k + 2] == values.front(), box + ": min");
  }
  expect(worst < 1e-4, std::string("crops differ from the naive loop by ") + std::to_string(worst));
  expect(dworst < 1e-5, std::string("depth crops differ from the naive loop by ") + std::to_string(dworst));

  // Errors name the box: an image index out of range (IndexError), a box without area (ValueError).
  index.mutable_data_ptr<int64_t>()[4] = 7;
  try {
    sif::crop_boxes_cpu(images, boxes, index, size, depth, std::nullopt, std::nullopt);
    expect(false, "index out of range did not throw");
  } catch (const c10::IndexError& e) {
    expect(std::string(e.what()).find("box 4") != std::string::npos, std::string("message: ") + e.what());
  }
  index.mutable_data_ptr<int64_t>()[4] = 0;
  boxes.mutable_data_ptr<float>()[4 * 2] = 40.f;  // x1 beyond the image
  try {
    sif::crop_boxes_cpu(images, boxes, index, size, depth, std::nullopt, std::nullopt);
    expect(false, "box without area did not throw");
  } catch (const c10::ValueError& e) {
    expect(std::string(e.what()).find("box 2") != std::string::npos, std::string("message: ") + e.what());
  }
}

}  // namespace

int main() {
  expect(c10::Dispatcher::singleton().findSchema({"sif::crop_boxes", ""}).has_value(), "sif::crop_boxes registered");
  run_case(true);
  run_case(false);
  if (failures == 0) std::printf("crop_boxes C++ test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
