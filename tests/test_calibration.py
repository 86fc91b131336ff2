"""Calibration: .npz loading and checks, and H = Σ xᵀx from ORT activations against independent references."""

from __future__ import annotations

from pathlib import Path

import graphs
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from threadpoolctl import threadpool_limits

from onnxq.calibration.data import iter_batches, load_calibration
from onnxq.calibration.keys import hessian_key
from onnxq.calibration.stream import CalibrationStats, collect_hessians, iter_hessian_passes
from onnxq.errors import OnnxqError
from onnxq.ir.model import load_model, save_model
from onnxq.ir.targets import find_targets
from onnxq.stats.hessian import HessianSum
from onnxq.stats.unfold import Unfolding

DATA_DIR = Path(__file__).resolve().parents[1] / "onnxq" / "data"


# ----------------------------------------------------------------------------- helpers


def make_model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    tensors = [numpy_helper.from_array(value, name) for name, value in initializers.items()]
    graph = helper.make_graph(nodes, "test", inputs, outputs, tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def run_with_outputs(model: onnx.ModelProto, feed: dict, names: list[str]) -> dict[str, np.ndarray]:
    """Independent ORT run (from bytes, no optimisation) exposing intermediate tensors."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    del augmented.graph.output[:]
    augmented.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feed), strict=True))


def outer_sum(rows: np.ndarray) -> np.ndarray:
    """Σ xᵀx with a plain loop over rows, in float64."""
    rows = rows.astype(np.float64)
    h = np.zeros((rows.shape[1], rows.shape[1]))
    for row in rows:
        h += np.outer(row, row)
    return h


def assert_hessian(h: np.ndarray, reference: np.ndarray) -> None:
    assert h.dtype == np.float64 and h.shape == reference.shape
    np.testing.assert_allclose(h, reference, rtol=2e-6, atol=2e-6 * np.abs(reference).max())


def batches_of(feed: dict, size: int) -> list[dict]:
    n = next(iter(feed.values())).shape[0]
    return [{k: v[i : i + size] for k, v in feed.items()} for i in range(0, n, size)]


# ----------------------------------------------------------------------------- MatMul / Gemm


@pytest.fixture(scope="module")
def matmul_model():
    """x[b,3,4] → MatMul(x, W1), MatMul(x, W2) (shared key) → Relu r[b,3,5] → MatMul(A, r) (activation on input 1)."""
    rng = np.random.default_rng(0)
    inits = {
        "W1": rng.standard_normal((4, 5)).astype(np.float32),
        "W2": rng.standard_normal((4, 6)).astype(np.float32),
        "A": rng.standard_normal((2, 3)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
        helper.make_node("MatMul", ["x", "W2"], ["h2"], name="mm2"),
        helper.make_node("Relu", ["h1"], ["r"]),
        helper.make_node("MatMul", ["A", "r"], ["left"], name="mm_left"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 4])]
    outputs = [
        helper.make_tensor_value_info("h2", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("left", TensorProto.FLOAT, None),
    ]
    return make_model(nodes, inputs, outputs, inits)


def test_matmul_both_sides_3d_and_shared_key(matmul_model):
    targets = find_targets(matmul_model).targets
    assert len(targets) == 3
    keys = [hessian_key(t) for t in targets]
    assert keys[0] == keys[1] == ("x", "rows") and keys[2] == ("r", "columns")

    x = np.random.default_rng(1).standard_normal((10, 3, 4)).astype(np.float32)
    hessians, stats = collect_hessians(matmul_model, targets, batches_of({"x": x}, 4))
    assert set(hessians) == {("x", "rows"), ("r", "columns")}  # one H for the two layers reading x

    r = run_with_outputs(matmul_model, {"x": x}, ["r"])["r"]
    columns = np.array([r[b, :, j] for b in range(r.shape[0]) for j in range(r.shape[2])])
    assert_hessian(hessians[("x", "rows")], outer_sum(x.reshape(-1, 4)))
    assert_hessian(hessians[("r", "columns")], outer_sum(columns))
    assert stats.rows == {("x", "rows"): 30, ("r", "columns"): 50}
    assert stats.samples == 10 and stats.batches == 3 and stats.passes == 1
    assert stats.seconds > 0 and stats.peak_rss_bytes > 0
    assert stats.hessian_bytes == 8 * (16 + 9)


def test_output_energy_equals_trace_w_h_wt(matmul_model):
    """Σ‖y‖² over the layer outputs computed by ORT equals trace(W H Wᵀ) for every target (any unfolding)."""
    x = np.random.default_rng(2).standard_normal((6, 3, 4)).astype(np.float32)
    targets = find_targets(matmul_model).targets
    hessians, _ = collect_hessians(matmul_model, targets, [{"x": x}])
    outputs = run_with_outputs(matmul_model, {"x": x}, ["h1", "h2", "left"])
    for target, output in zip(targets, ["h1", "h2", "left"], strict=True):
        w = target.matrix_from_initializer(numpy_helper.to_array(
            next(t for t in matmul_model.graph.initializer if t.name == target.weight_name))).astype(np.float64)
        energy = np.trace(w @ hessians[hessian_key(target)] @ w.T)
        np.testing.assert_allclose(energy, np.sum(outputs[output].astype(np.float64) ** 2), rtol=1e-5)


def test_gemm_shares_h_across_trans_b_and_matches_reference():
    rng = np.random.default_rng(3)
    inits = {
        "B0": rng.standard_normal((7, 3)).astype(np.float32),
        "B1": rng.standard_normal((5, 7)).astype(np.float32),
        "C": rng.standard_normal(3).astype(np.float32),
        "Wp": rng.standard_normal((6, 7)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "Wp"], ["a"], name="pre"),
        helper.make_node("Gemm", ["a", "B0", "C"], ["g0"], name="g0"),
        helper.make_node("Gemm", ["a", "B1"], ["g1"], name="g1", transB=1),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("g0", "g1")],
        inits,
    )
    targets = find_targets(model).targets
    x = rng.standard_normal((9, 6)).astype(np.float32)
    hessians, stats = collect_hessians(model, targets, batches_of({"x": x}, 2))
    a = run_with_outputs(model, {"x": x}, ["a"])["a"]
    assert set(hessians) == {("x", "rows"), ("a", "rows")}
    assert_hessian(hessians[("a", "rows")], outer_sum(a))
    assert_hessian(hessians[("x", "rows")], outer_sum(x))
    assert stats.rows[("a", "rows")] == 9 and stats.batches == 5


def test_initializer_as_activation_source():
    """A Gemm whose A input is a constant: its H is AᵀA once per batch."""
    rng = np.random.default_rng(4)
    inits = {
        "Aconst": rng.standard_normal((3, 4)).astype(np.float32),
        "B": rng.standard_normal((4, 2)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["Aconst", "B"], ["g"], name="g"),
        helper.make_node("Add", ["g", "x"], ["y"]),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    targets = find_targets(model).targets
    x = np.zeros((3, 2), np.float32)
    hessians, stats = collect_hessians(model, targets, [{"x": x}, {"x": x}])
    assert_hessian(hessians[("Aconst", "rows")], 2 * outer_sum(inits["Aconst"]))
    assert stats.rows[("Aconst", "rows")] == 6


def test_float16_model_accumulates_in_float64():
    rng = np.random.default_rng(5)
    inits = {"W": rng.standard_normal((8, 4)).astype(np.float16), "V": rng.standard_normal((4, 3)).astype(np.float16)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="m1"), helper.make_node("MatMul", ["h", "V"], ["y"])]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
        inits,
    )
    x = rng.standard_normal((20, 8)).astype(np.float16)
    hessians, _ = collect_hessians(model, find_targets(model).targets, batches_of({"x": x}, 8))
    h = run_with_outputs(model, {"x": x}, ["h"])["h"]
    assert h.dtype == np.float16
    assert_hessian(hessians[("h", "rows")], outer_sum(h))
    assert_hessian(hessians[("x", "rows")], outer_sum(x))


# ----------------------------------------------------------------------------- Conv


def conv_model(x_shape, weight, group, **attrs) -> onnx.ModelProto:
    """Relu(x) → Conv (so the conv input is an intermediate tensor)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["xr"]),
        helper.make_node("Conv", ["xr", "W"], ["y"], name="conv", group=group, **attrs),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", *x_shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        {"W": weight},
    )


