"""Golden hashes: sha256 of the serialized output of fixed quantization jobs, to prove a refactoring byte-identical.

    python -m tools.golden --write          # record the hashes of this machine kind in tests/golden_hashes.json
    python -m tools.golden                  # recompute and compare (exit 1 on a difference)
    python -m tools.golden --only digits    # only the jobs whose name starts with "digits"

Jobs: the built-in digits MLP and CNN at W2/W4/W8 (RTN, default group size) in every format; MiniLM W4 g64 RTN,
W2 g64 decoupleQ (sequential, float targets, 32 calibration windows of 128 tokens) and ``onnxq split``.

Floating-point reductions in BLAS differ between CPU kinds (AVX2 vs AVX-512 kernels), and jobs that multiply
matrices (decoupleQ, k-means) follow them, so hashes are recorded per machine kind (``avx512`` / ``avx2``); a job
with no hash recorded for this kind is reported as "unrecorded", not as a failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import onnx

HASHES_PATH = Path(__file__).resolve().parent.parent / "tests" / "golden_hashes.json"
FORMATS = ("matmulnbits", "qdq", "fake", "onnxq")


def machine_kind() -> str:
    """``avx512`` when the CPU has AVX-512F, else ``avx2`` (what changes BLAS rounding here)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return "avx512" if " avx512f" in flags else "avx2"


def model_sha256(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def _digits_jobs() -> dict[str, Callable[[], onnx.ModelProto]]:
    import onnxq
    from onnxq.demo import data_path

    jobs = {}
    for name in ("mlp", "cnn"):
        for bits in (2, 4, 8):
            for fmt in FORMATS:
                path = data_path(f"digits_{name}.onnx")
                jobs[f"digits_{name}_w{bits}_{fmt}"] = (
                    lambda path=path, bits=bits, fmt=fmt: onnxq.quantize(path, bits=bits, format=fmt))
    return jobs


def _minilm_jobs() -> dict[str, Callable[[], onnx.ModelProto]]:
    import onnxq
    from models import minilm
    from tools import evaluation

    def decoupleq() -> onnx.ModelProto:
        calibration = evaluation.make_minilm_calibration(n_samples=32, seq_len=128)
        return onnxq.quantize(minilm.build_minilm(), method="decoupleq", bits=2, group_size=64,
                              calibration=calibration)

    return {
        "minilm_w4_g64_rtn": lambda: onnxq.quantize(minilm.build_minilm(), bits=4, group_size=64),
        "minilm_w2_g64_decoupleq": decoupleq,
        "minilm_split": lambda: onnxq.split(minilm.build_minilm()),
    }


def jobs(only: str | None = None) -> dict[str, Callable[[], onnx.ModelProto]]:
    found = {**_digits_jobs(), **_minilm_jobs()}
    return {name: job for name, job in found.items() if only is None or name.startswith(only)}


def compute(only: str | None = None, log: Callable[[str], None] = print) -> dict[str, str]:
    hashes = {}
    for name, job in jobs(only).items():
        hashes[name] = model_sha256(job())
        log(f"{name}: {hashes[name]}")
    return hashes


def compare(recorded: dict[str, str], computed: dict[str, str]) -> dict[str, str]:
    """``{job: "same" | "different" | "unrecorded"}``."""
    return {name: "unrecorded" if name not in recorded else ("same" if recorded[name] == value else "different")
            for name, value in computed.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record this machine kind's hashes")
    parser.add_argument("--only", help="jobs whose name starts with this")
    args = parser.parse_args(argv)
    recorded = json.loads(HASHES_PATH.read_text()) if HASHES_PATH.exists() else {}
    kind = machine_kind()
    computed = compute(args.only)
    if args.write:
        recorded.setdefault(kind, {}).update(computed)
        HASHES_PATH.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(computed)} hashes for {kind} in {HASHES_PATH}")
        return 0
    verdicts = compare(recorded.get(kind, {}), computed)
    for name, verdict in verdicts.items():
        print(f"{verdict:10} {name}")
    return 1 if "different" in verdicts.values() else 0


if __name__ == "__main__":
    sys.exit(main())
