"""Evaluation text and metric plumbing: Austen extraction, passages and their split, calibration, probe math."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models import austen, text
from tools import evaluation


def test_austen_extraction_is_sane() -> None:
    paths = austen.build_austen()
    assert list(paths) == list(austen.NOVELS)
    line_counts = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in paths.items()}
    assert all(austen.MIN_LINES <= count <= austen.MAX_LINES for count in line_counts.values())
    assert line_counts["persuasion"] < line_counts["emma"]  # the R package's own test
    assert "It is a truth universally acknowledged" in austen.novel_text("prideprejudice")


def test_verify_rejects_a_truncated_novel() -> None:
    texts = {name: austen.novel_text(name) for name in austen.NOVELS}
    texts["emma"] = "\n".join(texts["emma"].splitlines()[:500]) + "\n"
    with pytest.raises(austen.OnnxqError, match="emma has 500 lines"):
        austen.verify_novels(texts)


def test_sentence_splitting_keeps_abbreviations_and_quotes() -> None:
    paragraph = '"My dear Mr. Bennet," said his lady. "Have you heard?" Mrs. Long says so! Yes.'
    assert text.split_sentences(paragraph) == [
        '"My dear Mr. Bennet," said his lady.',
        '"Have you heard?"',
        "Mrs. Long says so!",
        "Yes.",
    ]


def test_paragraphs_drop_headings_and_join_lines() -> None:
    lines = ["EMMA", "", "VOLUME I", "", "CHAPTER I", "", "Emma Woodhouse, handsome,", "clever, and _rich_.", ""]
    assert text.paragraphs(lines) == ["Emma Woodhouse, handsome, clever, and rich."]


def test_passages_split_by_position_without_shared_text() -> None:
    passages = text.novel_passages("persuasion")
    test_fraction = np.mean([p.split == "test" for p in passages])
    assert 0.15 < test_fraction < 0.25
    assert [p.index for p in passages] == list(range(len(passages)))
    # blocks of 20: passages 80..99 are the first test block
    assert {p.split for p in passages[80:100]} == {"test"} and passages[79].split == passages[100].split == "train"
    train_texts = {p.text for p in passages if p.split == "train"}
    assert not any(p.text in train_texts for p in passages if p.split == "test")


def test_evaluation_sets_are_balanced_and_disjoint() -> None:
    evaluation_set = evaluation.evaluation_passages()
    probe_set = evaluation.probe_train_passages()
    assert np.bincount(evaluation.novel_labels(evaluation_set)).tolist() == [evaluation.EVAL_PER_NOVEL] * 6
    assert np.bincount(evaluation.novel_labels(probe_set)).tolist() == [evaluation.PROBE_TRAIN_PER_NOVEL] * 6
    assert {p.split for p in evaluation_set} == {"test"} and {p.split for p in probe_set} == {"train"}


def test_calibration_texts_use_train_passages_only() -> None:
    test_texts = [p.text for p in text.all_passages(**evaluation.PASSAGE_OPTIONS) if p.split == "test"]
    calibration = evaluation.calibration_texts(n_samples=64, seq_len=128, seed=3)
    assert all(len(sample.split()) >= 128 for sample in calibration)
    joined = "\n".join(calibration)
    assert not any(passage in joined for passage in test_texts)
    assert calibration == evaluation.calibration_texts(n_samples=64, seq_len=128, seed=3)
    assert calibration != evaluation.calibration_texts(n_samples=64, seq_len=128, seed=4)


def test_make_calibration_arrays_and_cli(tmp_path: Path) -> None:
    arrays = evaluation.make_minilm_calibration(n_samples=4, seq_len=64, seed=0)
    assert list(arrays) == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(array.shape == (4, 64) and array.dtype == np.int64 for array in arrays.values())
    assert (arrays["attention_mask"] == 1).all() and (arrays["token_type_ids"] == 0).all()
    assert (arrays["input_ids"][:, 0] == 101).all() and (arrays["input_ids"][:, -1] == 102).all()  # [CLS] … [SEP]
    from tools.eval import main

    output = tmp_path / "calib.npz"
    lines: list[str] = []
    assert main(["minilm-calibration", str(output), "--samples", "4", "--seq-len", "64"], lines.append) == 0
    with np.load(output) as saved:
        for name, array in arrays.items():
            np.testing.assert_array_equal(saved[name], array)
    with pytest.raises(evaluation.OnnxqError, match="seq_len must be in 8..512"):
        evaluation.make_minilm_calibration(n_samples=4, seq_len=1000)


def test_cosine_and_probe_math() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(50, 8))
    assert np.allclose(evaluation.cosine_similarities(3.0 * reference, reference), 1.0)
    assert np.allclose(evaluation.cosine_similarities(-reference, reference), -1.0)
    centers = rng.normal(size=(3, 8)) * 4
    labels = np.repeat(np.arange(3), 40)
    embeddings = centers[labels] + rng.normal(size=(120, 8))
    probe = evaluation.fit_probe(embeddings, labels)
    assert np.mean(probe.predict(embeddings) == labels) > 0.95
    assert np.mean(probe.predict(rng.normal(size=(120, 8)) * 4) == labels) < 0.6  # noise is not separable


def test_eval_cli_reports_a_missing_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from tools.eval import main

    reference = tmp_path / "reference.onnx"
    assert main(["minilm", str(tmp_path / "missing.onnx"), "--reference", str(reference)]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
