// Schema of sif::crop_boxes and the argument checks shared by its CPU and CUDA kernels.
#include "crop_boxes.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <string>

namespace sif {
namespace {

std::string box_text(int64_t k, const float* b) {
  return "box " + std::to_string(k) + " [x1=" + std::to_string(b[0]) + ", y1=" + std::to_string(b[1]) +
         ", x2=" + std::to_string(b[2]) + ", y2=" + std::to_string(b[3]) + "]";
}

// Per-box value checks; only possible without a device sync when the boxes are on the CPU (the Python wrapper
// engine.ops.crop_boxes checks CUDA boxes before launching).
void check_box_values(const at::Tensor& boxes, const at::Tensor& index, const CropPlan& plan) {
  const float* b = boxes.const_data_ptr<float>();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const float w = static_cast<float>(plan.width);
  const float h = static_cast<float>(plan.height);
  for (int64_t k = 0; k < plan.num_boxes; ++k) {
    const float* bk = b + 4 * k;
    TORCH_CHECK_INDEX(idx[k] >= 0 && idx[k] < plan.num_images, "crop_boxes: ", box_text(k, bk),
                      " has box_image_index ", idx[k], ", out of range for ", plan.num_images, " images");
    TORCH_CHECK_VALUE(std::isfinite(bk[0]) && std::isfinite(bk[1]) && std::isfinite(bk[2]) && std::isfinite(bk[3]),
                      "crop_boxes: ", box_text(k, bk), " has a non-finite coordinate");
    const float x1 = std::fmin(std::fmax(bk[0], 0.f), w);
    const float x2 = std::fmin(std::fmax(bk[2], 0.f), w);
    const float y1 = std::fmin(std::fmax(bk[1], 0.f), h);
    const float y2 = std::fmin(std::fmax(bk[3], 0.f), h);
    TORCH_CHECK_VALUE(x2 > x1 && y2 > y1, "crop_boxes: ", box_text(k, bk), " of image ", idx[k],
                      " has no area after clamping to the image (W=", plan.width, ", H=", plan.height, ")");
  }
}

std::array<double, 3> channel_params(const std::optional<c10::ArrayRef<double>>& values, const char* name,
                                     double fill) {
  std::array<double, 3> out{fill, fill, fill};
  if (!values.has_value()) return out;
  TORCH_CHECK_VALUE(values->size() == 3, "crop_boxes: ", name, " must have 3 values (one per channel), got ",
                    values->size());
  for (size_t c = 0; c < 3; ++c) {
    TORCH_CHECK_VALUE(std::isfinite((*values)[c]), "crop_boxes: ", name, "[", c, "] is not finite");
    out[c] = (*values)[c];
  }
  return out;
}

}  // namespace

CropPlan check_crop_args(const at::Tensor& images, const at::Tensor& boxes, const at::Tensor& box_image_index,
                         c10::IntArrayRef out_size, const std::optional<at::Tensor>& depth,
                         const std::optional<c10::ArrayRef<double>>& mean,
                         const std::optional<c10::ArrayRef<double>>& std) {
  CropPlan plan;
  TORCH_CHECK_VALUE(images.dim() == 4, "crop_boxes: images must be uint8 [N, H, W, 3] or float32 [N, 3, H, W], got ",
                    images.dim(), " dims");
  if (images.scalar_type() == at::kByte) {
    TORCH_CHECK_VALUE(images.size(3) == 3, "crop_boxes: uint8 images must be [N, H, W, 3], got ", images.sizes());
    plan.channels_last_uint8 = true;
    plan.height = images.size(1);
    plan.width = images.size(2);
  } else {
    TORCH_CHECK_VALUE(images.scalar_type() == at::kFloat, "crop_boxes: images must be uint8 or float32, got ",
                      images.scalar_type());
    TORCH_CHECK_VALUE(images.size(1) == 3, "crop_boxes: float images must be [N, 3, H, W], got ", images.sizes());
    plan.height = images.size(2);
    plan.width = images.size(3);
  }
  plan.num_images = images.size(0);
  TORCH_CHECK_VALUE(plan.height > 0 && plan.width > 0, "crop_boxes: images have no pixels: ", images.sizes());
  TORCH_CHECK_VALUE(plan.height < (1 << 24) && plan.width < (1 << 24),
                    "crop_boxes: images larger than 2^24 pixels per side are not supported (float32 coordinates)");

  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, "crop_boxes: boxes must be [K, 4], got ", boxes.sizes());
  TORCH_CHECK_VALUE(boxes.scalar_type() == at::kFloat, "crop_boxes: boxes must be float32, got ", boxes.scalar_type());
  plan.num_boxes = boxes.size(0);
  TORCH_CHECK_VALUE(box_image_index.dim() == 1 && box_image_index.size(0) == plan.num_boxes,
                    "crop_boxes: box_image_index must be [K] with K=", plan.num_boxes, ", got ",
                    box_image_index.sizes());
  TORCH_CHECK_VALUE(box_image_index.scalar_type() == at::kLong, "crop_boxes: box_image_index must be int64, got ",
                    box_image_index.scalar_type());
  TORCH_CHECK_VALUE(boxes.device() == images.device() && box_image_index.device() == images.device(),
                    "crop_boxes: boxes (", boxes.device(), ") and box_image_index (", box_image_index.device(),
                    ") must be on the device of images (", images.device(), ")");

