"""Build the SIF engine's native extension; the package metadata (name, dependencies, extras) is in pyproject.toml.

Native extension ``engine._C`` (the ``crop_boxes`` op, see csrc/): a CppExtension with OpenMP on a
CPU-only torch, a CUDAExtension when torch has CUDA and nvcc is found. CUDA architectures come from
``SIF_CUDA_ARCH`` (default ``8.0;9.0``). Install with ``pip install --no-build-isolation -e .`` so
that the extension builds against the torch already installed.
"""

import glob
import os
import shutil
import sys

from setuptools import Extension, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ModuleNotFoundError:
    sys.exit(
        "sif-engine: torch is not installed in this build environment; run "
        "`pip install torch==2.13.0 && pip install --no-build-isolation -e .`"
    )


def _extension() -> Extension:
    """The crop_boxes extension: CUDA kernels included when torch has CUDA and nvcc is found."""
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # C++20: torch >= 2.10 headers need it. No implicit FMA contraction: the sampling positions follow ATen's
    # rounding (csrc/crop_boxes_geometry.h has the one explicit FMA).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    link_flags = ["-fopenmp"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("SIF_NO_CUDA") != "1"
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("SIF_CUDA_ARCH", "8.0;9.0"))
        return CUDAExtension(
            "engine._C",
            cpp_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            # No --use_fast_math: the kernels are memory-bound, and approximate division would move the
            # sampling positions off the CPU kernel's (and F.interpolate's) float32 rounding.
            extra_compile_args={
                "cxx": cxx_flags + ["-DSIF_WITH_CUDA"],
                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DSIF_WITH_CUDA"],
            },
            extra_link_args=link_flags,
        )
    return CppExtension("engine._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=link_flags)


# ninja compiles the sources in parallel where it is installed (the "gpu" extra); plain setuptools otherwise.
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
