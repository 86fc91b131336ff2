"""The quantize pipeline's finish step: every output passes onnx.checker, or nothing is written."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxq
from onnxq.errors import OnnxqError
from onnxq.formats import registry
from onnxq.formats.common import Rewrite
from onnxq.pipeline import checker_error


def _mlp(output_shape: list | None) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [onnx.numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_outputs_pass_the_checker_and_a_failing_input_is_noted(tmp_path):
    good = _mlp([None, 8])
    assert checker_error(good) is None
    _, summary = onnxq.api.quantize_with_summary(good, tmp_path / "good.onnx", bits=4, group_size=16)
    assert checker_error(onnx.load(tmp_path / "good.onnx")) is None
    assert not any("onnx.checker" in note for note in summary.notes)
    bad = _mlp(None)  # an output without a shape: the checker refuses the input itself
    assert "shape" in checker_error(bad)
    _, summary = onnxq.api.quantize_with_summary(bad, tmp_path / "bad.onnx", bits=4, group_size=16)
    assert any(note.startswith("the input model already fails onnx.checker") for note in summary.notes)


def test_a_broken_rewrite_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    def broken(target, qw, ctx):
        return Rewrite(replacement=[helper.make_node("MatMul", ["x"], [], name="broken")])  # no output: invalid

    monkeypatch.setitem(registry.EMITTERS, "fake", broken)
    with pytest.raises(OnnxqError, match="internal error: the rewritten graph fails onnx.checker"):
        onnxq.quantize(_mlp([None, 8]), tmp_path / "out.onnx", bits=4, group_size=16, format="fake")
    assert not list(tmp_path.iterdir())