def torch_unfold_reference(xr: np.ndarray, kernel, strides, pads, dilations, groups) -> np.ndarray:
    """Σ over patches of patchᵀpatch per group, from torch.nn.functional.unfold on an explicitly padded input."""
    import torch  # imported here: slow to import, needed by the conv tests only

    spatial = len(kernel)
    if spatial == 1:  # 1-D as 2-D with height 1
        xr, kernel, strides, dilations = xr[:, :, None, :], (1, *kernel), (1, *strides), (1, *dilations)
        pads = (0, pads[0], 0, pads[1])
    padded = np.pad(xr, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    cols = torch.nn.functional.unfold(
        torch.from_numpy(padded).double(), kernel_size=kernel, dilation=dilations, stride=strides
    ).numpy()  # [B, C·kh·kw, L], rows ordered (c, kh, kw)
    patches = cols.transpose(0, 2, 1).reshape(-1, cols.shape[1])
    width = patches.shape[1] // groups
    return np.stack([patches[:, g * width : (g + 1) * width].T @ patches[:, g * width : (g + 1) * width]
                     for g in range(groups)])


CONV_CASES = [
    # x shape, weight shape, group, attrs
    ((2, 4, 7, 6), (6, 2, 3, 2), 2, dict(strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2])),
    ((3, 3, 5, 5), (4, 3, 3, 3), 1, dict(strides=[1, 1], pads=[1, 1, 1, 1])),
    ((2, 4, 6, 5), (4, 1, 2, 2), 4, dict(strides=[2, 2], dilations=[2, 1])),  # depthwise, no pads attribute
    ((2, 6, 9), (6, 2, 3), 3, dict(strides=[2], pads=[2, 1], dilations=[2])),  # 1-D
    ((2, 2, 11), (3, 2, 4), 1, dict()),  # 1-D defaults
]


