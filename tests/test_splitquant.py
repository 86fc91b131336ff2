"""SplitQuant: exact in float at every ORT level, branches partition the weight, composes with every format."""

import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import conv_model, gemm_model, left_matmul_model, matmul_model
from onnx import TensorProto, helper, numpy_helper
from ort_helpers import LEVELS, relative_error, run

import onnxq
from models.cache import cache_root
from onnxq.cli import main
from onnxq.errors import OnnxqError
from onnxq.ir.metadata import SPLIT_ACTIVATIONS_METADATA_KEY, SPLIT_METADATA_KEY
from onnxq.ir.targets import find_targets
from onnxq.passes.split_activations import find_activation_sites
from onnxq.passes.splitquant import split_model
from onnxq.solvers.kmeans1d import kmeans_1d, kmeans_1d_rows

DATA = Path(__file__).resolve().parents[1] / "onnxq" / "data"
TOLERANCE = 1e-5
FORMATS = ["fake", "qdq", "matmulnbits"]


def metadata(model: onnx.ModelProto, key: str) -> dict:
    return next((json.loads(p.value) for p in model.metadata_props if p.key == key), {})


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def nodes_by_name(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


def check_exact(original: onnx.ModelProto, split: onnx.ModelProto, feeds: dict) -> None:
    """Same outputs within 1e-5·max|output| at every optimization level; passes the full checker."""
    onnx.checker.check_model(split, full_check=True)
    expected = run(original, feeds, "disable_all")
    for level in LEVELS:
        assert relative_error(run(split, feeds, level), expected) <= TOLERANCE, level


def branch_weights(split: onnx.ModelProto, layer: str) -> list[np.ndarray]:
    """The three branch weights (as the nodes consume them) of original layer ``layer``."""
    groups = metadata(split, SPLIT_METADATA_KEY)
    nodes, inits = nodes_by_name(split), initializers(split)
    out = []
    for name in groups[layer]:
        node = nodes[name]
        index = 0 if node.op_type == "MatMul" and node.input[0] in inits else 1
        out.append(inits[node.input[index]])
    return out


# ----------------------------------------------------------------------------- tiny graphs


@pytest.mark.parametrize(
    "build, feed_shape",
    [
        (lambda: matmul_model(k=48, n=20, seed=1), (6, 48)),
        (lambda: matmul_model(k=48, n=20, seed=2, transpose=True), (6, 48)),
        (lambda: matmul_model(k=32, n=16, seed=3, rank=3), (2, 5, 32)),
        (lambda: left_matmul_model(k=24, n=12, seed=4), (3, 24, 5)),
        (lambda: gemm_model(k=40, n=12, trans_b=0, seed=5), (7, 40)),
        (lambda: gemm_model(k=40, n=12, trans_b=1, seed=6, alpha=0.7, beta=-1.3), (7, 40)),
        (lambda: gemm_model(k=40, n=12, trans_b=1, seed=7, bias=False), (7, 40)),
        (lambda: conv_model(cin=4, cout=6, kernel=(3, 3), seed=8), (2, 4, 9, 9)),
        (lambda: conv_model(cin=4, cout=6, kernel=(3, 3), group=2, seed=9), (2, 4, 9, 9)),
        (lambda: conv_model(cin=3, cout=5, kernel=(3,), seed=10), (2, 3, 9)),
    ],
    ids=["matmul", "matmul_transpose", "matmul_rank3", "matmul_left", "gemm", "gemm_transb_alpha_beta",
         "gemm_no_bias", "conv", "conv_groups", "conv1d"],
)
def test_split_is_exact_and_partitions_the_weight(build, feed_shape):
    model = build()
    before = model.SerializeToString()
    split, report = split_model(model)
    assert model.SerializeToString() == before  # the input is never modified
    x = np.random.default_rng(0).standard_normal(feed_shape).astype(np.float32)
    check_exact(model, split, {"x": x})

    target = find_targets(model).targets[0]
    original = initializers(model)[target.weight_name]
    consumed = original.T if target.through_transpose else original
    branches = branch_weights(split, target.name)
    assert len(branches) == 3 and all(b.shape == consumed.shape for b in branches)
    np.testing.assert_array_equal(branches[0] + branches[1] + branches[2], consumed)  # exact: one nonzero per entry
    assert np.all(np.count_nonzero(np.stack(branches), axis=0) <= 1)
    assert all(np.count_nonzero(b) > 0 for b in branches)
    # branch c holds cluster c: every value of the lower branch is below every value of the upper one (per kernel)
    rows = [b.reshape(b.shape[0], -1) if target.op_type == "Conv" else b.reshape(1, -1) for b in branches]
    for lower, upper in zip(rows[0], rows[2], strict=True):
        if lower.any() and upper.any():
            assert lower[lower != 0].max() < upper[upper != 0].min()
    # three branches + two Adds replace the node (and the Transpose, whose output branches no longer read)
    assert len(report.layers) == 1 and report.extra_nodes == 4 - target.through_transpose
    assert metadata(split, SPLIT_METADATA_KEY) == {target.name: report.layers[0].branches}


def test_matmul_thresholds_are_kmeans_midpoints():
    model = matmul_model(k=64, n=32, seed=11)
    weight = initializers(model)["w"]
    split, report = split_model(model)
    clustering = kmeans_1d(weight, 3)
    np.testing.assert_allclose(report.layers[0].thresholds, clustering.boundaries, rtol=1e-6)
    lower, middle, upper = branch_weights(split, "mm")
    labels = clustering.labels(weight)
    np.testing.assert_array_equal(lower, np.where(labels == 0, weight, 0))
    np.testing.assert_array_equal(middle, np.where(labels == 1, weight, 0))
    np.testing.assert_array_equal(upper, np.where(labels == 2, weight, 0))


def test_conv_is_clustered_per_output_kernel():
    model = conv_model(cin=3, cout=8, kernel=(3, 3), seed=12)
    weight = initializers(model)["w"]
    split, _ = split_model(model)
    rows = weight.reshape(8, -1).astype(np.float64)
    centres = kmeans_1d_rows(rows, 3)
    bounds = (centres[:, 1:] + centres[:, :-1]) / 2
    expected = (rows > bounds[:, :1]).astype(int) + (rows > bounds[:, 1:])
    for c, branch in enumerate(branch_weights(split, "conv")):
        np.testing.assert_array_equal(branch.reshape(8, -1), np.where(expected == c, rows, 0).astype(np.float32))


def test_gemm_bias_split_and_constant_bias_stays_on_one_branch():
    model = gemm_model(k=16, n=12, trans_b=1, seed=13)
    split, report = split_model(model)
    assert report.layers[0].bias == "split"
    nodes, inits = nodes_by_name(split), initializers(split)
    biases = [inits[nodes[name].input[2]] for name in report.layers[0].branches]
    np.testing.assert_array_equal(sum(biases), initializers(model)["c"])

    zero_bias = gemm_model(k=16, n=12, trans_b=1, seed=13)
    zero_bias.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(12, np.float32), "c"))
    split, report = split_model(zero_bias)
    assert report.layers[0].bias.startswith("kept on the lower branch (zero")
    inputs = [list(nodes_by_name(split)[name].input) for name in report.layers[0].branches]
    assert [len(i) for i in inputs] == [3, 2, 2]
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    check_exact(zero_bias, split, {"x": x})


