"""Target discovery, shared weights, subgraphs, external data and atomic saving."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import matmul_model
from onnx import TensorProto, helper, numpy_helper
from ort_helpers import run

import onnxq
from onnxq.ir.model import load_model, save_model
from onnxq.ir.targets import find_targets
from onnxq.solvers.rtn import quantize_rtn


def shared_weight_model():
    """Two MatMuls and a Gather read the same weight W [K, N]."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
        helper.make_node("MatMul", ["x", "w"], ["b"], name="mm2"),
        helper.make_node("Gather", ["w", "idx"], ["g"], name="gather", axis=0),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 32]),
         helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 32])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0, 3], np.int64), "idx")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w


@pytest.mark.parametrize("fmt", ["fake", "qdq", "matmulnbits"])
def test_shared_weight_is_quantized_once_and_other_readers_keep_float(fmt):
    model, w = shared_weight_model()
    quantized, summary = onnxq.quantize_with_summary(model, bits=4, group_size=32, format=fmt)
    assert len(summary.layers) == 1  # one weight, one solve
    codes = [t for t in quantized.graph.initializer if t.name.endswith(("_quant", "_nbits", "_fakequant"))]
    assert len(codes) == 1
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    deq = quantize_rtn(w.T.astype(np.float64), 4, 32).dequantize(np.float64)
    sess_out = run(quantized, {"x": x})
    np.testing.assert_allclose(sess_out, 2 * x.astype(np.float64) @ deq.T, rtol=1e-5, atol=1e-5)
    g = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(["g"], {"x": x})[0]
    np.testing.assert_array_equal(g, w[[0, 3]])  # the Gather still reads the float weight


def test_subgraph_nodes_are_listed_as_skipped():
    inner_w = numpy_helper.from_array(np.ones((4, 4), np.float32), "inner_w")
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "inner_w"], ["t"], name="inner_mm")], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["M", 4])], [inner_w])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="id")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["M", 4])])
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("If", ["c"], ["z"], name="if", then_branch=branch, else_branch=other),
             helper.make_node("MatMul", ["z", "w"], ["y"], name="outer_mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 4]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = find_targets(model)
    assert [t.name for t in report.targets] == ["outer_mm"]
    assert report.skipped[0].name == "inner_mm" and "subgraph" in report.skipped[0].reason
    quantized = onnxq.quantize(model, bits=4, group_size=-1, format="matmulnbits")
    onnx.checker.check_model(quantized)
    x = np.ones((2, 4), np.float32)
    out = run(quantized, {"x": x, "c": np.array(True)})
    np.testing.assert_allclose(out, np.full((2, 4), 16.0), rtol=1e-6)  # ones are exact at any bits


def test_external_data_round_trip_and_atomic_write(tmp_path):
    model = matmul_model(k=256, n=128)
    out = tmp_path / "m.onnx"
    save_model(model, out, external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size >= 256 * 128 * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temp files left
    loaded = load_model(out)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]),
                                  numpy_helper.to_array(model.graph.initializer[0]))
    # quantizing a model with external data works and leaves the input files untouched
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    onnxq.quantize(out, tmp_path / "q.onnx", bits=4)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before


def test_model_over_2gb_round_trips(tmp_path):
    """A > 2 GiB model (five 430 MB weights) is written with external data and loads back identically."""
    k, n, layers = 8192, 13120, 5  # 5 × 430 MB of float32
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        w = np.zeros((k, n) if i % 2 == 0 else (n, k), np.float32)
        w[i, i] = i + 1.0
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, n])], inits)
    del inits, w
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = tmp_path / "big.onnx"
    save_model(model, out)  # automatic external data above 1 GiB
    assert out.stat().st_size < 1 << 20 and (tmp_path / "big.onnx.data").stat().st_size == layers * k * n * 4
    assert model.graph.initializer[0].HasField("raw_data")  # the caller's model keeps its data
    del model
    loaded = load_model(out)
    for i, tensor in enumerate(loaded.graph.initializer):
        values = numpy_helper.to_array(tensor)
        assert values[i, i] == i + 1.0 and float(values.sum()) == i + 1.0


def test_deterministic_output(tmp_path):
    model = matmul_model(k=128, n=64, seed=11)
    for fmt in ("fake", "qdq", "matmulnbits"):
        a = onnxq.quantize(model, tmp_path / f"a_{fmt}.onnx", bits=2, format=fmt, clip_search=True)
        b = onnxq.quantize(model, tmp_path / f"b_{fmt}.onnx", bits=2, format=fmt, clip_search=True)
        assert a.SerializeToString() == b.SerializeToString()
        assert (tmp_path / f"a_{fmt}.onnx").read_bytes() == (tmp_path / f"b_{fmt}.onnx").read_bytes()


def test_input_model_object_is_not_modified():
    model = matmul_model(k=64, n=16)
    before = model.SerializeToString()
    onnxq.quantize(model, bits=2, format="matmulnbits")
    assert model.SerializeToString() == before


def test_inspect_reports_quantized_bytes():
    model = matmul_model(k=256, n=128)
    float_report = onnxq.inspect(model)
    assert float_report.total_bytes == 256 * 128 * 4 and float_report.rows[0].state == "float"
    for fmt, max_fraction in (("matmulnbits", 1 / 6), ("qdq", 1 / 6)):
        report = onnxq.inspect(onnxq.quantize(model, bits=4, group_size=64, format=fmt))
        assert report.rows[0].state == "quantized"
        assert report.total_bytes <= float_report.total_bytes * max_fraction


def test_copy_model_without_keeps_everything_but_the_named_weights():
    from onnxq.demo import data_path
    from onnxq.ir.model import copy_model_without

    model = onnx.load(data_path("digits_cnn.onnx"))
    assert copy_model_without(model, set()) == model
    names = {t.name for t in model.graph.initializer if t.raw_data and len(t.raw_data) >= 1024}
    shell = copy_model_without(model, names)
    assert [t.name for t in shell.graph.initializer] == [t.name for t in model.graph.initializer]
    for tensor in shell.graph.initializer:
        assert (tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data) == (tensor.name in names)
    assert len(shell.SerializeToString()) < len(model.SerializeToString()) // 10
    assert list(shell.graph.node) == list(model.graph.node)
