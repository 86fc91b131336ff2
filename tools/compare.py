"""Side-by-side comparison: onnxq's methods vs ONNX Runtime's MatMulNBitsQuantizer on a real model.

For each (bits, group size) it quantizes the fp32 export with every method, evaluates it with the
model's metrics (MiniLM: mean cosine to fp32 and the 6-way novel probe; SmolLM2: perplexity on the
held-out novel and top-1 agreement), and prints one markdown table: metric, quantized-weight bytes,
bits per weight, quantization time. A PNG plots the metric against bits per weight.

    python tools/compare.py minilm --bits 2 3 4 --group-size 64 128
    python tools/compare.py smollm2 --bits 2 4 --group-size 64 128
    python tools/compare.py smollm2 --configs 2:64 3:128 --methods rtn decoupleq

SmolLM2's lm_head is left in float by every method: it is tied to the embedding (a Transpose of the Gather
table, which ORT's quantizer cannot see as a constant) and ships as Q8_0, so quantizing it only on the onnxq
side would not compare like with like.

Quantized-weight bytes: every tensor the output's quantized layers use (codes, scales, zero points, float-zero
terms), counted as the quantize summary and ``onnxq inspect`` count them (``onnxq.quantized_size``); bits per
weight divides by the weights of those layers.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxq  # noqa: E402
from models.cache import cache_dir, write_npz  # noqa: E402
from onnxq.heap import reuse_freed_memory
from onnxq.ir.model import load_model
from onnxq.quantized_size import quantized_layers

ONNXQ_METHODS = ("rtn", "gptq", "decoupleq")
ORT_METHODS = ("ort-default", "ort-hqq", "ort-gptq")
# ORT's GPTQ runs the whole model once per distinct MatMul input per sample (SmolLM2: ~120 inputs x ~2.7 s per
# 512-token window, over an hour per setting at 16 samples), so it gets only the first few calibration samples.
# Its weights come out equal to its RTN's at any sample count (the error update reads the zero triangle of the
# Cholesky factor), which every run re-checks against ort-default's output (code_differences).
ORT_GPTQ_SAMPLES = {"minilm": 16, "smollm2": 2}


@dataclass
class Row:
    method: str
    bits: int | None
    group_size: int | None
    metrics: dict = field(default_factory=dict)
    weight_bytes: int = 0
    bits_per_weight: float = 32.0
    seconds: float = 0.0
    note: str = ""


# ----------------------------------------------------------------------------- models and metrics


SMOLLM2_CALIBRATION_WINDOWS = 64


def model_spec(name: str):
    """(fp32 path, evaluate(path) -> metrics dict, calibration dict, primary metric, higher is better,
    node-name regex left in float by every method)."""
    if name == "minilm":
        from models.minilm import build_minilm
        from tools.evaluation import evaluate_minilm, make_minilm_calibration

        path = Path(build_minilm())

        def evaluate(p: Path) -> dict:
            r = evaluate_minilm(p, reference=path)
            return {"cosine": r.mean_cosine, "probe": r.probe_accuracy}

        return path, evaluate, lambda: make_minilm_calibration(128, 128, 0), "cosine", True, None
    if name == "smollm2":
        from models.smollm2 import build_smollm2
        from tools.lm_metrics import evaluate_lm, make_smollm2_calibration

        path = Path(build_smollm2())

        def evaluate(p: Path) -> dict:
            r = evaluate_lm(p, reference=path)
            return {"perplexity": r.perplexity, "top1": r.top1_agreement}

        # 64 windows of 512 tokens: sequential calibration with float targets runs the working and the float model
        # (two forward passes); 128 windows took decoupleQ W2 g64 to 17 min, over issue 5's 15-minute budget
        # (docs/results.md gives both)
        return path, evaluate, lambda: make_smollm2_calibration(SMOLLM2_CALIBRATION_WINDOWS, 512, 0), \
            "perplexity", False, "lm_head"
    raise SystemExit(f"unknown model {name!r}; use minilm or smollm2")


def quantized_weight_bytes(quantized_path: Path) -> tuple[int, int]:
    """(bytes of every tensor the quantized layers use, their weights), as the quantize summary and ``onnxq
    inspect`` count them (:func:`onnxq.quantized_size.quantized_layers`: codes, scales, zero points, float-zero
    terms, whatever their producer)."""
    layers = quantized_layers(onnx.load(str(quantized_path), load_external_data=False))
    return round(sum(layer.bytes for layer in layers)), sum(layer.params for layer in layers)


# ----------------------------------------------------------------------------- quantizers


def run_onnxq(method: str, fp32_path: Path, out: Path, bits: int, group_size: int, calib: Path,
              exclude: str | None) -> str:
    """Quantize with onnxq (matmulnbits format, accuracy level 0); returns a note."""
    # the harness chooses with --exclude (its SmolLM2 spec excludes lm_head): no default may override that choice
    options = dict(method=method, bits=bits, group_size=group_size, format="matmulnbits", exclude=exclude,
                   quantize_lm_head=True, accuracy_level=0)
    if method != "rtn":
        options["calibration"] = str(calib)
    _, summary = onnxq.quantize_with_summary(fp32_path, out, **options)
    extra = f"calibration {summary.calibration_seconds:.0f}s, solving {summary.solve_seconds:.0f}s, peak " \
        f"{summary.peak_memory_mb:.0f} MB" \
        if summary.calibration_seconds else ""
    return extra


class _Reader:
    """ORT CalibrationDataReader over a dict of arrays, one sample per call."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.index = 0
        self.count = len(next(iter(arrays.values())))

    def get_next(self):
        if self.index >= self.count:
            return None
        feed = {k: v[self.index : self.index + 1] for k, v in self.arrays.items()}
        self.index += 1
        return feed

    def rewind(self) -> None:
        self.index = 0