def test_layers_with_too_few_distinct_values_are_left_alone():
    binary = matmul_model(k=8, n=4, seed=14)
    values = np.where(np.random.default_rng(0).random((8, 4)) > 0.5, 1.0, -1.0).astype(np.float32)
    binary.graph.initializer[0].CopyFrom(numpy_helper.from_array(values, "w"))
    split, report = split_model(binary)
    assert not report.layers and len(split.graph.node) == 1
    assert "only 2 distinct weight value(s)" in report.skipped[0].reason
    assert any("left alone: MatMul 'mm': only 2 distinct" in line for line in report.lines())

    constant_kernels = conv_model(cin=2, cout=3, kernel=(1, 1), seed=15)
    constant_kernels.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "w"))
    _, report = split_model(constant_kernels)
    assert not report.layers and "fewer than 3 distinct values" in report.skipped[0].reason


def test_shared_weight_is_split_once():
    w = numpy_helper.from_array(np.random.default_rng(16).standard_normal((8, 6)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("MatMul", ["x", "w"], ["b"], name="second"),
             helper.make_node("Add", ["a", "b"], ["y"], name="sum")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    split, report = split_model(model)
    assert [layer.shares_weight for layer in report.layers] == [False, True]
    assert len(split.graph.initializer) == 3
    check_exact(model, split, {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)})


def test_split_is_deterministic_and_sklearn_method_works():
    model = onnx.load(str(DATA / "digits_cnn.onnx"))
    first, _ = split_model(model, seed=3)
    second, _ = split_model(model, seed=3)
    assert first.SerializeToString() == second.SerializeToString()
    with_sklearn, report = split_model(model, method="sklearn")
    assert report.method == "sklearn" and len(report.layers) == 3
    test = np.load(DATA / "digits_test.npz")
    check_exact(model, with_sklearn, {"image": test["image"][:64]})


def test_splitting_a_split_model_leaves_branches_alone():
    split, _ = split_model(matmul_model(k=16, n=8, seed=17))
    again, report = split_model(split)
    assert not report.layers and {s.reason for s in report.skipped} == {"already a SplitQuant branch"}
    assert again.SerializeToString() == split.SerializeToString()


def test_user_errors():
    model = matmul_model(k=8, n=4)
    with pytest.raises(OnnxqError, match="needs calibration data"):
        split_model(model, activations=True)
    with pytest.raises(OnnxqError, match="k-means method 'lloyd' is unknown"):
        split_model(model, method="lloyd")


# ----------------------------------------------------------------------------- activations


def activation_model(kind: str, opset: int = 17) -> onnx.ModelProto:
    """x·W₁ → activation ``kind`` → ·W₂; every pattern SplitQuant recognises."""
    rng = np.random.default_rng(18)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 24)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((24, 8)).astype(np.float32), "w2")]

    def const(name, value):
        inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    h, a = "h", "a"
    if kind == "erf_gelu":
        body = [helper.make_node("Div", [h, const("sqrt2", math.sqrt(2))], ["d"]),
                helper.make_node("Erf", ["d"], ["e"]),
                helper.make_node("Add", ["e", const("one", 1.0)], ["p"]),
                helper.make_node("Mul", [h, "p"], ["m"]),
                helper.make_node("Mul", ["m", const("half", 0.5)], [a], name="gelu_out")]
    elif kind == "erf_gelu_half_first":
        body = [helper.make_node("Mul", [h, const("inv_sqrt2", 1 / math.sqrt(2))], ["d"]),
                helper.make_node("Erf", ["d"], ["e"]),
                helper.make_node("Add", [const("one", 1.0), "e"], ["p"]),
                helper.make_node("Mul", [h, const("half", 0.5)], ["hh"]),
                helper.make_node("Mul", ["hh", "p"], [a], name="gelu_out")]
    elif kind == "silu":
        body = [helper.make_node("Sigmoid", [h], ["s"]), helper.make_node("Mul", [h, "s"], [a], name="silu")]
    elif kind == "Clip":
        body = [helper.make_node("Clip", [h, const("lo", -1.0), const("hi", 2.5)], [a], name="act")]
    elif kind == "LeakyRelu":
        body = [helper.make_node("LeakyRelu", [h], [a], name="act", alpha=0.1)]
    else:
        body = [helper.make_node(kind, [h], [a], name="act")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], [h], name="fc1"), *body,
             helper.make_node("MatMul", [a, "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(
    "kind, opset, label",
    [("Relu", 17, "Relu"), ("LeakyRelu", 17, "LeakyRelu"), ("Sigmoid", 17, "Sigmoid"), ("Tanh", 17, "Tanh"),
     ("Gelu", 20, "Gelu"), ("HardSigmoid", 17, "HardSigmoid"), ("Clip", 17, "Clip"),
     ("erf_gelu", 17, "Gelu(erf)"), ("erf_gelu_half_first", 17, "Gelu(erf)"), ("silu", 17, "SiLU")],
)
def test_activation_split_is_bit_exact(kind, opset, label):
    model = activation_model(kind, opset)
    sites = find_activation_sites(model)
    assert [s.op_type for s in sites] == [label]
    rng = np.random.default_rng(19)
    calibration = {"x": rng.standard_normal((64, 16)).astype(np.float32)}
    split, report = split_model(model, activations=True, calibration=calibration)
    assert [a.op_type for a in report.activations] == [label]
    entry = metadata(split, SPLIT_ACTIVATIONS_METADATA_KEY)[report.activations[0].name]
    assert entry["output"] == sites[0].output and len(entry["branches"]) == 3
    assert entry["thresholds"][0] < entry["thresholds"][1]
    x = rng.standard_normal((32, 16)).astype(np.float32) * 2
    check_exact(model, split, {"x": x})
    weights_only, _ = split_model(model)  # the activation split adds zeros only: bit-exact against it
    for level in LEVELS:
        np.testing.assert_array_equal(run(split, {"x": x}, level), run(weights_only, {"x": x}, level))


def test_activation_branches_carry_one_range_each():
    model = activation_model("Relu")
    calibration = {"x": np.random.default_rng(20).standard_normal((64, 16)).astype(np.float32)}
    split, report = split_model(model, activations=True, calibration=calibration)
    entry = metadata(split, SPLIT_ACTIVATIONS_METADATA_KEY)["act"]
    t1, t2 = entry["thresholds"]
    probe = onnx.ModelProto()
    probe.CopyFrom(split)
    probe.graph.output.extend(onnx.ValueInfoProto(name=b) for b in [entry["output"], *entry["branches"]])
    import onnxruntime as ort

    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    y, lower, middle, upper = session.run([entry["output"], *entry["branches"]], calibration)[:4]
    np.testing.assert_array_equal(lower, np.where(y <= t1, y, 0))
    np.testing.assert_array_equal(middle, np.where((y > t1) & (y <= t2), y, 0))
    np.testing.assert_array_equal(upper, np.where(y > t2, y, 0))
    assert all(f > 0 for f in report.activations[0].fractions)


# ----------------------------------------------------------------------------- built-in digits models


@pytest.mark.parametrize("name, key", [("digits_mlp", "pixels"), ("digits_cnn", "image")])
def test_digits_split_is_exact_with_activations(name, key):
    model = onnx.load(str(DATA / f"{name}.onnx"))
    split, report = split_model(model, activations=True, calibration=str(DATA / "digits_calib.npz"))
    assert len(report.layers) == 3 and len(report.activations) == 2
    test = np.load(DATA / "digits_test.npz")
    check_exact(model, split, {key: test[key]})
    again, _ = split_model(model, activations=True, calibration=str(DATA / "digits_calib.npz"))
    assert again.SerializeToString() == split.SerializeToString()
    lines = report.lines()
    assert f"extra nodes: {report.extra_nodes} ({len(model.graph.node)} -> {len(split.graph.node)})" in lines
    assert report.weight_bytes(split=True) == 3 * report.weight_bytes(split=False)
    assert any(line.startswith("  INT2: per-channel") for line in lines)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_branches_keep_exact_zeros(fmt, bits):
    model = onnx.load(str(DATA / "digits_mlp.onnx"))
    split, _ = split_model(model)
    quantized = onnxq.quantize(split, bits=bits, group_size=32, format=fmt)
    test = np.load(DATA / "digits_test.npz")
    logits = run(quantized, {"pixels": test["pixels"]}, "disable_all")
    assert (logits.argmax(1) == test["labels"]).mean() >= (0.9 if bits == 2 else 0.95)
    if fmt != "fake":
        return
    nodes, inits, split_inits = nodes_by_name(quantized), initializers(quantized), initializers(split)
    split_nodes = nodes_by_name(split)
    for layer, branches in metadata(quantized, SPLIT_METADATA_KEY).items():
        for name in branches:
            weight_input = split_nodes[name].input[1]
            original = split_inits[weight_input]
            dequantized = inits[nodes[name].input[1]]
            assert weight_input != nodes[name].input[1], layer
            assert np.all(dequantized[original == 0] == 0), name  # exactly zero where the branch is zero


@pytest.mark.parametrize("method", ["gptq", "decoupleq"])
def test_hessian_methods_keep_branch_zeros(method):
    model = onnx.load(str(DATA / "digits_mlp.onnx"))
    split, _ = split_model(model)
    quantized = onnxq.quantize(split, method=method, bits=2, group_size=-1, format="fake",
                               calibration=str(DATA / "digits_calib.npz"))
    nodes, inits = nodes_by_name(quantized), initializers(quantized)
    split_nodes, split_inits = nodes_by_name(split), initializers(split)
    for branches in metadata(quantized, SPLIT_METADATA_KEY).values():
        for name in branches:
            original = split_inits[split_nodes[name].input[1]]
            assert np.all(inits[nodes[name].input[1]][original == 0] == 0), name
    test = np.load(DATA / "digits_test.npz")
    assert (run(quantized, {"pixels": test["pixels"]}, "disable_all").argmax(1) == test["labels"]).mean() >= 0.95


def test_split_then_quantize_improves_int2_on_digits_cnn():
    model = onnx.load(str(DATA / "digits_cnn.onnx"))
    test = np.load(DATA / "digits_test.npz")

    def accuracy(m):
        return (run(m, {"image": test["image"]}, "disable_all").argmax(1) == test["labels"]).mean()

    plain = accuracy(onnxq.quantize(model, bits=2, group_size=-1, format="fake"))
    split = accuracy(onnxq.quantize(model, bits=2, group_size=-1, format="fake", split=True))
    assert split > plain + 0.02


def test_cli_split_and_quantize_split(tmp_path, capsys):
    source = str(DATA / "digits_mlp.onnx")
    out = tmp_path / "split.onnx"
    assert main(["split", source, "-o", str(out), "--activations", "--calib", str(DATA / "digits_calib.npz")]) == 0
    printed = capsys.readouterr().out
    assert "SplitQuant: split 3 layers" in printed and "extra nodes: 28" in printed and "FLOPs" in printed
    test = np.load(DATA / "digits_test.npz")
    check_exact(onnx.load(source), onnx.load(str(out)), {"pixels": test["pixels"]})

    quantized = tmp_path / "q.onnx"
    assert main(["quantize", source, "-o", str(quantized), "--split", "--bits", "4", "--format", "qdq"]) == 0
    model = onnx.load(str(quantized))
    assert sum(len(v) for v in metadata(model, SPLIT_METADATA_KEY).values()) == 9
    logits = run(model, {"pixels": test["pixels"]}, "disable_all")
    assert (logits.argmax(1) == test["labels"]).mean() >= 0.96

    assert main(["split", source, "-o", str(out), "--activations"]) == 2
    assert "needs calibration data" in capsys.readouterr().err


# ----------------------------------------------------------------------------- MiniLM


def minilm_path() -> Path:
    """The MiniLM export; skipped when absent, except in CI (``CI`` set) where it must have been built."""
    path = cache_root() / "minilm" / "model.onnx"
    if not path.exists():
        message = f"{path} missing: run python -m models.minilm"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.mark.real
def test_minilm_split_is_exact_at_every_level():
    from models.minilm import load_tokenizer, tokenize
    from models.text import all_passages

    model = onnx.load(str(minilm_path()))
    split, report = split_model(model)
    assert len(report.layers) == 36 and report.extra_nodes == 36 * 4
    passages = [p.text for p in all_passages()[:: 997][:8]]
    feeds = tokenize(load_tokenizer(), passages)
    check_exact(model, split, feeds)


def test_split_eval_tool_prints_the_table():
    from tools.split_eval import main as split_eval

    lines: list[str] = []
    assert split_eval(["--models", "mlp", "--bits", "2", "--group-sizes", "-1", "--act-bits"], out=lines.append) == 0
    row = next(line for line in lines if line.startswith("| INT2 | per-channel |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    rtn_accuracy, split_accuracy = float(cells[2]), float(cells[3])
    assert split_accuracy > rtn_accuracy + 0.02


def test_cli_quantize_with_split_activations_and_act_bits(tmp_path):
    source, calib = str(DATA / "digits_cnn.onnx"), str(DATA / "digits_calib.npz")
    out = tmp_path / "q.onnx"
    args = ["quantize", source, "-o", str(out), "--split", "--split-activations", "--act-bits", "4", "--calib", calib,
            "--bits", "4", "--group-size", "-1", "--format", "fake"]
    assert main(args) == 0
    model = onnx.load(str(out))
    assert len(metadata(model, SPLIT_ACTIVATIONS_METADATA_KEY)) == 2
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 1 + 2 * 3  # image + 2 split ReLUs
    test = np.load(DATA / "digits_test.npz")
    assert (run(model, {"image": test["image"]}, "disable_all").argmax(1) == test["labels"]).mean() >= 0.95
