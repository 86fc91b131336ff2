"""onnxq's genai folders run in onnxruntime-genai: ``onnxq quantize GENAI_DIR -o OUT_DIR`` on the tiny trained
Llama of :mod:`models.tiny_genai` (a genai builder export, fp32), then greedy generation with ``og.Model``,
``og.Tokenizer`` and ``og.Generator`` on CPU in a subprocess (:mod:`tools.genai_generate`) whose ``sys.path`` has
the ``pip install --no-deps --target`` folder of onnxruntime-genai 0.18 (:func:`models.zoo_fetch.tool_env`), over
this environment's onnxruntime (or the onnxruntime-genai of ``onnxq[llm]`` when it is installed).

The commands run (README, "Quantize an LLM")::

    onnxq calib tiny-llama-genai -o calib.npz --text emma.txt --samples 8 --seq-len 64
    onnxq quantize tiny-llama-genai -o w2 --method decoupleq --bits 2 --group-size 32 --exclude lm_head \\
        --calib-text emma.txt --calib-samples 8 --calib-seq-len 64
    python tools/genai_generate.py --genai-path <genai folder> --tokens 32 --repeat 2 FOLDER...

Facts checked: every folder (fp32; W8 RTN MatMulNBits; W4 RTN QDQ; W2 decoupleQ g32 MatMulNBits and, where the
custom-op library is built, the ``onnxq`` format) generates 32 tokens; each generation repeats exactly; W8's greedy
tokens equal fp32's at ≥ 75% of the 32 positions (measured: 29); the W2 ``onnxq`` format (the same codes through
another kernel) agrees with W2 MatMulNBits at ≥ 75% of them (measured: 32).
Skipped when the genai folder or the tiny model is not built (``python -m models.tiny_genai``). The slow test does
the same on the real SmolLM2 genai folder, W2 on its first decoder layer (measured: 6 of 32 tokens as fp32's, the
first 5; "the universe is governed by a rational and orderly universe").
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from test_calib_sources import cli

import onnxq.api as api
import onnxq.custom_ops as custom_ops
from models.austen import build_austen
from models.cache import cache_dir
from models.tiny_genai import NAME, tiny_genai_dir
from models.zoo_exports import is_built, zoo_model_dir

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 32
W2 = ("--method", "decoupleq", "--bits", "2", "--group-size", "32", "--exclude", "lm_head")
CALIB = ("--calib-samples", "8", "--calib-seq-len", "64")


@pytest.fixture(scope="module")
def genai_path() -> Path | None:
    """``None`` when onnxruntime-genai is installed here (``onnxq[llm]``), else the zoo's ``--target`` folder."""
    folder = cache_dir("zoo", "tools", create=False) / "genai"
    spec = importlib.util.find_spec("onnxruntime_genai")  # (an earlier test may have imported the zoo's copy)
    if spec is not None and not str(spec.origin).startswith(str(folder)):
        return None
    if not (folder / "onnxruntime_genai" / "__init__.py").is_file():
        pytest.skip(f"onnxruntime-genai is not unpacked in {folder}: python -c \"from models.zoo_fetch import "
                    "tool_env; tool_env('genai')\" (pip install --no-deps --target: the environment's onnxruntime "
                    "stays)")
    return folder


@pytest.fixture(scope="module")
def tiny() -> Path:
    if not is_built(NAME):
        pytest.skip(f"{NAME} is not built; run python -m models.tiny_genai (~3 min, once)")
    return tiny_genai_dir()


