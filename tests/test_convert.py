"""``onnxq convert``: a quantized model re-emitted in another format keeps its dequantized weights bit for bit.

The weights are compared through the ``fake`` format: ``quantize(format="fake")`` stores the solver's
``s·(q − zp) + z`` as float, and ``convert(model, format="fake")`` stores what a quantized model's layers hold,
so equal float initializers mean equal dequantized weights.  ORT outputs are compared with direct quantization to
the target format at ORT_DISABLE_ALL and ORT_ENABLE_ALL.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from ort_helpers import EXACT_QDQ_CONFIG, LEVELS, exact_kernels, relative_error
from test_cli import assert_one_line_error, onnxq_cli

import onnxq
from onnxq import custom_ops
from onnxq.demo import builtin_model, builtin_test_set, data_path
from onnxq.ir.model import save_model

FORMATS = ("matmulnbits", "qdq", "onnxq")
CALIB = data_path("digits_calib.npz")
FEEDS = {"mlp": "pixels", "cnn": "image"}


@functools.cache
def direct(model: str, bits: int, method: str, fmt: str) -> onnx.ModelProto:
    """Quantized in ``fmt``; MatMulNBits with exact fp32 activations (level 0), as this file compares weights."""
    options = {"calibration": CALIB, "sequential": False} if method == "decoupleq" else {}
    options |= exact_kernels(fmt)
    return onnxq.quantize(builtin_model(model), bits=bits, group_size=32, method=method, format=fmt, **options)



def float_weights(model: onnx.ModelProto) -> dict[str, bytes]:
    """``{weight: bytes}`` of the dequantized weights of ``model`` in ``fake`` format (``<weight>_fakequant``)."""
    is_fake = '"format": "fake"' in {p.key: p.value for p in model.metadata_props}.get("onnxq.quantize", "")
    fake = model if is_fake else onnxq.convert(model, format="fake")
    return {t.name: numpy_helper.to_array(t).tobytes() for t in fake.graph.initializer
            if t.name.endswith("_fakequant")}


def without_opset(model: onnx.ModelProto) -> bytes:
    """The model's bytes but for its opset, IR version and value_info (ONNX's version converter adds them)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.opset_import[:], copy.graph.value_info[:]
    copy.ir_version = 0
    return copy.SerializeToString()


def outputs(model: onnx.ModelProto, feeds: dict, level: str) -> np.ndarray:
    uses_custom_op = any(n.domain == "onnxq" for n in model.graph.node)
    if uses_custom_op:
        if not custom_ops.available():
            if os.environ.get("CI") == "true":
                raise AssertionError("the custom-op library must be built in CI")
            pytest.skip("custom-op library not built (see onnxq.custom_ops)")
        options = custom_ops.session_options()
    else:
        options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = 2
    for key, value in EXACT_QDQ_CONFIG.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def has_float_zeros(model: onnx.ModelProto) -> bool:
    return any(n.name.endswith("_add_float_zero") for n in model.graph.node)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("method", ["rtn", "decoupleq"])
@pytest.mark.parametrize("source", FORMATS)
def test_convert_keeps_the_dequantized_weights(model, bits, method, source):
    quantized = direct(model, bits, method, source)
    lossy_zeros = method == "decoupleq"  # MatMulLowBit stores z − s·zp rounded to float: read (and compared) as is
    if source != "onnxq" or not lossy_zeros:  # the reader gives back the solver's weights exactly
        assert float_weights(quantized) == float_weights(direct(model, bits, method, "fake"))
    inputs = builtin_test_set(model)[0][:64]
    for target in FORMATS:
        converted, summary = onnxq.convert_with_summary(quantized, format=target, **exact_kernels(target))
        assert summary.layers == 3 and summary.format == target
        onnx.checker.check_model(converted)
        from_source = source == "onnxq" and lossy_zeros
        # the weights as the target format stores them: the direct quantization's, or the onnxq source's own
        expected = float_weights(quantized if from_source else direct(model, bits, method, target))
        assert float_weights(converted) == expected, target
        reference = direct(model, bits, method, target)
        if target == source or (not from_source and {source, target} <= {"matmulnbits", "onnxq"}):
            assert converted.SerializeToString() == reference.SerializeToString(), target
        elif source == "qdq":  # the float nodes are the original ones: same graph (opset stays)
            assert without_opset(converted) == without_opset(reference), target
        if from_source and target != "onnxq":
            assert has_float_zeros(converted)
        for level in ("disable_all", "enable_all"):
            got = outputs(converted, {FEEDS[model]: inputs}, level)
            want = outputs(reference, {FEEDS[model]: inputs}, level)
            assert relative_error(got, want) <= (1e-5 if from_source else 1e-6), (target, level)


