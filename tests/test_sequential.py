"""Sequential calibration (onnxq.sequential): every step's H equals a full calibration run on the partially
quantized model, every node runs at most once over all steps, spilling kept activations to disk changes nothing,
and the quantize pass uses it by default."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import pytest

from onnxq.api import quantize_with_summary
from onnxq.calibration.data import iter_batches
from onnxq.calibration.sequential import SequentialCalibration
from onnxq.calibration.sessions import release_shared_arena
from onnxq.calibration.stream import collect_hessians
from onnxq.ir.model import copy_model
from onnxq.ir.targets import find_targets, initializer_array
from onnxq.passes.quantize import layer_groups_of
from onnxq.solvers.rtn import quantize_rtn


def _sequential_against_rerun(model: onnx.ModelProto, calibration: dict, memory_limit: int | None):
    """Step through the groups, quantizing each (RTN W2 g8) after its step, and compare every step's H with
    collect_hessians on the working model. Returns (worst relative difference, calibration object, first-step H)."""
    targets = find_targets(model).targets
    groups = layer_groups_of(targets)
    working = copy_model(model)
    batches = iter_batches(calibration, batch_size=4, model=model)
    sequential = SequentialCalibration(model, groups, batches, memory_limit)
    worst, float_h = 0.0, collect_hessians(model, targets, batches)[0]
    last = {}
    try:
        for index, group in enumerate(groups):
            hessians, stats, crosses = sequential.step(index)
            assert crosses == {}
            reference, _ = collect_hessians(working, group, batches)
            assert list(hessians) == list(reference)
            assert stats.batches == len(batches)
            for key, h in hessians.items():
                worst = max(worst, float(np.abs(h - reference[key]).max() / np.abs(reference[key]).max()))
                last[key] = h
            for target in group:
                weight = target.matrix_from_initializer(initializer_array(model, target.weight_name))
                _commit(sequential, working, target, quantize_rtn(weight.astype(np.float64), 2, 8, False, "float"))
    finally:
        sequential.close()
    return worst, sequential, float_h, last


@pytest.mark.parametrize("memory_limit", [None, 0])  # 0: every kept activation goes to a memory-mapped file
def test_steps_match_full_rerun_and_run_each_node_once(memory_limit):
    model = graphs.residual_model()
    x = np.random.default_rng(1).standard_normal((10, 24)).astype(np.float32)
    worst, sequential, float_h, last = _sequential_against_rerun(model, {"x": x}, memory_limit)
    assert worst <= 1e-6
    assert sequential.node_runs <= len(model.graph.node)  # each node at most once over all steps
    assert sequential.store.peak_bytes > 0
    # the later groups really saw quantized inputs: their H differs from the float model's
    changed = [float(np.abs(last[k] - float_h[k]).max() / np.abs(float_h[k]).max()) for k in last]
    assert changed[0] == 0.0 and max(changed) > 0.05


@pytest.mark.parametrize("style", ["genai", "optimum"])
def test_a_tied_embedding_runs_once_and_steps_match_full_rerun(style):
    """The embedding reads lm_head's weight (solved last): its value holds until then, so it is computed once and
    kept, not recomputed before every step; each step's H still equals a rerun of the partially quantized model."""
    model = graphs.tied_lm_model(style=style)
    ids = np.random.default_rng(4).integers(0, 64, (8, 12)).astype(np.int64)
    worst, sequential, _, _ = _sequential_against_rerun(model, {"input_ids": ids}, None)
    assert len(sequential.plans) == 2
    assert worst <= 1e-6
    assert sequential.node_runs <= len(model.graph.node)


def test_steps_out_of_order_are_refused():
    model = graphs.residual_model()
    groups = layer_groups_of(find_targets(model).targets)
    batches = iter_batches({"x": np.ones((2, 24), np.float32)}, model=model)
    sequential = SequentialCalibration(model, groups, batches)
    with pytest.raises(ValueError, match="in order"):
        sequential.step(1)
    sequential.close()


def test_quantize_pass_is_sequential_by_default(tmp_path):
    model = graphs.residual_model()
    x = np.random.default_rng(2).standard_normal((16, 24)).astype(np.float32)
    options = dict(method="gptq", bits=2, group_size=8, format="fake", calibration={"x": x})
    _, on = quantize_with_summary(model, tmp_path / "seq.onnx", **options)
    _, off = quantize_with_summary(model, tmp_path / "float.onnx", sequential=False, **options)
    assert "sequential calibration: 6 layer groups, each layer fit to the float model's output" in on.notes
    assert not any(note.startswith("sequential") for note in off.notes)
    first = [r.error for r in on.layers[:2]], [r.error for r in off.layers[:2]]
    assert first[0] == first[1]  # the first group sees the float model either way
    assert [r.error for r in on.layers] != [r.error for r in off.layers]


