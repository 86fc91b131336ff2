"""Language-model metrics for SmolLM2 ONNX files: perplexity and top-1 agreement with fp32, plus calibration data.

Evaluation text: *Persuasion* (held out; never used for calibration), exactly as the R package has it (hard-wrapped
lines joined by ``\\n``), tokenized without BOS, cut into non-overlapping windows of ``WINDOW`` tokens; ``N_WINDOWS``
of them, evenly spaced over the book, are scored independently (no context crosses a window boundary):

* perplexity ``PPL = exp(−(1/T)·Σ log p(x_{t+1} | x_{≤t}))`` over the ``T = N_WINDOWS·(WINDOW − 1)`` next-token
  predictions inside the windows;
* top-1 agreement ``(1/T)·Σ [argmax logits_model = argmax logits_fp32]`` at the same positions.

The fp32 reference's argmax (and its perplexity) is cached under ``<cache>/smollm2/reference/``, keyed by the sha256 of
the reference model (``.onnx`` and external data) and of the window tokens, so each quantized model costs one pass.

Calibration (:func:`make_smollm2_calibration`): random ``seq_len``-token windows of the other five novels.

CLI::

    python tools/lm_metrics.py MODEL.onnx [--reference FP32.onnx] [--windows N]
    python tools/lm_metrics.py --make-calibration calib.npz [--samples 128] [--seq-len 512] [--seed 0]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.austen import NOVELS, novel_text  # noqa: E402
from models.cache import cache_dir, write_npz  # noqa: E402
from onnxq.errors import OnnxqError  # noqa: E402
from onnxq.perplexity import next_token_scores, perplexity  # noqa: E402
from onnxq.progress import Progress  # noqa: E402

EVAL_NOVEL = "persuasion"
CALIBRATION_NOVELS = tuple(name for name in NOVELS if name != EVAL_NOVEL)
WINDOW = 512
N_WINDOWS = 32
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class LMEvaluation:
    """Result of :func:`evaluate_lm` (``top1_agreement`` is ``None`` without a reference)."""

    perplexity: float
    top1_agreement: float | None
    n_windows: int
    n_tokens: int  # scored next-token predictions
    seconds: float  # wall time of the model-under-test pass (excludes the cached reference)


# ----------------------------------------------------------------------------- text and tokens


@functools.lru_cache(maxsize=len(NOVELS))
def novel_token_ids(name: str) -> np.ndarray:
    """The novel ``name`` (its lines joined by ``\\n``, as distributed) as SmolLM2 token ids (int64, no BOS)."""
    from models.smollm2 import load_tokenizer

    ids = np.asarray(load_tokenizer().encode(novel_text(name)).ids, dtype=np.int64)
    ids.flags.writeable = False  # cached and shared between callers
    return ids


def evaluation_windows(n_windows: int = N_WINDOWS, window: int = WINDOW, novel: str = EVAL_NOVEL) -> np.ndarray:
    """``[n_windows, window]`` int64: non-overlapping windows ``i·window`` for ``n_windows`` evenly spaced ``i``."""
    ids = novel_token_ids(novel)
    available = len(ids) // window
    if not 1 <= n_windows <= available:
        raise OnnxqError(
            f"--windows {n_windows}: {novel} has {available} windows of {window} tokens; pick 1..{available}"
        )
    starts = np.linspace(0, available - 1, n_windows).round().astype(np.int64) * window
    return np.stack([ids[start : start + window] for start in starts])


def make_smollm2_calibration(
    n_samples: int, seq_len: int, seed: int, novels: Sequence[str] = CALIBRATION_NOVELS
) -> dict[str, np.ndarray]:
    """``{"input_ids": int64 [n_samples, seq_len]}``: windows drawn uniformly (with replacement) over every start
    position of the calibration novels (a window never crosses a book boundary). Never uses ``EVAL_NOVEL``."""
    if EVAL_NOVEL in novels:
        raise OnnxqError(f"calibration novels include the evaluation novel {EVAL_NOVEL!r}; choose others")
    if n_samples < 1 or seq_len < 2:
        raise OnnxqError(f"calibration needs n_samples ≥ 1 and seq_len ≥ 2, got {n_samples} and {seq_len}")
    books = [novel_token_ids(name) for name in novels]
    starts_per_book = np.array([max(len(book) - seq_len + 1, 0) for book in books])
    if starts_per_book.sum() == 0:
        raise OnnxqError(f"seq_len {seq_len} is longer than every calibration novel; use a shorter one")
    picks = np.random.default_rng(seed).integers(0, starts_per_book.sum(), size=n_samples)
    bounds = np.cumsum(starts_per_book)
    rows = []
    for pick in picks:
        book = int(np.searchsorted(bounds, pick, side="right"))
        start = int(pick - (bounds[book] - starts_per_book[book]))
        rows.append(books[book][start : start + seq_len])
    return {INPUT_NAME: np.stack(rows).astype(np.int64)}


# ----------------------------------------------------------------------------- model runs


def onnx_model_sha256(path: str | Path) -> str:
    """sha256 over the ``.onnx`` bytes and every external-data file it references (sorted by name)."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes())
    model = onnx.load(str(path), load_external_data=False)
    locations = sorted(
        {
            entry.value
            for tensor in onnx.external_data_helper._get_all_tensors(model)
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )
    for location in locations:
        digest.update(location.encode())
        with open(path.parent / location, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def make_session(path: str | Path, threads: int | None = None, custom_op_libraries: Sequence[str] = ()) -> Any:
    """A CPU ``onnxruntime.InferenceSession`` for ``path`` (optionally registering custom-op libraries)."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise OnnxqError(f"{path}: no such ONNX file; build it first (python -m models.smollm2)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    for library in custom_op_libraries:
        options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if names != [INPUT_NAME]:
        raise OnnxqError(f"{path}: inputs are {names}, expected ['{INPUT_NAME}'] (a models.smollm2 export)")
    return session


def score_windows(session: Any, windows: np.ndarray, label: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """Run each window; return (negative log-likelihoods float64, argmax int32), both ``[n, window − 1]``.

    ``nll[i, t] = logsumexp(z[i, t]) − z[i, t, x[i, t+1]]`` and ``argmax[i, t] = argmax z[i, t]`` for the logits
    ``z`` of window ``i`` at position ``t`` (the prediction of token ``t + 1``), by
    :func:`onnxq.perplexity.next_token_scores`.
    """
    n, length = windows.shape
    nll = np.empty((n, length - 1), dtype=np.float64)
    argmax = np.empty((n, length - 1), dtype=np.int32)
    with Progress(n, label) as bar:
        for i in range(n):
            (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: windows[i : i + 1]})
            nll[i], argmax[i] = next_token_scores(logits[0], windows[i])
            bar.step(f"window {i + 1}")
    if not np.all(np.isfinite(nll)):
        raise OnnxqError("the model produced non-finite logits on the evaluation text; the model is broken")
    return nll, argmax


def reference_scores(
    reference: str | Path, windows: np.ndarray, threads: int | None = None, reference_sha256: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(nll, argmax) of the fp32 reference on ``windows``, cached by reference hash and window-token hash."""
    model_hash = reference_sha256 or onnx_model_sha256(reference)
    tokens_hash = hashlib.sha256(np.ascontiguousarray(windows).tobytes()).hexdigest()
    cache_file = cache_dir("smollm2", "reference") / f"{model_hash[:16]}-{tokens_hash[:16]}.npz"
    if cache_file.exists():
        with np.load(cache_file) as cached:
            return cached["nll"], cached["argmax"]
    nll, argmax = score_windows(make_session(reference, threads), windows, label="fp32 reference")
    write_npz(cache_file, {"nll": nll, "argmax": argmax})
    return nll, argmax


def evaluate_lm(
    model: str | Path,
    reference: str | Path | None = None,
    n_windows: int = N_WINDOWS,
    threads: int | None = None,
    custom_op_libraries: Sequence[str] = (),
    windows: np.ndarray | None = None,
) -> LMEvaluation:
    """Perplexity of ``model`` on the held-out windows and its top-1 agreement with ``reference``.

    ``reference`` defaults to the fp32 SmolLM2 export when it exists (pass ``""`` to skip the agreement). When
    ``model`` is the reference itself (same hash), the cached reference scores are reused.
    """
    from models.smollm2 import model_path as fp32_path

    if reference is None:
        reference = fp32_path() if fp32_path().exists() else ""
    for path in (model, reference):
        if path and not Path(path).is_file():
            raise OnnxqError(f"{path}: no such ONNX file; check the path (fp32: python -m models.smollm2)")
    if windows is None:
        windows = evaluation_windows(n_windows)
    reference_hash = onnx_model_sha256(reference) if reference else None
    start = time.perf_counter()
    if reference_hash is not None and onnx_model_sha256(model) == reference_hash:
        nll, argmax = reference_scores(reference, windows, threads, reference_hash)
        agreement: float | None = 1.0
    else:
        session = make_session(model, threads, custom_op_libraries)
        nll, argmax = score_windows(session, windows, label=Path(model).name)
        agreement = None
        if reference_hash is not None:
            _, reference_argmax = reference_scores(reference, windows, threads, reference_hash)
            agreement = float(np.mean(argmax == reference_argmax))
    seconds = time.perf_counter() - start
    return LMEvaluation(
        perplexity=perplexity(nll),
        top1_agreement=agreement,
        n_windows=int(windows.shape[0]),
        n_tokens=int(nll.size),
        seconds=seconds,
    )


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/lm_metrics.py",
        description=f"SmolLM2 perplexity and top-1 agreement with fp32 on {N_WINDOWS} windows of {WINDOW} tokens "
        f"of {NOVELS[EVAL_NOVEL]}; or build calibration input_ids from the other novels.",
        epilog="Examples: python tools/lm_metrics.py q4.onnx   |   "
        "python tools/lm_metrics.py --make-calibration calib.npz --samples 128 --seq-len 512",
    )
    parser.add_argument("model", nargs="?", help="ONNX model to evaluate (input_ids → logits)")
    parser.add_argument("--reference", help="fp32 reference ONNX (default: <cache>/smollm2/model.onnx)")
    parser.add_argument("--windows", type=int, default=N_WINDOWS, help=f"number of windows (default {N_WINDOWS})")
    parser.add_argument("--threads", type=int, help="ORT intra-op threads (default: all cores)")
    parser.add_argument("--custom-op-library", action="append", default=[], help="shared library to register")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--make-calibration", metavar="OUT.npz", help="write calibration input_ids and exit")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    parser.add_argument("--seq-len", type=int, default=WINDOW, help=f"calibration window length (default {WINDOW})")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    args = parser.parse_args(argv)
    try:
        if args.make_calibration:
            arrays = make_smollm2_calibration(args.samples, args.seq_len, args.seed)
            write_npz(args.make_calibration, arrays)
            shape = arrays[INPUT_NAME].shape
            out(f"wrote {args.make_calibration}: input_ids {shape} from {', '.join(CALIBRATION_NOVELS)}")
            return 0
        if not args.model:
            parser.error("give MODEL.onnx to evaluate, or --make-calibration OUT.npz")
        result = evaluate_lm(args.model, args.reference, args.windows, args.threads, args.custom_op_library)
    except OnnxqError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        out(json.dumps(asdict(result)))
    else:
        agreement = "n/a" if result.top1_agreement is None else f"{result.top1_agreement:.4f}"
        out(
            f"{args.model}: perplexity {result.perplexity:.3f}  top-1 agreement {agreement}  "
            f"({result.n_windows} windows, {result.n_tokens} tokens, {result.seconds:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
