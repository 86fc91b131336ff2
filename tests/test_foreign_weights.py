"""Weights our own exports never had: one-signed groups, one-signed depthwise kernels on real photos, a weight read
in two orientations, initializers also listed as graph inputs, NaN weights.

Every case runs the emitted model in ORT (every format) against fp32 or against a numpy reference of the
dequantized weights of each reader.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from ort_helpers import LEVELS, relative_error, run, session

import onnxq
from onnxq import custom_ops
from onnxq.config import default_scale_storage
from onnxq.errors import OnnxqError
from onnxq.solvers.rtn import quantize_rtn

FORMATS = ["matmulnbits", "qdq", "fake", "onnxq"]
METHODS = ["rtn", "gptq", "decoupleq"]


def _model(nodes, inputs, outputs, inits, opset=21, ir_version=10) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _value(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _run_any(model: onnx.ModelProto, feeds: dict, level: str = "disable_all") -> list[np.ndarray]:
    if any(node.domain == "onnxq" for node in model.graph.node):
        options = custom_ops.session_options()
        import onnxruntime as ort

        options.graph_optimization_level = LEVELS[level]
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
            None, feeds)
    return session(model, level).run(None, feeds)


def _needs_library(fmt: str) -> None:
    if fmt == "onnxq" and not custom_ops.available():
        pytest.skip("custom-op library not built")


def frobenius_error(actual: np.ndarray, expected: np.ndarray) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(actual, dtype=np.float64) - expected) / np.linalg.norm(expected))


# ----------------------------------------------------------------------------- one-signed groups


def positive_matmul_model(k: int = 128, n: int = 64, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """``y = x·W`` with every weight in [0.2, 1.2] (all groups one-signed, min > 0)."""
    w = np.random.default_rng(seed).uniform(0.2, 1.2, (k, n)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_value("x", ["M", k])],
                   [_value("y", ["M", n])], [numpy_helper.from_array(w, "w")])
    return model, w


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_all_positive_matmul_8bit_is_within_one_percent(fmt, method):
    """Before the grid fix: 55-60 % output error (RTN), 172 % (GPTQ)."""
    _needs_library(fmt)
    model, w = positive_matmul_model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 128)).astype(np.float32)
    options = {"calibration": {"x": x}} if method != "rtn" else {}
    quantized, summary = onnxq.quantize_with_summary(model, bits=8, group_size=32, format=fmt, method=method,
                                                     **options)
    assert not any("WARNING" in note for note in summary.notes)
    test_x = rng.standard_normal((16, 128)).astype(np.float32)
    expected = test_x.astype(np.float64) @ w
    for level in LEVELS:
        assert frobenius_error(_run_any(quantized, {"x": test_x}, level)[0], expected) <= 0.01, level


@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_small_groups_on_any_weight_stay_on_the_grid(bits, clip_search):
    """``--group-size 3`` makes one-signed groups on any model; the pass's own grid check must stay quiet."""
    model, w = positive_matmul_model(k=30, n=8, seed=bits)
    w_mixed = (w - 0.7).astype(np.float32)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w_mixed, "w"))
    quantized, summary = onnxq.quantize_with_summary(model, bits=bits, group_size=3, format="fake",
                                                     clip_search=clip_search)
    assert not any("WARNING" in note for note in summary.notes)
    deq = numpy_helper.to_array(next(t for t in quantized.graph.initializer if t.name.endswith("fakequant")))
    qw = quantize_rtn(w_mixed.T.astype(np.float64), bits, 3, clip_search=clip_search,
                      scale_dtype=np.dtype(default_scale_storage(bits)).type)  # the grid onnxq stores at ``bits``
    np.testing.assert_allclose(deq, qw.dequantize(np.float32).T, rtol=0, atol=1e-7)
    if not clip_search:
        step = np.repeat(qw.scales, 3, axis=1)[:, :30].T
        assert np.all(np.abs(deq - w_mixed) <= step / 2 + 1e-6)


def depthwise_net(seed: int = 0) -> onnx.ModelProto:
    """Conv 3→16 (3×3), ReLU, depthwise 3×3 whose every channel is one-signed, pointwise 16→32, ReLU, global
    average pool, Gemm 32→10: the shape of mobile CNNs (MobileNet, PP-OCR) whose depthwise kernels broke INT8."""
    rng = np.random.default_rng(seed)
    signs = np.where(rng.random(16) < 0.5, -1.0, 1.0)[:, None, None, None]
    inits = {
        "w_stem": rng.standard_normal((16, 3, 3, 3)) * 0.3,
        "b_stem": rng.standard_normal(16) * 0.1,
        "w_dw": signs * rng.uniform(0.05, 1.0, (16, 1, 3, 3)),  # one-signed per channel, min far from 0
        "b_dw": rng.standard_normal(16) * 0.1,
        "w_pw": rng.standard_normal((32, 16, 1, 1)) * 0.3,
        "w_fc": rng.standard_normal((10, 32)) * 0.5,
        "b_fc": rng.standard_normal(10) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w_stem", "b_stem"], ["c1"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w_dw", "b_dw"], ["c2"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "w_pw"], ["c3"], name="pointwise"),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w_fc", "b_fc"], ["logits"], name="fc", transB=1),
    ]
    tensors = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
    return _model(nodes, [_value("x", ["N", 3, 64, 64])], [_value("logits", ["N", 10])], tensors, opset=17,
                  ir_version=8)


