"""The key/value cache sizes of an LLM export, read from the config file its exporter wrote beside the model.

* onnxruntime-genai's model builder: ``genai_config.json`` → ``model.decoder.num_key_value_heads`` and
  ``model.decoder.head_size``;
* optimum / transformers: ``config.json`` → ``num_key_value_heads`` (else ``num_attention_heads``) and ``head_dim``
  (else ``hidden_size / num_attention_heads``).

``genai_config.json`` wins when both are there.  A size the input shape fixes is taken from the shape instead
(:func:`onnxq.calibration.sources.specs.calibration_shape`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxq.errors import OnnxqError

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"


@dataclass(frozen=True)
class CacheSizes:
    """Key/value heads and head size of a decoder (None: not known), and the file they come from."""

    kv_heads: int | None = None
    head_size: int | None = None
    source: str | None = None


def cache_sizes(model_path: str | os.PathLike | None) -> CacheSizes:
    """The cache sizes from the config beside ``model_path`` (empty when there is none or no path)."""
    if model_path is None:
        return CacheSizes()
    folder = Path(model_path).parent
    genai, hf = folder / GENAI_CONFIG, folder / HF_CONFIG
    if genai.is_file():
        decoder = _read(genai).get("model", {}).get("decoder", {})
        return CacheSizes(_int(decoder.get("num_key_value_heads")), _int(decoder.get("head_size")), str(genai))
    if hf.is_file():
        config = _read(hf)
        heads = _int(config.get("num_attention_heads"))
        kv_heads = _int(config.get("num_key_value_heads")) or heads
        head_size = _int(config.get("head_dim"))
        hidden = _int(config.get("hidden_size"))
        if head_size is None and hidden and heads and hidden % heads == 0:
            head_size = hidden // heads
        return CacheSizes(kv_heads, head_size, str(hf))
    return CacheSizes()


def _read(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OnnxqError(f"{path}: not a readable JSON config ({type(exc).__name__}); fix or remove it") from None
    if not isinstance(config, dict):
        raise OnnxqError(f"{path}: holds no JSON object; fix or remove it")
    return config


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
