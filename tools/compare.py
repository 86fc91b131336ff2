"""Side-by-side comparison: onnxq's methods vs ONNX Runtime's MatMulNBitsQuantizer on a real model.

For each (bits, group size) it quantizes the fp32 export with every method, evaluates it with the
model's metrics (MiniLM: mean cosine to fp32 and the 6-way novel probe; SmolLM2: perplexity on the
held-out novel and top-1 agreement), and prints one markdown table: metric, quantized-weight bytes,
bits per weight, quantization time. A PNG plots the metric against bits per weight.

    python tools/compare.py minilm --bits 2 3 4 --group-size 64 128
    python tools/compare.py smollm2 --bits 2 4 --group-size 64 128 --methods rtn decoupleq

Quantized-weight bytes: every initializer of the output that the fp32 model does not have under the
same name (codes, scales, zero points, correction terms), i.e. the cost of the quantized layers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxq  # noqa: E402
from models.cache import cache_dir, write_npz  # noqa: E402
from onnxq.graph import find_targets, load_model, tensor_nbytes  # noqa: E402

ONNXQ_METHODS = ("rtn", "gptq", "decoupleq")
ORT_METHODS = ("ort-default", "ort-hqq", "ort-gptq")


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


def model_spec(name: str):
    """(fp32 path, evaluate(path) -> metrics dict, calibration dict, primary metric, higher is better)."""
    if name == "minilm":
        from models.minilm import build_minilm
        from tools.evaluation import evaluate_minilm, make_minilm_calibration

        path = Path(build_minilm())

        def evaluate(p: Path) -> dict:
            r = evaluate_minilm(p, reference=path)
            return {"cosine": r.mean_cosine, "probe": r.probe_accuracy}

        return path, evaluate, lambda: make_minilm_calibration(128, 128, 0), "cosine", True
    if name == "smollm2":
        from models.smollm2 import build_smollm2
        from tools.lm_metrics import evaluate_lm, make_smollm2_calibration

        path = Path(build_smollm2())

        def evaluate(p: Path) -> dict:
            r = evaluate_lm(p, reference=path)
            return {"perplexity": r.perplexity, "top1": r.top1_agreement}

        return path, evaluate, lambda: make_smollm2_calibration(128, 512, 0), "perplexity", False
    raise SystemExit(f"unknown model {name!r}; use minilm or smollm2")


def quantized_weight_bytes(fp32: onnx.ModelProto, quantized_path: Path) -> tuple[int, int]:
    """(bytes of initializers new in the quantized model, parameters of the quantized layers)."""
    quantized = onnx.load(str(quantized_path), load_external_data=False)
    old = {t.name for t in fp32.graph.initializer}
    params = sum(int(np.prod(t.matrix_shape)) for t in find_targets(fp32).targets)
    return sum(tensor_nbytes(t) for t in quantized.graph.initializer if t.name not in old), params


# ----------------------------------------------------------------------------- quantizers


def run_onnxq(method: str, fp32_path: Path, out: Path, bits: int, group_size: int, calib: Path) -> str:
    """Quantize with onnxq (matmulnbits format, accuracy level 0); returns a note."""
    options = dict(method=method, bits=bits, group_size=group_size, format="matmulnbits", progress=False)
    if method != "rtn":
        options["calibration"] = str(calib)
    _, summary = onnxq.quantize_with_summary(fp32_path, out, **options)
    extra = f"calibration {summary.calibration_seconds:.0f}s, peak {summary.peak_memory_mb:.0f} MB" \
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


def run_ort(method: str, fp32_path: Path, out: Path, bits: int, group_size: int, calib: dict, external: bool) -> str:
    """Quantize with ORT's MatMulNBitsQuantizer (default/HQQ/GPTQ); returns a note."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    if method == "ort-default":
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=group_size, is_symmetric=False, bits=bits)
    elif method == "ort-hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=group_size, bits=bits)
    else:
        reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib)
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=group_size)
        config.bits = bits
    quantizer = mnq.MatMulNBitsQuantizer(str(fp32_path), bits=bits, block_size=group_size, is_symmetric=False,
                                         algo_config=config)
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


# ----------------------------------------------------------------------------- the table


def compare(name: str, bits_list: list[int], group_sizes: list[int], methods: list[str],
            out_dir: Path) -> tuple[list[Row], str]:
    fp32_path, evaluate, make_calib, primary, higher_better = model_spec(name)
    fp32 = load_model(fp32_path)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(fp32_path), load_external_data=False).graph.initializer)
    calib = make_calib()
    calib_path = write_npz(cache_dir("compare") / f"{name}_calib.npz", calib)
    rows = [Row("fp32", None, None, evaluate(fp32_path))]
    print(_row_line(rows[0]), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"onnxq-compare-{name}-"))
    for bits in bits_list:
        for group_size in group_sizes:
            for method in methods:
                out = workdir / f"{method}_w{bits}_g{group_size}.onnx"
                row = Row(method, bits, group_size)
                start = time.perf_counter()
                try:
                    if method in ONNXQ_METHODS:
                        row.note = run_onnxq(method, fp32_path, out, bits, group_size, calib_path)
                    else:
                        row.note = run_ort(method, fp32_path, out, bits, group_size, calib, external)
                    row.seconds = time.perf_counter() - start
                    if not row.note.startswith("refused"):
                        row.weight_bytes, params = quantized_weight_bytes(fp32, out)
                        row.bits_per_weight = 8 * row.weight_bytes / params
                        row.metrics = evaluate(out)
                except Exception as exc:  # noqa: BLE001 - a failing method is a result, not a crash
                    row.seconds = time.perf_counter() - start
                    row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                    traceback.print_exc(limit=2, file=sys.stderr)
                rows.append(row)
                print(_row_line(row), flush=True)
                for leftover in workdir.glob(f"{out.name}*"):
                    leftover.unlink()
    table = markdown_table(rows)
    (out_dir / f"compare_{name}.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
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
    parser.add_argument("--out-dir", default="docs")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    _, table = compare(args.model, args.bits, args.group_size, args.methods, Path(args.out_dir))
    print()
    print(table)
    print(f"\ntotal time {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
