"""SmolLM2 genai fp32 export and its quantized variants side by side: size, perplexity, greedy tokens, speed.

One run measures every variant of :data:`VARIANTS` (built once into ``<cache>/bench/<name>/``, reused by later
runs; ``--rebuild [NAME ...]`` forces a rebuild):

* ``fp32``: ``<cache>/zoo/smollm2-genai-fp32`` (onnxruntime-genai builder ``-p fp32 -e cpu``);
* ``genai-int4`` / ``genai-int4-kquant``: the same builder ``-p int4 -e cpu`` with its defaults (RTN through ORT's
  MatMulNBitsQuantizer, symmetric, block 32, accuracy level 4, the tied embedding shared as GatherBlockQuantized)
  and with ``--extra_options algo_config=k_quant``, from a Hugging Face folder saved from the GGUF as
  :mod:`models.zoo_exports` does;
* ``onnxq-*``: ``python -m onnxq quantize FP32_DIR -o OUT_DIR ...`` (a genai folder in and out; lm_head stays float,
  the default), decoupleQ calibrated with ``--calib-text`` on *Emma* (never the evaluation novel);
* ``*-acc0``, ``*-acc4``, ``*-onnxq``: ``onnxq.convert`` of a decoupleQ output into another format (the stored codes,
  scales and zeros re-emitted, no new solve), written as a genai folder (the ``onnxq`` format gets the custom-op
  library copied in and named in ``genai_config.json``).

Columns (one row per variant):

* ``MB``: bytes of the decoder file and its external data / 1e6; ``bits/param``: 8·bytes over the fp32 model's
  parameter count (everything in the file: embedding, norms, graph); ``q-layer bits``: ``onnxq inspect``'s bits per
  weight over the quantized layers (every tensor they use), ``-`` for fp32;
* ``ppl``/``top-1``: perplexity on ``--windows`` windows of 512 tokens of *Persuasion* (``tools/lm_metrics``:
  the harness's windows and formula; each window one prefill with an empty past) and top-1 agreement with fp32's
  argmax at the same positions;
* ``og =fp32``: of the 64 greedy tokens onnxruntime-genai generates after a 128-token prompt (the first 128 tokens
  of *Persuasion*, as ids), how many equal fp32's at the same position; ``prefix``: how many leading tokens do
  (after the first difference the texts drift apart, so position matches mean little); ``ORT =og``: how many of the
  plain-ORT KV-cache loop's tokens (:mod:`tools.kv_generate`) equal onnxruntime-genai's for the same folder (the
  loop cross-checked);
* ``prefill ms``: ``append_tokens`` of the prompt; ``decode ms/tok``: median over ``--repeat`` runs of each run's
  median ``generate_next_token`` time; ``decode ×fp32``: fp32's decode ms over the variant's, from the same run.
  og runs in a subprocess (:mod:`tools.genai_generate`, onnxruntime-genai from ``--genai-path`` over this
  environment's onnxruntime), all models loaded, one warm-up each, then the repeats round-robin.

Perplexity, top-1 and plain-ORT tokens are cached per model hash under ``<cache>/bench/scores/``; timings are
measured anew on every run. Also: the optimum with-past export (fp32 and onnxq RTN W4 g64) through the same
plain-ORT loop, against the genai fp32 export's tokens.

    python -m tools.bench_generate                       # build what is missing, measure, print the tables
    python -m tools.bench_generate --only fp32 onnxq-dq-w2-g64 --repeat 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from models.austen import novel_path  # noqa: E402
from models.cache import cache_dir, onnx_file_sha256, write_npz  # noqa: E402
from onnxq.errors import OnnxqError  # noqa: E402
from onnxq.ir.genai_folder import decoder_files  # noqa: E402
from onnxq.perplexity import perplexity  # noqa: E402
from tools.kv_generate import PrefillSession, agreement, common_prefix, greedy_generate  # noqa: E402
from tools.lm_metrics import EVAL_NOVEL, N_WINDOWS, evaluation_windows, novel_token_ids, score_windows  # noqa: E402

CALIBRATION_NOVEL = "emma"
PROMPT_TOKENS = 128
NEW_TOKENS = 64
BUILDER = "onnxruntime_genai.models.builder"


@dataclass(frozen=True)
class Variant:
    """How one model folder is made: ``kind`` is ``zoo`` (used as is), ``builder`` (genai builder ``-p int4`` plus
    ``args``), ``quantize`` (``onnxq quantize`` with ``args``) or ``convert`` (``source`` re-emitted in ``format`` at
    ``accuracy_level``)."""

    name: str
    label: str
    kind: str
    args: tuple[str, ...] = ()
    source: str = ""
    format: str = ""
    accuracy_level: int | None = None


def decoupleq_args(bits: int, samples: int) -> tuple[str, ...]:
    """``onnxq quantize`` arguments of a decoupleQ g64 variant calibrated on ``samples`` × 512 tokens of *Emma*."""
    return ("--method", "decoupleq", "--bits", str(bits), "--group-size", "64", "--calib-text",
            str(novel_path(CALIBRATION_NOVEL)), "--calib-samples", str(samples), "--calib-seq-len", "512")


def decoupleq_variants(bits: int, samples: int, default_level: int, other_level: int) -> tuple[Variant, ...]:
    """decoupleQ W``bits`` g64 in the default format (MatMulNBits at ``default_level``) and its conversions (no new
    solve) to MatMulNBits at ``other_level`` and to the onnxq format."""
    name = f"onnxq-dq-w{bits}-g64"
    return (
        Variant(name, f"onnxq decoupleQ W{bits} g64 (default: MatMulNBits, acc {default_level})", "quantize",
                decoupleq_args(bits, samples)),
        Variant(f"{name}-acc{other_level}", f"… converted: MatMulNBits acc {other_level}", "convert", source=name,
                format="matmulnbits", accuracy_level=other_level),
        Variant(f"{name}-onnxq", "… converted: onnxq format", "convert", source=name, format="onnxq"),
    )


VARIANTS = (
    Variant("fp32", "fp32 (genai builder -p fp32)", "zoo"),
    Variant("genai-int4", "genai int4: builder -p int4 (RTN, sym, block 32, acc 4)", "builder"),
    Variant("genai-int4-kquant", "genai int4: builder -p int4 algo_config=k_quant", "builder",
            ("--extra_options", "algo_config=k_quant")),
    Variant("onnxq-rtn-w4-g64", "onnxq RTN W4 g64 (MatMulNBits, acc 0)", "quantize",
            ("--method", "rtn", "--bits", "4", "--group-size", "64")),
    Variant("onnxq-rtn-w4-g64-emb", "onnxq RTN W4 g64, embedding and lm_head (one GatherBlockQuantized/MatMulNBits "
            "table)", "quantize", ("--method", "rtn", "--bits", "4", "--group-size", "64", "--op-types",
                                   "MatMul,Gather", "--quantize-lm-head")),
    *decoupleq_variants(4, 32, default_level=0, other_level=4),  # 32 samples: the 2-core budget (docs/llm.md)
    *decoupleq_variants(2, 64, default_level=4, other_level=0),
)
BY_NAME = {variant.name: variant for variant in VARIANTS}


def bench_dir(*parts: str) -> Path:
    """``<cache>/bench/...``."""
    return cache_dir("bench", *parts)


def fp32_dir() -> Path:
    """The genai fp32 folder of the zoo (``python -m models.zoo`` builds it)."""
    from models.zoo_exports import is_built, zoo_model_dir

    if not is_built("smollm2-genai-fp32"):
        raise OnnxqError("smollm2-genai-fp32 is not built: python -m models.zoo")
    return zoo_model_dir("smollm2-genai-fp32")


# ----------------------------------------------------------------------------- building the variants


def variant_dir(variant: Variant) -> Path:
    """Where the variant's genai folder lives (the zoo folder for fp32)."""
    return fp32_dir() if variant.kind == "zoo" else bench_dir() / variant.name


