"""Every format × bits on MatMul, Gemm and Conv equals the numpy dequantized reference at every ORT level."""

import numpy as np
import onnx
import pytest
import torch
from graphs import conv_model, gemm_model, left_matmul_model, matmul_model
from onnx import numpy_helper
from ort_helpers import LEVELS, exact_kernels, relative_error, run

import onnxq
from onnxq.config import default_scale_storage
from onnxq.ir.targets import find_targets
from onnxq.solvers.grouping import resolve_group_size
from onnxq.solvers.rtn import quantize_rtn

FORMATS = ["fake", "qdq", "matmulnbits"]
BITS = [2, 3, 4, 8]
TOLERANCE = 1e-5


def reference_weight(model, bits, group_size, zero_convention="integer", symmetric=False, storage=None):
    """W[N, K] dequantized by the numpy solver, independent of any emitter, with scales on the grid of ``storage``
    (default: what onnxq stores at ``bits``, float16 at 2-3 bits)."""
    target = find_targets(model).targets[0]
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[target.weight_name]
    w = target.matrix_from_initializer(init).astype(np.float64)
    scale_dtype = np.dtype(storage or default_scale_storage(bits)).type
    qw = quantize_rtn(w, bits, resolve_group_size(w.shape[1], group_size), symmetric, zero_convention,
                      scale_dtype=scale_dtype)
    return qw.dequantize(np.float64), init


def check_all_levels(quantized, feeds, expected):
    onnx.checker.check_model(quantized, full_check=True)
    for level in LEVELS:
        got = run(quantized, feeds, level)
        assert got.shape == expected.shape
        assert relative_error(got, expected) <= TOLERANCE, level


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("zero_convention", ["integer", "float"])
def test_matmul(fmt, bits, zero_convention):
    model = matmul_model(k=100, n=24, seed=bits)
    x = np.random.default_rng(1).standard_normal((5, 100)).astype(np.float32)
    w, _ = reference_weight(model, bits, 32, zero_convention)
    quantized = onnxq.quantize(model, bits=bits, group_size=32, format=fmt, zero_convention=zero_convention,
                               **exact_kernels(fmt))
    check_all_levels(quantized, {"x": x}, x.astype(np.float64) @ w.T)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", [2, 4])
def test_matmul_through_transpose_3d_input_and_per_channel(fmt, bits):
    model = matmul_model(k=64, n=16, seed=3, transpose=True, rank=3)
    x = np.random.default_rng(2).standard_normal((2, 3, 64)).astype(np.float32)
    w, _ = reference_weight(model, bits, -1)
    quantized = onnxq.quantize(model, bits=bits, group_size=-1, format=fmt, **exact_kernels(fmt))
    check_all_levels(quantized, {"x": x}, x.astype(np.float64) @ w.T)
    assert not any(n.op_type == "Transpose" for n in quantized.graph.node) or fmt == "fake"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("zero_convention", ["integer", "float"])
def test_constant_left_operand(fmt, zero_convention):
    model = left_matmul_model(k=64, n=12)
    x = np.random.default_rng(2).standard_normal((2, 64, 5)).astype(np.float32)
    w, _ = reference_weight(model, 2, 32, zero_convention)
    quantized = onnxq.quantize(model, bits=2, group_size=32, format=fmt, zero_convention=zero_convention,
                               **exact_kernels(fmt))
    check_all_levels(quantized, {"x": x}, np.einsum("nk,bkc->bnc", w, x.astype(np.float64)))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm(fmt, bits, trans_b):
    model = gemm_model(k=96, n=10, trans_b=trans_b, seed=bits, alpha=0.75, beta=1.5)
    bias = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    x = np.random.default_rng(4).standard_normal((3, 96)).astype(np.float32)
    w, _ = reference_weight(model, bits, 32, "float")
    quantized = onnxq.quantize(model, bits=bits, group_size=32, format=fmt, zero_convention="float",
                               **exact_kernels(fmt))
    check_all_levels(quantized, {"x": x}, 0.75 * x.astype(np.float64) @ w.T + 1.5 * bias)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kernel,group", [((3, 3), 1), ((3, 3), 2), ((5,), 1)])
def test_conv(fmt, bits, kernel, group):
    model = conv_model(cin=4, cout=6, kernel=kernel, group=group, seed=bits)
    bias = torch.from_numpy(numpy_helper.to_array(model.graph.initializer[1]).copy()).double()
    x = np.random.default_rng(5).standard_normal((2, 4, *[9] * len(kernel))).astype(np.float32)
    w, init = reference_weight(model, bits, 16, "float")
    conv = torch.nn.functional.conv2d if len(kernel) == 2 else torch.nn.functional.conv1d
    expected = conv(torch.from_numpy(x).double(), torch.from_numpy(w.reshape(init.shape)), bias, padding=kernel[0] // 2,
                    groups=group).numpy()
    quantized, summary = onnxq.quantize_with_summary(model, bits=bits, group_size=16, format=fmt,
                                                     zero_convention="float")
    check_all_levels(quantized, {"x": x}, expected)
    if fmt == "matmulnbits":
        assert any("Conv is not supported by MatMulNBits; emitted as qdq" in n for n in summary.notes)


