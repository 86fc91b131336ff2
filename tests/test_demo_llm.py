"""``onnxq demo --llm GENAI_DIR`` on the tiny trained genai Llama of :mod:`models.tiny_genai` (~20 s), its one-line
errors, and the perplexity formula of :mod:`onnxq.perplexity`.

Facts checked: exit 0; the fp32 perplexity printed equals one computed here independently (the shipped *Persuasion*
chapter tokenized whole without special tokens, 8 of its non-overlapping 256-token windows picked with
``default_rng(0)``, each run with an empty past, ``exp(mean(−log_softmax))`` over the next-token predictions, with
scipy); the W2 perplexity is finite and at most 1.25× fp32's (measured: 7452 against 7476; the tiny model's
perplexity is high because it was trained on the book's 2048 most frequent tokens only); W2 costs 2-3.5 bits per
weight and its decoder is smaller; both greedy continuations are non-empty. Without a folder, with a folder that is
not a genai folder, and without onnxruntime-genai: one line ``onnxq: error: ...`` and exit 2.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from scipy.special import log_softmax
from test_calib_sources import cli
from test_genai_generate import genai_path, tiny  # noqa: F401  (fixtures)

from onnxq.demo import data_path
from onnxq.demo_llm import EVAL_TEXT, EVAL_WINDOWS, SEQ_LEN
from onnxq.perplexity import next_token_scores, perplexity

ROW = re.compile(r"^\| (?P<label>[^|]+) \| (?P<ppl>[\d.]+) \| (?P<mb>[\d.]+) \| (?P<bits>[\d.]+) \| "
                 r"(?P<ms>[\d.]+) \| (?P<seconds>[\d.]+|-) \|$", re.MULTILINE)


def direct_perplexity(folder: Path) -> float:
    """The fp32 perplexity the demo should print, computed without onnxq."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    text = Path(data_path(EVAL_TEXT)).read_text(encoding="utf-8")
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    available = len(ids) // SEQ_LEN
    picks = np.sort(np.random.default_rng(0).choice(available, size=EVAL_WINDOWS, replace=False))
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(folder / decoder["filename"]), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype=np.float32)
    nll = []
    for i in picks:
        window = ids[i * SEQ_LEN:(i + 1) * SEQ_LEN][None]
        feeds = {"input_ids": window, "attention_mask": np.ones_like(window)}
        feeds |= {s.name: empty for s in session.get_inputs() if s.name.startswith("past_key_values.")}
        logits = session.run(["logits"], feeds)[0][0].astype(np.float64)
        nll.append(-log_softmax(logits[:-1], axis=1)[np.arange(SEQ_LEN - 1), window[0, 1:]])
    return float(np.exp(np.concatenate(nll).mean()))


def test_demo_llm_on_the_tiny_genai_llama(genai_path, tiny, capsys, monkeypatch):  # noqa: F811
    if genai_path is not None:
        monkeypatch.syspath_prepend(str(genai_path))
    result = cli(capsys, "demo", "--llm", str(tiny))
    assert result.returncode == 0, result.stderr
    rows = {m["label"]: m for m in ROW.finditer(result.stdout)}
    assert list(rows) == ["fp32", "decoupleQ W2 g64"], result.stdout
    fp32, w2 = (float(rows[label]["ppl"]) for label in rows)
    assert abs(fp32 - direct_perplexity(tiny)) <= 0.006, result.stdout
    assert np.isfinite(w2) and w2 <= 1.25 * fp32, result.stdout
    q = rows["decoupleQ W2 g64"]
    assert 2.0 < float(q["bits"]) < 3.5 and float(q["mb"]) < float(rows["fp32"]["mb"])
    assert rows["fp32"]["seconds"] == "-" and float(q["seconds"]) > 0
    texts = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in result.stdout.splitlines()[-2:]}
    assert set(texts) == {"fp32", "decoupleQ W2 g64"} and all(len(t.strip("'\" ")) > 0 for t in texts.values())


def one_line_error(result) -> str:
    assert result.returncode == 2 and result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: error: "), result.stderr
    return lines[0]


def test_demo_llm_without_a_folder_says_how_to_export(genai_path, tmp_path, capsys, monkeypatch):  # noqa: F811
    if genai_path is not None:
        monkeypatch.syspath_prepend(str(genai_path))
    monkeypatch.chdir(tmp_path)
    line = one_line_error(cli(capsys, "demo", "--llm"))
    assert "smollm2-genai: no such folder" in line and "onnxruntime_genai.models.builder" in line
    line = one_line_error(cli(capsys, "demo", "--llm", str(tmp_path)))
    assert "not an onnxruntime-genai model folder" in line


def test_demo_llm_without_onnxruntime_genai(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails as if not installed
    line = one_line_error(cli(capsys, "demo", "--llm", "anywhere"))
    assert line == "onnxq: error: onnxruntime-genai is not installed; pip install 'onnxq[llm]'"


def test_demo_options_do_not_mix(capsys):
    line = one_line_error(cli(capsys, "demo", "--llm", "x", "--bits", "2"))
    assert "--model and --bits" in line


def test_perplexity_is_exp_mean_nll_of_the_next_tokens():
    rng = np.random.default_rng(0)
    logits, ids = rng.normal(size=(6, 11)).astype(np.float32) * 5, rng.integers(0, 11, 6)
    nll, argmax = next_token_scores(logits, ids)
    expected = -log_softmax(logits[:-1].astype(np.float64), axis=1)[np.arange(5), ids[1:]]
    np.testing.assert_allclose(nll, expected, rtol=1e-12)
    assert (argmax == logits[:-1].argmax(axis=1)).all()
    assert perplexity(nll) == pytest.approx(np.exp(expected.mean()), rel=1e-12)