def recipe(variant: Variant) -> list[str]:
    """What the variant's stamp must record for a cached folder to be reused (convert: the source's stamp too)."""
    if variant.kind == "convert":
        source = read_stamp(bench_dir() / variant.source) or {}
        return ["convert", variant.format, str(variant.accuracy_level), json.dumps(source.get("args"))]
    return list(variant.args)


def read_stamp(folder: Path) -> dict[str, Any] | None:
    """``bench.json`` of a built folder (``args``, ``seconds``), or ``None``."""
    stamp = folder / "bench.json"
    return json.loads(stamp.read_text()) if stamp.is_file() and (folder / "genai_config.json").is_file() else None


def write_stamp(folder: Path, args: list[str], seconds: float) -> None:
    """Record how ``folder`` was built and how long it took."""
    (folder / "bench.json").write_text(json.dumps({"args": args, "seconds": round(seconds, 1)}, indent=1) + "\n")


def build(variant: Variant, rebuild: bool, log: Callable[[str], None]) -> Path:
    """The variant's folder: reused when its stamp matches :func:`recipe`, else built (minutes for decoupleQ)."""
    folder = variant_dir(variant)
    if variant.kind == "zoo":
        return folder
    stamp = read_stamp(folder)
    if stamp and stamp.get("args") == recipe(variant) and not rebuild:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    log(f"building {variant.name} ({variant.label}) ...")
    start = time.perf_counter()
    {"builder": build_with_builder, "quantize": build_with_onnxq, "convert": build_by_convert}[variant.kind](
        variant, folder)
    write_stamp(folder, recipe(variant), time.perf_counter() - start)
    log(f"built {variant.name} in {time.perf_counter() - start:.0f} s")
    return folder


