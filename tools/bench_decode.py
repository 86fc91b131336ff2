"""End-to-end CPU latency of SmolLM2-135M single-token decode (logits for one new token) per weight format.

The model is the ``use_cache=False`` export, so one decode step is a forward pass over a length-1 sequence:
every linear layer runs at M=1, the case the 2-bit kernels are for.  Each variant is the same W2 g64 RTN
weights with a float zero ``w = s·q + z`` (decoupleQ's layout, so the timings are those of a decoupleQ
model) in one format; all sessions share one intra-op thread pool and are measured round-robin in one
process (``tools/bench_matmul.py``'s method), median over the rounds.

- ``fp32``: the export itself;
- ``matmulnbits-acc0`` / ``-acc4``: com.microsoft::MatMulNBits bits=2 with the exact correction term for the
  float zero, accuracy_level 0 (exact) / 4 (int8 activations);
- ``qdq``: uint2 DequantizeLinear → MatMul (ORT fuses it at ENABLE_ALL; accuracy level 0 kept exact);
- ``onnxq``: the onnxq::MatMulLowBit custom op (exact fp32 accumulation).

By default lm_head stays fp32 (as in tools/compare.py; it is tied to the embedding); ``--with-lm-head``
quantizes it too, which is where a third of the weights and of the time are.

    python -m tools.bench_decode
    python -m tools.bench_decode --with-lm-head --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxq
from onnxq import custom_ops
from tools.bench_matmul import measure, session, use_global_thread_pool

FORMATS = {  # name -> (quantize options, session config entries)
    "matmulnbits-acc0": (dict(format="matmulnbits", accuracy_level=0), {}),
    "matmulnbits-acc4": (dict(format="matmulnbits", accuracy_level=4), {}),
    "qdq": (dict(format="qdq"), {"session.qdq_matmulnbits_accuracy_level": "0"}),
    "onnxq": (dict(format="onnxq"), {}),
}


def decode_sessions(fp32_path: Path, workdir: Path, bits: int, group_size: int, exclude: str | None,
                    formats: list[str]) -> dict[str, ort.InferenceSession]:
    """One ORT session per variant (fp32 first); quantized models are written under ``workdir``."""
    sessions = {"fp32": session(str(fp32_path))}
    for name in formats:
        options, config = FORMATS[name]
        out = workdir / f"{name}.onnx"
        onnxq.quantize(fp32_path, out, method="rtn", bits=bits, group_size=group_size, zero_convention="float",
                       exclude=exclude, progress=False, **options)
        sessions[name] = session(str(out), config, custom=name == "onnxq")
    return sessions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--with-lm-head", action="store_true", help="quantize lm_head too")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of measurement rounds")
    args = parser.parse_args(argv)
    if "onnxq" in args.formats and custom_ops.library_path() is None:
        print("onnxq: error: the custom-op library is not built; drop --formats onnxq or build it "
              "(see custom_ops/README.md)", file=sys.stderr)
        return 2

    from models.smollm2 import build_smollm2

    fp32_path = Path(build_smollm2())
    use_global_thread_pool(args.threads)
    with tempfile.TemporaryDirectory(prefix="onnxq-decode-") as tmp:
        sessions = decode_sessions(fp32_path, Path(tmp), args.bits, args.group_size,
                                   None if args.with_lm_head else "lm_head", args.formats)
        feeds = {"input_ids": np.array([[504]], dtype=np.int64)}
        runs = {name: (lambda s=s: s.run(None, feeds)[0]) for name, s in sessions.items()}
        medians = measure(runs, warmup=5, min_rounds=20, max_rounds=2000, budget=args.budget)
        outputs = {name: run() for name, run in runs.items()}
    lm = "quantized" if args.with_lm_head else "fp32"
    print(f"SmolLM2-135M single-token decode, W{args.bits} g{args.group_size} (lm_head {lm}), "
          f"{args.threads} threads, ORT {ort.__version__}\n")
    reference = "matmulnbits-acc0" if "matmulnbits-acc0" in outputs else "fp32"  # the exact quantized model if run
    print(f"| format | median ms | vs fp32 | logits max abs diff vs {reference} |")
    print("|---|---|---|---|")
    for name, ms in medians.items():
        diff = "-" if name in ("fp32", reference) else f"{np.abs(outputs[name] - outputs[reference]).max():.2e}"
        print(f"| {name} | {ms:.2f} | {medians['fp32'] / ms:.2f}x | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
