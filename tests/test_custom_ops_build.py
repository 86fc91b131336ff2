"""The custom-op build pieces that need no ONNX Runtime session: the host/device math (run on the CPU with
the CUDA kernels' thread decomposition), the emitter's tensors, the header fetch script, the CUDA library
and the two tools."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxq import custom_ops
from onnxq.errors import OnnxqError
from onnxq.formats.lowbit_layout import DOMAIN, OP_TYPE, emit_matmul_lowbit, lowbit_tensors
from onnxq.packing import unpack_bits
from onnxq.quantized_weight import QuantizedWeight
from onnxq.solvers.rtn import quantize_rtn

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"
sys.path.insert(0, str(ROOT / "custom_ops"))
import fetch_ort_headers  # noqa: E402

sys.path.pop(0)


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def test_host_math_runs_cuda_tile_functions_on_cpu(tmp_path):
    """custom_ops/tests/host_math_test.cc: GEMV lanes and GEMM tiles of the CUDA kernels vs float64, float+half."""
    compiler = _compiler()
    if compiler is None:
        if IN_CI:
            pytest.fail("no C++ compiler in CI")
        pytest.skip("no C++ compiler")
    binary = tmp_path / "host_math_test"
    subprocess.run([compiler, "-std=c++17", "-O1", str(ROOT / "custom_ops/tests/host_math_test.cc"), "-o",
                    str(binary)], check=True, capture_output=True, timeout=300)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
    assert "72/72 cases passed" in result.stdout


def _weight(bits: int, group: int, float_zero: bool, n: int = 12, k: int = 100) -> QuantizedWeight:
    rng = np.random.default_rng(bits * 100 + group)
    return quantize_rtn(rng.standard_normal((n, k)), bits, group, zero_convention="float" if float_zero else "integer")


@pytest.mark.parametrize("float_zero", [False, True])
@pytest.mark.parametrize(("bits", "group"), [(2, 64), (2, 24), (3, 32), (4, 16), (8, 64), (4, 200)])
def test_lowbit_tensors_reproduce_dequantize(bits, group, float_zero):
    weight = _weight(bits, group, float_zero)
    n, k = weight.shape
    group = weight.group_size  # a group wider than K is clipped to K
    packed, scales, zeros = lowbit_tensors(weight)
    groups = -(-k // group)
    assert packed.shape == (n, groups, -(-group * bits // 8)) and packed.dtype == np.uint8
    assert scales.shape == zeros.shape == (n, groups) and scales.dtype == zeros.dtype == np.float32
    codes = unpack_bits(packed, bits, group).reshape(n, groups * group)
    assert not codes[:, k:].any()  # K padded with zero codes
    w = (np.repeat(scales.astype(np.float64), group, 1) * codes + np.repeat(zeros.astype(np.float64), group, 1))
    np.testing.assert_allclose(w[:, :k], weight.dequantize(np.float64), rtol=0, atol=1e-6)


def test_emitter_node_and_initializers():
    weight = _weight(2, 64, True)
    bias = np.arange(12, dtype=np.float64)
    nodes, inits = emit_matmul_lowbit("x", "y", weight, bias, "fc1", np.float16)
    (node,) = nodes
    assert (node.op_type, node.domain, node.name) == (OP_TYPE, DOMAIN, "fc1")
    assert list(node.input) == ["x", "fc1_B", "fc1_scales", "fc1_zeros", "fc1_bias"] and list(node.output) == ["y"]
    assert {a.name: a.i for a in node.attribute} == {"K": 100, "N": 12, "bits": 2, "group_size": 64}
    assert [t.data_type for t in inits] == [2, 10, 10, 10]  # uint8, then float16


def test_emitter_rejects_bad_bias_and_dtype():
    weight = _weight(4, 32, False)
    with pytest.raises(ValueError, match=r"bias must have shape \(12,\)"):
        emit_matmul_lowbit("x", "y", weight, np.zeros(5), "fc", np.float32)
    with pytest.raises(ValueError, match="float32 or float16"):
        emit_matmul_lowbit("x", "y", weight, None, "fc", np.float64)


def test_fetch_rejects_a_tarball_with_the_wrong_checksum(tmp_path, monkeypatch):
    fake = tmp_path / "work" / "fake.tgz"
    fake.parent.mkdir()
    with tarfile.open(fake, "w:gz") as archive:
        archive.add(__file__, arcname="package/README")
    digest = "sha512-" + base64.b64encode(hashlib.sha512(fake.read_bytes()).digest()).decode()
    assert fetch_ort_headers.integrity_of(fake) == digest
    monkeypatch.setattr(fetch_ort_headers, "_download_tarball", lambda workdir: (fake, digest))
    with pytest.raises(fetch_ort_headers.FetchError, match="checksum mismatch"):
        fetch_ort_headers.fetch(tmp_path / "headers")
    assert not (tmp_path / "headers").exists()


def test_include_override_must_hold_the_c_api_header(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXQ_ORT_INCLUDE", str(tmp_path))
    with pytest.raises(fetch_ort_headers.FetchError, match="does not contain onnxruntime_c_api.h"):
        fetch_ort_headers.resolve_include_dir()
    (tmp_path / "onnxruntime_c_api.h").write_text("// stub\n")
    assert fetch_ort_headers.resolve_include_dir() == tmp_path


def test_cuda_library_built_where_nvcc_exists():
    """With nvcc installed, pip install must also have built the CUDA library; it loads without a GPU and its
    CPU kernels work."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)
    if nvcc is None or os.environ.get("ONNXQ_BUILD_CUDA") == "0":
        pytest.skip("no nvcc here: the CUDA library is not built")
    if not custom_ops.available("cuda"):
        if IN_CI or custom_ops.available("cpu"):
            pytest.fail("nvcc is installed but onnxq/lib has no CUDA custom-op library")
        pytest.skip("custom-op libraries not built (no ONNX Runtime headers)")
    import ctypes

    library = ctypes.CDLL(custom_ops.library_path("cuda"))
    assert library.OnnxqHasCuda() == 1
    weight = _weight(2, 64, True, n=16, k=128)
    nodes, inits = emit_matmul_lowbit("A", "Y", weight, None, "fc")
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, 128])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), custom_ops.session_options("cuda"),
                                   providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    ref = a.astype(np.float64) @ weight.dequantize(np.float64).T
    assert np.abs(session.run(None, {"A": a})[0] - ref).max() <= 1e-5 * np.abs(ref).max()