def is_slow_to_build(variant: Variant, rebuild: set[str]) -> bool:
    """Whether building the variant needs a solve or the builder (a conversion of a built source is seconds)."""
    if variant.kind == "zoo":
        return False
    if variant.kind == "convert":
        return is_slow_to_build(BY_NAME[variant.source], rebuild)
    return variant.name in rebuild or read_stamp(variant_dir(variant)) is None


def build_with_onnxq(variant: Variant, folder: Path) -> None:
    """``python -m onnxq quantize FP32_DIR -o folder ARGS`` from the repository root (its log beside the folder)."""
    log_file = bench_dir("logs") / f"{variant.name}.log"
    command = [sys.executable, "-m", "onnxq", "quantize", str(fp32_dir()), "-o", str(folder), *variant.args]
    with open(log_file, "w") as handle:
        result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise OnnxqError(f"{variant.name}: onnxq quantize failed; see {log_file}")


def build_by_convert(variant: Variant, folder: Path) -> None:
    """``onnxq.convert`` the source variant's decoder into ``variant.format`` and write it as a genai folder."""
    from onnxq import api, custom_ops
    from onnxq.ir.genai_folder import write_folder

    source = bench_dir() / variant.source
    if read_stamp(source) is None:
        raise OnnxqError(f"{variant.name}: its source {variant.source} is not built")
    model = api.convert(source / "model.onnx", None, format=variant.format, accuracy_level=variant.accuracy_level)
    library = custom_ops.library_path("cpu") if variant.format == "onnxq" else None
    write_folder(source, folder, model, custom_ops_library=library)
    (folder / "bench.json").unlink(missing_ok=True)  # copied from the source; rewritten by build()


def hf_folder(log: Callable[[str], None]) -> Path:
    """SmolLM2 as a Hugging Face folder (from the GGUF, as :mod:`models.zoo_exports` saves it), for the builder."""
    folder = bench_dir(".hf-smollm2")
    if not (folder / "config.json").is_file():
        from models.smollm2 import load_torch_model
        from models.zoo_exports import save_smollm2_folder

        log("saving the SmolLM2 Hugging Face folder for the genai builder ...")
        save_smollm2_folder(load_torch_model(), folder)
    return folder


