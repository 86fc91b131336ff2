"""Find and register the onnxq custom-operator library (``onnxq::MatMulLowBit``) in ONNX Runtime.

``pip install`` builds ``onnxq/lib/libonnxq_ops.so`` (CPU kernels) and, where nvcc exists,
``libonnxq_ops_cuda.so`` (the same CPU kernels plus CUDA kernels).  ``ONNXQ_CUSTOM_OPS_LIBRARY``
overrides the path.  Usage::

    so = onnxq.custom_ops.session_options(intra_op_num_threads=2)
    session = onnxruntime.InferenceSession("model_onnxq.onnx", so, providers=["CPUExecutionProvider"])
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import onnxruntime as ort

from onnxq.errors import OnnxqError

LIBRARY_DIR = Path(__file__).resolve().parent / "lib"
ENV_LIBRARY = "ONNXQ_CUSTOM_OPS_LIBRARY"
DEVICES = ("auto", "cpu", "cuda")
BUILD_STEPS = (
    "set ONNXQ_ORT_INCLUDE=/path/to/onnxruntime/headers or run `python custom_ops/fetch_ort_headers.py`, "
    "then reinstall (`pip install -e .`); see custom_ops/README.md"
)
BUILD_HINT = f"the onnxq custom-op library is not built: {BUILD_STEPS}"


def _file_name(stem: str) -> str:
    suffix = ".dll" if sys.platform == "win32" else (".dylib" if sys.platform == "darwin" else ".so")
    return f"lib{stem}{suffix}"


CPU_LIBRARY = _file_name("onnxq_ops")
CUDA_LIBRARY = _file_name("onnxq_ops_cuda")


def library_path(device: str = "auto") -> str:
    """Path of the library to register.

    ``cpu``: the CPU-only library; ``cuda``: the CPU+CUDA one; ``auto``: the CUDA one when it was built and
    onnxruntime offers ``CUDAExecutionProvider``, else the CPU one.  Raises OnnxqError (with how to build it)
    if the library is missing.
    """
    if device not in DEVICES:
        raise OnnxqError(f"custom-op device {device!r} is not one of {', '.join(DEVICES)}")
    override = os.environ.get(ENV_LIBRARY)
    if override:
        if not Path(override).is_file():
            raise OnnxqError(f"{ENV_LIBRARY}={override} does not exist: point it at a built libonnxq_ops library")
        return override
    cpu, cuda = LIBRARY_DIR / CPU_LIBRARY, LIBRARY_DIR / CUDA_LIBRARY
    if device == "cuda":
        if cuda.is_file():
            return str(cuda)
        raise OnnxqError(f"{cuda} is missing: the CUDA custom-op library is built only where nvcc is installed "
                         "(reinstall onnxq on a machine with the CUDA toolkit)")
    if device == "auto" and cuda.is_file() and "CUDAExecutionProvider" in ort.get_available_providers():
        return str(cuda)
    if cpu.is_file():
        return str(cpu)
    if device == "auto" and cuda.is_file():
        return str(cuda)
    raise OnnxqError(BUILD_HINT)


def available(device: str = "auto") -> bool:
    """True if :func:`library_path` would succeed."""
    try:
        library_path(device)
    except OnnxqError:
        return False
    return True


def custom_op_library_note(device: str = "auto") -> str | None:
    """``None`` when ORT here can load the custom-op library; else a summary note saying the ``onnxq`` format's
    output cannot run on this machine (it is still valid wherever the library is built) and how to build it."""
    try:
        ort.SessionOptions().register_custom_ops_library(library_path(device))
    except OnnxqError as exc:
        reason = "not built" if str(exc) == BUILD_HINT else str(exc)
    except Exception as exc:  # noqa: BLE001 - ORT raises several pybind types
        reason = f"ONNX Runtime cannot load it: {str(exc).splitlines()[0][:200]}"
    else:
        return None
    return (f"ONNX Runtime on this machine cannot run this model: the onnxq custom-op library is unavailable "
            f"({reason}); the model is valid and runs wherever the library is built. To build it: {BUILD_STEPS}")


def session_options(device: str = "auto", **options: object) -> ort.SessionOptions:
    """``onnxruntime.SessionOptions`` with the custom-op library registered; ``options`` set its attributes
    (e.g. ``intra_op_num_threads=2``, ``graph_optimization_level=...``)."""
    so = ort.SessionOptions()
    for name, value in options.items():
        if not hasattr(so, name):
            raise OnnxqError(f"onnxruntime.SessionOptions has no attribute {name!r}")
        setattr(so, name, value)
    so.register_custom_ops_library(library_path(device))
    return so


def cpu_isa(device: str = "auto") -> str:
    """Instruction set the CPU kernels use here by default (``avx512``, ``avx2`` or ``portable``);
    ``ONNXQ_CPU_ISA`` in the environment overrides it per session."""
    library = ctypes.CDLL(library_path(device))
    library.OnnxqBestCpuIsa.restype = ctypes.c_char_p
    return library.OnnxqBestCpuIsa().decode()


def cpu_isa_supported(name: str, device: str = "auto") -> bool:
    """Whether this CPU can run the kernels compiled for ``name`` (``avx512``, ``avx2``, ``portable``)."""
    library = ctypes.CDLL(library_path(device))
    library.OnnxqCpuIsaSupported.argtypes = [ctypes.c_char_p]
    return bool(library.OnnxqCpuIsaSupported(name.encode()))
