"""Activation fake-quantization: calibrated per-tensor QDQ, 8/4 bits, and finer ranges for split activations."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from ort_helpers import LEVELS, relative_error, run

import onnxq
from onnxq.errors import OnnxqError
from onnxq.ir.metadata import ACT_QUANT_METADATA_KEY
from onnxq.passes.activation_quant import (
    activation_inputs,
    add_activation_qdq,
    calibrated_ranges,
    fake_quantize,
    quantization_params,
)
from onnxq.passes.splitquant import split_model

DATA = Path(__file__).resolve().parents[1] / "onnxq" / "data"
CALIB = str(DATA / "digits_calib.npz")


def digits(name: str) -> onnx.ModelProto:
    return onnx.load(str(DATA / f"{name}.onnx"))


def accuracy(model: onnx.ModelProto, key: str) -> float:
    test = np.load(DATA / "digits_test.npz")
    return float((run(model, {key: test[key]}, "disable_all").argmax(1) == test["labels"]).mean())


def act_record(model: onnx.ModelProto) -> dict:
    return next(json.loads(p.value) for p in model.metadata_props if p.key == ACT_QUANT_METADATA_KEY)


def two_layer_model(opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((12, 10)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((10, 6)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def test_quantization_params_keep_zero_exact():
    for lo, hi, bits in [(-1.3, 2.7, 8), (0.2, 5.0, 8), (-4.0, -1.0, 4), (0.0, 0.0, 8), (-0.5, 3.0, 4)]:
        scale, zero_point = quantization_params(lo, hi, bits)
        assert 0 <= zero_point <= (1 << bits) - 1
        assert fake_quantize(np.zeros(3, np.float32), scale, zero_point, bits).tolist() == [0, 0, 0]
        grid_lo, grid_hi = scale * -zero_point, scale * ((1 << bits) - 1 - zero_point)
        assert grid_lo <= min(lo, 0) + 1e-6 * scale + scale / 2 and grid_hi >= max(hi, 0) - scale / 2


@pytest.mark.parametrize("bits, opset", [(8, 17), (4, 17), (4, 21)])
def test_qdq_equals_numpy_reference_at_every_level(bits, opset):
    model = two_layer_model(opset)
    rng = np.random.default_rng(1)
    calibration = {"x": rng.standard_normal((64, 12)).astype(np.float32)}
    quantized = add_activation_qdq(model, bits, calibration)
    onnx.checker.check_model(quantized, full_check=True)
    zero_point_types = {t.data_type for t in quantized.graph.initializer if "zero_point" in t.name}
    assert zero_point_types == {TensorProto.UINT4 if opset >= 21 and bits == 4 else TensorProto.UINT8}
    ranges = calibrated_ranges(model, calibration, ["x", "a"])
    w1, w2 = (numpy_helper.to_array(t) for t in model.graph.initializer)
    x = rng.standard_normal((16, 12)).astype(np.float32) * 1.5  # beyond the calibrated range: saturates
    xq = fake_quantize(x, *quantization_params(*ranges["x"], bits), bits)
    a = np.maximum(xq @ w1, 0)
    aq = fake_quantize(a, *quantization_params(*ranges["a"], bits), bits)
    assert np.unique(aq).size <= 1 << bits
    expected = aq.astype(np.float64) @ w2
    for level in LEVELS:
        assert relative_error(run(quantized, {"x": x}, level), expected) <= 1e-5, level


def test_only_activation_side_of_weight_layers_is_quantized():
    model = digits("digits_mlp")
    assert [(i, name) for _, i, name in activation_inputs(model)] == [
        (0, "pixels"), (0, "/Relu_output_0"), (0, "/Relu_1_output_0")]
    rng = np.random.default_rng(2)
    q, k = (numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), n) for n in ("wq", "wk"))
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["q", "k"], ["y"], name="act_x_act")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [q, k])
    attention = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [name for _, _, name in activation_inputs(attention)] == ["x", "x"]  # q·k has no constant side


def test_act_bits_8_keeps_digits_mlp_accuracy():
    model = digits("digits_mlp")
    fp32 = accuracy(model, "pixels")
    assert accuracy(add_activation_qdq(model, 8, CALIB), "pixels") >= fp32 - 0.01
    both = onnxq.quantize(model, bits=8, group_size=-1, format="fake", act_bits=8, calibration=CALIB)
    assert accuracy(both, "pixels") >= fp32 - 0.01


def test_matmulnbits_input_is_fake_quantized():
    quantized = onnxq.quantize(digits("digits_mlp"), bits=4, group_size=32, format="matmulnbits", act_bits=8,
                               calibration=CALIB)
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    layers = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    assert layers and all(producers[n.input[0]] == "DequantizeLinear" for n in layers)
    assert accuracy(quantized, "pixels") >= 0.95


def test_custom_op_input_is_fake_quantized():
    """``--format onnxq --act-bits 8``: MatMulLowBit reads its activation first, like MatMulNBits."""
    from onnxq import custom_ops

    if not custom_ops.available():
        pytest.skip("custom-op library not built")
    import onnxruntime as ort

    quantized = onnxq.quantize(digits("digits_mlp"), bits=4, group_size=32, format="onnxq", act_bits=8,
                               calibration=CALIB)
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    layers = [n for n in quantized.graph.node if n.op_type == "MatMulLowBit"]
    assert layers and all(producers[n.input[0]] == "DequantizeLinear" for n in layers)
    test = np.load(DATA / "digits_test.npz")
    session = ort.InferenceSession(quantized.SerializeToString(), custom_ops.session_options(),
                                   providers=["CPUExecutionProvider"])
    assert float((session.run(None, {"pixels": test["pixels"]})[0].argmax(1) == test["labels"]).mean()) >= 0.95


@pytest.mark.parametrize("name, key", [("digits_mlp", "pixels"), ("digits_cnn", "image")])
@pytest.mark.parametrize("bits", [8, 4])
def test_split_activations_lower_the_activation_error(name, key, bits):
    """Error of what the layers read (QDQ'd activation) against the float activation, on the test digits."""
    model = digits(name)
    test = np.load(DATA / "digits_test.npz")
    split, report = split_model(model, activations=True, calibration=CALIB)
    assert len(report.activations) == 2

    def activation_errors(quantized: onnx.ModelProto) -> dict[str, float]:
        record = act_record(quantized)["tensors"]
        probe = onnx.ModelProto()
        probe.CopyFrom(quantized)
        names = sorted(record)
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
        probe.graph.output.extend(onnx.ValueInfoProto(name=record[n]["read_as"]) for n in names)
        import onnxruntime as ort

        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        values = session.run(names + [record[n]["read_as"] for n in names], {key: test[key]})
        return {n: float(np.mean((values[i + len(names)] - values[i]) ** 2)) for i, n in enumerate(names)}

    plain = activation_errors(add_activation_qdq(model, bits, CALIB))
    split_quantized = add_activation_qdq(split, bits, CALIB)
    finer = activation_errors(split_quantized)
    record = act_record(split_quantized)["tensors"]
    read_from_split = {t: r["split_activation"] for t, r in record.items() if "split_activation" in r}
    assert sorted(read_from_split.values()) == sorted(a.output for a in report.activations)  # CNN: via Flatten
    for tensor in read_from_split:
        assert finer[tensor] < plain[tensor], tensor
    fp32 = accuracy(model, key)
    assert accuracy(add_activation_qdq(split, bits, CALIB), key) >= fp32 - (0.01 if bits == 8 else 0.03)


def test_split_activation_branches_get_their_own_ranges():
    split, report = split_model(digits("digits_mlp"), activations=True, calibration=CALIB)
    quantized = add_activation_qdq(split, 8, CALIB)
    record = act_record(quantized)["tensors"]
    by_source = {r["split_activation"]: r for r in record.values() if "split_activation" in r}
    for act in report.activations:
        ranges = by_source[act.output]["branches"]
        assert len(ranges) == 3
        highs = sorted(hi for _, hi in ranges.values())
        assert highs[0] <= act.thresholds[0] + 1e-6 and highs[1] <= act.thresholds[1] + 1e-6


def test_without_calibration_is_a_user_error():
    with pytest.raises(OnnxqError, match="calibration data"):
        add_activation_qdq(digits("digits_mlp"), 8, None)
    with pytest.raises(OnnxqError, match="--act-bits 3"):
        add_activation_qdq(digits("digits_mlp"), 3, CALIB)
