"""Honest size: float16 storage of scales and float zeros in fp32 models, and bits per weight counting every tensor
a quantized layer uses (codes, scales, zero points, the float-zero term's ``Z`` and its group sums' constants)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import conv_model, gemm_model, matmul_model
from onnx import numpy_helper
from ort_helpers import LEVELS, exact_kernels, relative_error, run
from test_formats import reference_weight

import onnxq
from onnxq import custom_ops
from onnxq.formats.lowbit_layout import lowbit_tensors
from onnxq.ir.targets import find_targets
from onnxq.quantized_size import bits_per_weight, quantized_layers
from onnxq.solvers.base import DecoupleqParams, LayerStats, RtnParams, solve
from onnxq.solvers.grid import off_grid
from onnxq.solvers.hessian import prepare_hessian
from onnxq.solvers.rtn import quantize_rtn

N, K, GROUP = 24, 128, 32
G = K // GROUP
GROUP_SUMS = 8 * 3 + 8  # the group sums' int64 Reshape shape [0, G, GROUP] and ReduceSum axes [1] (K = G·GROUP)
FP16 = onnx.TensorProto.FLOAT16


def _needs_library(fmt: str) -> None:
    if fmt == "onnxq" and not custom_ops.available("cpu"):
        pytest.skip("the onnxq custom-op library is not built")


def _run(model: onnx.ModelProto, feeds: dict, level: str) -> np.ndarray:
    if any(n.domain == "onnxq" for n in model.graph.node):
        options = custom_ops.session_options(device="cpu", intra_op_num_threads=2)
        options.graph_optimization_level = LEVELS[level]
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return run(model, feeds, level)


def _fake_weights(model: onnx.ModelProto) -> list[bytes]:
    return [numpy_helper.to_array(t).tobytes() for t in model.graph.initializer if t.name.endswith("_fakequant")]


def _init_types(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


# ----------------------------------------------------------------------------- storage: exact at every ORT level


@pytest.mark.parametrize("fmt,level", [("matmulnbits", 0), ("matmulnbits", 4), ("qdq", None), ("onnxq", None)])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("zero_convention", ["integer", "float"])
def test_float16_storage_matches_the_dequantized_reference_at_every_level(fmt, level, bits, zero_convention):
    """Scales and float zeros stored in float16 (any bits, asked for explicitly) run as the numpy reference on the
    float16 grid; at accuracy level 4 only ORT_DISABLE_ALL is exact (int8 activations above it)."""
    _needs_library(fmt)
    model = matmul_model(k=K, n=N, seed=bits)
    x = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    w, _ = reference_weight(model, bits, GROUP, zero_convention, storage="float16")
    extra = {} if level is None else {"accuracy_level": level}
    quantized = onnxq.quantize(model, bits=bits, group_size=GROUP, format=fmt, zero_convention=zero_convention,
                               scale_storage="float16", **extra)
    onnx.checker.check_model(quantized, full_check=True)
    assert FP16 in _init_types(quantized).values()
    expected = x.astype(np.float64) @ w.T
    for name in LEVELS:
        tolerance = 1e-5 if level != 4 or name == "disable_all" else 0.02
        assert relative_error(_run(quantized, {"x": x}, name), expected) <= tolerance, name


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_float16_storage_on_gemm_and_conv(fmt):
    """Gemm (alpha 1, bias) and Conv (qdq fallback, with its float-zero DequantizeLinear) store float16 too."""
    gemm = gemm_model(k=96, n=10, trans_b=1, seed=3)
    bias = numpy_helper.to_array(gemm.graph.initializer[1]).astype(np.float64)
    x = np.random.default_rng(4).standard_normal((3, 96)).astype(np.float32)
    w, _ = reference_weight(gemm, 2, GROUP, "float", storage="float16")
    quantized = onnxq.quantize(gemm, bits=2, group_size=GROUP, format=fmt, zero_convention="float",
                               **exact_kernels(fmt))
    for level in LEVELS:
        assert relative_error(run(quantized, {"x": x}, level), x.astype(np.float64) @ w.T + bias) <= 1e-5
    conv = conv_model(cin=8, cout=6, kernel=(3, 3))
    quantized = onnxq.quantize(conv, bits=2, group_size=GROUP, format=fmt, zero_convention="float")
    assert sum(t == FP16 for t in _init_types(quantized).values()) == 2  # scales and -z of the zero half
    fake = onnxq.quantize(conv, bits=2, group_size=GROUP, format="fake", zero_convention="float")
    image = np.random.default_rng(5).standard_normal((1, 8, 9, 9)).astype(np.float32)
    for level in LEVELS:
        assert relative_error(run(quantized, {"x": image}, level), run(fake, {"x": image})) <= 1e-5


def test_storage_defaults_by_bits_and_float32_when_asked():
    """float16 at 2-3 bits, float32 at 4 and 8 bits (unchanged), float32 at 2 bits when asked."""
    model = matmul_model(k=K, n=N)
    for bits, options, expected in ((2, {}, FP16), (3, {}, FP16), (4, {}, onnx.TensorProto.FLOAT),
                                    (8, {}, onnx.TensorProto.FLOAT),
                                    (2, {"scale_storage": "float32"}, onnx.TensorProto.FLOAT)):
        quantized = onnxq.quantize(model, bits=bits, group_size=GROUP, format="qdq", **options)
        assert _init_types(quantized)["w_scale"] == expected, (bits, options)


def test_accuracy_level_4_with_float16_scales_reads_b_through_identity():
    """ORT 1.31's int8 kernel reads Cast-fed scales as zeros at ORT_DISABLE_ALL: B goes through an Identity there
    (ORT then takes its unpacked path), and without it the output would be 0 (checked, so a fixed ORT shows)."""
    model = matmul_model(k=K, n=N)
    x = np.random.default_rng(2).standard_normal((3, K)).astype(np.float32)
    quantized = onnxq.quantize(model, bits=2, group_size=GROUP, format="matmulnbits", accuracy_level=4)
    assert [n.op_type for n in quantized.graph.node] == ["Cast", "Identity", "MatMulNBits"]
    bare = onnx.ModelProto()
    bare.CopyFrom(quantized)
    identity = bare.graph.node[1]
    bare.graph.node[2].input[1] = identity.input[0]
    bare.graph.node.remove(identity)
    assert np.abs(run(bare, {"x": x}, "disable_all")).max() == 0.0  # the ORT behaviour the Identity avoids
    assert np.abs(run(quantized, {"x": x}, "disable_all")).max() > 0.0


# ----------------------------------------------------------------------------- solvers on the float16 grid


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("zero_convention", ["integer", "float"])
def test_rtn_on_the_float16_grid_stays_on_its_grid(bits, zero_convention):
    w = np.random.default_rng(bits).standard_normal((16, 96)) * np.linspace(1e-3, 10, 96)
    qw, _ = solve(w, RtnParams(bits, 32, zero_convention=zero_convention, scale_dtype=np.float16))
    assert not off_grid(w, qw, np.float16).any()
    assert np.array_equal(qw.scales.astype(np.float16).astype(np.float32), qw.scales)


def test_decoupleq_solves_on_the_float16_grid():
    """Every stored parameter is a float16 number, and the reported loss is the stored weight's."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64))
    w = rng.standard_normal((12, 64))
    stats = LayerStats((prepare_hessian(x.T @ x, 0.01, act_order=True),), (None,))
    qw, report = solve(w, DecoupleqParams(2, 16, scale_dtype=np.float16), stats)
    for values in (qw.scales, qw.float_zeros):
        assert np.array_equal(values.astype(np.float16).astype(np.float32), values)
    raw = x.T @ x
    error = w - qw.dequantize(np.float64)
    assert report.loss_method == pytest.approx(float(np.einsum("nk,kl,nl->", error, raw, error)), rel=1e-9)
    assert report.loss_method < report.loss_rtn


