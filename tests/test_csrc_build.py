"""The native sources build outside setup.py too: nvcc compiles the CUDA kernels (no GPU needed, so a CUDA
syntax or type error cannot land from a CPU machine), and CMake builds csrc/ against libtorch and runs the C++
test with ctest. Each test skips, saying why, when its tool is missing."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

ROOT = Path(__file__).resolve().parents[1]


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _run(cmd: list[str], timeout: float) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    output = f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{output}"


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu")))
def test_cuda_sources_compile_with_nvcc(source: str, tmp_path: Path) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH) - the CUDA sources were not compiled")
    flags = [
        "-std=c++20",
        "-O2",
        "-DSIF_WITH_CUDA",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        # sm_80, the oldest architecture setup.py builds for: catches intrinsics that newer chips only have.
        "-gencode=arch=compute_80,code=sm_80",
        "-Xcompiler=-fPIC",
        *COMMON_NVCC_FLAGS,
        *(f"-I{p}" for p in include_paths()),
    ]
    if torch.version.cuda is None:
        # A CPU-only torch ships the c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h;
        # this torch-provided switch skips it (it only holds Windows export macros).
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    _run([nvcc, "-c", str(ROOT / "csrc" / "cuda" / source), "-o", str(tmp_path / "out.o"), *flags], timeout=600)
    assert (tmp_path / "out.o").stat().st_size > 0


@pytest.mark.slow
def test_cmake_builds_and_ctest_passes(tmp_path: Path) -> None:
    cmake, ctest = shutil.which("cmake"), shutil.which("ctest")
    if cmake is None or ctest is None:
        pytest.skip("cmake/ctest not found (pip install cmake) - the CMake build was not tried")
    build = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
    # The .cu files are compiled by the nvcc test above; here only the libtorch build and the C++ test.
    configure += [f"-DPython3_EXECUTABLE={sys.executable}", "-DSIF_COMPILE_CUDA=OFF"]
    _run(configure, timeout=300)
    _run([cmake, "--build", str(build), "-j", str(max(os.cpu_count() or 1, 1))], timeout=900)
    _run([ctest, "--test-dir", str(build), "--output-on-failure"], timeout=300)
