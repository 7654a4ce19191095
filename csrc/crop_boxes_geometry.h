// Sampling geometry of sif::crop_boxes: the one definition shared by the CPU and CUDA kernels.
//
// Per axis (x shown; y is the same with H and out_h), for a box [x1, x2) in continuous pixel coordinates
// (pixel i covers [i, i + 1), its centre is i + 0.5):
//   c1 = clamp(x1, 0, W), c2 = clamp(x2, 0, W)                       (the box clamped to the image)
//   support = pixels whose centres lie in [c1, c2): lo = ceil(c1 - 0.5), hi = ceil(c2 - 0.5) - 1;
//             when no centre lies inside (sub-pixel box), the one pixel containing the box centre,
//             lo = hi = min(floor((c1 + c2) / 2), W - 1)
//   sample j (0 <= j < out_w), in pixel-index coordinates (centre of pixel i at i):
//             src = c1 + (j + 0.5) * (c2 - c1) / out_w - 0.5
//   bilinear on the support with edge clamping: s = clamp(src, lo, hi), i0 = floor(s), i1 = min(i0 + 1, hi),
//             weight of i1 = s - i0.
// For integer boxes the support is exactly the pixels x1..x2-1, so this equals slicing the box and calling
// F.interpolate(mode="bilinear", align_corners=False); the arithmetic below is ATen's (float32 scale = extent /
// out, source index fma(scale, j + 0.5, -0.5)) so that it agrees with it to float rounding of the blend (a
// different rounding of the source index alone would cost ~1e-4 on 1000-pixel boxes of noisy images).
//
// The depth statistics (median, mean, min) are NOT taken over that support but over the pixels the box touches,
// the project's one definition of a box's depth (engine.data.boxes.box_pixel_bounds, shared with the trace writer
// and the depth reward, and the released SIFThinker's calculate_avg_depth): per axis
//   lo = min(floor(c1), W - 1), hi = max(ceil(c2), lo + 1) - 1
// i.e. columns floor(x1) .. ceil(x2) - 1 of the clamped box, at least one. For integer boxes both sets are the
// pixels x1..x2-1; they differ for fractional boxes (a box covering 0.8..2.0 samples pixel 1 but its statistics
// read pixels 0 and 1). Callers with normalised boxes pass the integer bounds of box_pixel_bounds (computed in
// double precision), so the float32 floor/ceil here never decides a pixel for them.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SIF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SIF_HOST_DEVICE inline
#endif

namespace sif {

// IEEE round-to-nearest a * b, a + b, a / b: nvcc would otherwise contract them into FMAs where ATen has none
// (or, under --use_fast_math, approximate the division) and move the sample positions off the float32 rounding
// that F.interpolate and the torch reference use.
SIF_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SIF_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// fma(a, b, c) with a single rounding: ATen's bilinear kernels compute the source index as
// scale * (j + 0.5) - 0.5 and their compilers contract it into an FMA (CUDA always; CPU in the AVX2/AVX512
// builds that every x86-64 machine with AVX2 dispatches to), so the single-rounding form is what F.interpolate
// produces in practice.
SIF_HOST_DEVICE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

SIF_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// One axis of one box.
struct Axis {
  int lo;        // first support pixel
  int hi;        // last support pixel (hi >= lo)
  float offset;  // c1 - lo, in [-0.5, 0.5]: zero for integer boxes
  float step;    // (c2 - c1) / out, the source extent of one output sample
};

// Two source pixels and the weight of the second.
struct Tap {
  int i0;
  int i1;
  float w;
};

SIF_HOST_DEVICE float clampf(float v, float lo, float hi) { return fminf(fmaxf(v, lo), hi); }

// Memory-safe for any input (NaN or inverted boxes give a valid one-pixel support inside [0, size)).
SIF_HOST_DEVICE Axis make_axis(float a, float b, int size, int out) {
  const float fsize = static_cast<float>(size);
  const float c1 = clampf(a, 0.f, fsize);
  const float c2 = clampf(b, 0.f, fsize);
  int lo = static_cast<int>(ceilf(c1 - 0.5f));
  int hi = static_cast<int>(ceilf(c2 - 0.5f)) - 1;
  if (!(hi >= lo)) {
    const float mid = mul_rn(add_rn(c1, c2), 0.5f);
    const int p = static_cast<int>(floorf(mid));
    lo = hi = p < 0 ? 0 : (p > size - 1 ? size - 1 : p);
  }
  if (lo < 0) lo = 0;
  if (hi > size - 1) hi = size - 1;
  Axis ax;
  ax.lo = lo;
  ax.hi = hi;
  ax.offset = c1 - static_cast<float>(lo);
  ax.step = div_rn(c2 - c1, static_cast<float>(out));
  return ax;
}

// Pixels [lo, hi] one axis of a box touches, for the depth statistics (see the header comment). Memory-safe
// for any input: NaN or inverted boxes give one pixel inside [0, size).
struct Span {
  int lo;
  int hi;
};

SIF_HOST_DEVICE Span stats_span(float a, float b, int size) {
  const float fsize = static_cast<float>(size);
  const float c1 = clampf(a, 0.f, fsize);
  const float c2 = clampf(b, 0.f, fsize);
  int lo = static_cast<int>(floorf(c1));
  if (lo > size - 1) lo = size - 1;
  int hi = static_cast<int>(ceilf(c2)) - 1;
  if (hi < lo) hi = lo;
  if (hi > size - 1) hi = size - 1;
  Span sp;
  sp.lo = lo < 0 ? 0 : lo;
  sp.hi = hi;
  return sp;
}

SIF_HOST_DEVICE Tap make_tap(const Axis& ax, int j) {
  // Relative to lo: fma(step, j + 0.5, -0.5) + offset, exactly ATen's source index for offset == 0.
  const float rel = add_rn(fma_rn(ax.step, static_cast<float>(j) + 0.5f, -0.5f), ax.offset);
  const float s = clampf(rel, 0.f, static_cast<float>(ax.hi - ax.lo));
  const int i0 = static_cast<int>(s);
  Tap t;
  t.i0 = ax.lo + i0;
  t.i1 = ax.lo + (ax.lo + i0 < ax.hi ? i0 + 1 : i0);
  t.w = s - static_cast<float>(i0);
  return t;
}

// Order-preserving map of float32 to uint32 (for radix selection of the median on the GPU).
SIF_HOST_DEVICE unsigned int float_to_key(unsigned int bits) {
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

SIF_HOST_DEVICE unsigned int key_to_float_bits(unsigned int key) {
  return (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
}

}  // namespace sif
