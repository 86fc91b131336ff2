"""LLM-aware defaults: lm_head stays float unless asked, thin calibration data is flagged, progress shows time left."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxq
import onnxq.progress as progress
from onnxq.ir.llm import lm_head_names
from onnxq.ir.targets import find_targets

VOCAB, HIDDEN = 64, 32


def tiny_lm() -> onnx.ModelProto:
    """input_ids → Gather(embedding) → MatMul(W1) → Relu → MatMul(lm_head) → Reshape → logits."""
    rng = np.random.default_rng(0)
    inits = {"embed": rng.standard_normal((VOCAB, HIDDEN)), "W1": rng.standard_normal((HIDDEN, HIDDEN)),
             "head": rng.standard_normal((HIDDEN, VOCAB))}
    inits = {k: v.astype(np.float32) for k, v in inits.items()} | {"shape": np.array([0, -1, VOCAB], np.int64)}
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["x"]),
             helper.make_node("MatMul", ["x", "W1"], ["h"], name="/model/layers.0/mlp/MatMul"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "head"], ["z"], name="/output/MatMul"),
             helper.make_node("Reshape", ["z", "shape"], ["logits"])]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_lm_head_stays_float_unless_asked():
    model = tiny_lm()
    assert lm_head_names(model, find_targets(model).targets) == {"/output/MatMul"}
    _, summary = onnxq.api.quantize_with_summary(model, bits=4, group_size=16)
    assert [r.name for r in summary.layers] == ["/model/layers.0/mlp/MatMul"]
    assert [s.name for s in summary.skipped] == ["/output/MatMul"] and "--quantize-lm-head" in summary.lines()[-1]
    _, summary = onnxq.api.quantize_with_summary(model, bits=4, group_size=16, quantize_lm_head=True)
    assert len(summary.layers) == 2 and not summary.skipped
    renamed = tiny_lm()
    renamed.graph.input[0].name = "tokens"  # not token ids by name: not a language model by this rule
    renamed.graph.node[0].input[1] = "tokens"
    assert lm_head_names(renamed, find_targets(renamed).targets) == set()


def test_fewer_calibration_rows_than_columns_is_a_warning():
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 8))  # 16 rows for K = 32
    _, summary = onnxq.api.quantize_with_summary(tiny_lm(), method="gptq", bits=4, group_size=16,
                                                 calibration={"input_ids": ids}, quantize_lm_head=True)
    assert summary.thin_inputs == [("x", 16, HIDDEN), ("r", 16, HIDDEN)]
    assert any(line.startswith("WARNING: 2 layer inputs had fewer calibration rows than columns (e.g. 'x': 16 rows")
               for line in summary.lines())
    ids = np.random.default_rng(1).integers(0, VOCAB, (8, 8))  # 64 rows
    _, summary = onnxq.api.quantize_with_summary(tiny_lm(), method="gptq", bits=4, group_size=16,
                                                 calibration={"input_ids": ids}, quantize_lm_head=True)
    assert not summary.thin_inputs and summary.calibration_rows == 64


def test_progress_lines_give_the_time_left(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    ids = np.random.default_rng(1).integers(0, VOCAB, (8, 8))
    onnxq.api.quantize_with_summary(tiny_lm(), method="gptq", bits=4, group_size=16, calibration={"input_ids": ids},
                                    quantize_lm_head=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["quantize: 1/2", "quantize: 2/2"]
    assert all("elapsed, ~" in line and "left" in line for line in lines)
    onnxq.api.quantize_with_summary(tiny_lm(), bits=4, group_size=16, progress=False)
    assert capsys.readouterr().err == ""
    assert progress.duration(75) == "1m15s" and progress.duration(3725) == "1h02m"
