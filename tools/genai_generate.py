"""Greedy generation with onnxruntime-genai (``og.Model``, ``og.Tokenizer``, ``og.Generator``) on CPU, one or more
model folders in one process; prints one JSON object: ``{"versions": ..., "models": {folder: [run, ...]}}`` where
each run is ``{"tokens": [...], "text": ...}``.

Meant to run as a subprocess with onnxruntime-genai importable, e.g. from a ``pip install --no-deps --target``
folder given by ``--genai-path`` (it is put first on ``sys.path``; onnxruntime itself is the environment's)::

    python tools/genai_generate.py --genai-path ~/.cache/onnxq/zoo/tools/genai --tokens 24 out-w2/ out-w8/

``--repeat 2`` generates twice per folder (the same tokens are expected: greedy decoding is deterministic).
``--prompt-ids 1,2,3`` gives the prompt as token ids (skipping og's tokenizer). Every model is loaded first, then
the runs go round-robin over the folders (repeat 1 of each folder, then repeat 2, ...), so timings of different
folders are measured side by side; ``--warmup N`` runs N untimed generations per folder first. Each run records
``prefill_ms`` (``append_tokens``: the prompt's forward pass) and ``decode_ms`` (each ``generate_next_token`` that
runs the model: every one after the first, which only picks the token from the prefill's logits).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq.generation import PROMPT, greedy_run  # noqa: E402


def generate_all(og: Any, folders: list[str], prompt: str | list[int], tokens: int, repeat: int,
                 warmup: int = 0) -> dict[str, list[dict[str, Any]]]:
    """``repeat`` greedy runs per folder, round-robin over the folders after ``warmup`` untimed runs each."""
    models = {folder: og.Model(folder) for folder in folders}
    tokenizers = {folder: og.Tokenizer(model) for folder, model in models.items()}
    ids = {folder: list(prompt) if not isinstance(prompt, str) else list(tokenizers[folder].encode(prompt))
           for folder in folders}
    for folder in folders:
        for _ in range(warmup):
            greedy_run(og, models[folder], ids[folder], tokens)
    runs: dict[str, list[dict[str, Any]]] = {folder: [] for folder in folders}
    for _ in range(repeat):
        for folder in folders:
            run = greedy_run(og, models[folder], ids[folder], tokens)
            run["text"] = tokenizers[folder].decode(run["tokens"])
            runs[folder].append(run)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="onnxruntime-genai model folders (genai_config.json inside)")
    parser.add_argument("--genai-path", help="a folder holding the onnxruntime_genai package (first on sys.path)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per run (default 24)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per folder (default 1)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs per folder first (default 0)")
    parser.add_argument("--prompt-ids", help="the prompt as comma-separated token ids (instead of --prompt)")
    args = parser.parse_args(argv)
    if args.genai_path:
        sys.path.insert(0, args.genai_path)
    import onnxruntime
    import onnxruntime_genai as og

    versions = {"onnxruntime_genai": og.__version__, "onnxruntime": onnxruntime.__version__,
                "onnxruntime_file": onnxruntime.__file__}
    prompt = [int(i) for i in args.prompt_ids.split(",")] if args.prompt_ids else args.prompt
    models = generate_all(og, args.folders, prompt, args.tokens, args.repeat, args.warmup)
    print(json.dumps({"versions": versions, "models": models}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
