"""Evaluate an ONNX model against its fp32 reference on real text (see tools/evaluation.py for the metrics).

Examples::

    python tools/eval.py minilm q4.onnx                       # reference: <cache>/minilm/model.onnx
    python tools/eval.py minilm q4.onnx --reference fp32.onnx --json
    python tools/eval.py minilm-calibration calib.npz --samples 128 --seq-len 128 --seed 0
    python tools/eval.py smollm2 q4.onnx                      # forwards to tools/lm_metrics.py
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq.errors import OnnxqError  # noqa: E402


def _minilm(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    from tools.evaluation import evaluate_minilm

    result = evaluate_minilm(args.model, args.reference, args.threads, args.custom_op_library)
    if args.json:
        out(json.dumps(asdict(result)))
    else:
        out(
            f"{args.model}: mean cosine to fp32 {result.mean_cosine:.5f} (min {result.min_cosine:.4f})  "
            f"probe accuracy {result.probe_accuracy:.4f} (fp32 {result.fp32_probe_accuracy:.4f})  "
            f"[{result.n_passages} passages, {result.seconds:.1f} s]"
        )
    return 0


def _minilm_calibration(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    from tools.evaluation import save_minilm_calibration

    path = save_minilm_calibration(args.output, args.samples, args.seq_len, args.seed)
    out(
        f"wrote {path}: input_ids/attention_mask/token_type_ids [{args.samples}, {args.seq_len}] "
        "from TRAIN-split Austen passages (no evaluation passage)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tools/eval.py",
        description="Quality of a (quantized) ONNX model against fp32 on real text.",
        epilog="Examples: python tools/eval.py minilm q4.onnx | python tools/eval.py smollm2 q4.onnx",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    minilm = commands.add_parser(
        "minilm",
        help="MiniLM: mean cosine of sentence embeddings to fp32 and 6-way novel-probe accuracy",
        epilog="Example: python tools/eval.py minilm q4.onnx --reference ~/.cache/onnxq/minilm/model.onnx",
    )
    minilm.add_argument("model", help="ONNX model with MiniLM's inputs and last_hidden_state output")
    minilm.add_argument("--reference", help="fp32 reference (default: <cache>/minilm/model.onnx, built if missing)")
    minilm.add_argument("--threads", type=int, help="ORT intra-op threads (default: all cores)")
    minilm.add_argument("--custom-op-library", action="append", default=[], help="shared library to register")
    minilm.add_argument("--json", action="store_true", help="print the result as one JSON object")
    minilm.set_defaults(handler=_minilm)

    calibration = commands.add_parser(
        "minilm-calibration",
        help="write MiniLM calibration inputs (.npz) from train-split passages",
        epilog="Example: python tools/eval.py minilm-calibration calib.npz --samples 128 --seq-len 128",
    )
    calibration.add_argument("output", help="output .npz (input name → int64 [samples, seq_len])")
    calibration.add_argument("--samples", type=int, default=128, help="number of sequences (default 128)")
    calibration.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    calibration.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    calibration.set_defaults(handler=_minilm_calibration)

    commands.add_parser("smollm2", help="SmolLM2 perplexity/top-1 agreement (tools/lm_metrics.py; -h there)")
    return parser


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["smollm2"]:
        from tools.lm_metrics import main as lm_main

        return lm_main(argv[1:], out)
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args, out)
    except OnnxqError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
