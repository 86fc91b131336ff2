"""SplitQuant evidence: RTN with and without split, on the built-in digits models and on all-MiniLM-L6-v2.

For every model: INT2/3/4/8 RTN (asymmetric, integer zero point), per-channel (group -1) and group-64, plain
and split; then per-tensor activation fake-quantization (``--act-bits``) with no split, weight split and
weight + activation split.  Weights are emitted in the ``fake`` format (dequantized float weights), which is
numerically what ``qdq`` and ``matmulnbits`` compute.

* digits CNN / MLP: test accuracy (540 digits) and mean cosine of the logits to fp32;
* MiniLM: mean cosine of the sentence embeddings to fp32 and the fp32-trained 6-way novel probe accuracy
  (``tools/evaluation.py``); activation calibration: 128 train-split sequences of 128 tokens.

    python tools/split_eval.py                     # digits CNN + MLP (seconds)
    python tools/split_eval.py --models cnn minilm # + MiniLM (minutes; needs python -m models.minilm)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import onnxq  # noqa: E402
from onnxq.ir.model import load_model, save_model  # noqa: E402
from onnxq.passes.splitquant import split_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "onnxq" / "data"
DIGITS = {"cnn": ("digits_cnn", "image"), "mlp": ("digits_mlp", "pixels")}
Metrics = dict[str, float]


# ----------------------------------------------------------------------------- metrics per model family


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)))


def digits_family(name: str) -> tuple[onnx.ModelProto, object, Callable[[onnx.ModelProto], Metrics], list[str]]:
    """(model, calibration, evaluate, metric names) for a built-in digits model."""
    file, key = DIGITS[name]
    model = onnx.load(str(DATA / f"{file}.onnx"))
    test = np.load(DATA / "digits_test.npz")
    reference = _session(model).run(None, {key: test[key]})[0]

    def evaluate(candidate: onnx.ModelProto) -> Metrics:
        logits = _session(candidate).run(None, {key: test[key]})[0]
        return {"accuracy": float((logits.argmax(1) == test["labels"]).mean()), "cosine": _cosine(logits, reference)}

    return model, str(DATA / "digits_calib.npz"), evaluate, ["accuracy", "cosine"]


def minilm_family(folder: Path) -> tuple[onnx.ModelProto, object, Callable[[onnx.ModelProto], Metrics], list[str]]:
    from models.minilm import build_minilm
    from tools.evaluation import evaluate_minilm, make_minilm_calibration

    path = build_minilm()
    model = load_model(path)

    def evaluate(candidate: onnx.ModelProto) -> Metrics:
        file = folder / "candidate.onnx"
        save_model(candidate, file)
        result = evaluate_minilm(file, path)
        file.unlink()
        return {"probe": result.probe_accuracy, "cosine": result.mean_cosine}

    return model, make_minilm_calibration(128, 128, 0), evaluate, ["probe", "cosine"]


# ----------------------------------------------------------------------------- the table


def run_family(
    label: str, family: tuple, bits_list: list[int], group_sizes: list[int], act_bits: list[int], seed: int,
    out: Callable[[str], None],
) -> None:
    model, calibration, evaluate, names = family
    start = time.perf_counter()
    fp32 = evaluate(model)
    split, report = split_model(model, seed=seed)
    split_seconds = report.seconds
    out(f"\n### {label}: weight RTN (fake format), plain vs SplitQuant\n")
    out(f"fp32: {', '.join(f'{n} {fp32[n]:.3f}' for n in names)}; split: {len(report.layers)} layers "
        f"in {split_seconds:.1f}s, {report.bytes_before / 1e6:.2f} -> {report.bytes_after / 1e6:.2f} MB float\n")
    header = " | ".join(f"{n} RTN | {n} split" for n in names)
    out(f"| bits | group | {header} | recovered ({names[0]}) |")
    out("|" + "---|" * (3 + 2 * len(names)))
    for group_size in group_sizes:
        for bits in bits_list:
            options = {"bits": bits, "group_size": group_size, "format": "fake", "seed": seed}
            plain = evaluate(onnxq.quantize(model, **options))
            with_split = evaluate(onnxq.quantize(split, **options))
            metric = names[0]  # share of the fp32 → RTN loss that the split wins back
            lost = fp32[metric] - plain[metric]
            recovered = f"{(with_split[metric] - plain[metric]) / lost:.0%}" if lost > 0.005 else "-"
            cells = " | ".join(f"{plain[n]:.3f} | {with_split[n]:.3f}" for n in names)
            out(f"| INT{bits} | {'per-channel' if group_size == -1 else group_size} | {cells} | {recovered} |")
    if act_bits:
        split_acts, act_report = split_model(model, activations=True, calibration=calibration, seed=seed)
        out(f"\n### {label}: per-tensor activation QDQ (weights RTN per-channel), {len(act_report.activations)} "
            "activations split\n")
        header = " | ".join(f"{n} no split | {n} split W | {n} split W+A" for n in names)
        out(f"| weights | act bits | {header} |")
        out("|" + "---|" * (2 + 3 * len(names)))
        for weight_bits in (8, 4):
            for bits in act_bits:
                options = {"bits": weight_bits, "group_size": -1, "format": "fake", "act_bits": bits,
                           "calibration": calibration, "seed": seed}
                results = [evaluate(onnxq.quantize(m, **options)) for m in (model, split, split_acts)]
                cells = " | ".join(" | ".join(f"{r[n]:.3f}" for r in results) for n in names)
                out(f"| INT{weight_bits} | A{bits} | {cells} |")
    out(f"\n({label}: {time.perf_counter() - start:.0f}s in all)")


def bench_kmeans(out: Callable[[str], None], repeats: int = 3) -> None:
    """Exact DP vs scikit-learn KMeans on a 384×1536 weight (MiniLM's FFN weight if built, and a Gaussian one)."""
    from models.cache import cache_root
    from onnxq.solvers.kmeans1d import kmeans_1d

    weights = {"gaussian 384x1536": np.random.default_rng(0).standard_normal((384, 1536)).astype(np.float32) * 0.04}
    path = cache_root() / "minilm" / "model.onnx"
    if path.exists():
        graph = onnx.load(str(path)).graph
        ffn = next(t for t in graph.initializer if tuple(t.dims) == (384, 1536))
        weights["MiniLM FFN weight 384x1536"] = onnx.numpy_helper.to_array(ffn)
    out("| input | exact DP | scikit-learn | loss exact / sklearn |")
    out("|---|---|---|---|")
    for label, weight in weights.items():
        cells = []
        for method in ("exact", "sklearn"):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                clustering = kmeans_1d(weight, 3, method)
                times.append(time.perf_counter() - start)
            cells.append((min(times), clustering.loss))
        out(f"| {label} | {cells[0][0]:.2f} s | {cells[1][0]:.2f} s | {cells[0][1]:.3f} / {cells[1][1]:.3f} |")


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp", "minilm"])
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8])
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[-1, 64])
    parser.add_argument("--act-bits", nargs="*", type=int, default=[8, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bench-kmeans", action="store_true", help="only time the exact DP against scikit-learn")
    args = parser.parse_args(argv)
    if args.bench_kmeans:
        bench_kmeans(out)
        return 0
    with tempfile.TemporaryDirectory(prefix="onnxq-split-eval-") as folder:
        for name in args.models:
            family = minilm_family(Path(folder)) if name == "minilm" else digits_family(name)
            label = "all-MiniLM-L6-v2" if name == "minilm" else f"digits {name.upper()}"
            run_family(label, family, args.bits, args.group_sizes, args.act_bits, args.seed, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