  TORCH_CHECK_VALUE(out_size.size() == 2, "crop_boxes: out_size must be (h, w), got ", out_size);
  plan.out_h = out_size[0];
  plan.out_w = out_size[1];
  TORCH_CHECK_VALUE(plan.out_h > 0 && plan.out_w > 0, "crop_boxes: out_size must be positive, got ", out_size);
  TORCH_CHECK_VALUE(plan.out_h < (1 << 24) && plan.out_w < (1 << 24), "crop_boxes: out_size too large: ", out_size);

  if (depth.has_value()) {
    const at::Tensor& d = *depth;
    TORCH_CHECK_VALUE(d.scalar_type() == at::kFloat, "crop_boxes: depth must be float32, got ", d.scalar_type());
    TORCH_CHECK_VALUE(d.dim() == 3 && d.size(0) == plan.num_images && d.size(1) == plan.height &&
                          d.size(2) == plan.width,
                      "crop_boxes: depth must be [N, H, W] = [", plan.num_images, ", ", plan.height, ", ", plan.width,
                      "] to match images, got ", d.sizes());
    TORCH_CHECK_VALUE(d.device() == images.device(), "crop_boxes: depth (", d.device(),
                      ") must be on the device of images (", images.device(), ")");
    plan.with_depth = true;
  }

  const std::array<double, 3> m = channel_params(mean, "mean", 0.0);
  const std::array<double, 3> s = channel_params(std, "std", 1.0);
  const double base = plan.channels_last_uint8 ? 1.0 / 255.0 : 1.0;
  for (int c = 0; c < 3; ++c) {
    TORCH_CHECK_VALUE(s[c] > 0.0, "crop_boxes: std[", c, "] must be > 0, got ", s[c]);
    plan.scale[c] = static_cast<float>(base / s[c]);
    plan.shift[c] = static_cast<float>(-m[c] / s[c]);
  }

  if (boxes.is_cpu() && plan.num_boxes > 0) {
    check_box_values(boxes.contiguous(), box_image_index.contiguous(), plan);
  }
  return plan;
}

std::array<at::Tensor, 3> allocate_outputs(const at::Tensor& images, const CropPlan& plan) {
  const auto opts = images.options().dtype(at::kFloat);
  const int64_t k = plan.num_boxes;
  at::Tensor crops = at::empty({k, 3, plan.out_h, plan.out_w}, opts);
  at::Tensor depth_crops = plan.with_depth ? at::empty({k, 1, plan.out_h, plan.out_w}, opts) : at::empty({0}, opts);
  at::Tensor depth_stats = plan.with_depth ? at::empty({k, 3}, opts) : at::empty({0}, opts);
  return {crops, depth_crops, depth_stats};
}

TORCH_LIBRARY(sif, m) {
  // The fake (meta) kernel is registered in Python by engine.ops (torch.library.register_fake).
  m.set_python_module("engine.ops");
  m.def(
      "crop_boxes(Tensor images, Tensor boxes, Tensor box_image_index, int[2] out_size, Tensor? depth=None, "
      "float[]? mean=None, float[]? std=None) -> (Tensor crops, Tensor depth_crops, Tensor depth_stats)");
}

}  // namespace sif