def test_releasing_the_arena_before_each_solve_keeps_the_bytes(tmp_path, monkeypatch):
    """A large solve releases the calibration arena first (a 1 B model's ``down_proj``); the steps after it get the
    same activations, so the output is the same bytes.  Here every solve releases it."""
    import onnxq.passes.quantize as quantize_pass

    model = graphs.residual_model()
    x = np.random.default_rng(3).standard_normal((16, 24)).astype(np.float32)
    options = dict(method="decoupleq", bits=2, group_size=8, calibration={"x": x})
    quantize_with_summary(model, tmp_path / "kept.onnx", **options)
    released = []
    monkeypatch.setattr(quantize_pass, "ARENA_RELEASE_BYTES", 0)
    monkeypatch.setattr(quantize_pass, "release_shared_arena", lambda: released.append(release_shared_arena()))
    quantize_with_summary(model, tmp_path / "released.onnx", **options)
    assert len(released) == 6  # one per layer group
    assert (tmp_path / "kept.onnx").read_bytes() == (tmp_path / "released.onnx").read_bytes()


@pytest.mark.real
def test_minilm_steps_match_full_rerun():
    """Real graph (BERT with its mask and shape subgraphs): same H as rerunning the partially quantized model."""
    from models import minilm
    from onnxq.ir.model import load_model
    from tools.evaluation import make_minilm_calibration

    model = load_model(str(minilm.build_minilm()))
    worst, sequential, _, _ = _sequential_against_rerun(model, make_minilm_calibration(8, 32, 0), None)
    assert worst <= 1e-6
    assert sequential.node_runs <= len(model.graph.node)


def test_cross_terms_pair_quantized_and_float_inputs():
    """With float targets, C = Σ xᵀx_float for every layer input that a solved weight changed."""
    model = graphs.residual_model()
    x = np.random.default_rng(3).standard_normal((10, 24)).astype(np.float32)
    groups = layer_groups_of(find_targets(model).targets)
    working = copy_model(model)
    batches = iter_batches({"x": x}, batch_size=4, model=model)
    before = model.SerializeToString()
    sequential = SequentialCalibration(model, groups, batches, float_targets=True)
    float_inputs = _values(model, {"x": x})
    try:
        for index, group in enumerate(groups):
            hessians, _, crosses = sequential.step(index)
            quantized_inputs = _values(working, {"x": x})
            for key, h in hessians.items():
                xq, xf = quantized_inputs[key[0]], float_inputs[key[0]]
                np.testing.assert_allclose(h, xq.T.astype(np.float64) @ xq, rtol=1e-5, atol=1e-4)
                if index == 0:
                    assert key not in crosses  # nothing solved yet: the inputs are the float ones
                else:
                    np.testing.assert_allclose(crosses[key], xq.T.astype(np.float64) @ xf, rtol=1e-5, atol=1e-4)
            for target in group:
                weight = target.matrix_from_initializer(initializer_array(model, target.weight_name))
                _commit(sequential, working, target, quantize_rtn(weight.astype(np.float64), 2, 8, False, "float"))
    finally:
        sequential.close()
    assert sequential.float_store.peak_bytes > 0
    assert model.SerializeToString() == before  # the model is only read


def _float_target_sums(model, x, memory_limit) -> list[bytes]:
    """Every step's H and C bytes with float targets, each group committed as RTN W2 g8 after its step."""
    groups = layer_groups_of(find_targets(model).targets)
    sequential = SequentialCalibration(model, groups, iter_batches({"x": x}, batch_size=2, model=model), memory_limit,
                                       float_targets=True)
    out = []
    try:
        for index, group in enumerate(groups):
            hessians, _, crosses = sequential.step(index)
            out += [h.tobytes() for h in hessians.values()] + [c.tobytes() for c in crosses.values()]
            for target in group:
                weight = target.matrix_from_initializer(initializer_array(model, target.weight_name))
                values = target.initializer_from_matrix(
                    quantize_rtn(weight.astype(np.float64), 2, 8, False, "float").dequantize(np.float32))
                sequential.commit(target.weight_name, values)
    finally:
        sequential.close()
    return out


