"""Greedy generation with onnxruntime-genai (``og.Model``, ``og.Tokenizer``, ``og.Generator``) on CPU, one or more
model folders in one process; prints one JSON object: ``{"versions": ..., "models": {folder: [run, ...]}}`` where
each run is ``{"tokens": [...], "text": ...}``.

Meant to run as a subprocess with onnxruntime-genai importable, e.g. from a ``pip install --no-deps --target``
folder given by ``--genai-path`` (it is put first on ``sys.path``; onnxruntime itself is the environment's)::

    python tools/genai_generate.py --genai-path ~/.cache/onnxq/zoo/tools/genai --tokens 24 out-w2/ out-w8/

``--repeat 2`` generates twice per folder (the same tokens are expected: greedy decoding is deterministic).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

PROMPT = "It is a truth universally acknowledged, that"


def generate(og: Any, folder: str, prompt: str, tokens: int, repeat: int) -> list[dict[str, Any]]:
    """``repeat`` greedy runs of ``tokens`` new tokens after ``prompt`` with the model in ``folder``."""
    model = og.Model(folder)
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(prompt)
    runs = []
    for _ in range(repeat):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        new: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        runs.append({"tokens": new, "text": tokenizer.decode(new)})
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="onnxruntime-genai model folders (genai_config.json inside)")
    parser.add_argument("--genai-path", help="a folder holding the onnxruntime_genai package (first on sys.path)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per run (default 24)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per folder (default 1)")
    args = parser.parse_args(argv)
    if args.genai_path:
        sys.path.insert(0, args.genai_path)
    import onnxruntime
    import onnxruntime_genai as og

    versions = {"onnxruntime_genai": og.__version__, "onnxruntime": onnxruntime.__version__,
                "onnxruntime_file": onnxruntime.__file__}
    models = {folder: generate(og, folder, args.prompt, args.tokens, args.repeat) for folder in args.folders}
    print(json.dumps({"versions": versions, "models": models}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
