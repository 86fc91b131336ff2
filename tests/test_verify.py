"""onnxq verify / quantize --verify: per-output relative L2, cosine and max abs error of a quantized model against its
float original in ONNX Runtime, on calibration inputs or inputs generated from the input specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_one_line_error, onnxq_cli

import onnxq
from onnxq.calibration.data import model_input_specs
from onnxq.errors import OnnxqError
from onnxq.ir.model import load_model, save_model
from onnxq.verify import generated_inputs, verify_models

DATA_DIR = Path(__file__).resolve().parents[1] / "onnxq" / "data"
CALIB = DATA_DIR / "digits_calib.npz"


def digits(name: str) -> onnx.ModelProto:
    return load_model(DATA_DIR / f"digits_{name}.onnx")


def rtn(model: onnx.ModelProto, bits: int, **options) -> onnx.ModelProto:
    return onnxq.quantize(model, bits=bits, group_size=32 if bits != 8 else -1, **options)


def plain_outputs(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    """Independent ORT run (no onnxq helpers) of the whole feed at once."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_eight_bit_is_near_lossless_and_two_bit_is_worse(name):
    model = digits(name)
    eight = verify_models(model, rtn(model, 8), CALIB).outputs
    two = verify_models(model, rtn(model, 2), CALIB).outputs
    assert [o.name for o in eight] == [o.name for o in two] == [o.name for o in model.graph.output]
    for e, t in zip(eight, two, strict=True):
        assert e.cosine > 0.999 and e.relative_l2 < 0.02
        assert t.relative_l2 > 5 * e.relative_l2 and t.cosine < e.cosine and t.max_abs > e.max_abs


def test_numbers_equal_an_independent_computation():
    model = digits("mlp")
    quantized = rtn(model, 4, format="qdq")
    with np.load(CALIB) as data:
        feed = {"pixels": data["pixels"]}
    f = plain_outputs(model, feed)[0].astype(np.float64)
    q = plain_outputs(quantized, feed)[0].astype(np.float64)
    report = verify_models(model, quantized, CALIB)
    (out,) = report.outputs
    assert report.samples == len(f) == 128 and report.runs == 16  # batches of 8
    np.testing.assert_allclose(out.relative_l2, np.linalg.norm(q - f) / np.linalg.norm(f), rtol=1e-5)
    np.testing.assert_allclose(out.cosine, (q.ravel() @ f.ravel()) / np.linalg.norm(q) / np.linalg.norm(f), rtol=1e-6)
    np.testing.assert_allclose(out.max_abs, np.abs(q - f).max(), rtol=1e-5)


def test_error_sums_in_chunks_equal_one_pass(monkeypatch):
    import onnxq.verify as verify

    rng = np.random.default_rng(2)
    f, q = rng.standard_normal((2, 3, 50)).astype(np.float32), rng.standard_normal((2, 3, 50)).astype(np.float32)
    whole = verify._ErrorSum()
    whole.add(f, q)
    monkeypatch.setattr(verify, "CHUNK", 7)
    chunked = verify._ErrorSum()
    chunked.add(f[:1], q[:1])
    chunked.add(f[1:], q[1:])
    a, b = whole.result("y"), chunked.result("y")
    assert a.max_abs == b.max_abs == np.abs(q.astype(np.float64) - f).max()
    np.testing.assert_allclose([a.relative_l2, a.cosine], [b.relative_l2, b.cosine], rtol=1e-12)


def test_a_model_against_itself_is_exact():
    model = digits("cnn")
    (out,) = verify_models(model, model, CALIB, samples=20).outputs
    assert (out.relative_l2, out.cosine, out.max_abs) == (0.0, pytest.approx(1.0, abs=1e-12), 0.0)