def build_with_builder(variant: Variant, folder: Path) -> None:
    """onnxruntime-genai's builder ``-p int4 -e cpu`` (plus the variant's extra options) into ``folder``."""
    from models.zoo_fetch import run_tool

    work = bench_dir(".work")
    out = work / variant.name
    shutil.rmtree(out, ignore_errors=True)
    arguments = ["-i", str(hf_folder(print)), "-o", str(out), "-p", "int4", "-e", "cpu", "-c",
                 str(work / "genai-cache"), *variant.args]
    run_tool("genai", BUILDER, arguments, bench_dir("logs") / f"{variant.name}.log")
    out.rename(folder)


# ----------------------------------------------------------------------------- measurements


@dataclass
class Row:
    """One variant's measurements (``None``: not measured)."""

    name: str
    label: str
    megabytes: float = 0.0
    bits_per_param: float = 0.0
    layer_bits: float | None = None
    perplexity: float | None = None
    top1: float | None = None
    og_agree: int | None = None
    og_prefix: int | None = None
    ort_equals_og: int | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    decode_speedup: float | None = None
    ort_tokens: list[int] = field(default_factory=list)
    og_tokens: list[int] = field(default_factory=list)
    build_seconds: float | None = None


def parameter_count(model_path: Path) -> int:
    """Elements of every float initializer of a float model (read from the dims; data stays on disk)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats)


def quantized_layer_bits(folder: Path) -> float | None:
    """``onnxq inspect``'s bits per weight over the quantized layers, ``None`` when there are none."""
    from onnxq import api

    rows = [row for row in api.inspect(folder / "model.onnx").rows if row.state == "quantized"]
    params = sum(row.params for row in rows)
    return 8 * sum(row.bytes for row in rows) / params if params else None


def open_session(model_path: Path) -> Any:
    """A CPU session for a decoder, with the onnxq custom-op library registered when the model uses it."""
    import onnx
    import onnxruntime as ort

    from onnxq import custom_ops

    options = ort.SessionOptions()
    model = onnx.load(str(model_path), load_external_data=False)
    if any(node.domain == "onnxq" for node in model.graph.node):
        options.register_custom_ops_library(custom_ops.library_path("cpu"))
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def plain_scores(model_path: Path, windows: np.ndarray, prompt: Sequence[int], tokens: int) -> dict[str, Any]:
    """nll, argmax on the windows and the plain-ORT greedy tokens of one decoder, cached by model and input hash."""
    key = hashlib.sha256(np.ascontiguousarray(windows).tobytes() + np.asarray(prompt, np.int64).tobytes()
                         + str(tokens).encode()).hexdigest()[:16]
    cache_file = bench_dir("scores") / f"{onnx_file_sha256(model_path)[:16]}-{key}.npz"
    if cache_file.is_file():
        with np.load(cache_file) as cached:
            return {name: cached[name] for name in cached.files}
    session = open_session(model_path)
    nll, argmax = score_windows(PrefillSession(session), windows, label=model_path.parent.name)
    generated = greedy_generate(session, prompt, tokens, eos_id=2)
    scores = {"nll": nll, "argmax": argmax, "tokens": np.asarray(generated.tokens, dtype=np.int64)}
    write_npz(cache_file, scores)
    return scores