def test_convert_is_deterministic_and_round_trips():
    quantized = direct("mlp", 4, "decoupleq", "matmulnbits")
    first = onnxq.convert(quantized, format="qdq")
    assert onnxq.convert(quantized, format="qdq").SerializeToString() == first.SerializeToString()
    back = onnxq.convert(first, format="matmulnbits")
    assert float_weights(back) == float_weights(quantized)
    assert without_opset(back) == without_opset(quantized)


def test_per_channel_and_three_bit_come_back_as_solved():
    """MatMulNBits repeats a per-channel scale over blocks and stores 3-bit codes in 4 bits: the metadata's
    group size and bits are found again (the qdq output equals direct qdq quantization)."""
    for bits, group_size in ((3, 32), (4, -1)):
        model = builtin_model("mlp")
        nbits = onnxq.quantize(model, bits=bits, group_size=group_size, format="matmulnbits")
        qdq = onnxq.quantize(model, bits=bits, group_size=group_size, format="qdq")
        converted = onnxq.convert(nbits, format="qdq")
        assert float_weights(converted) == float_weights(qdq)
        blocks = {n.name: onnx.helper.get_attribute_value(n.attribute[1]) for n in converted.graph.node
                  if n.op_type == "DequantizeLinear"}
        assert blocks == {n.name: onnx.helper.get_attribute_value(n.attribute[1]) for n in qdq.graph.node
                          if n.op_type == "DequantizeLinear"}


@pytest.mark.real
def test_minilm_w4_g64_converts_exactly(tmp_path):
    from models import minilm  # noqa: PLC0415 - a models/ recipe, built on demand

    path = minilm.build_minilm()
    quantized = {fmt: onnxq.quantize(path, bits=4, group_size=64, format=fmt) for fmt in (*FORMATS, "fake")}
    expected = float_weights(quantized["fake"])
    feeds = {name: np.ones((1, 12), dtype=np.int64) for name in minilm.INPUT_NAMES}
    feeds["input_ids"] = np.arange(100, 112, dtype=np.int64)[None]
    for source in FORMATS:
        for target in FORMATS:
            converted, summary = onnxq.convert_with_summary(quantized[source], format=target, **exact_kernels(target))
            assert summary.layers == 36
            assert float_weights(converted) == expected, (source, target)
            if source == target or {source, target} <= {"matmulnbits", "onnxq"} or source == "qdq":
                assert without_opset(converted) == without_opset(quantized[target]), (source, target)
            if target != "onnxq":
                for level in ("disable_all", "enable_all"):
                    got = outputs(converted, feeds, level)
                    assert relative_error(got, outputs(quantized[target], feeds, level)) <= 1e-6


def test_cli_convert_prints_a_summary(tmp_path):
    source, out = tmp_path / "q.onnx", tmp_path / "q.qdq.onnx"
    save_model(direct("cnn", 2, "decoupleq", "matmulnbits"), source)
    result = onnxq_cli("convert", str(source), "-o", str(out), "--format", "qdq")
    assert result.returncode == 0, result.stderr
    assert "converted 3 layers from matmulnbits to qdq in" in result.stdout and "weights:" in result.stdout
    assert float_weights(onnx.load(str(out))) == float_weights(direct("cnn", 2, "decoupleq", "qdq"))


@pytest.mark.parametrize("case", ["fake", "float", "same_file", "format"])
def test_cli_refusals_write_nothing(tmp_path, case):
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    model = {"fake": direct("mlp", 4, "rtn", "fake"), "float": builtin_model("mlp")}.get(
        case, direct("mlp", 4, "rtn", "qdq"))
    save_model(model, source)
    before = source.read_bytes()
    args = ["convert", str(source), "-o", str(source if case == "same_file" else out), "--format",
            "int3" if case == "format" else "matmulnbits"]
    fragment = {"fake": "fake stores float weights; quantize the float model instead",
                "float": "not quantized by onnxq; nothing to convert", "same_file": "equals the input file",
                "format": "unknown format 'int3'"}[case]
    result = onnxq_cli(*args)
    assert result.returncode == 2
    assert_one_line_error(result, fragment)
    assert not out.exists() and source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_convert_picks_the_same_default_accuracy_level_as_quantize():
    """2-3 bits: level 4 (fast int8-activation kernels) unless asked; 4 and 8 bits: level 0."""
    for bits, level in ((2, 4), (4, 0)):
        level0 = onnxq.quantize(builtin_model("mlp"), bits=bits, group_size=32, format="matmulnbits", accuracy_level=0)
        converted = onnxq.convert(level0, format="matmulnbits")
        direct_default = onnxq.quantize(builtin_model("mlp"), bits=bits, group_size=32, format="matmulnbits")
        levels = {a.i for n in converted.graph.node for a in n.attribute if a.name == "accuracy_level"}
        assert levels == {level}
        assert converted.SerializeToString() == direct_default.SerializeToString()