@pytest.mark.parametrize("x_shape, w_shape, group, attrs", CONV_CASES)
def test_conv_hessian_matches_torch_unfold(x_shape, w_shape, group, attrs):
    rng = np.random.default_rng(6)
    weight = rng.standard_normal(w_shape).astype(np.float32)
    model = conv_model(x_shape, weight, group, **attrs)
    targets = find_targets(model).targets
    x = rng.standard_normal(x_shape).astype(np.float32)
    hessians, stats = collect_hessians(model, targets, batches_of({"x": x}, 1))
    (key,) = hessians
    spatial = len(w_shape) - 2
    reference = torch_unfold_reference(
        np.maximum(x, 0), w_shape[2:], attrs.get("strides", [1] * spatial), attrs.get("pads", [0] * 2 * spatial),
        attrs.get("dilations", [1] * spatial), group,
    )
    h = hessians[key]
    assert h.shape == ((group, *reference.shape[1:]) if group > 1 else reference.shape[1:])
    assert_hessian(h.reshape(reference.shape), reference)
    y = run_with_outputs(model, {"x": x}, ["y"])["y"]
    assert stats.rows[key] == y.shape[0] * int(np.prod(y.shape[2:]))
    # and the patches line up with ORT's convolution: Σ‖y‖² = Σ_g trace(W_g H_g W_gᵀ)
    w_groups = weight.reshape(group, w_shape[0] // group, -1).astype(np.float64)
    energy = sum(np.trace(w_groups[g] @ h.reshape(reference.shape)[g] @ w_groups[g].T) for g in range(group))
    np.testing.assert_allclose(energy, np.sum(y.astype(np.float64) ** 2), rtol=1e-5)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("spatial", [1, 2])
def test_conv_auto_pad_agrees_with_ort(auto_pad, spatial):
    rng = np.random.default_rng(7)
    x_shape = (2, 2, 7, 8)[: 2 + spatial]
    w_shape = (3, 2, 4, 3)[: 2 + spatial]
    weight = rng.standard_normal(w_shape).astype(np.float32)
    model = conv_model(x_shape, weight, 1, auto_pad=auto_pad, strides=[2] * spatial)
    x = rng.standard_normal(x_shape).astype(np.float32)
    hessians, _ = collect_hessians(model, find_targets(model).targets, [{"x": x}])
    (h,) = hessians.values()
    y = run_with_outputs(model, {"x": x}, ["y"])["y"].astype(np.float64)
    w = weight.reshape(w_shape[0], -1).astype(np.float64)
    np.testing.assert_allclose(np.trace(w @ h @ w.T), np.sum(y**2), rtol=1e-5)


def test_conv_keys_distinguish_unfoldings():
    rng = np.random.default_rng(8)
    w3 = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "Wa"], ["ya"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "Wb"], ["yb"], name="b", pads=[1, 1, 1, 1]),  # same unfolding as a
        helper.make_node("Conv", ["x", "Wc"], ["yc"], name="c", strides=[2, 2]),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 6, 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("ya", "yb", "yc")],
        {"Wa": w3, "Wb": w3 * 2, "Wc": w3},
    )
    targets = find_targets(model).targets
    keys = [hessian_key(t) for t in targets]
    assert keys[0] == keys[1] != keys[2]
    hessians, stats = collect_hessians(model, targets, [{"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)}])
    assert len(hessians) == 2
    assert stats.rows[keys[0]] == 2 * 36 and stats.rows[keys[2]] == 2 * 4


# ----------------------------------------------------------------------------- memory-bounded passes


@pytest.fixture(scope="module")
def deep_model():
    return graphs.deep_model()


def test_memory_grouped_passes_give_the_same_hessians(deep_model):
    targets = find_targets(deep_model).targets
    x = np.random.default_rng(10).standard_normal((40, 16)).astype(np.float32)
    batches = iter_batches({"x": x}, batch_size=8)
    single, single_stats = collect_hessians(deep_model, targets, batches)
    assert single_stats.passes == 1 and len(single) == 5

    grouped, stats = collect_hessians(deep_model, targets, batches, max_memory=16_000)
    assert stats.passes >= 2 and sum(stats.keys_per_pass) == 5
    assert list(grouped) == list(single)
    for key in single:
        np.testing.assert_array_equal(grouped[key], single[key])
    assert stats.rows == single_stats.rows

    # the generator form hands out one group at a time
    groups = list(iter_hessian_passes(deep_model, targets, batches, max_memory=16_000))
    assert len(groups) == stats.passes and all(isinstance(s, CalibrationStats) for _, s in groups)


def test_max_memory_too_small_and_one_shot_iterators(deep_model):
    targets = find_targets(deep_model).targets
    x = np.random.default_rng(11).standard_normal((16, 16)).astype(np.float32)
    with pytest.raises(OnnxqError, match="max_memory .* too small.*raise --max-memory"):
        collect_hessians(deep_model, targets, [{"x": x}], max_memory=2_000)
    with pytest.raises(OnnxqError, match="one-shot iterator"):
        collect_hessians(deep_model, targets, iter(batches_of({"x": x}, 4)), max_memory=16_000)
    # a one-shot iterator is fine when one pass suffices, even with the memory probe
    one_shot, stats = collect_hessians(deep_model, targets, iter(batches_of({"x": x}, 4)), max_memory=1 << 30)
    listed, _ = collect_hessians(deep_model, targets, batches_of({"x": x}, 4))
    assert stats.passes == 1 and stats.batches == 4
    for key in listed:
        np.testing.assert_array_equal(one_shot[key], listed[key])


def test_external_data_model(tmp_path, deep_model):
    """A model saved with external data (the >2 GB layout) calibrates the same as the in-memory one."""
    save_model(deep_model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").exists()
    loaded = load_model(tmp_path / "m.onnx")
    x = np.random.default_rng(12).standard_normal((8, 16)).astype(np.float32)
    a, _ = collect_hessians(loaded, find_targets(loaded).targets, [{"x": x}])
    b, _ = collect_hessians(deep_model, find_targets(deep_model).targets, [{"x": x}])
    for key in b:
        np.testing.assert_array_equal(a[key], b[key])


# ----------------------------------------------------------------------------- calibration files


def test_iter_batches_from_folder_and_dict(tmp_path, matmul_model):
    rng = np.random.default_rng(13)
    x1 = rng.standard_normal((5, 3, 4)).astype(np.float64)  # float64 is cast to the model's float32
    x2 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.savez(tmp_path / "b.npz", x=x2, extra=np.zeros(2))  # names the model does not read are dropped
    np.savez(tmp_path / "a.npz", x=x1)
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.name for p in load_calibration(tmp_path)] == ["a.npz", "b.npz"]

    batches = iter_batches(tmp_path, batch_size=2, model=matmul_model)
    assert len(batches) == 4 and batches.num_samples == 7
    first = list(batches)
    second = list(batches)  # re-iterable
    assert [b["x"].shape[0] for b in first] == [2, 2, 1, 2]
    assert all(b["x"].dtype == np.float32 and set(b) == {"x"} for b in first)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in second]), np.concatenate([x1, x2]).astype(np.float32))

    from_path, _ = collect_hessians(matmul_model, find_targets(matmul_model).targets, tmp_path)
    reference = outer_sum(np.concatenate([x1.astype(np.float32), x2]).reshape(-1, 4))
    assert_hessian(from_path[("x", "rows")], reference)
    assert [len(b["x"]) for b in iter_batches({"x": x2})] == [2]


