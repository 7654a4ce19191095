"""Build and install the SIF engine.

Python packages: ``engine`` (model, data, RL, training loop) and ``kernels`` (Triton kernels).
Native extension ``engine._C`` (the ``crop_boxes`` op, see csrc/): a CppExtension with OpenMP on a
CPU-only torch, a CUDAExtension when torch has CUDA and nvcc is found. CUDA architectures come from
``SIF_CUDA_ARCH`` (default ``8.0;9.0``). Install with ``pip install --no-build-isolation -e .`` so
that the extension builds against the torch already installed.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.6,<2.15",
    "triton>=3.2",
    "liger-kernel>=0.5",
    "nvidia-dali-cuda130>=2.0",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "numpy>=1.26",
    "pillow>=10",
    "tqdm>=4.60",
    "matplotlib>=3.8",
    "pybind11>=2.12",
    "scipy>=1.11",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8",
        "hypothesis>=6.100",
        "ruff>=0.6",
        "transformers>=4.50",
        "cmake>=3.25",
    ],
    "gpu": ["ninja"],
}


def _extension_modules() -> list:
    """The crop_boxes extension, or none when csrc/ holds no sources yet."""
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpp_sources:
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    # C++20: torch >= 2.10 headers need it. No implicit FMA contraction: the sampling positions follow ATen's
    # rounding (csrc/crop_boxes_geometry.h has the one explicit FMA).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    link_flags = ["-fopenmp"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("SIF_NO_CUDA") != "1"
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("SIF_CUDA_ARCH", "8.0;9.0"))
        return [
            CUDAExtension(
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
        ]
    return [CppExtension("engine._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=link_flags)]


def _build_ext_cmdclass() -> dict:
    ext = _extension_modules()
    if not ext:
        return {"ext_modules": [], "cmdclass": {}}
    from torch.utils.cpp_extension import BuildExtension

    # ninja compiles the sources in parallel where it is installed (the "gpu" extra); plain setuptools otherwise.
    use_ninja = shutil.which("ninja") is not None
    return {"ext_modules": ext, "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}}


setup(
    name="sif-engine",
    version="0.1.0",
    description="A lean training engine for spatially-aware multimodal reasoning (SIFThinker-style GRPO-SIF).",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    package_data={"engine": ["data/bundled/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    **_build_ext_cmdclass(),
)