def run_ort(method: str, fp32_path: Path, out: Path, bits: int, group_size: int, calib: dict, external: bool,
            excluded: list[str], gptq_samples: int = 16) -> str:
    """Quantize with ORT's MatMulNBitsQuantizer (default/HQQ/GPTQ); returns a note."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    if method == "ort-default":
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=group_size, is_symmetric=False, bits=bits)
    elif method == "ort-hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=group_size, bits=bits)
    else:
        # ORT's GPTQ reruns the whole model once per distinct layer input and sample: cap its samples
        subset = {k: v[:gptq_samples] for k, v in calib.items()}
        reader = type("Reader", (_Reader, CalibrationDataReader), {})(subset)
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=group_size)
        config.bits = bits
    # given a path to a model with external data, ORT's GPTQ serializes the model without its tensors and
    # fails ("External data path validation failed"): hand it the loaded model instead
    source = onnx.load(str(fp32_path)) if method == "ort-gptq" and external else str(fp32_path)
    quantizer = mnq.MatMulNBitsQuantizer(source, bits=bits, block_size=group_size, is_symmetric=False,
                                         nodes_to_exclude=excluded, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=external)
    model = onnx.load(str(out), load_external_data=False)
    kinds = {n.op_type for n in model.graph.node} & {"MatMulNBits", "DequantizeLinear"}
    bits_attr = {onnx.helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "MatMulNBits"
                 for a in n.attribute if a.name == "bits"}
    if not kinds:
        return "refused: no layer quantized (weights left in float)"
    if bits_attr and bits not in bits_attr:
        return f"wrote bits={sorted(bits_attr)} instead of {bits}"
    return ""


def code_differences(path: Path, reference: Path) -> tuple[int, int] | None:
    """(differing, total) bytes of MatMulNBits codes and zero points between two ORT outputs, or None when
    their layouts differ. ORT's GPTQ computes scales in another order than its RTN (last-bit differences),
    which flips a rounding tie here and there; everything else is the same."""
    def quantized(p: Path) -> list[np.ndarray]:
        model = onnx.load(str(p))
        inits = {t.name: t for t in model.graph.initializer}
        return [numpy_helper.to_array(inits[name]) for node in model.graph.node
                if node.op_type == "MatMulNBits" for name in node.input[1:] if name in inits]

    a, b = quantized(path), quantized(reference)
    if len(a) != len(b) or not a or any(x.shape != y.shape or x.dtype != y.dtype for x, y in zip(a, b, strict=True)):
        return None
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x.dtype.kind in "iu"]
    return sum(int((x != y).sum()) for x, y in pairs), sum(x.size for x, _ in pairs)


# ----------------------------------------------------------------------------- the table


def compare(name: str, configs: list[tuple[int, int]], methods: list[str], out_dir: Path) -> tuple[list[Row], str]:
    fp32_path, evaluate, make_calib, primary, higher_better, exclude = model_spec(name)
    fp32 = load_model(fp32_path)
    excluded = [n.name for n in fp32.graph.node if exclude and re.search(exclude, n.name)]  # ORT takes node names
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(fp32_path), load_external_data=False).graph.initializer)
    calib = make_calib()
    calib_path = write_npz(cache_dir("compare") / f"{name}_calib.npz", calib)
    rows = [Row("fp32", None, None, evaluate(fp32_path))]
    print(_row_line(rows[0]), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"onnxq-compare-{name}-"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / f"compare_{name}.json"
        for bits, group_size in configs:
            for method in methods:
                out = workdir / f"{method}_w{bits}_g{group_size}.onnx"
                row = Row(method, bits, group_size)
                print(f"[{method} w{bits} g{group_size}] running ...", file=sys.stderr, flush=True)
                start = time.perf_counter()
                try:
                    if method in ONNXQ_METHODS:
                        row.note = run_onnxq(method, fp32_path, out, bits, group_size, calib_path, exclude)
                    else:
                        row.note = run_ort(method, fp32_path, out, bits, group_size, calib, external, excluded,
                                           ORT_GPTQ_SAMPLES[name])
                        if method == "ort-gptq":
                            samples = f"{ORT_GPTQ_SAMPLES[name]} calibration samples"
                            row.note = "; ".join(filter(None, [row.note, samples]))
                    row.seconds = time.perf_counter() - start
                    if not row.note.startswith("refused"):
                        row.weight_bytes, params = quantized_weight_bytes(out)
                        row.bits_per_weight = 8 * row.weight_bytes / params
                        row.metrics = evaluate(out)
                except Exception as exc:  # noqa: BLE001 - a failing method is a result, not a crash
                    row.seconds = time.perf_counter() - start
                    row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                    traceback.print_exc(limit=2, file=sys.stderr)
                if method == "ort-gptq" and out.exists() and "ort-default" in methods:
                    reference = workdir / f"ort-default_w{bits}_g{group_size}.onnx"
                    diff = code_differences(out, reference) if reference.exists() else None
                    if diff is not None:
                        row.note = "; ".join(filter(None, [row.note, f"codes differ from ort-default's in {diff[0]:,} "
                                                                     f"of {diff[1]:,} bytes"]))
                rows.append(row)
                print(_row_line(row), flush=True)
                json_path.write_text(json.dumps([asdict(r) for r in rows], indent=1))  # partial results survive
            for leftover in workdir.glob("*"):
                leftover.unlink()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the quantized models of every configuration
    table = markdown_table(rows)
    plot(rows, primary, higher_better, out_dir / f"compare_{name}.png", name)
    return rows, table


def _row_line(row: Row) -> str:
    metrics = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.metrics.items())
    return f"[{row.method} w{row.bits} g{row.group_size}] {metrics} bytes={row.weight_bytes} " \
           f"time={row.seconds:.1f}s {row.note}"


def markdown_table(rows: list[Row]) -> str:
    keys = list(rows[0].metrics)
    head = ("| method | bits | group | " + " | ".join(keys)
            + " | quantized-weight bytes | bits/weight | time (s) | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        values = " | ".join(_fmt(r.metrics.get(k)) for k in keys)
        lines.append(f"| {r.method} | {r.bits or 32} | {r.group_size or '-'} | {values} | {r.weight_bytes:,} | "
                     f"{r.bits_per_weight:.2f} | {r.seconds:.1f} | {r.note} |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"


def plot(rows: list[Row], metric: str, higher_better: bool, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r.method for r in rows if r.bits):
        points = sorted((r.bits_per_weight, r.metrics[metric]) for r in rows
                        if r.method == method and metric in r.metrics and r.metrics[metric] is not None)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
    fp32 = rows[0].metrics[metric]
    ax.axhline(fp32, color="k", linestyle="--", label="fp32")
    if not higher_better:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + scales + zeros)")
    ax.set_ylabel(metric)
    ax.set_title(f"{name}: {metric} vs bits per weight")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["minilm", "smollm2"])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--group-size", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--methods", nargs="+", default=["rtn", "decoupleq", *ORT_METHODS],
                        choices=[*ONNXQ_METHODS, *ORT_METHODS])
    parser.add_argument("--configs", nargs="+", metavar="BITS:GROUP",
                        help="explicit (bits, group) pairs instead of the --bits x --group-size grid")
    parser.add_argument("--out-dir", default="docs")
    args = parser.parse_args(argv)
    reuse_freed_memory()  # as the command line does: this process solves the small layer groups itself
    if args.configs:
        try:
            configs = [tuple(int(v) for v in c.split(":")) for c in args.configs]
        except ValueError:
            parser.error("--configs takes BITS:GROUP pairs, e.g. 2:64 4:128")
    else:
        configs = [(b, g) for b in args.bits for g in args.group_size]
    start = time.perf_counter()
    _, table = compare(args.model, configs, args.methods, Path(args.out_dir))
    print()
    print(table)
    print(f"\ntotal time {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
