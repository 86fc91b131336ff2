"""Greedy generation with onnxruntime-genai (``og.Model``, ``og.Tokenizer``, ``og.Generator``), timed.

One run (:func:`greedy_run`): ``GeneratorParams`` with ``max_length = len(prompt) + tokens`` and ``do_sample=False``
(greedy: the argmax token each step), ``append_tokens(prompt)`` (the prefill, timed as ``prefill_ms``), then
``generate_next_token`` until done. The first ``generate_next_token`` only picks the token from the prefill's logits;
every later one runs the model on one token with the KV cache, and those are the ``decode_ms`` (one per token).

onnxruntime-genai is optional (``pip install 'onnxq[llm]'``): :func:`import_genai` imports it or raises a one-line
:class:`OnnxqError`.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from onnxq.errors import OnnxqError

GENAI_MISSING = "onnxruntime-genai is not installed; pip install 'onnxq[llm]'"
PROMPT = "It is a truth universally acknowledged, that"  # README's generation snippet


def import_genai() -> ModuleType:
    """The ``onnxruntime_genai`` module (onnxruntime is imported first: the genai package runs on its library)."""
    import onnxruntime  # noqa: F401

    try:
        import onnxruntime_genai
    except ImportError:
        raise OnnxqError(GENAI_MISSING) from None
    return onnxruntime_genai


def greedy_run(og: ModuleType, model: Any, ids: list[int], tokens: int) -> dict[str, Any]:
    """One greedy run of ``tokens`` new tokens after ``ids``: ``{"tokens", "prefill_ms", "decode_ms"}`` (rules in
    the module docstring)."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + tokens, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids)
    prefill_ms = (time.perf_counter() - start) * 1e3
    new: list[int] = []
    step_ms: list[float] = []
    while not generator.is_done():
        start = time.perf_counter()
        generator.generate_next_token()
        step_ms.append((time.perf_counter() - start) * 1e3)
        new.append(int(generator.get_next_tokens()[0]))
    return {"tokens": new, "prefill_ms": prefill_ms, "decode_ms": step_ms[1:]}


@dataclass(frozen=True)
class Generated:
    """Result of :func:`generate`: the greedy continuation and the median decode time per token."""

    tokens: list[int]
    text: str
    decode_ms: float  # median over the timed runs of each run's median generate_next_token time (ms)


def generate(folder: str | os.PathLike, prompt: str, tokens: int, repeat: int = 3) -> Generated:
    """Greedy continuation of ``prompt`` (encoded by the folder's tokenizer) by the genai model in ``folder``: one
    untimed warm-up run, then ``repeat`` timed runs; the tokens are the same every run (greedy)."""
    og = import_genai()
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    ids = [int(i) for i in tokenizer.encode(prompt)]
    run = greedy_run(og, model, ids, tokens)
    medians = []
    for _ in range(repeat):
        run = greedy_run(og, model, ids, tokens)
        medians.append(statistics.median(run["decode_ms"]) if run["decode_ms"] else float("nan"))
    return Generated(run["tokens"], tokenizer.decode(run["tokens"]), statistics.median(medians))