def test_float_steps_ahead_give_the_same_bytes_spilled_or_not():
    """The float model's steps run ahead and hand their layer inputs over batch by batch; held in memory or
    spilled to memory-mapped files (``memory_limit=0``), every step's H and C are the same bytes."""
    model = graphs.residual_model()
    x = np.random.default_rng(5).standard_normal((12, 24)).astype(np.float32)
    kept, spilled = _float_target_sums(model, x, None), _float_target_sums(model, x, 0)
    assert len(kept) == 6 + 5  # 6 groups: an H each, a C for each after the first
    assert kept == spilled


def test_closing_stops_the_float_step_ahead_and_removes_its_files(tmp_path, monkeypatch):
    """``close()`` after a step, while the float model's next step runs ahead: it stops after its current batch,
    and no temp file is left."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    model = graphs.residual_model(width=64)
    x = np.random.default_rng(6).standard_normal((64, 64)).astype(np.float32)
    groups = layer_groups_of(find_targets(model).targets)
    sequential = SequentialCalibration(model, groups, iter_batches({"x": x}, batch_size=1, model=model),
                                       float_targets=True)
    sequential.step(0)
    ahead = sequential._float_steps[1][0]
    sequential.close()
    assert ahead.done()
    assert list(tmp_path.iterdir()) == []


def _commit(sequential: SequentialCalibration, working: onnx.ModelProto, target, qw) -> None:
    """Hand the solved weight to ``sequential`` and write it into the test's own copy of the model."""
    values = target.initializer_from_matrix(qw.dequantize(np.float32))
    sequential.commit(target.weight_name, values)
    for tensor in working.graph.initializer:
        if tensor.name == target.weight_name:
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))


def _values(model: onnx.ModelProto, feed: dict) -> dict[str, np.ndarray]:
    """Every intermediate tensor of ``model`` (independent ORT run)."""
    import onnxruntime as ort

    exposed = copy_model(model)
    names = [name for node in exposed.graph.node for name in node.output]
    exposed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feed), strict=True))


def test_float_output_target_is_the_least_squares_fit():
    from onnxq.solvers.hessian import float_output_target, prepare_hessian

    rng = np.random.default_rng(4)
    xf = rng.standard_normal((400, 12))
    xq = xf + 0.2 * rng.standard_normal((400, 12))  # inputs after quantized earlier layers
    w = rng.standard_normal((5, 12))
    prepared = prepare_hessian(xq.T @ xq, damp=1e-9)
    target = float_output_target(w, prepared, xq.T @ xf)
    best = np.linalg.lstsq(xq, xf @ w.T, rcond=None)[0].T  # argmin_q ‖X_q qᵀ − X_f wᵀ‖
    np.testing.assert_allclose(target, best, rtol=1e-6, atol=1e-8)
    # equal inputs: the target is the weight itself (with the default damping too)
    np.testing.assert_allclose(float_output_target(w, prepare_hessian(xf.T @ xf), xf.T @ xf), w, atol=1e-12)


def test_a_committed_weight_lives_in_a_file_not_in_memory(tmp_path):
    """A solved weight handed to commit() is written to the temp folder and read back, equal, for each lookup."""
    from onnxq.calibration.sequential import CommittedWeights

    float_weights = {"w": onnx.numpy_helper.from_array(np.zeros((3, 4), np.float32), "w")}
    weights = CommittedWeights(float_weights, tmp_path / "solved")
    solved = np.arange(12, dtype=np.float32).reshape(3, 4)
    weights.commit("w", solved)
    assert "w" in weights and list(weights) == ["w"]
    path, dtype, shape = weights.committed["w"]  # a file name, not the array
    assert path.exists() and path.stat().st_size == solved.nbytes and shape == (3, 4)
    assert np.array_equal(onnx.numpy_helper.to_array(weights["w"]), solved)
    assert weights["w"].name == "w"


def test_a_sequential_run_holds_one_group_of_statistics(monkeypatch):
    """Each group's H, C and factorisations are dropped once no later group reads them (a 1 B model would otherwise
    hold every layer's), and the output is what it was."""
    from onnxq.calibration.store import HessianStore
    from onnxq.demo import data_path

    held = []
    layer_stats = HessianStore.layer_stats

    def spy(self, target):
        held.append((len(self.hessians), len(self.crosses), len({slot[0] for slot in self.prepared})))
        return layer_stats(self, target)

    monkeypatch.setattr(HessianStore, "layer_stats", spy)
    model, summary = quantize_with_summary(str(data_path("digits_mlp.onnx")), method="decoupleq", bits=2,
                                           group_size=32, calibration=str(data_path("digits_calib.npz")),
                                           progress=False)
    assert len(held) == len(summary.layers) >= 3
    assert max(h for h, _, _ in held) == 1 and max(p for _, _, p in held) <= 1  # one input per group in this MLP