# ----------------------------------------------------------------------------- bits per weight: hand counts


def _hand_count(fmt: str, level: int | None, qw_zeros_fp16: bool) -> float:
    """Bytes of the one layer of matmul_model(K, N) at 2 bits, group 32, float zeros, float16 storage."""
    codes = N * K * 2 / 8
    scales = N * G * 2
    sums = GROUP_SUMS  # shared by every layer reading the activation
    if fmt == "matmulnbits":
        return codes + scales + N * int(np.ceil(G * 2 / 8)) + N * G * 2 + sums
    if fmt == "qdq":
        return codes + scales + N * G * 2 / 8 + N * G * 2 + sums
    return codes + scales + N * G * (2 if qw_zeros_fp16 else 4)  # onnxq: z − s·zp carried by the op


@pytest.mark.parametrize("fmt,level", [("matmulnbits", 0), ("matmulnbits", 4), ("qdq", None), ("onnxq", None)])
def test_bits_per_weight_is_a_hand_count(fmt, level):
    model = matmul_model(k=K, n=N, seed=7)
    extra = {} if level is None else {"accuracy_level": level}
    quantized, summary = onnxq.quantize_with_summary(model, bits=2, group_size=GROUP, format=fmt,
                                                     zero_convention="float", **extra)
    target = find_targets(model).targets[0]
    w = target.matrix_from_initializer(numpy_helper.to_array(model.graph.initializer[0])).astype(np.float64)
    _, _, zeros = lowbit_tensors(quantize_rtn(w, 2, GROUP, zero_convention="float", scale_dtype=np.float16),
                                 np.float64)
    zeros_fp16 = np.array_equal(zeros.astype(np.float16).astype(np.float32), zeros.astype(np.float32))
    expected = _hand_count(fmt, level, zeros_fp16)
    (layer,) = quantized_layers(quantized)
    assert layer.bytes == expected
    assert layer.bits_per_weight == pytest.approx(8 * expected / (N * K))
    assert summary.bits_per_weight == pytest.approx(8 * expected / (N * K))
    assert f"{8 * expected / (N * K):.2f} bits per weight all-in" in "\n".join(summary.lines())
    (row,) = onnxq.inspect(quantized).rows  # the float-zero term's MatMuls are the layer's, not float layers
    assert row.state == "quantized" and row.bits_per_weight == pytest.approx(8 * expected / (N * K))