def generate(genai_path: Path | None, *folders: Path) -> dict:
    path = ["--genai-path", str(genai_path)] if genai_path else []
    command = [sys.executable, str(ROOT / "tools" / "genai_generate.py"), *path, "--tokens", str(TOKENS),
               "--repeat", "2", *map(str, folders)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def test_onnxq_genai_folders_generate_in_onnxruntime_genai(genai_path, tiny, tmp_path, capsys):
    novel = build_austen()["emma"]
    w2 = tmp_path / "w2"
    result = cli(capsys, "quantize", str(tiny), "-o", str(w2), *W2, "--calib-text", str(novel), *CALIB)
    assert result.returncode == 0, result.stderr
    assert f"wrote {w2}" in result.stdout
    calib = tmp_path / "calib.npz"
    result = cli(capsys, "calib", str(tiny), "-o", str(calib), "--text", str(novel), "--samples", "8",
                 "--seq-len", "64")
    assert result.returncode == 0, result.stderr
    api.quantize(tiny, tmp_path / "w8", bits=8)
    api.quantize(tiny, tmp_path / "w4qdq", bits=4, format="qdq")
    folders = [tiny, tmp_path / "w8", tmp_path / "w4qdq", w2]
    if custom_ops.available("cpu"):
        api.quantize(tiny, tmp_path / "w2onnxq", method="decoupleq", bits=2, group_size=32, exclude="lm_head",
                     calibration=str(calib), format="onnxq")  # the same data as --calib-text
        folders.append(tmp_path / "w2onnxq")
    out = generate(genai_path, *folders)
    assert out["versions"]["onnxruntime_genai"] == "0.18.0"
    runs = {Path(folder).name: value for folder, value in out["models"].items()}
    for name, (first, second) in runs.items():
        assert len(first["tokens"]) == TOKENS, name
        assert first["tokens"] == second["tokens"], f"{name}: greedy generation is not deterministic"
    tokens = {name: value[0]["tokens"] for name, value in runs.items()}
    assert agreement(tokens["w8"], tokens[tiny.name]) >= 0.75, runs
    if "w2onnxq" in tokens:
        assert agreement(tokens["w2onnxq"], tokens["w2"]) >= 0.75, runs


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_genai_folder_w2_decoupleq_generates(genai_path, tmp_path, capsys):
    """~2 min: the real SmolLM2 genai export (fp32 folder) with decoupleQ W2 g64 on the first decoder layer only
    (``--include``; the full model takes 20-40 min), calibration from text; onnxruntime-genai generates 32 tokens
    from it, the same twice."""
    if not is_built("smollm2-genai-fp32"):
        pytest.skip("smollm2-genai-fp32 is not built; run python -m models.zoo")
    folder = zoo_model_dir("smollm2-genai-fp32")
    w2 = tmp_path / "w2"
    result = cli(capsys, "quantize", str(folder), "-o", str(w2), "--method", "decoupleq", "--bits", "2",
                 "--group-size", "64", "--include", r"layers\.0/", "--calib-text", str(build_austen()["emma"]),
                 *CALIB)
    assert result.returncode == 0, result.stderr
    runs = {Path(k).name: v for k, v in generate(genai_path, folder, w2)["models"].items()}
    for name, (first, second) in runs.items():
        assert len(first["tokens"]) == TOKENS and first["tokens"] == second["tokens"], name


def test_quantized_tied_embedding_generates_in_onnxruntime_genai(genai_path, tiny, tmp_path):
    """``--op-types MatMul,Gather --quantize-lm-head`` on the tiny genai Llama (its Gather reads the lm_head's weight
    through a Transpose): one GatherBlockQuantized/MatMulNBits table, and onnxruntime-genai generates from it, the
    same twice."""
    out = tmp_path / "w8emb"
    api.quantize(tiny, out, bits=8, op_types=("MatMul", "Gather"), quantize_lm_head=True)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "lm_head.MatMul.weight" not in {t.name for t in
                                                                                     model.graph.initializer}
    runs = {Path(k).name: v for k, v in generate(genai_path, tiny, out)["models"].items()}
    for name, (first, second) in runs.items():
        assert len(first["tokens"]) == TOKENS and first["tokens"] == second["tokens"], name
    assert agreement(runs["w8emb"][0]["tokens"], runs[tiny.name][0]["tokens"]) >= 0.75, runs
