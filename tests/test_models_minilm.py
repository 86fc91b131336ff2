"""all-MiniLM-L6-v2: the recipe's export matches PyTorch, and the evaluation metrics behave (real model)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models import minilm
from tools import evaluation

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def fp32_path() -> Path:
    return minilm.build_minilm()  # cached after the first build (~1.5 min on 2 cores)


def test_export_interface_and_op_mix(fp32_path: Path) -> None:
    model = onnx.load(str(fp32_path))
    assert [i.name for i in model.graph.input] == list(minilm.INPUT_NAMES)
    assert [o.name for o in model.graph.output] == [minilm.OUTPUT_NAME]
    for value in [*model.graph.input, model.graph.output[0]]:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and dims[1].dim_param == "sequence"
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in model.graph.input)
    assert minilm.op_mix(fp32_path)["MatMul(const weight)"] == 36  # 6 layers × (Q, K, V, output, FFN in, FFN out)


def test_fp32_export_matches_torch(fp32_path: Path) -> None:
    texts = [p.text for p in evaluation.evaluation_passages(per_novel=2)]
    texts.append("Short.")  # a batch with heavy padding
    max_diff = minilm.check_against_torch(fp32_path, minilm.load_torch_model(), minilm.load_tokenizer(), texts)
    assert max_diff <= minilm.CHECK_TOLERANCE


def test_metrics_of_fp32_against_itself(fp32_path: Path) -> None:
    result = evaluation.evaluate_minilm(fp32_path)
    assert result.mean_cosine == pytest.approx(1.0, abs=1e-12)
    assert result.probe_accuracy == result.fp32_probe_accuracy >= 0.7
    assert result.n_passages == 6 * evaluation.EVAL_PER_NOVEL


def _perturbed_copy(source: Path, target: Path, relative_noise: float, seed: int = 0) -> Path:
    """Copy of the model with W ← W + ε, ε ~ N(0, (relative_noise·std(W))²) on every MatMul weight."""
    model = onnx.load(str(source))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    rng = np.random.default_rng(seed)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            tensor = initializers[node.input[1]]
            weight = numpy_helper.to_array(tensor)
            noisy = weight + rng.normal(scale=relative_noise * weight.std(), size=weight.shape).astype(weight.dtype)
            tensor.CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    onnx.save(model, str(target))
    return target


def test_noisy_weights_score_lower(fp32_path: Path, tmp_path: Path) -> None:
    noisy = _perturbed_copy(fp32_path, tmp_path / "noisy.onnx", relative_noise=0.5)
    result = evaluation.evaluate_minilm(noisy, fp32_path)
    assert result.mean_cosine < 0.99
    assert result.probe_accuracy < result.fp32_probe_accuracy - 0.02


def test_compare_4bit_end_to_end_matches_ort(fp32_path: Path, tmp_path: Path) -> None:
    """tools/compare.py at W4 g64: onnxq RTN and ORT's default quantizer are the same algorithm, so they
    must score alike, close to fp32, at ~4.5 bits per weight; the JSON and the plot are written."""
    from tools import compare

    before = set(Path(tempfile.gettempdir()).glob("onnxq-compare-minilm-*"))
    rows, table = compare.compare("minilm", [(4, 64)], ["rtn", "ort-default"], tmp_path)
    assert set(Path(tempfile.gettempdir()).glob("onnxq-compare-minilm-*")) <= before  # its work folder is gone
    fp32, rtn, ort_default = rows
    assert fp32.metrics["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert rtn.metrics["cosine"] > 0.94
    assert rtn.metrics["probe"] >= fp32.metrics["probe"] - 0.05
    assert rtn.metrics["cosine"] == pytest.approx(ort_default.metrics["cosine"], abs=2e-3)
    assert 4.0 < rtn.bits_per_weight < 5.0
    assert "| rtn | 4 | 64 |" in table
    assert (tmp_path / "compare_minilm.json").exists() and (tmp_path / "compare_minilm.png").stat().st_size > 0