def test_integer_inputs_cast_within_kind():
    rng = np.random.default_rng(14)
    inits = {"E": rng.standard_normal((10, 4)).astype(np.float32), "W": rng.standard_normal((4, 3)).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"]), helper.make_node("MatMul", ["emb", "W"], ["y"])]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    ids = rng.integers(0, 10, (3, 5)).astype(np.int32)
    hessians, _ = collect_hessians(model, find_targets(model).targets, {"ids": ids})
    assert_hessian(hessians[("emb", "rows")], outer_sum(inits["E"][ids.reshape(-1)]))


@pytest.mark.parametrize(
    "arrays, pattern",
    [
        ({"y": np.zeros((2, 3, 4), np.float32)}, r"bad\.npz: model input 'x' is missing .*add an array named 'x'"),
        ({"x": np.zeros((2, 3, 4), np.int64)}, r"bad\.npz: input 'x' has dtype int64, the model expects float32"),
        ({"x": np.zeros((3, 4), np.float32)}, r"bad\.npz: input 'x' has rank 2 .*expects rank 3 \[b, 3, 4\]"),
        ({"x": np.zeros((2, 5, 4), np.float32)}, r"bad\.npz: input 'x' has shape \(2, 5, 4\).*axis 1 must be 3"),
        ({"x": np.zeros((0, 3, 4), np.float32)}, r"bad\.npz: holds 0 samples"),
        ({"x": np.zeros((2, 3, 4), np.float32), "z": np.zeros(3)}, r"bad\.npz: arrays disagree on the number"),
        ({}, r"bad\.npz: the \.npz holds no arrays"),
    ],
)
def test_bad_calibration_file_errors(tmp_path, matmul_model, arrays, pattern):
    good = tmp_path / "a_good.npz"
    np.savez(good, x=np.zeros((2, 3, 4), np.float32))
    np.savez(tmp_path / "bad.npz", **arrays)
    targets = find_targets(matmul_model).targets
    with pytest.raises(OnnxqError, match=pattern) as info:
        collect_hessians(matmul_model, targets, tmp_path)
    assert "\n" not in str(info.value)


def test_unreadable_or_missing_calibration(tmp_path, matmul_model):
    targets = find_targets(matmul_model).targets
    (tmp_path / "broken.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(OnnxqError, match=r"broken\.npz: not a readable \.npz"):
        collect_hessians(matmul_model, targets, tmp_path / "broken.npz")
    with pytest.raises(OnnxqError, match="not found"):
        load_calibration(tmp_path / "nothing.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxqError, match="holds no .npz files"):
        load_calibration(tmp_path / "empty")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(OnnxqError, match="must be an .npz"):
        load_calibration(tmp_path / "c.txt")
    # in-memory arrays go through the same per-batch checks
    with pytest.raises(OnnxqError, match="input 'x' has rank 2"):
        collect_hessians(matmul_model, targets, [{"x": np.zeros((2, 4), np.float32)}])


def test_ort_failure_names_the_batch():
    """A batch that passes the input checks but fails inside ORT (a Reshape that does not divide)."""
    inits = {"shape": np.array([-1, 5], np.int64), "W": np.ones((5, 2), np.float32)}
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["y"])]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    targets = find_targets(model).targets
    good = {"x": np.ones((2, 10), np.float32)}
    hessians, _ = collect_hessians(model, targets, [good, good])
    np.testing.assert_array_equal(hessians[("r", "rows")], np.full((5, 5), 8.0))  # 4 rows of ones per batch
    with pytest.raises(OnnxqError, match=r"calibration batch 1: ONNX Runtime failed on this batch"):
        collect_hessians(model, targets, [good, {"x": np.ones((2, 10), np.float32)[:, :7]}, good])


# ----------------------------------------------------------------------------- a real model


def _digits_model(kind: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The committed digits model and calibration set, or a small stand-in of the same structure."""
    path, calib = DATA_DIR / f"digits_{kind}.onnx", DATA_DIR / "digits_calib.npz"
    if path.exists() and calib.exists():
        with np.load(calib) as data:
            return load_model(path), {k: data[k] for k in data.files}
    rng = np.random.default_rng(15)
    pixels = rng.uniform(0, 1, (128, 64)).astype(np.float32)
    if kind == "mlp":
        inits = {
            "W1": (rng.standard_normal((128, 64)) / 8).astype(np.float32),
            "b1": rng.standard_normal(128).astype(np.float32),
            "W2": (rng.standard_normal((128, 64)) / 8).astype(np.float32),
            "W3": (rng.standard_normal((10, 64)) / 8).astype(np.float32),
        }
        nodes = [
            helper.make_node("Gemm", ["pixels", "W1", "b1"], ["g1"], transB=1),
            helper.make_node("Relu", ["g1"], ["r1"]),
            helper.make_node("MatMul", ["r1", "W2"], ["m2"]),
            helper.make_node("Relu", ["m2"], ["r2"]),
            helper.make_node("Gemm", ["r2", "W3"], ["logits"], transB=1),
        ]
        inputs = [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["b", 64])]
    else:
        inits = {
            "C1": (rng.standard_normal((16, 1, 3, 3)) / 3).astype(np.float32),
            "C2": (rng.standard_normal((32, 8, 3, 3)) / 8).astype(np.float32),
            "F": (rng.standard_normal((10, 512)) / 20).astype(np.float32),
        }
        nodes = [
            helper.make_node("Conv", ["image", "C1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["a1"]),
            helper.make_node("Conv", ["a1", "C2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=2),
            helper.make_node("Relu", ["c2"], ["a2"]),
            helper.make_node("Flatten", ["a2"], ["flat"]),
            helper.make_node("Gemm", ["flat", "F"], ["logits"], transB=1),
        ]
        inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 1, 8, 8])]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return model, {"pixels": pixels, "image": pixels.reshape(-1, 1, 8, 8)}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_digits_hessians_are_psd_and_match_mean_squares(kind):
    model, calib = _digits_model(kind)
    targets = find_targets(model).targets
    hessians, stats = collect_hessians(model, targets, iter_batches(calib, batch_size=32, model=model))
    assert len(hessians) == len(targets)
    n = len(next(iter(calib.values())))
    assert stats.samples == n
    input_name = model.graph.input[0].name
    activations = run_with_outputs(
        model, {input_name: calib[input_name]}, [k[0] for k in hessians if k[0] != input_name]
    ) | {input_name: calib[input_name]}
    for target in targets:
        key = hessian_key(target)
        h = hessians[key].reshape(-1, *hessians[key].shape[-2:])
        np.testing.assert_array_equal(h, np.swapaxes(h, -1, -2))
        # PSD up to float32 rounding (the flattened CNN features are rank-deficient: 512 columns, 128 samples)
        with threadpool_limits(1):  # small eigenproblems: threaded BLAS only adds overhead
            assert all(np.linalg.eigvalsh(g).min() >= -1e-6 * np.abs(g).max() for g in h)
        x = activations[key[0]].astype(np.float64)
        if target.op_type == "Conv":
            # centre taps of the kernel see every input pixel exactly once at stride 1; in general compare the
            # per-channel energy: Σ_rows patch² at the centre tap ≤ Σ x² and = for stride 1 'same' padding
            groups = target.conv_groups
            kh, kw = target.weight_shape[2:]
            centre = [c * kh * kw + (kh // 2) * kw + kw // 2 for c in range(h.shape[-1] // (kh * kw))]
            per_channel = np.concatenate([np.diag(g)[centre] for g in h])
            strides = key[3]
            sampled = x[:, :, :: strides[0], :: strides[1]]
            np.testing.assert_allclose(per_channel, np.sum(sampled**2, axis=(0, 2, 3)), rtol=1e-5)
            assert groups in (1, 2)
        else:
            rows = x.reshape(-1, x.shape[-1])
            assert stats.rows[key] == rows.shape[0]
            np.testing.assert_allclose(np.diag(h[0]) / stats.rows[key], np.mean(rows**2, axis=0), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_model_over_2gb_with_external_data(tmp_path):
    """A 2.2 GB embedding table (external data) feeding a MatMul: the session is built from files, not bytes."""
    rows, width = 550_000, 1_000  # 2.2 GB of float32, written straight to the external-data file
    row_values = np.arange(width, dtype=np.float32) / width
    with open(tmp_path / "big.onnx.data", "wb") as data:
        for start in range(0, rows, 50_000):
            block = np.tile(row_values, (50_000, 1))
            block[:, 0] = np.arange(start, start + 50_000)
            data.write(block.tobytes())
    table = onnx.TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[rows, width])
    table.data_location = onnx.TensorProto.EXTERNAL
    table.external_data.add(key="location", value="big.onnx.data")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"]), helper.make_node("MatMul", ["emb", "W"], ["y"])]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        {"W": np.ones((width, 2), np.float32)},
    )
    model.graph.initializer.append(table)
    (tmp_path / "big.onnx").write_bytes(model.SerializeToString())

    loaded = load_model(tmp_path / "big.onnx")
    ids = np.array([3, 7, 549_999], dtype=np.int64)
    hessians, stats = collect_hessians(loaded, find_targets(loaded).targets, [{"ids": ids}])
    emb = np.tile(row_values, (3, 1))
    emb[:, 0] = ids
    assert_hessian(hessians[("emb", "rows")], outer_sum(emb))
    assert stats.rows[("emb", "rows")] == 3


def test_hessian_sum_unit_cases():
    """Direct checks of the unfoldings: a 1-D column operand, and float16 rows."""
    column = HessianSum(Unfolding(tensor="v", kind="columns", size=3))
    column.add(np.array([1.0, 2.0, 3.0], np.float32))
    np.testing.assert_array_equal(column.result(), np.outer([1, 2, 3], [1, 2, 3]))
    assert column.rows == 1
    rows = HessianSum(Unfolding(tensor="x", kind="rows", size=2))
    rows.add(np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], np.float16))
    np.testing.assert_array_equal(rows.result(), outer_sum(np.arange(1, 9).reshape(4, 2)))
    with pytest.raises(OnnxqError, match="reduction axis should have 2"):
        rows.add(np.zeros((4, 3), np.float32))


def test_hessian_sum_layout_keeps_the_sum():
    """The running ``H`` is column-major (the layout ``ssyrk`` returns, so each block's ``+=`` reads both arrays in
    order); its result is the row-major symmetric matrix of exactly the float64 sums of the blocks' upper triangles,
    also after a shard arrives read-only and row-major (from another process)."""
    from scipy.linalg import blas

    rng = np.random.default_rng(3)
    blocks = [rng.standard_normal((n, 300)).astype(np.float32) for n in (700, 64, 2048)]
    expected = np.zeros((300, 300))
    for block in blocks:
        expected += blas.ssyrk(1.0, block.T, trans=0)
    expected = np.triu(expected) + np.triu(expected, 1).T
    unit = Unfolding(tensor="x", kind="rows", size=300)
    running = HessianSum(unit, keep_shards=True)
    for block in blocks:
        running.add(block)
    running.end_shard()
    assert running.shards[0].upper[0].flags.f_contiguous
    shard = running.shards[0]
    copied = type(shard)(np.ascontiguousarray(shard.upper), None, shard.rows)  # row-major, read-only
    copied.upper.flags.writeable = False
    for upper in (shard, copied):
        total = HessianSum(unit)
        total.fold(upper)
        result = total.result()
        assert result.flags.c_contiguous and result.tobytes() == expected.tobytes()
    exact = sum(block.astype(np.float64).T @ block.astype(np.float64) for block in blocks)
    np.testing.assert_allclose(result, exact, rtol=1e-5, atol=1e-3)


def test_hessian_sum_jobs_are_independent():
    """With a reference, a batch's update is three jobs (``C``'s rows ``[K/4, K)``, ``H``, ``C``'s rows
    ``[0, K/4)``) writing disjoint memory: run in any order they give the same bytes, and ``C`` is ``Σ xᵀx_ref``."""
    rng = np.random.default_rng(4)
    x = [rng.standard_normal((512, 96)).astype(np.float32) for _ in range(3)]
    ref = [a + 0.1 * rng.standard_normal(a.shape).astype(np.float32) for a in x]
    unit = Unfolding(tensor="x", kind="rows", size=96)
    results = []
    for order in (slice(None), slice(None, None, -1)):
        total = HessianSum(unit, cross=True)
        for a, r in zip(x, ref, strict=True):
            jobs = total.parts(a, r)
            assert len(jobs) == 3
            for job in jobs[order]:
                job()
        results.append((total.result().tobytes(), total.cross_result().tobytes(), total.rows))
        exact = sum(a.astype(np.float64).T @ r.astype(np.float64) for a, r in zip(x, ref, strict=True))
        np.testing.assert_allclose(total.cross_result(), exact, rtol=1e-5, atol=1e-3)
    assert results[0] == results[1] and results[0][2] == 3 * 512
