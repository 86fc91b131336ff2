"""decoupleQ W2 on graphs someone else exported, against a numpy reference and across worker counts.

    python -m tools.foreign_check      # needs the three zoo models: python -m models.zoo --models NAME,...

For the zoo's YOLOv8n (nudenet) and PP-OCRv4 rec (qdq) and optimum's MiniLM (MatMulNBits, accuracy level 0), with
``onnxq calib --random`` data: the output with ``--workers 1`` and ``--workers 2`` must be byte-identical, and the
quantized model's output must match the same model with its weights dequantized by numpy (``onnxq convert --format
fake``) at every ORT optimization level (the printed max relative errors).  Calibration data and models go to a
temporary folder.  Exits 1 when the two worker counts give different bytes.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ort_helpers import relative_error, run  # noqa: E402

from models.cache import cache_dir  # noqa: E402


def sh(*a: str) -> None:
    r = subprocess.run([sys.executable, "-m", "onnxq", *a], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]

CASES = [("yolov8n-nudenet", "qdq", ["--size", "320", "320"]), ("ppocr-rec", "qdq", ["--size", "48", "320"]),
         ("minilm-optimum", "matmulnbits", [])]


def main() -> int:
    same = True
    with tempfile.TemporaryDirectory(prefix="onnxq-foreign-") as folder:
        for name, fmt, size in CASES:
            src = str(cache_dir("zoo", create=False) / name / "model.onnx")
            out = Path(folder) / name
            sh("calib", src, "-o", f"{out}.npz", "--random", "--samples", "16", *size)
            digests = []
            for w in ("1", "2"):
                extra = ["--accuracy-level", "0"] if fmt == "matmulnbits" else []
                sh("quantize", src, "-o", f"{out}_w{w}.onnx", "--method", "decoupleq", "--bits", "2", "--group-size",
                   "32", "--format", fmt, "--calib", f"{out}.npz", "--workers", w, "--quiet", *extra)
                digests.append(hashlib.sha256(Path(f"{out}_w{w}.onnx").read_bytes()).hexdigest())
            sh("convert", f"{out}_w2.onnx", "-o", f"{out}_fake.onnx", "--format", "fake")
            q, ref = onnx.load(f"{out}_w2.onnx"), onnx.load(f"{out}_fake.onnx")
            feeds = {k: v[:2] for k, v in np.load(f"{out}.npz").items()}
            expected = run(ref, feeds, "disable_all")
            errs = {lvl: relative_error(run(q, feeds, lvl), expected) for lvl in ("disable_all", "basic", "enable_all")}
            same &= digests[0] == digests[1]
            print(name, fmt, "workers 1 == 2:", digests[0] == digests[1], "max rel err vs numpy-dequantized:",
                  {k: f"{v:.1e}" for k, v in errs.items()}, flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
