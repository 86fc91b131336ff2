"""onnxq's float-zero term: exact at every ORT level, small, and read back in its current and its old form.

``tests/data/float_zero_v0`` holds models made by onnxq 0.1.0 (commit fd8d1be) from the graphs below, 2-3 KB each:
MatMul/Gemm layers whose term is ``(A·E)·Zᵀ`` with the float ``[K, G]`` group indicator ``E`` stored (left
products ``Z·(Eᵀ·X)``), and a Conv whose ``z`` is a second DequantizeLinear of all-zero codes (zero point 1, scale
``−z``).  ``onnxq convert`` must give back the solver's weights exactly, ``onnxq.quantized_size`` must count every
tensor those layers use, and converting re-emits the current form.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from graphs import conv_model, gemm_model, left_matmul_model, matmul_model
from onnx import numpy_helper
from ort_helpers import EXACT_QDQ_CONFIG, LEVELS, exact_kernels, relative_error, run
from test_convert import float_weights

import onnxq
from onnxq.config import default_scale_storage
from onnxq.ir.model import model_bytes, tensor_nbytes
from onnxq.ir.targets import find_targets
from onnxq.quantized_size import quantized_layers
from onnxq.quantized_weight import num_groups
from onnxq.solvers.rtn import quantize_rtn

OLD = Path(__file__).resolve().parent / "data" / "float_zero_v0"
CASES = {  # name: (float model, quantize options) as the fixtures were made (zero_convention="float")
    "matmul": (lambda: matmul_model(k=100, n=24, seed=2), {"bits": 2, "group_size": 32}),
    "left": (lambda: left_matmul_model(k=64, n=12), {"bits": 2, "group_size": 32}),
    "gemm": (lambda: gemm_model(k=96, n=10, trans_b=1, seed=4, alpha=0.75, beta=1.5), {"bits": 4, "group_size": 32}),
    "conv": (lambda: conv_model(cin=4, cout=6, kernel=(3, 3), group=1, seed=2), {"bits": 2, "group_size": 16}),
}
FIXTURES = [(case, fmt) for case in CASES for fmt in ("matmulnbits", "qdq") if (case, fmt) != ("conv", "matmulnbits")]
BIASES = ("b", "c", "gemm_bias")  # the float model's own tensors (not counted as a quantized layer's)


def _feeds(case: str) -> dict[str, np.ndarray]:
    shape = {"matmul": (3, 100), "left": (2, 64, 5), "gemm": (3, 96), "conv": (2, 4, 9, 9)}[case]
    return {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _quantize(case: str, fmt: str) -> onnx.ModelProto:
    make, options = CASES[case]
    return onnxq.quantize(make(), format=fmt, zero_convention="float", **options, **exact_kernels(fmt))


@pytest.mark.parametrize("case,fmt", FIXTURES)
def test_old_form_reads_back_bit_exact(case, fmt):
    """The old model reads back as the same model made now (the solver's weights; Gemm's ``alpha·z`` divided by
    ``alpha`` as before), so converting either gives the same bytes, in the current form."""
    old = onnx.load(OLD / f"{case}_{fmt}.onnx")
    new = _quantize(case, fmt)
    assert float_weights(old) == float_weights(new)
    if case != "gemm":
        assert float_weights(old) == float_weights(_quantize(case, "fake"))
    for target in ("matmulnbits", "qdq"):
        converted = onnxq.convert(old, format=target, **exact_kernels(target))
        assert converted.SerializeToString() == onnxq.convert(new, format=target,
                                                              **exact_kernels(target)).SerializeToString()
        assert not any(t.name.startswith("onnxq_group_sum") for t in converted.graph.initializer)
        for level in LEVELS:
            want = run(_quantize(case, target), _feeds(case), level)
            assert relative_error(run(converted, _feeds(case), level), want) <= 1e-6, (target, level)


@pytest.mark.parametrize("case,fmt", FIXTURES)
def test_old_form_is_counted_whole(case, fmt):
    """Every tensor of an old-form layer but the float model's bias counts, ``E`` included."""
    old = onnx.load(OLD / f"{case}_{fmt}.onnx")
    (layer,) = quantized_layers(old)
    inits = {t.name: t for t in old.graph.initializer}
    assert set(layer.tensors) == set(inits) - set(BIASES)
    assert layer.bytes == model_bytes(old) - sum(tensor_nbytes(inits[b]) for b in BIASES if b in inits)


# ----------------------------------------------------------------------------- the current form


ALL_LEVELS = {**LEVELS, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}


