"""The plain-ORT KV-cache greedy loop (:mod:`tools.kv_generate`, used by ``tools/bench_generate.py``) on decoder
exports with past key/values, cross-checked against onnxruntime-genai and across exporters.

Facts checked:

* tiny genai Llama (:mod:`models.tiny_genai`), 32 greedy tokens after a 24-token prompt (~30 s at load 10 on 2
  cores): the loop's tokens equal onnxruntime-genai's for the same folder, for fp32 and for W8 RTN (MatMulNBits)
  of it (a real cross-check: a wrong mask, position or past would change them); W8's tokens equal fp32's at ≥ 24
  of 32 positions (measured: 32); a prefill of ``prompt + generated`` without any past gives the same argmax at
  every generated position as the step-by-step loop (the growing past is consistent with one long prefill);
* SmolLM2 (``slow`` and ``real``: the zoo's exports; 90 s at load 10 on 2 cores), 12 tokens: the optimum
  ``text-generation-with-past`` export (with ``position_ids``) and the genai builder's (GroupQueryAttention, no
  ``position_ids``) give the same greedy tokens through the loop. No tiny optimum-style model exists (it would
  need its own export recipe), so the optimum path is covered on the real model only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_genai_generate import genai_path, tiny  # noqa: F401 - fixtures

import onnxq.api as api
from models.zoo_exports import is_built, zoo_model_dir
from tools.kv_generate import PrefillSession, agreement, greedy_generate
from tools.lm_metrics import EVAL_NOVEL, novel_token_ids

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 32


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def og_tokens(genai_path: Path | None, prompt: list[int], *folders: Path) -> dict[str, list[int]]:  # noqa: F811
    path = ["--genai-path", str(genai_path)] if genai_path else []
    command = [sys.executable, str(ROOT / "tools" / "genai_generate.py"), *path, "--tokens", str(TOKENS),
               "--prompt-ids", ",".join(map(str, prompt)), *map(str, folders)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return {Path(k).name: v[0]["tokens"] for k, v in json.loads(result.stdout)["models"].items()}


def test_kv_loop_equals_onnxruntime_genai_and_w8_agrees(genai_path, tiny, tmp_path):  # noqa: F811
    prompt = novel_token_ids("prideprejudice")[1000:1024].tolist()
    api.quantize(tiny, tmp_path / "w8", bits=8, progress=False)
    ours = {}
    for folder in (tiny, tmp_path / "w8"):
        ours[folder.name] = greedy_generate(session(folder / "model.onnx"), prompt, TOKENS).tokens
        assert len(ours[folder.name]) == TOKENS
    theirs = og_tokens(genai_path, prompt, tiny, tmp_path / "w8")
    assert ours[tiny.name] == theirs[tiny.name]
    assert ours["w8"] == theirs["w8"]
    assert agreement(ours["w8"], ours[tiny.name]) >= 24, ours

    fp32 = session(tiny / "model.onnx")
    sequence = np.array([prompt + ours[tiny.name]], dtype=np.int64)
    (logits,) = PrefillSession(fp32).run(["logits"], {"input_ids": sequence})
    one_pass = logits[0, len(prompt) - 1 : -1].argmax(axis=-1).tolist()
    assert one_pass == ours[tiny.name]


@pytest.mark.slow
@pytest.mark.real
def test_optimum_and_genai_exports_generate_the_same_tokens():
    names = ("smollm2-optimum", "smollm2-genai-fp32")
    if not all(is_built(name) for name in names):
        pytest.skip("the SmolLM2 exports are not built; run python -m models.zoo")
    prompt = novel_token_ids(EVAL_NOVEL)[:32].tolist()
    tokens = [greedy_generate(session(zoo_model_dir(name) / "model.onnx"), prompt, 12).tokens for name in names]
    assert len(tokens[0]) == 12
    assert tokens[0] == tokens[1]
