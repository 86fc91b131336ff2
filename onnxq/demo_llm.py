"""``onnxq demo --llm [GENAI_DIR]``: README's "Quantize an LLM" path on an onnxruntime-genai folder, fp32 against W2.

Steps (each as the commands do it):

1. calibration: :data:`CALIB_SAMPLES` windows of :data:`SEQ_LEN` tokens of *Emma* (chapters I–II, shipped in
   ``onnxq/data``), made by the folder's tokenizer as ``onnxq calib --text`` makes them;
2. ``onnxq quantize GENAI_DIR -o <temp folder> --method decoupleq --bits 2 --group-size 64`` with that text
   (default format: MatMulNBits; lm_head and the embedding stay float), timed;
3. for the fp32 folder and the W2 folder: perplexity on :data:`EVAL_WINDOWS` windows of :data:`SEQ_LEN` tokens of
   *Persuasion* (chapter 1, shipped too; never calibrated on), each window one run with an empty past
   (:mod:`onnxq.perplexity`: ``exp(mean NLL)`` over the windows' next-token predictions); the decoder's size on
   disk (model file and external data); bits per weight of the quantized layers (every tensor they use, as the
   quantize summary counts them; 32 for fp32); and :data:`NEW_TOKENS` greedy tokens from onnxruntime-genai after
   :data:`~onnxq.generation.PROMPT`, with the median decode time per token (:mod:`onnxq.generation`).

Without ``GENAI_DIR`` the folder is :data:`DEFAULT_FOLDER` (where README's export step writes SmolLM2).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from onnxq import api
from onnxq.demo import data_path
from onnxq.errors import OnnxqError
from onnxq.generation import PROMPT, generate, import_genai
from onnxq.ir.genai_folder import decoder_file, decoder_files, is_genai_folder
from onnxq.perplexity import text_perplexity

DEFAULT_FOLDER = "smollm2-genai"
EXPORT_STEPS = ("python -m onnxruntime_genai.models.builder -i smollm2-hf/ -o smollm2-genai/ -p fp32 -e cpu "
                "(README, 'Quantize an LLM')")
CALIB_TEXT = "emma_ch1-2.txt"
EVAL_TEXT = "persuasion_ch1.txt"
CALIB_SAMPLES = 16
EVAL_WINDOWS = 8
SEQ_LEN = 256
NEW_TOKENS = 30
QUANTIZE = {"method": "decoupleq", "bits": 2, "group_size": 64}


@dataclass(frozen=True)
class LlmRow:
    """One model's measurements (``quantize_seconds`` is ``None`` for fp32)."""

    label: str
    perplexity: float
    megabytes: float  # decoder file and its external data, 1e6 bytes
    bits_per_weight: float  # over the layers W2 quantizes
    decode_ms: float
    text: str
    quantize_seconds: float | None = None


def genai_input(folder: str | os.PathLike | None) -> Path:
    """The genai folder to run (``DEFAULT_FOLDER`` when none is given); a one-line error saying how to export it."""
    path = Path(folder if folder is not None else DEFAULT_FOLDER)
    if not path.exists():
        raise OnnxqError(f"{path}: no such folder; export SmolLM2 first: {EXPORT_STEPS}, or pass an "
                         "onnxruntime-genai folder: onnxq demo --llm GENAI_DIR")
    if not is_genai_folder(path):
        raise OnnxqError(f"{path}: not an onnxruntime-genai model folder (no genai_config.json); export one with "
                         f"{EXPORT_STEPS}")
    decoder_file(path)  # names the missing decoder in one line
    return path


def measure(folder: Path, label: str, bits_per_weight: float, quantize_seconds: float | None = None) -> LlmRow:
    """Perplexity, size, decode speed and greedy text of one genai folder."""
    ppl = text_perplexity(decoder_file(folder), data_path(EVAL_TEXT), EVAL_WINDOWS, SEQ_LEN)
    size = sum(path.stat().st_size for path in decoder_files(folder))
    generated = generate(folder, PROMPT, NEW_TOKENS)
    return LlmRow(label, ppl.perplexity, size / 1e6, bits_per_weight, generated.decode_ms, generated.text,
                  quantize_seconds)


def llm_rows(folder: str | os.PathLike | None = None, log: Callable[[str], None] | None = None) -> list[LlmRow]:
    """fp32 and decoupleQ W2 g64 rows of the genai folder (steps in the module docstring)."""
    import_genai()  # before any work: one line when onnxruntime-genai is missing
    source = genai_input(folder)
    say = log or (lambda line: print(f"onnxq demo --llm: {line}", file=sys.stderr))
    say(f"fp32 {source}: perplexity, size, generation ...")
    fp32 = measure(source, "fp32", 32.0)
    with tempfile.TemporaryDirectory() as temp:
        out = Path(temp) / "w2"
        say(f"decoupleQ W2 g64 on {CALIB_SAMPLES} x {SEQ_LEN} tokens of {CALIB_TEXT} ...")
        start = time.perf_counter()
        _, summary = api.quantize_with_summary(source, out, calib_text=data_path(CALIB_TEXT),
                                               calib_samples=CALIB_SAMPLES, calib_seq_len=SEQ_LEN, **QUANTIZE)
        seconds = time.perf_counter() - start
        say("W2: perplexity, size, generation ...")
        w2 = measure(out, "decoupleQ W2 g64", summary.bits_per_weight, seconds)
    return [fp32, w2]


def llm_table(rows: list[LlmRow]) -> str:
    """The rows as a table, then the prompt and each model's continuation (newlines shown as ``\\n``)."""
    lines = ["| model | perplexity | decoder MB | bits/weight | decode ms/token | quantize (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        seconds = "-" if r.quantize_seconds is None else f"{r.quantize_seconds:.1f}"
        lines.append(f"| {r.label} | {r.perplexity:.2f} | {r.megabytes:.1f} | {r.bits_per_weight:.2f} | "
                     f"{r.decode_ms:.2f} | {seconds} |")
    lines.append(f"\nprompt: {PROMPT}")
    lines += [f"{r.label}: {r.text!r}" for r in rows]
    return "\n".join(lines)


def run_llm_demo(folder: str | os.PathLike | None = None) -> str:
    """What ``onnxq demo --llm`` prints: the header, the table and the two continuations."""
    rows = llm_rows(folder)
    header = (f"onnxq demo --llm: {genai_input(folder)}, fp32 against decoupleQ W2 g64 (default format), calibrated on "
              f"{CALIB_SAMPLES} windows of {SEQ_LEN} tokens of Emma ch. I-II; perplexity on {EVAL_WINDOWS} windows "
              f"of {SEQ_LEN} tokens of Persuasion ch. 1 (held out); {NEW_TOKENS} greedy tokens from "
              "onnxruntime-genai; bits/weight over the quantized layers\n")
    return header + llm_table(rows)