def _run_at(model: onnx.ModelProto, feeds: dict, level: str) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ALL_LEVELS[level]
    options.intra_op_num_threads = 2
    for key, value in EXACT_QDQ_CONFIG.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _reference(case: str, feeds: dict) -> np.ndarray:
    """The layer on the solver's dequantized weights ``s·(q − zp) + z``, in float64 (Gemm's alpha and bias, Conv's
    bias and padding through torch)."""
    make, options = CASES[case]
    model = make()
    target = find_targets(model).targets[0]
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = target.matrix_from_initializer(init[target.weight_name]).astype(np.float64)
    qw = quantize_rtn(w, options["bits"], options["group_size"], zero_convention="float",
                      scale_dtype=np.dtype(default_scale_storage(options["bits"])).type)
    w = qw.dequantize(np.float64)
    x = feeds["x"].astype(np.float64)
    if case == "left":
        return np.einsum("nk,bkc->bnc", w, x)
    if case == "gemm":
        return 0.75 * x @ w.T + 1.5 * init["c"].astype(np.float64)
    if case == "conv":
        weight = torch.from_numpy(w.reshape(init["w"].shape))
        return torch.nn.functional.conv2d(torch.from_numpy(x), weight, torch.from_numpy(init["b"].copy()).double(),
                                          padding=1).numpy()
    return x @ w.T


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("case", list(CASES))
def test_current_form_is_exact_at_every_level(case, fmt):
    """Nothing ``[K, G]`` or ``[N, K]`` is stored for the float zeros, and the layer matches the float64 reference
    at ORT_DISABLE_ALL, BASIC, EXTENDED and ALL."""
    quantized = _quantize(case, fmt)
    onnx.checker.check_model(quantized, full_check=True)
    n, k = find_targets(CASES[case][0]()).targets[0].matrix_shape
    big = [t.name for t in quantized.graph.initializer if "float_zero" in t.name or t.name.startswith("onnxq_group")
           if np.prod(t.dims) > n * num_groups(k, CASES[case][1]["group_size"])]
    assert not big
    feeds = _feeds(case)
    expected = _reference(case, feeds)
    for level in ALL_LEVELS:
        assert relative_error(_run_at(quantized, feeds, level), expected) <= 1e-5, level


@pytest.mark.parametrize("opset", [10, 12])
def test_older_opsets_take_pads_and_axes_as_attributes(opset):
    """Pad's pads (opset < 11) and ReduceSum's axes (opset < 13) are attributes there; still exact, read back."""
    make, options = CASES["matmul"]
    model = make()
    model.opset_import[0].version = opset
    quantized = onnxq.quantize(model, format="matmulnbits", zero_convention="float", accuracy_level=0, **options)
    onnx.checker.check_model(quantized, full_check=True)
    reduce = next(n for n in quantized.graph.node if n.op_type == "ReduceSum")
    assert len(reduce.input) == 1 and [a.name for a in reduce.attribute] == ["axes", "keepdims"]
    assert any(n.op_type == "Pad" and len(n.input) == (1 if opset < 11 else 2) for n in quantized.graph.node)
    feeds = _feeds("matmul")
    for level in ALL_LEVELS:
        assert relative_error(_run_at(quantized, feeds, level), _reference("matmul", feeds)) <= 1e-5, level
    assert float_weights(quantized) == float_weights(_quantize("matmul", "fake"))


def test_unknown_rank_keeps_the_indicator_form():
    """An activation of unknown rank cannot be reshaped into groups: the term multiplies by ``E`` (noted), exact,
    and it reads back."""
    make, options = CASES["matmul"]
    model = make()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    quantized, summary = onnxq.quantize_with_summary(model, format="qdq", zero_convention="float", **options)
    assert any("float-zero term uses a [K, G] group indicator" in note for note in summary.notes)
    assert any(t.name.startswith("onnxq_group_sum_100_32") for t in quantized.graph.initializer)
    feeds = _feeds("matmul")
    for level in ALL_LEVELS:
        assert relative_error(_run_at(quantized, feeds, level), _reference("matmul", feeds)) <= 1e-5, level
    assert float_weights(quantized) == float_weights(_quantize("matmul", "fake"))
    (layer,) = quantized_layers(quantized)
    assert layer.bytes == model_bytes(quantized)


def test_float16_model_with_float_zeros():
    """In an fp16 model the group sums run in float16 like the product (fp16 output rounding)."""
    model = matmul_model(k=100, n=24, seed=7, dtype=np.float16)
    x = np.random.default_rng(6).standard_normal((4, 100)).astype(np.float16)
    fake = onnxq.quantize(model, bits=2, group_size=32, format="fake", zero_convention="float")
    expected = run(fake, {"x": x}).astype(np.float64)
    for fmt in ("matmulnbits", "qdq"):
        quantized = onnxq.quantize(model, bits=2, group_size=32, format=fmt, zero_convention="float",
                                   **exact_kernels(fmt))
        assert any(n.op_type == "ReduceSum" for n in quantized.graph.node)
        for level in ALL_LEVELS:
            got = _run_at(quantized, {"x": x}, level)
            assert got.dtype == np.float16
            assert relative_error(got, expected) <= 2e-3, (fmt, level)
        assert float_weights(onnxq.convert(quantized, format="fake")) == float_weights(fake)
