"""Parallel solving side by side: one quantize job with ``--workers 1`` and with ``--workers N`` in one run.

    python -m tools.bench_workers                      # MiniLM decoupleQ W2 g64 (the golden job), 1 vs all CPUs
    python -m tools.bench_workers --model smollm2      # SmolLM2-135M with the harness's 64 x 512 calibration tokens
    python -m tools.bench_workers --workers 1 2 4

Each run is a separate process (fresh imports, its own worker processes); the script prints wall time, the
summary's calibration and solving seconds, the output's sha256 and the speed-up over the first row.  The outputs
must be byte-identical (the row tasks run with one BLAS thread wherever they run); a difference fails the script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq.solve_pool import default_workers  # noqa: E402

RUN = """
import json, sys, time
sys.path.insert(0, {root!r})
import numpy as np, onnxq
model, out, workers = {model!r}, {out!r}, {workers}
if model == "minilm":
    from models.minilm import build_minilm
    from tools.evaluation import make_minilm_calibration
    path, calibration = build_minilm(), make_minilm_calibration(n_samples=32, seq_len=128)
    options = {{}}
else:
    from models.smollm2 import build_smollm2
    from tools.compare import SMOLLM2_CALIBRATION_WINDOWS
    from tools.lm_metrics import make_smollm2_calibration
    path = build_smollm2()
    calibration = make_smollm2_calibration(SMOLLM2_CALIBRATION_WINDOWS, 512, 0)
    options = dict(quantize_lm_head=True, exclude="lm_head", accuracy_level=0)
start = time.perf_counter()
_, summary = onnxq.quantize_with_summary(path, out, method="decoupleq", bits=2, group_size=64,
                                         calibration=calibration, workers=workers, progress=False, **options)
print(json.dumps(dict(wall=time.perf_counter() - start, calibration=summary.calibration_seconds,
                      solving=summary.solve_seconds)))
"""


def run_one(model: str, workers: int, folder: Path) -> dict:
    out = folder / f"{model}_w{workers}.onnx"
    code = RUN.format(root=str(Path(__file__).resolve().parents[1]), model=model, out=str(out), workers=workers)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"workers={workers} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    digest = hashlib.sha256(out.read_bytes())
    data = out.with_name(out.name + ".data")
    if data.exists():
        digest.update(data.read_bytes())
    result["sha256"] = digest.hexdigest()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, default_workers()])
    args = parser.parse_args(argv)
    print(f"decoupleQ W2 g64 on {args.model}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| workers | wall s | calibration s | solving s | speed-up | sha256 |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-workers-") as folder:
        for workers in args.workers:
            rows.append(run_one(args.model, workers, Path(folder)))
            r = rows[-1]
            print(f"| {workers} | {r['wall']:.1f} | {r['calibration']:.1f} | {r['solving']:.1f} | "
                  f"{rows[0]['wall'] / r['wall']:.2f}x | {r['sha256'][:16]}… |", flush=True)
    if len({r["sha256"] for r in rows}) != 1:
        print("FAIL: the outputs differ between worker counts")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
