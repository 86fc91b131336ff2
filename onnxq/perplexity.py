"""Perplexity of a language-model ONNX decoder on a text, from its logits: each window one run with an empty past.

The windows and the other inputs are made exactly as ``onnxq calib --text`` makes calibration data
(:func:`onnxq.calibration.sources.make.build_calibration`): the whole file tokenized without special tokens, cut into
non-overlapping windows of ``seq_len`` tokens, ``windows`` of them picked by ``seed`` (in text order); masks 1,
positions ``0..L−1``, key/value caches empty (past length 0). Each window runs alone (batch 1), so no context
crosses a window boundary. With ``z[t]`` the logits at position ``t`` (the prediction of token ``t + 1``) of a
window ``x``::

    nll[t]     = logsumexp(z[t]) − z[t, x[t+1]]             t = 0 .. L−2
    perplexity = exp(mean of nll over the n·(L − 1) predictions of the n windows)

computed in float64 from the model's logits.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxq.calibration.data import model_input_specs
from onnxq.calibration.sources.make import build_calibration
from onnxq.calibration.sources.specs import input_kind
from onnxq.errors import OnnxqError
from onnxq.ir.llm import LOGITS
from onnxq.ir.model import load_model


@dataclass(frozen=True)
class Perplexity:
    """Result of :func:`text_perplexity`."""

    perplexity: float
    windows: int
    predictions: int  # scored next-token predictions: windows · (seq_len − 1)
    seconds: float  # wall time of the model runs


def next_token_scores(logits: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(nll, argmax)`` of one window: ``logits`` ``[L, V]``, ``ids`` ``[L]``; ``nll[t] = logsumexp(z[t]) −
    z[t, ids[t+1]]`` (float64) and ``argmax[t] = argmax z[t]`` (int32, ties: the lowest id), both ``[L − 1]``."""
    z = np.asarray(logits[:-1], dtype=np.float64)
    peak = z.max(axis=1)
    log_norm = peak + np.log(np.exp(z - peak[:, None]).sum(axis=1))
    nll = log_norm - z[np.arange(len(z)), np.asarray(ids)[1:]]
    return nll, z.argmax(axis=1).astype(np.int32)


def perplexity(nll: np.ndarray) -> float:
    """``exp(mean nll)`` over every scored prediction."""
    return float(np.exp(np.mean(nll)))


def decoder_session(model_path: str | os.PathLike) -> ort.InferenceSession:
    """A CPU ONNX Runtime session of the decoder file (its external data read from beside it)."""
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])


def text_perplexity(model_path: str | os.PathLike, text: str | os.PathLike, windows: int, seq_len: int,
                    seed: int = 0, tokenizer: str | os.PathLike | None = None) -> Perplexity:
    """Perplexity of the decoder ``model_path`` on ``windows`` windows of ``seq_len`` tokens of ``text`` (rules in
    the module docstring); ``tokenizer`` defaults to the ``tokenizer.json`` beside the model."""
    model_path = Path(model_path)
    specs = model_input_specs(load_model(model_path, external_data=False))
    feeds = build_calibration(model_path, text=text, tokenizer=tokenizer, samples=windows, seq_len=seq_len,
                              seed=seed).arrays
    ids_name = next(name for name, spec in specs.items() if name in feeds and input_kind(spec) == "ids")
    session = decoder_session(model_path)
    if LOGITS not in {output.name for output in session.get_outputs()}:
        raise OnnxqError(f"{model_path}: has no '{LOGITS}' output; perplexity needs a language model's logits")
    start = time.perf_counter()
    nll = []
    for i in range(windows):
        (logits,) = session.run([LOGITS], {name: value[i:i + 1] for name, value in feeds.items()})
        nll.append(next_token_scores(logits[0], feeds[ids_name][i])[0])
    seconds = time.perf_counter() - start
    scores = np.concatenate(nll)
    if not np.all(np.isfinite(scores)):
        raise OnnxqError(f"{model_path}: non-finite logits on {text}; the model is broken")
    return Perplexity(perplexity(scores), windows, int(scores.size), seconds)