@pytest.mark.parametrize("fmt", FORMATS)
def test_float16_model(fmt):
    model = matmul_model(k=128, n=32, seed=7, dtype=np.float16)
    x = np.random.default_rng(6).standard_normal((4, 128)).astype(np.float16)
    quantized = onnxq.quantize(model, bits=4, group_size=64, format=fmt)
    scales = [t for t in quantized.graph.initializer if t.name.endswith("_scale")]
    assert fmt == "fake" or (scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales))
    fake = onnxq.quantize(model, bits=4, group_size=64, format="fake")
    expected = run(fake, {"x": x}).astype(np.float64)
    for level in LEVELS:
        got = run(quantized, {"x": x}, level)
        assert got.dtype == np.float16
        assert relative_error(got, expected) <= 2e-3  # fp16 output rounding


def test_matmulnbits_accuracy_level_4_is_close_not_exact():
    model = matmul_model(k=256, n=64, seed=8)
    x = np.random.default_rng(7).standard_normal((1, 256)).astype(np.float32)
    w, _ = reference_weight(model, 2, 64)
    quantized = onnxq.quantize(model, bits=2, group_size=64, format="matmulnbits", accuracy_level=4)
    err = relative_error(run(quantized, {"x": x}), x.astype(np.float64) @ w.T)
    assert err < 0.02  # int8 activations: close, documented as not exact


@pytest.mark.parametrize("n", [1, 3, 6, 8, 12])
def test_qdq_two_bit_survives_ort_fusion(n):
    """ORT 1.31 fuses uint2 DequantizeLinear→MatMul wrongly when N % 4 != 0; onnxq must stay exact."""
    model = matmul_model(k=64, n=n, seed=n)
    x = np.random.default_rng(8).standard_normal((3, 64)).astype(np.float32)
    w, _ = reference_weight(model, 2, 32)
    quantized = onnxq.quantize(model, bits=2, group_size=32, format="qdq")
    err = relative_error(run(quantized, {"x": x}, "enable_all"), x.astype(np.float64) @ w.T)
    assert err <= TOLERANCE
    codes = next(t for t in quantized.graph.initializer if t.name.endswith("_quant"))
    expected_type = onnx.TensorProto.UINT2 if n % 4 == 0 else onnx.TensorProto.UINT4
    assert codes.data_type == expected_type


def test_enable_all_without_session_option_is_approximate():
    """Pins ORT's behaviour: without session.qdq_matmulnbits_accuracy_level=0 the fused QDQ MatMul is inexact."""
    model = matmul_model(k=256, n=64, seed=9)
    x = np.random.default_rng(9).standard_normal((4, 256)).astype(np.float32)
    w, _ = reference_weight(model, 4, 64)
    quantized = onnxq.quantize(model, bits=4, group_size=64, format="qdq")
    expected = x.astype(np.float64) @ w.T
    assert relative_error(run(quantized, {"x": x}, "enable_all", config={}), expected) > TOLERANCE
    assert relative_error(run(quantized, {"x": x}, "enable_all"), expected) <= TOLERANCE


def _custom_op_session_options():
    import os

    from onnxq import custom_ops

    if not custom_ops.available():
        if os.environ.get("CI") == "true":
            raise AssertionError("the custom-op library must be built in CI")
        pytest.skip("custom-op library not built (see onnxq.custom_ops)")
    return custom_ops.session_options()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("zero_convention", ["integer", "float"])
@pytest.mark.parametrize("case", ["matmul", "gemm", "left", "conv"])
def test_onnxq_custom_op_format_matches_fake(bits, zero_convention, case):
    import onnxruntime as ort

    options = _custom_op_session_options()
    rng = np.random.default_rng(bits)
    model, x = {
        "matmul": (matmul_model(k=100, n=24, rank=3), rng.standard_normal((2, 3, 100))),
        "gemm": (gemm_model(k=96, n=10, trans_b=0, alpha=0.5, beta=2.0), rng.standard_normal((3, 96))),
        "left": (left_matmul_model(k=64, n=8), rng.standard_normal((2, 64, 5))),
        "conv": (conv_model(cin=4, cout=6, kernel=(3, 3)), rng.standard_normal((2, 4, 9, 9))),
    }[case]
    feeds = {"x": x.astype(np.float32)}
    options_kwargs = dict(bits=bits, group_size=32, zero_convention=zero_convention)
    quantized = onnxq.quantize(model, format="onnxq", **options_kwargs)
    onnx.checker.check_model(quantized)
    expected = run(onnxq.quantize(model, format="fake", **options_kwargs), feeds)
    got = ort.InferenceSession(quantized.SerializeToString(), options,
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert relative_error(got, expected) <= TOLERANCE
    uses_op = any(n.op_type == "MatMulLowBit" for n in quantized.graph.node)
    assert uses_op == (case != "conv")


@pytest.mark.parametrize("k,group_size", [(384, -1), (1536, -1), (1024, 512)])
def test_matmulnbits_large_groups_use_blocks_ort_accepts(k, group_size):
    """ORT refuses MatMulNBits blocks above 256: per-channel/large groups repeat their scale per block."""
    model = matmul_model(k=k, n=8, seed=k)
    x = np.random.default_rng(3).standard_normal((2, k)).astype(np.float32)
    w, _ = reference_weight(model, 2, group_size)
    quantized = onnxq.quantize(model, bits=2, group_size=group_size, format="matmulnbits", accuracy_level=0)
    node = next(n for n in quantized.graph.node if n.op_type == "MatMulNBits")
    assert next(a.i for a in node.attribute if a.name == "block_size") <= 256
    check_all_levels(quantized, {"x": x}, x.astype(np.float64) @ w.T)