def test_samples_limit_and_generated_inputs_are_deterministic():
    model, quantized = digits("mlp"), rtn(digits("mlp"), 2)
    report = verify_models(model, quantized, CALIB, samples=20)
    assert (report.samples, report.runs) == (20, 3)
    generated = verify_models(model, quantized, samples=5)
    assert (generated.samples, generated.runs) == (5, 5) and "generated" in generated.source
    assert generated.outputs == verify_models(model, quantized, samples=5).outputs  # same seed, same numbers
    assert generated.outputs != verify_models(model, quantized, samples=5, seed=1).outputs


def test_custom_op_format_is_run_with_the_library():
    if not onnxq.custom_ops.available():
        pytest.skip("custom-op library not built")
    model = digits("mlp")
    custom = verify_models(model, rtn(model, 4, format="onnxq"), CALIB).outputs[0]
    reference = verify_models(model, rtn(model, 4, format="fake"), CALIB).outputs[0]
    assert custom.relative_l2 == pytest.approx(reference.relative_l2, rel=1e-3)


# ----------------------------------------------------------------------------- generated inputs


def cache_model() -> onnx.ModelProto:
    """A decoder step: keys = Concat(past_key_values.0.key, x·Wk) along the sequence; y = mean over keys of keys·Wo
    + Gather(table, input_ids) + position_ids·1, masked by attention_mask.  Accepts an empty cache (length 0)."""
    rng = np.random.default_rng(0)
    inits = {"Wk": rng.standard_normal((4, 4)).astype(np.float32), "Wo": rng.standard_normal((4, 4)).astype(np.float32),
             "table": rng.standard_normal((100, 4)).astype(np.float32), "axis": np.array([2], np.int64)}
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),  # [b, s, 4]
        helper.make_node("MatMul", ["emb", "Wk"], ["k"]),
        helper.make_node("Unsqueeze", ["k", "one"], ["k4"]),  # [b, 1, s, 4]
        helper.make_node("Concat", ["past_key_values.0.key", "k4"], ["keys"], axis=2),  # [b, 1, past+s, 4]
        helper.make_node("MatMul", ["keys", "Wo"], ["v"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),  # [b, past+s]
        helper.make_node("Unsqueeze", ["maskf", "mask_axes"], ["mask4"]),  # [b, 1, past+s, 1]
        helper.make_node("Mul", ["v", "mask4"], ["masked"]),
        helper.make_node("ReduceMean", ["masked", "axis"], ["y"], keepdims=0),  # [b, 1, 4]
        helper.make_node("Cast", ["position_ids"], ["posf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["posf"], ["p"], keepdims=1),  # [1, 1]
        helper.make_node("Add", ["y", "p"], ["out"]),
    ]
    inits |= {"one": np.array([1], np.int64), "mask_axes": np.array([1, 3], np.int64)}
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 1, "past", 4]),
    ]
    graph = helper.make_graph(nodes, "step", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_generated_inputs_follow_the_documented_rule():
    specs = model_input_specs(cache_model())
    (feed,) = generated_inputs(specs, 1, seed=0)
    assert {k: v.shape for k, v in feed.items()} == {
        "input_ids": (1, 8), "attention_mask": (1, 8), "position_ids": (1, 8), "past_key_values.0.key": (1, 1, 0, 4)}
    assert feed["input_ids"].dtype == np.int64 and 0 <= feed["input_ids"].min() and feed["input_ids"].max() < 100
    assert (feed["attention_mask"] == 1).all() and feed["position_ids"].tolist() == [list(range(8))]
    first, second = generated_inputs(specs, 2, seed=0)
    again = generated_inputs(specs, 2, seed=0)[1]
    assert not np.array_equal(first["input_ids"], second["input_ids"])
    assert np.array_equal(second["input_ids"], again["input_ids"])


def test_a_cache_model_runs_on_generated_inputs():
    model = cache_model()
    quantized = onnxq.quantize(model, bits=8, group_size=-1, format="fake")
    (out,) = verify_models(model, quantized).outputs
    assert out.cosine > 0.999 and 0 < out.relative_l2 < 0.01


# ----------------------------------------------------------------------------- refusals


def renamed_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    old = copy.graph.output[0].name
    copy.graph.output[0].name = name
    for node in copy.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
    return copy


def test_refusals_are_one_line_errors():
    model = digits("mlp")
    with pytest.raises(OnnxqError, match=r"different outputs \(float: \['logits'\], quantized: \['scores'\]\)"):
        verify_models(model, renamed_output(rtn(model, 4), "scores"))
    wrong = rtn(model, 4)
    wrong.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 11
    with pytest.raises(OnnxqError, match="output 'logits' has shape .* in the quantized model"):
        verify_models(model, wrong)
    with pytest.raises(OnnxqError, match="needs inputs the float model does not have"):
        verify_models(model, digits("cnn"))
    with pytest.raises(OnnxqError, match="--samples 0 is out of range"):
        verify_models(model, model, samples=0)
    unknown = rtn(model, 4)
    unknown.graph.input[0].type.tensor_type.ClearField("shape")
    model_without_shape = onnx.ModelProto()
    model_without_shape.CopyFrom(model)
    model_without_shape.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(OnnxqError, match="declares no shape"):
        verify_models(model_without_shape, unknown)


def test_output_shapes_that_differ_when_run_are_refused():
    """Declared shapes agree (symbolic) but the quantized model computes another shape."""
    model = digits("mlp")
    quantized = rtn(model, 4)
    last = quantized.graph.node[-1]
    last.output[0] = "pre"
    quantized.graph.node.append(helper.make_node("Concat", ["pre", "pre"], ["logits"], axis=1))
    quantized.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"
    with pytest.raises(OnnxqError, match=r"output 'logits' has shape \(8, 20\) in the quantized model and \(8, 10\)"):
        verify_models(model, quantized, CALIB)


# ----------------------------------------------------------------------------- command line


def table_rows(stdout: str) -> dict[str, list[float]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("output "))
    return {cells[0]: [float(c) for c in cells[1:]] for cells in (line.split() for line in lines[start + 1:])}


def test_cli_verify_and_quantize_verify(tmp_path):
    model_path = DATA_DIR / "digits_mlp.onnx"
    eight, two = tmp_path / "q8.onnx", tmp_path / "q2.onnx"
    save_model(rtn(digits("mlp"), 8), eight)
    result = onnxq_cli("verify", str(model_path), str(eight), "--calib", str(CALIB))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "128 samples in 16 ONNX Runtime runs" in result.stdout
    (relative, cosine, max_abs), = table_rows(result.stdout).values()
    assert cosine > 0.999 and relative < 0.02 and max_abs > 0
    result = onnxq_cli("quantize", str(model_path), "-o", str(two), "--bits", "2", "--group-size", "32", "--verify")
    assert result.returncode == 0, result.stderr
    assert "wrote " in result.stdout and "inputs generated from the float model's input specs" in result.stdout
    assert table_rows(result.stdout)["logits"][1] < cosine
    result = onnxq_cli("quantize", str(model_path), "-o", str(two), "--method", "gptq", "--bits", "2",
                       "--group-size", "32", "--calib", str(CALIB), "--verify")
    assert result.returncode == 0 and "(" + str(CALIB) + ")" in result.stdout, result.stderr


def test_cli_refusals(tmp_path):
    model_path = str(DATA_DIR / "digits_mlp.onnx")
    assert_one_line_error(onnxq_cli("verify", model_path, str(tmp_path / "nope.onnx")), "nope.onnx", "no such file")
    assert_one_line_error(onnxq_cli("verify", model_path, str(DATA_DIR / "digits_cnn.onnx")),
                          "needs inputs the float model does not have")
    assert_one_line_error(onnxq_cli("verify", model_path, model_path, "--samples", "-1"),
                          "--samples -1 is out of range")
    assert_one_line_error(onnxq_cli("verify", model_path, model_path, "--calib", str(tmp_path / "none.npz")),
                          "calibration data not found")
