"""Build hook: compile the onnxq custom-op library (custom_ops/) with CMake during ``pip install``.

All metadata lives in pyproject.toml.  This file only adds a step to ``build_py`` that builds
``onnxq/lib/libonnxq_ops.so`` (CPU kernels) and, when nvcc is found, ``libonnxq_ops_cuda.so``; and the solvers'
compiled column sweeps ``libonnxq_sweeps.so`` (custom_ops/solver/, no ONNX Runtime headers needed).
Nothing here may break the install: without CMake, a compiler or the ONNX Runtime headers (offline, no
npm registry), onnxq installs without the library and ``onnxq.custom_ops`` explains how to build it.

Environment:
  ONNXQ_BUILD_CUSTOM_OPS=0   skip the native libraries entirely (the solvers then use their numpy sweeps)
  ONNXQ_BUILD_CUDA=0|1       never / always try the CUDA library (default: when nvcc is found)
  ONNXQ_ORT_INCLUDE=DIR      use these ONNX Runtime headers instead of downloading them
  CMAKE_BUILD_PARALLEL_LEVEL build jobs (default: CPU count)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CUSTOM_OPS = ROOT / "custom_ops"
BUILD_DIR = ROOT / "build" / "custom_ops"
SOLVER_SOURCES = CUSTOM_OPS / "solver"
SOLVER_BUILD_DIR = ROOT / "build" / "solver"
LIBRARY_SUFFIX = ".dll" if sys.platform == "win32" else (".dylib" if sys.platform == "darwin" else ".so")
CPU_LIBRARY = f"libonnxq_ops{LIBRARY_SUFFIX}"
CUDA_LIBRARY = f"libonnxq_ops_cuda{LIBRARY_SUFFIX}"
SOLVER_LIBRARY = f"libonnxq_sweeps{LIBRARY_SUFFIX}"


def log(message: str) -> None:
    print(f"[onnxq custom ops] {message}", file=sys.stderr, flush=True)


def ort_include_dir() -> Path:
    spec = importlib.util.spec_from_file_location("onnxq_fetch_ort_headers", CUSTOM_OPS / "fetch_ort_headers.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.resolve_include_dir()


def cmake_executable() -> str | None:
    found = shutil.which("cmake")
    if found:
        return found
    try:
        import cmake  # the PyPI "cmake" package, if the user has it

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return None


def nvcc_executable() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def run(command: list[str]) -> None:
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-25:])
        raise RuntimeError(f"`{' '.join(command[:4])} ...` failed:\n{tail}")


def build_library(configure: list[str], build_dir: Path, target: str, library: str, destination: Path) -> None:
    """Configure and build one CMake ``target`` and copy its ``library`` to ``destination`` (raises on failure)."""
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    run(configure)
    run([configure[0], "--build", str(build_dir), "--target", target, "-j", jobs])
    shutil.copy2(build_dir / library, destination / library)
    log(f"built {destination / library}")


def build_custom_ops(destination: Path) -> None:
    """Build the libraries and copy them to ``destination``; log instead of raising on any failure."""
    if os.environ.get("ONNXQ_BUILD_CUSTOM_OPS", "1") == "0":
        log("skipped (ONNXQ_BUILD_CUSTOM_OPS=0)")
        return
    destination.mkdir(parents=True, exist_ok=True)
    for name in (CPU_LIBRARY, CUDA_LIBRARY):
        (destination / name).unlink(missing_ok=True)  # never leave a stale library behind
    cmake = cmake_executable()
    if not cmake:
        log("not built: CMake not found (install cmake, then reinstall onnxq)")
        return
    try:
        include = ort_include_dir()
    except Exception as exc:  # offline, no registry access, checksum mismatch, ...
        log(f"not built: ONNX Runtime headers unavailable ({exc}); set ONNXQ_ORT_INCLUDE=/path/to/headers "
            "or run `python custom_ops/fetch_ort_headers.py`, then reinstall")
        return
    configure = [cmake, "-S", str(CUSTOM_OPS), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DORT_INCLUDE_DIR={include}", "-DBUILD_TESTING=OFF"]
    try:
        build_library([*configure, "-DONNXQ_WITH_CUDA=OFF"], BUILD_DIR, "onnxq_ops", CPU_LIBRARY, destination)
    except Exception as exc:
        log(f"CPU library not built: {exc}")
        return
    want_cuda = os.environ.get("ONNXQ_BUILD_CUDA")
    nvcc = nvcc_executable()
    if want_cuda == "0" or (want_cuda is None and not nvcc):
        return
    try:
        cuda_flags = [f"-DCMAKE_CUDA_COMPILER={nvcc}"] if nvcc else []
        build_library([*configure, "-DONNXQ_WITH_CUDA=ON", *cuda_flags], BUILD_DIR, "onnxq_ops_cuda", CUDA_LIBRARY,
                      destination)
    except Exception as exc:
        log(f"CUDA library not built (the CPU library is unaffected): {exc}")


def build_solver_kernels(destination: Path) -> None:
    """Build the solvers' compiled column sweeps (no ONNX Runtime headers needed); log instead of raising: without
    them onnxq/solvers/sweeps.py runs its numpy twins, which give the same bits."""
    if os.environ.get("ONNXQ_BUILD_CUSTOM_OPS", "1") == "0":
        return
    destination.mkdir(parents=True, exist_ok=True)
    (destination / SOLVER_LIBRARY).unlink(missing_ok=True)
    cmake = cmake_executable()
    if not cmake:
        log("solver sweeps not built: CMake not found (the numpy sweeps give the same results, slower)")
        return
    try:
        build_library([cmake, "-S", str(SOLVER_SOURCES), "-B", str(SOLVER_BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release"],
                      SOLVER_BUILD_DIR, "onnxq_sweeps", SOLVER_LIBRARY, destination)
    except Exception as exc:
        log(f"solver sweeps not built (the numpy sweeps give the same results, slower): {exc}")


class BuildPyWithCustomOps(build_py):
    """``build_py`` plus the custom-op library: into the source tree for editable installs, else build_lib."""

    def run(self) -> None:
        super().run()
        editable = getattr(self, "editable_mode", False) or getattr(self, "inplace", False)
        destination = ROOT / "onnxq" / "lib" if editable else Path(self.build_lib) / "onnxq" / "lib"
        build_solver_kernels(destination)
        build_custom_ops(destination)


class BinaryDistribution(Distribution):
    """The wheel carries a native library, so it must be platform-tagged."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithCustomOps}, distclass=BinaryDistribution)