def photo_crops(count: int = 8, size: int = 64) -> np.ndarray:
    """``count`` crops of scikit-learn's two sample photos, NCHW, standardised per channel."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crops.append(photo[top : top + size, left : left + size].transpose(2, 0, 1))
    x = np.stack(crops).astype(np.float32) / 255.0
    return ((x - x.mean(axis=(0, 2, 3), keepdims=True)) / x.std(axis=(0, 2, 3), keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_signed_depthwise_cnn_int8_per_channel(fmt):
    """Before the grid fix the depthwise layer lost its larger weights (logit cosine ≈ 0.83 on a real CNN)."""
    _needs_library(fmt)
    model = depthwise_net()
    x = photo_crops()
    expected = run(model, {"x": x}).astype(np.float64)
    quantized, summary = onnxq.quantize_with_summary(model, bits=8, group_size=-1, format=fmt)
    assert len(summary.layers) == 4 and not any("WARNING" in note for note in summary.notes)
    for level in LEVELS:
        got = _run_any(quantized, {"x": x}, level)[0].astype(np.float64)
        cosine = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
        assert cosine.min() >= 0.99, level
        assert frobenius_error(got, expected) <= 0.01, level


# ----------------------------------------------------------------------------- shared weights


def _shared_models() -> dict[str, tuple[onnx.ModelProto, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 48)).astype(np.float32)  # [K, N] for x·W
    x = rng.standard_normal((4, 32)).astype(np.float32)
    z = rng.standard_normal((48, 5)).astype(np.float32)
    u = rng.standard_normal((4, 48)).astype(np.float32)
    init = [numpy_helper.from_array(w, "w")]
    left_and_right = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y1"], name="x_at_w"),
         helper.make_node("MatMul", ["w", "z"], ["y2"], name="w_at_z")],
        [_value("x", [4, 32]), _value("z", [48, 5])], [_value("y1", [4, 48]), _value("y2", [32, 5])], init)
    matmul_and_gemm = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y1"], name="matmul"),
         helper.make_node("Gemm", ["u", "w"], ["y2"], name="gemm_transb", transB=1)],
        [_value("x", [4, 32]), _value("u", [4, 48])], [_value("y1", [4, 48]), _value("y2", [4, 32])], init)
    tied = _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="encode"),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0], name="tie"),
         helper.make_node("MatMul", ["r", "wt"], ["y1"], name="decode")],
        [_value("x", [4, 32])], [_value("y1", [4, 32])], init)
    return {"left_and_right": (left_and_right, {"x": x, "z": z}),
            "matmul_and_gemm": (matmul_and_gemm, {"x": x, "u": u}),
            "tied_autoencoder": (tied, {"x": x})}


def _reference_outputs(case: str, feeds: dict[str, np.ndarray], bits: int, group_size: int) -> list[np.ndarray]:
    """Each reader's output with the weight quantized in that reader's own orientation (numpy only)."""
    model, _ = _shared_models()[case]
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)  # [K=32, N=48]
    as_kn = quantize_rtn(w.T, bits, group_size).dequantize(np.float64).T  # readers contracting over K (x·W)
    as_nk = quantize_rtn(w, bits, group_size).dequantize(np.float64)  # readers contracting over N (W·z, Gemm)
    x = feeds["x"].astype(np.float64)
    if case == "left_and_right":
        return [x @ as_kn, as_nk @ feeds["z"]]
    if case == "matmul_and_gemm":
        return [x @ as_kn, feeds["u"] @ as_nk.T]
    return [np.maximum(x @ as_kn, 0) @ as_nk.T]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["left_and_right", "matmul_and_gemm", "tied_autoencoder"])
def test_weight_read_in_two_orientations(case, fmt):
    """Before: the second reader got the first reader's orientation (121-145 % error, or an unloadable model)."""
    _needs_library(fmt)
    model, feeds = _shared_models()[case]
    quantized, summary = onnxq.quantize_with_summary(model, bits=4, group_size=16, format=fmt)
    onnx.checker.check_model(quantized, full_check=True)
    assert len(summary.layers) == 2  # two orientations, two solutions
    expected = _reference_outputs(case, feeds, 4, 16)
    for level in LEVELS:
        for got, want in zip(_run_any(quantized, feeds, level), expected, strict=True):
            assert relative_error(got, want) <= 1e-5, (level, case)