def test_cuda_device_without_library_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(custom_ops, "LIBRARY_DIR", tmp_path)
    monkeypatch.delenv(custom_ops.ENV_LIBRARY, raising=False)
    with pytest.raises(OnnxqError, match="CUDA custom-op library is built only where nvcc is installed"):
        custom_ops.library_path("cuda")


def test_gpu_selftest_says_no_gpu_or_passes(capsys):
    from tools import gpu_selftest

    devices, _ = gpu_selftest.gpu_count()
    if devices:
        pytest.skip("a GPU is present: run `python -m tools.gpu_selftest` for the real check")
    assert gpu_selftest.main([]) == 0
    assert capsys.readouterr().out.startswith("no GPU: ")


def test_gpu_selftest_steps_on_cpu(capsys):
    if not custom_ops.available("cpu"):
        pytest.skip("custom-op library not built")
    from tools import gpu_selftest

    assert gpu_selftest.main(["--cpu-dry-run", "--sizes", "64", "--m", "1", "9", "--repeats", "1"]) == 0
    assert "all results within tolerance" in capsys.readouterr().out


def test_bench_matmul_prints_a_table(capsys):
    if not custom_ops.available("cpu"):
        pytest.skip("custom-op library not built")
    from tools import bench_matmul

    bench_matmul.use_global_thread_pool = lambda threads: None  # the pytest process may already have sessions
    assert bench_matmul.main(["--m", "1", "--sizes", "64", "--groups", "32", "--warmup", "0", "--min-rounds", "1",
                              "--budget", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("| M | K=N | group | fp32 |") and lines[3].startswith("| 1 | 64 | 32 |")


def test_cpp_application_loads_the_library(tmp_path):
    """custom_ops/examples/run_model.cc (the C++ usage in docs/custom_ops.md) against the wheel's libonnxruntime."""
    compiler = _compiler()
    capi = Path(ort.__file__).parent / "capi"
    runtime = sorted(capi.glob("libonnxruntime.so.1.*"))
    if compiler is None or not runtime or not custom_ops.available("cpu"):
        pytest.skip("needs a C++ compiler, a Linux onnxruntime wheel and the built library")
    try:
        include = fetch_ort_headers.resolve_include_dir(allow_download=False)
    except fetch_ort_headers.FetchError:
        pytest.skip("no ONNX Runtime headers")
    (tmp_path / "libonnxruntime.so.1").symlink_to(runtime[0])
    binary = tmp_path / "run_model"
    subprocess.run([compiler, "-std=c++17", "-O1", f"-I{include}", str(ROOT / "custom_ops/examples/run_model.cc"),
                    str(tmp_path / "libonnxruntime.so.1"), f"-Wl,-rpath,{tmp_path}", "-o", str(binary)],
                   check=True, capture_output=True, timeout=600)
    weight = _weight(2, 32, True, n=6, k=96)
    nodes, inits = emit_matmul_lowbit("A", "Y", weight, None, "fc")
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 96])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 6])], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                           ir_version=10), tmp_path / "model.onnx")
    result = subprocess.run([str(binary), custom_ops.library_path("cpu"), str(tmp_path / "model.onnx"), "96"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = np.array([float(v) for v in result.stdout.split()])
    expected = weight.dequantize(np.float64).sum(axis=1)[:4]  # A = ones
    np.testing.assert_allclose(printed, expected, rtol=1e-5, atol=1e-5)
