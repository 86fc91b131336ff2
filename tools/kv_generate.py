"""Greedy generation with a KV cache in plain ONNX Runtime, for decoder exports with past key/values.

One loop serves both exporters measured in the zoo:

* optimum's ``--task text-generation-with-past``: ``input_ids``, ``attention_mask``, ``position_ids`` and
  ``past_key_values.{i}.key|value`` ``[batch, kv_heads, past, head]`` in, ``logits`` and ``present.{i}.key|value``
  out;
* onnxruntime-genai's builder (GroupQueryAttention): the same names without ``position_ids`` (positions come from
  the mask), the head size declared as the symbol ``kv_cache_dim``.

Rules of the loop (batch 1):

* prefill: the prompt's ``T`` tokens, an empty past (length 0, head count and head size from the input's shape or
  ``head_size``), ``attention_mask`` all ones over ``T``, positions ``0..T-1``;
* each step: the previous argmax token alone, the previous step's ``present.*`` as ``past_key_values.*``, the mask
  all ones over ``past + 1`` (the total length, as both exports declare it), position ``past``;
* the next token is the argmax of the last position's logits (ties: the lowest id, ``numpy.argmax``); generation
  stops after ``new_tokens`` tokens or right after ``eos_id`` (as onnxruntime-genai's greedy search does).

``python -m tools.kv_generate MODEL.onnx [--tokens 64]`` prints the generated ids for the first 128 tokens of the
held-out novel as the prompt.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
DEFAULT_HEAD_SIZE = 64  # SmolLM2 and the tiny genai Llama; genai declares the head size as a symbol


@dataclass
class Generation:
    """Result of :func:`greedy_generate`: the new token ids and the wall time of each model run (ms; the first is
    the prefill)."""

    tokens: list[int]
    run_ms: list[float] = field(default_factory=list)


def past_specs(session: Any, head_size: int = DEFAULT_HEAD_SIZE) -> dict[str, tuple[tuple[int, int], np.dtype]]:
    """``{past input name: ((kv_heads, head_size), dtype)}`` from the session's input specs (a symbolic head size
    is ``head_size``)."""
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    specs = {}
    for spec in session.get_inputs():
        if spec.name.startswith(PAST_PREFIX):
            heads, size = spec.shape[1], spec.shape[3]
            specs[spec.name] = ((heads, size if isinstance(size, int) else head_size), np.dtype(dtypes[spec.type]))
    return specs


def step_feeds(input_names: Sequence[str], tokens: np.ndarray, past: dict[str, np.ndarray],
               past_length: int) -> dict[str, np.ndarray]:
    """Feeds for one run: ``tokens`` ``[1, n]`` after ``past_length`` cached positions."""
    n = tokens.shape[1]
    feeds: dict[str, np.ndarray] = {"input_ids": tokens.astype(np.int64)}
    if "attention_mask" in input_names:
        feeds["attention_mask"] = np.ones((1, past_length + n), dtype=np.int64)
    if "position_ids" in input_names:
        feeds["position_ids"] = np.arange(past_length, past_length + n, dtype=np.int64)[None]
    feeds.update(past)
    return feeds


def greedy_generate(session: Any, prompt: Sequence[int], new_tokens: int, eos_id: int | None = None,
                    head_size: int = DEFAULT_HEAD_SIZE) -> Generation:
    """Greedy decoding of ``new_tokens`` tokens after ``prompt`` with a growing KV cache (rules in the module
    docstring)."""
    input_names = [spec.name for spec in session.get_inputs()]
    past = {name: np.zeros((1, heads, 0, size), dtype=dtype)
            for name, ((heads, size), dtype) in past_specs(session, head_size).items()}
    outputs = ["logits", *(PRESENT_PREFIX + name[len(PAST_PREFIX):] for name in past)]
    tokens = np.asarray(prompt, dtype=np.int64)[None]
    past_length = 0
    result = Generation(tokens=[])
    while len(result.tokens) < new_tokens:
        start = time.perf_counter()
        logits, *presents = session.run(outputs, step_feeds(input_names, tokens, past, past_length))
        result.run_ms.append((time.perf_counter() - start) * 1e3)
        past_length += tokens.shape[1]
        past = dict(zip(past, presents, strict=True))
        token = int(np.argmax(logits[0, -1]))
        result.tokens.append(token)
        if token == eos_id:
            break
        tokens = np.array([[token]], dtype=np.int64)
    return result


class PrefillSession:
    """Wraps a decoder session so ``run(["logits"], {"input_ids": x})`` works (``tools.lm_metrics.score_windows``):
    the mask and an empty past are added as the KV-cache loop's prefill does."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.names = [spec.name for spec in session.get_inputs()]
        self.specs = past_specs(session)

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One prefill of ``feeds["input_ids"]`` (batch 1) with an empty past."""
        past = {name: np.zeros((1, heads, 0, size), dtype=dtype) for name, ((heads, size), dtype) in self.specs.items()}
        return self.session.run(outputs, step_feeds(self.names, feeds["input_ids"], past, 0))


def agreement(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """Positions ``i < len(reference)`` where ``tokens[i] == reference[i]`` (a shorter ``tokens`` counts its missing
    positions as disagreements)."""
    return sum(1 for a, b in zip(tokens, reference, strict=False) if a == b)


def common_prefix(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """How many leading tokens equal the reference's (the greedy continuations are the same text up to there)."""
    count = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="decoder .onnx with past_key_values inputs")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--custom-op-library", action="append", default=[])
    args = parser.parse_args(argv)
    import onnxruntime as ort

    from tools.lm_metrics import EVAL_NOVEL, novel_token_ids

    options = ort.SessionOptions()
    for library in args.custom_op_library:
        options.register_custom_ops_library(library)
    session = ort.InferenceSession(str(Path(args.model)), options, providers=["CPUExecutionProvider"])
    result = greedy_generate(session, novel_token_ids(EVAL_NOVEL)[: args.prompt_tokens], args.tokens)
    print(result.tokens)
    print(f"prefill {result.run_ms[0]:.1f} ms, decode median {np.median(result.run_ms[1:]):.1f} ms/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