def test_shared_weight_same_orientation_is_solved_once():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
                    helper.make_node("Identity", ["x"], ["a2"]),
                    helper.make_node("MatMul", ["a2", "w"], ["b"], name="second")],
                   [_value("x", [2, 16])], [_value("a", [2, 8]), _value("b", [2, 8])],
                   [numpy_helper.from_array(w, "w")])
    quantized, summary = onnxq.quantize_with_summary(model, bits=4, group_size=16, format="matmulnbits")
    assert len(summary.layers) == 1
    assert sum(1 for t in quantized.graph.initializer if t.name.startswith("w_nbits")) == 1


# ----------------------------------------------------------------------------- old-style and broken graphs


@pytest.mark.parametrize("fmt", FORMATS)
def test_initializers_listed_as_graph_inputs(fmt):
    """IR-3 style: every initializer also a graph input. The output must not ask for the removed ones as feeds."""
    _needs_library(fmt)
    model, w = positive_matmul_model(k=64, n=16)
    model.graph.input.append(_value("w", [64, 16]))
    model.ir_version = 3
    model.opset_import[0].version = 9
    onnx.checker.check_model(model)
    quantized = onnxq.quantize(model, bits=8, group_size=-1, format=fmt)
    onnx.checker.check_model(quantized)
    initializers = {t.name for t in quantized.graph.initializer}
    assert all(v.name in initializers or v.name == "x" for v in quantized.graph.input)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    got = _run_any(quantized, {"x": x})[0]  # only x is fed
    assert frobenius_error(got, x.astype(np.float64) @ w) <= 0.01