def test_shared_tensors_are_split_between_layers():
    """Two layers reading one activation share its group sums: each counts half of their constants, the total
    counts them once."""
    model = matmul_model(k=K, n=N)
    graph = model.graph
    w2 = numpy_helper.from_array(np.random.default_rng(3).standard_normal((K, N)).astype(np.float32), "w2")
    graph.initializer.append(w2)
    graph.node.append(onnx.helper.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2"))
    graph.output.append(onnx.helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, ["M", N]))
    quantized = onnxq.quantize(model, bits=2, group_size=GROUP, format="qdq", zero_convention="float")
    layers = quantized_layers(quantized)
    assert len(layers) == 2
    one = N * K * 2 / 8 + N * G * 2 + N * G * 2 / 8 + N * G * 2
    assert [layer.bytes for layer in layers] == [one + GROUP_SUMS / 2] * 2
    assert bits_per_weight(layers) == pytest.approx(8 * (2 * one + GROUP_SUMS) / (2 * N * K))


# ----------------------------------------------------------------------------- convert keeps the storage


@pytest.mark.parametrize("source,chain", [("matmulnbits", ("qdq", "matmulnbits")), ("qdq", ("matmulnbits", "qdq")),
                                          ("matmulnbits", ("onnxq",)), ("onnxq", ("qdq", "matmulnbits"))])
def test_convert_reads_float16_storage_back_exactly(source, chain):
    """Cast-fed float16 scales and zeros (and MatMulNBits' Identity-fed B at accuracy level 4) read back bit for bit,
    and every format re-emits them in float16, exact at every ORT level (MatMulNBits at level 0).  Between
    MatMulNBits and qdq the round trip keeps the size; the onnxq op carries ``z − s·zp``, which float16 rarely
    holds exactly, so after it the float zeros are float32 (the same weights, 0.5 bit more at g32)."""
    _needs_library("onnxq")
    model = matmul_model(k=K, n=N, seed=5)
    quantized = onnxq.quantize(model, bits=2, group_size=GROUP, format=source, zero_convention="float",
                               **({"accuracy_level": 4} if source == "matmulnbits" else {}))
    fake = onnxq.quantize(model, bits=2, group_size=GROUP, format="fake", zero_convention="float")
    x = np.random.default_rng(6).standard_normal((2, K)).astype(np.float32)
    reference = _fake_weights(onnxq.convert(quantized, format="fake"))
    assert reference == _fake_weights(fake) or source == "onnxq"
    current = quantized
    for fmt in chain:
        current = onnxq.convert(current, format=fmt, accuracy_level=0 if fmt == "matmulnbits" else None)
        assert _fake_weights(onnxq.convert(current, format="fake")) == reference, fmt
        assert FP16 in _init_types(current).values(), fmt
        for level in LEVELS:
            assert relative_error(_run(current, {"x": x}, level), _run(quantized, {"x": x}, "disable_all")) <= 1e-5
    if "onnxq" not in (source, *chain):
        assert bits_per_weight(quantized_layers(current)) == bits_per_weight(quantized_layers(quantized))