def og_runs(folders: list[Path], prompt: Sequence[int], tokens: int, repeat: int, genai_path: Path | None
            ) -> dict[str, list[dict[str, Any]]]:
    """onnxruntime-genai's greedy runs per folder (``tools/genai_generate.py`` in a subprocess, round-robin)."""
    path = ["--genai-path", str(genai_path)] if genai_path else []
    command = [sys.executable, str(ROOT / "tools" / "genai_generate.py"), *path, "--tokens", str(tokens),
               "--repeat", str(repeat), "--warmup", "1", "--prompt-ids", ",".join(map(str, prompt)),
               *map(str, folders)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise OnnxqError(f"onnxruntime-genai failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout)["models"]


def default_genai_path() -> Path | None:
    """``None`` when onnxruntime_genai imports here, else the zoo's ``--target`` folder."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") is not None:
        return None
    return cache_dir("zoo", "tools", create=False) / "genai"


def measure(variants: list[Variant], folders: dict[str, Path], windows: np.ndarray, repeat: int,
            genai_path: Path | None, log: Callable[[str], None]) -> list[Row]:
    """Every column of the table for ``variants`` (fp32 first: the reference of top-1, agreement and speed)."""
    prompt = novel_token_ids(EVAL_NOVEL)[:PROMPT_TOKENS].tolist()
    params = parameter_count(folders["fp32"] / "model.onnx")
    rows, scores = [], {}
    for variant in variants:
        folder = folders[variant.name]
        log(f"scoring {variant.name} (perplexity, plain-ORT greedy) ...")
        scores[variant.name] = plain_scores(folder / "model.onnx", windows, prompt, NEW_TOKENS)
        size = sum(path.stat().st_size for path in decoder_files(folder))
        stamp = read_stamp(folder)
        rows.append(Row(variant.name, variant.label, size / 1e6, 8 * size / params,
                        None if variant.kind == "zoo" else quantized_layer_bits(folder),
                        perplexity(scores[variant.name]["nll"]),
                        float(np.mean(scores[variant.name]["argmax"] == scores["fp32"]["argmax"])),
                        ort_tokens=scores[variant.name]["tokens"].tolist(),
                        build_seconds=stamp.get("seconds") if stamp else None))
    log(f"onnxruntime-genai: {len(variants)} models, 1 warm-up + {repeat} runs each, round-robin ...")
    runs = og_runs([folders[v.name] for v in variants], prompt, NEW_TOKENS, repeat, genai_path)
    for row, variant in zip(rows, variants, strict=True):
        folder_runs = runs[str(folders[variant.name])]
        row.og_tokens = folder_runs[0]["tokens"]
        row.prefill_ms = statistics.median(run["prefill_ms"] for run in folder_runs)
        row.decode_ms = statistics.median(statistics.median(run["decode_ms"]) for run in folder_runs)
    for row in rows:
        row.og_agree = agreement(row.og_tokens, rows[0].og_tokens)
        row.og_prefix = common_prefix(row.og_tokens, rows[0].og_tokens)
        row.ort_equals_og = agreement(row.ort_tokens, row.og_tokens)
        row.decode_speedup = rows[0].decode_ms / row.decode_ms
    return rows


def optimum_check(genai_fp32_tokens: list[int], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The optimum with-past export (fp32, and onnxq RTN W4 g64 of it, cached) through the plain-ORT loop: tokens
    equal to the genai fp32 export's, and to the optimum fp32's."""
    from models.zoo_exports import is_built, zoo_model_dir
    from onnxq import api

    if not is_built("smollm2-optimum"):
        log("smollm2-optimum is not built (python -m models.zoo): optimum check skipped")
        return []
    fp32 = zoo_model_dir("smollm2-optimum") / "model.onnx"
    w4 = bench_dir("optimum-rtn-w4-g64") / "model.onnx"
    if not w4.is_file():
        api.quantize(fp32, w4, method="rtn", bits=4, group_size=64, progress=False)
    prompt = novel_token_ids(EVAL_NOVEL)[:PROMPT_TOKENS].tolist()
    results = []
    for label, path in (("optimum fp32", fp32), ("optimum onnxq RTN W4 g64", w4)):
        tokens = greedy_generate(open_session(path), prompt, NEW_TOKENS, eos_id=2).tokens
        results.append({"model": label, "tokens": tokens, "equal_genai_fp32": agreement(tokens, genai_fp32_tokens)})
    for result in results:
        result["equal_optimum_fp32"] = agreement(result["tokens"], results[0]["tokens"])
    return results


# ----------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted, ``-`` for ``None``."""
    return "-" if value is None else format(value, spec)


def table(rows: list[Row], tokens: int) -> str:
    """The markdown table of :func:`measure`'s rows."""
    lines = ["| variant | MB | bits/param | q-layer bits | ppl | top-1 | og =fp32 | prefix | ORT =og | prefill ms | "
             "decode ms/tok | decode ×fp32 |", "|---|" + "---:|" * 11]
    for r in rows:
        lines.append(f"| {r.name}: {r.label} | {r.megabytes:.1f} | {r.bits_per_param:.2f} | {fmt(r.layer_bits, '.2f')}"
                     f" | {fmt(r.perplexity, '.2f')} | {fmt(r.top1, '.3f')} | {r.og_agree}/{tokens} | {r.og_prefix} | "
                     f"{r.ort_equals_og}/{len(r.og_tokens)} | {fmt(r.prefill_ms, '.0f')} | {fmt(r.decode_ms, '.1f')}"
                     f" | {fmt(r.decode_speedup, '.2f')} |")
    return "\n".join(lines)


def load_note() -> str:
    """The 1-minute load average and the core count, for the record."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), help="measure these variants (fp32 always)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="measure only the variants already built (conversions of built ones included)")
    parser.add_argument("--rebuild", nargs="*", choices=list(BY_NAME), help="rebuild these (no name: all)")
    parser.add_argument("--windows", type=int, default=N_WINDOWS, help=f"perplexity windows (default {N_WINDOWS})")
    parser.add_argument("--repeat", type=int, default=3, help="timed og runs per model (default 3)")
    parser.add_argument("--genai-path", type=Path, help="folder holding onnxruntime_genai (default: the zoo's)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--build-only", action="store_true", help="build the missing variants, measure nothing")
    parser.add_argument("--no-optimum", action="store_true", help="skip the optimum with-past check")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    names = ["fp32", *(n for n in (args.only or BY_NAME) if n != "fp32")]
    rebuild = set(BY_NAME) if args.rebuild == [] else set(args.rebuild or ())
    try:
        folders = {}
        for name in names:
            variant = BY_NAME[name]
            if args.skip_missing and is_slow_to_build(variant, rebuild):
                log(f"{name}: not built, skipped (--skip-missing)")
                continue
            folders[name] = build(variant, name in rebuild, log)
        if args.build_only:
            return 0
        variants = [BY_NAME[name] for name in folders]
        load_before = load_note()
        rows = measure(variants, folders, evaluation_windows(args.windows), args.repeat,
                       args.genai_path or default_genai_path(), log)
        optimum = [] if args.no_optimum else optimum_check(rows[0].ort_tokens, log)
        load_after = load_note()
    except OnnxqError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"SmolLM2-135M genai export, {len(rows)} variants; perplexity on {args.windows} × 512 tokens of "
          f"{EVAL_NOVEL}; {NEW_TOKENS} greedy tokens after {PROMPT_TOKENS} prompt tokens; og {args.repeat} runs "
          f"each round-robin; {load_before} at the start, {load_after} at the end\n")
    print(table(rows, NEW_TOKENS))
    if optimum:
        print(f"\nplain-ORT KV-cache loop on the optimum with-past export ({NEW_TOKENS} tokens):\n")
        print("| model | = genai fp32 (plain ORT) | = optimum fp32 |\n|---|---:|---:|")
        for result in optimum:
            print(f"| {result['model']} | {result['equal_genai_fp32']}/{NEW_TOKENS} | "
                  f"{result['equal_optimum_fp32']}/{NEW_TOKENS} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "optimum": optimum,
                                         "load": [load_before, load_after]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