def test_weight_that_is_also_a_graph_output_is_kept():
    model, w = positive_matmul_model(k=32, n=8)
    model.graph.output.append(_value("w", [32, 8]))
    quantized = onnxq.quantize(model, bits=4, group_size=16, format="matmulnbits")
    x = np.ones((1, 32), dtype=np.float32)
    outputs = session(quantized).run(None, {"x": x})
    np.testing.assert_array_equal(outputs[1], w)  # the float weight still comes out unchanged


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_weight_is_refused_naming_the_node(bad):
    model, _ = positive_matmul_model(k=32, n=8)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[3, 2] = bad
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    with pytest.raises(OnnxqError, match=r"weight 'w' of MatMul node 'mm' contains NaN or Inf"):
        onnxq.quantize(model, bits=4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_as_constant_nodes_are_quantized(fmt):
    """Some exporters write weights as Constant nodes rather than initializers."""
    _needs_library(fmt)
    w = np.random.default_rng(5).standard_normal((32, 16)).astype(np.float32)
    model = _model([helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
                    helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [_value("x", ["M", 32])], [_value("y", ["M", 16])], [])
    quantized, summary = onnxq.quantize_with_summary(model, bits=8, group_size=-1, format=fmt)
    assert [r.name for r in summary.layers] == ["mm"]
    assert not any(n.op_type == "Constant" for n in quantized.graph.node)
    x = np.random.default_rng(6).standard_normal((4, 32)).astype(np.float32)
    assert frobenius_error(_run_any(quantized, {"x": x})[0], x.astype(np.float64) @ w) <= 0.01


def test_weight_used_inside_an_if_branch_stays_float_there():
    """An outer-scope initializer read by a main-graph MatMul and inside an If branch: the main reader is
    quantized, the branch keeps reading the float weight, and the branch's own MatMul is listed as skipped."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    branch_w = rng.standard_normal((16, 16)).astype(np.float32)
    then_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["bw"], value=numpy_helper.from_array(branch_w, "bw")),
         helper.make_node("MatMul", ["h", "w"], ["t1"], name="then_outer"),
         helper.make_node("MatMul", ["t1", "bw"], ["t"], name="then_inner")],
        "then", [], [_value("t", ["M", 16])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["h"], ["e"])], "else", [], [_value("e", ["M", 16])])
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="main"),
         helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)],
        [_value("x", ["M", 16]), _value("cond", [], TensorProto.BOOL)], [_value("y", ["M", 16])],
        [numpy_helper.from_array(w, "w")])
    quantized, summary = onnxq.quantize_with_summary(model, bits=8, group_size=-1, format="matmulnbits")
    onnx.checker.check_model(quantized, full_check=True)
    assert [r.name for r in summary.layers] == ["main"]
    assert {s.name for s in summary.skipped} >= {"then_outer", "then_inner"}
    x = rng.standard_normal((3, 16)).astype(np.float32)
    for cond in (True, False):
        got = session(quantized).run(None, {"x": x, "cond": np.array(cond)})[0]
        h = x.astype(np.float64) @ w
        assert frobenius_error(got, (h @ w) @ branch_w if cond else h) <= 0.01


@pytest.mark.parametrize("shape", [(64, 0), (0, 32)])
def test_zero_size_weight_is_skipped_with_a_reason(shape):
    rng = np.random.default_rng(8)
    k = shape[0]
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="empty"),
                    helper.make_node("MatMul", ["x2", "w2"], ["y2"], name="real")],
                   [_value("x", ["M", k]), _value("x2", ["M", 32])],
                   [_value("y", ["M", shape[1]]), _value("y2", ["M", 8])],
                   [numpy_helper.from_array(np.zeros(shape, np.float32), "w"),
                    numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")])
    quantized, summary = onnxq.quantize_with_summary(model, bits=4, group_size=16)
    assert [r.name for r in summary.layers] == ["real"]
    assert any(s.name == "empty" and "is empty" in s.reason for s in summary.skipped)
    onnx.checker.check_model(quantized)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_unnamed_dims_survive_ort_constant_folding(fmt):
    """A MatMul on ``[?, ?, 64]`` (no dim names) followed by ``Reshape(y, [Shape(y)[0], -1, 4, 12])``, the head split
    of optimum's attention. MatMulLowBit's shape inference gave the unknown dims the value -1, ORT folded
    ``Shape(y)[0]`` to -1 and refused the Reshape ("multiple -1 dimensions") under ORT_ENABLE_ALL."""
    _needs_library(fmt)
    rng = np.random.default_rng(9)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("Shape", ["y"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "axis"], ["b1"]),
             helper.make_node("Concat", ["b1", "rest"], ["shape"], axis=0),
             helper.make_node("Reshape", ["y", "shape"], ["z"], name="heads")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axis"),
             numpy_helper.from_array(np.array([-1, 4, 12], np.int64), "rest")]
    model = _model(nodes, [_value("x", [None, None, 64])], [_value("z", [None, None, 4, 12])], inits, opset=17,
                   ir_version=8)
    quantized = onnxq.quantize(model, bits=8, group_size=-1, format=fmt)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    expected = (x.astype(np.float64) @ w).reshape(2, -1, 4, 12)
    for level in LEVELS:
        got = _run_any(quantized, {"x": x}, level)[0]
        assert got.shape == (2, 3, 4, 12) and frobenius_error(got, expected) <= 0.01, level


def test_conv_transpose_is_listed_as_skipped():
    rng = np.random.default_rng(10)
    model = _model([helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
                    helper.make_node("ConvTranspose", ["h", "wt"], ["y"], name="up", strides=[2, 2])],
                   [_value("x", ["N", 4, 8, 8])], [_value("y", ["N", 2, 17, 17])],
                   [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w"),
                    numpy_helper.from_array(rng.standard_normal((8, 2, 3, 3)).astype(np.float32), "wt")],
                   opset=17, ir_version=8)
    _, summary = onnxq.quantize_with_summary(model, bits=8, group_size=-1, format="qdq")
    assert [r.name for r in summary.layers] == ["conv"]
    assert [(s.name, s.op_type) for s in summary.skipped] == [("up", "ConvTranspose")]
    assert [r.name for r in onnxq.inspect(model).rows] == ["conv"]


def test_a_model_whose_weights_are_all_inside_subgraphs_is_refused_with_the_reason():
    rng = np.random.default_rng(11)
    body = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"], name="inner")], "then", [],
                             [_value("t", ["M", 8])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_value("e", ["M", 8])])
    model = _model([helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=body, else_branch=other)],
                   [_value("x", ["M", 8]), _value("cond", [], TensorProto.BOOL)], [_value("y", ["M", 8])],
                   [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")])
    with pytest.raises(OnnxqError, match=r"1 layers skipped, e\.g\. 'inner' \(inside the 'then_branch' subgraph"):
        onnxq.quantize(model, bits=8)


@pytest.mark.parametrize("sequential", [True, False])
def test_batch_declared_as_minus_one_calibrates(sequential):
    """paddle2onnx declares a dynamic batch as ``dim_value: -1``; it was taken as a fixed batch of -1 ("calibration
    data holds no batches", or a traceback without sequential calibration)."""
    model, w = positive_matmul_model(k=32, n=8)
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    x = np.random.default_rng(12).standard_normal((20, 32)).astype(np.float32)
    quantized = onnxq.quantize(model, method="decoupleq", bits=4, group_size=16, calibration={"x": x},
                               sequential=sequential)
    assert frobenius_error(session(quantized).run(None, {"x": x})[0], x.astype(np.float64) @ w) <= 0.05
