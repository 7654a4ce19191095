// sif::crop_boxes — batched box cropping with fused normalisation and depth fusion.
//
// Schema (registered in crop_boxes.cpp):
//   crop_boxes(Tensor images, Tensor boxes, Tensor box_image_index, int[2] out_size, Tensor? depth=None,
//              float[]? mean=None, float[]? std=None) -> (Tensor crops, Tensor depth_crops, Tensor depth_stats)
//   images          uint8 [N, H, W, 3] (as decoded) or float32 [N, 3, H, W]
//   boxes           float32 [K, 4] pixel x1, y1, x2, y2 (continuous coordinates, see crop_boxes_geometry.h)
//   box_image_index int64 [K], the image of each box
//   depth           float32 [N, H, W] or None
//   crops           float32 [K, 3, h, w]: bilinear resample, uint8 scaled to [0, 1], then (x - mean) / std
//   depth_crops     float32 [K, 1, h, w] resampled the same way, or an empty [0] tensor without depth
//   depth_stats     float32 [K, 3] (lower median, mean, min over the pixels the box touches: columns
//                   floor(x1) .. ceil(x2) - 1 and rows alike, clamped, at least one), or empty [0]
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <optional>

namespace sif {

// Everything a kernel needs besides the tensors, derived once from the validated arguments.
struct CropPlan {
  int64_t num_images = 0;  // N
  int64_t height = 0;      // H
  int64_t width = 0;       // W
  int64_t num_boxes = 0;   // K
  int64_t out_h = 0;
  int64_t out_w = 0;
  bool channels_last_uint8 = false;  // uint8 [N, H, W, 3]; otherwise float32 [N, 3, H, W]
  bool with_depth = false;
  // crops[c] = resampled_value * scale[c] + shift[c] (folds the uint8 1/255 and mean/std into one FMA).
  std::array<float, 3> scale{};
  std::array<float, 3> shift{};
};

// Checks dtypes, shapes, devices and mean/std (TORCH_CHECK_* with messages naming the argument); when the
// boxes live on the CPU also checks every box (finite, index in range, area after clamping), naming the box.
CropPlan check_crop_args(const at::Tensor& images, const at::Tensor& boxes, const at::Tensor& box_image_index,
                         c10::IntArrayRef out_size, const std::optional<at::Tensor>& depth,
                         const std::optional<c10::ArrayRef<double>>& mean,
                         const std::optional<c10::ArrayRef<double>>& std);

// Allocates the three outputs on the device of `images`.
std::array<at::Tensor, 3> allocate_outputs(const at::Tensor& images, const CropPlan& plan);

// The CPU kernel (csrc/cpu/crop_boxes_cpu.cpp); exposed for the C++ test.
std::tuple<at::Tensor, at::Tensor, at::Tensor> crop_boxes_cpu(const at::Tensor& images, const at::Tensor& boxes,
                                                              const at::Tensor& box_image_index,
                                                              c10::IntArrayRef out_size,
                                                              const std::optional<at::Tensor>& depth,
                                                              std::optional<c10::ArrayRef<double>> mean,
                                                              std::optional<c10::ArrayRef<double>> std);

}  // namespace sif
