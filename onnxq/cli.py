"""``onnxq`` command line: parse, call the API, print. No logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Sequence

import onnxq.api as api
from onnxq.config import QuantizeConfig
from onnxq.demo import run_demo
from onnxq.demo_llm import DEFAULT_FOLDER, run_llm_demo
from onnxq.errors import OnnxqError
from onnxq.heap import reuse_freed_memory
from onnxq.ir.paths import run_temp_dir
from onnxq.verify import verify_models

QUANTIZE_EXAMPLES = """examples:
  onnxq quantize model.onnx -o model.q4.onnx --bits 4 --group-size 64
  onnxq quantize model.onnx -o model.q2.onnx --method decoupleq --bits 2 --calib calib.npz
  onnxq quantize model.onnx -o model.q8.onnx --bits 8 --group-size -1 --format qdq --exclude 'lm_head'
  onnxq quantize model.onnx -o model.sim.onnx --bits 3 --format fake --clip-search
  onnxq quantize genai-fp32/ -o genai-w2/ --method decoupleq --bits 2 --calib-text book.txt   # a genai folder
"""
INSPECT_EXAMPLES = """examples:
  onnxq inspect model.onnx
  onnxq inspect model.q4.onnx      # shows quantized layers and their stored bytes
"""
SPLIT_EXAMPLES = """examples:
  onnxq split model.onnx -o model.split.onnx
  onnxq split model.onnx -o model.split.onnx --activations --calib calib.npz
"""
VERIFY_EXAMPLES = """examples:
  onnxq verify model.onnx model.q4.onnx --calib calib.npz      # on the calibration inputs
  onnxq verify model.onnx model.q4.onnx --samples 4            # on inputs generated from the input specs
  onnxq quantize model.onnx -o model.q4.onnx --verify          # the same right after quantizing
"""
CALIB_EXAMPLES = """examples:
  onnxq calib smollm2/model.onnx -o calib.npz --text book.txt                 # tokenizer.json beside the model
  onnxq calib optimum/model.onnx -o calib.npz --text book.txt --tokenizer hf/ --samples 128 --seq-len 512
  onnxq calib det.onnx -o calib.npz --images photos/ --size 640 640 --mean .485 .456 .406 --std .229 .224 .225
  onnxq calib model.onnx -o calib.npz --random --set im_shape=shape.npy   # random values: real data is better
  onnxq quantize model.onnx -o model.q4.onnx --method decoupleq --bits 4 --calib calib.npz
"""
CONVERT_EXAMPLES = """examples:
  onnxq convert model.q2.onnx -o model.q2.qdq.onnx --format qdq        # same weights, DequantizeLinear
  onnxq convert model.q4.onnx -o model.q4.nbits.onnx --format matmulnbits --accuracy-level 4
"""
DEMO_EXAMPLES = """examples:
  onnxq demo                  # built-in digits models, 2/4/8 bits, every format
  onnxq demo --model cnn --bits 2 4
  onnxq demo --llm            # ./smollm2-genai (README's export step): fp32 vs decoupleQ W2; needs onnxq[llm]
  onnxq demo --llm my-genai/  # any onnxruntime-genai model folder
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line ``onnxq: error: ...`` (exit 2) like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"onnxq: error: {message}; see '{self.prog} -h'\n")


def add_config_options(parser: argparse.ArgumentParser, config_type: type) -> None:
    """One command-line option per field of the dataclass ``config_type`` (see :mod:`onnxq.config`).

    Options default to ``argparse.SUPPRESS``: only what the user gives reaches the config, whose own defaults apply
    to the rest (so each default is written once, in the dataclass)."""
    for f in dataclasses.fields(config_type):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        shown = meta.get("shown", f.default)
        help_text = meta["help"] + ("" if shown is None or isinstance(shown, bool) else f" (default {shown})")
        common = {"dest": f.name, "default": argparse.SUPPRESS}
        if isinstance(f.default, bool) and "negative" in meta:
            pair = parser.add_mutually_exclusive_group()
            pair.add_argument(flag, action="store_true", help=help_text, **common)
            pair.add_argument(meta["negative"], action="store_false", help="the opposite (default)", **common)
        elif f.default is True:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text + " (default on)",
                                **common)
        elif f.default is False:
            parser.add_argument(flag, action="store_true", help=help_text, **common)
        else:
            kind = meta.get("parse") or _value_type(f)
            optional = {"nargs": "?", "const": meta["const"]} if "const" in meta else {}  # a flag alone means const
            parser.add_argument(flag, type=kind, choices=meta.get("choices"), metavar=meta.get("metavar"),
                                help=help_text, **optional, **common)


def _value_type(f: dataclasses.Field) -> type:
    """The argparse type of a non-bool field from its annotation (``int``, ``float``, else ``str``)."""
    name = str(f.type).removesuffix(" | None")
    return {"int": int, "float": float}.get(name, str)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxq", description="Low-bit weight quantization of ONNX models for ORT.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list quantizable layers, shapes, params, bytes",
                       epilog=INSPECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")

    p = sub.add_parser("quantize", help="quantize weights (rtn, gptq, decoupleq)",
                       epilog=QUANTIZE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--verify", action="store_true",
                   help="then run both models in ONNX Runtime (on the --calib inputs, else generated ones) and print "
                        "each output's error, as 'onnxq verify' does")
    add_config_options(p, QuantizeConfig)
    p.add_argument("--quiet", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress on stderr (default: a bar on a terminal, else a line every 15 s)")
    p.add_argument("--log", metavar="PATH", help="write a per-layer table (weight error, H-weighted loss of RTN "
                   "and of the method) as tab-separated text")

    p = sub.add_parser("split", help="SplitQuant: split layers into three k-means branches joined by Add",
                       epilog=SPLIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--activations", action="store_true", help="also split activations (needs --calib)")
    p.add_argument("--calib", dest="calibration", metavar="PATH")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("verify", help="run a float model and its quantized version in ORT, print each output's error",
                       epilog=VERIFY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Relative L2 error, cosine and max abs error of every graph output of QUANT against "
                                   "FLOAT. Without --calib the inputs are generated from FLOAT's input specs: floats "
                                   "N(0,1), masks 1, positions 0..L-1, token types 0, other integer ids in [0, 100); "
                                   "symbolic dims are 1 on axis 0, 0 in inputs named past*/cache* (empty cache), "
                                   "else 8.")
    p.add_argument("float_model", metavar="FLOAT")
    p.add_argument("quantized_model", metavar="QUANT")
    p.add_argument("--calib", dest="calibration", metavar="PATH", help="inputs: .npz or folder of .npz")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="first N calibration samples (default all), or N generated inputs (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (default 0)")

    p = sub.add_parser("calib", help="make calibration data (.npz) from a text file, photos or random values",
                       epilog=CALIB_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fill every model input: token ids from --text, an image input from --images, "
                                   "or everything from --random; masks 1, positions 0..L-1, token types 0, "
                                   "key/value caches empty (past length 0); --set gives any input by hand.")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="the .npz to write")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE", help="UTF-8 text, cut into --samples windows of --seq-len tokens")
    source.add_argument("--images", metavar="DIR", help="folder of .jpg/.png photos")
    source.add_argument("--random", action="store_true", help="values from the input specs (real data is better)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or its folder (default: beside the model)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image height and width")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean of pixel/255 (default 0)")
    p.add_argument("--std", type=float, nargs="+", help="per-channel std of pixel/255 (default 1)")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], help="image layout (default: from the channel axis)")
    p.add_argument("--samples", type=int, default=128, metavar="N", help="samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, metavar="L", help="tokens per sample (default 512)")
    p.add_argument("--seed", type=int, default=0, help="which windows/photos/values (default 0)")
    p.add_argument("--set", dest="set_inputs", action="append", default=[], metavar="NAME=file.npy",
                   help="an input given by hand: samples along axis 0, or one sample repeated (repeatable)")

    p = sub.add_parser("convert", help="re-emit a quantized model in another format from its stored weights "
                       "(no re-solve)", epilog=CONVERT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Read each quantized layer's codes, scales and zeros (MatMulNBits, MatMulLowBit, "
                                   "DequantizeLinear) and write them in FORMAT: the dequantized weights stay bit for "
                                   "bit the same, in seconds.")
    p.add_argument("model", metavar="QUANT")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--format", required=True, metavar="FORMAT", help="matmulnbits, qdq, onnxq or fake")
    p.add_argument("--accuracy-level", type=int, default=None, metavar="L",
                   help="MatMulNBits accuracy_level: 0 exact fp32, 4 int8 activations (default 4 at 2-3 bits, else 0)")

    p = sub.add_parser("demo", help="quantize the built-in digits models and compare accuracy, size, latency",
                       epilog=DEMO_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["mlp", "cnn", "all"], help="digits model (default all)")
    p.add_argument("--bits", type=int, nargs="+", help="digits bit widths (default 2 4 8)")
    p.add_argument("--llm", nargs="?", const=DEFAULT_FOLDER, metavar="GENAI_DIR",
                   help="instead: an onnxruntime-genai folder (default ./smollm2-genai) at fp32 and decoupleQ W2 g64, "
                        "calibrated on text shipped with onnxq: perplexity, size, bits/weight, decode speed, greedy "
                        "text (needs pip install 'onnxq[llm]')")
    return parser


def _config_options(args: argparse.Namespace, config_type: type) -> dict:
    """The config fields the user gave on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_type) if hasattr(args, f.name)}


def _calib_options(args: argparse.Namespace) -> dict:
    sets = {}
    for item in args.set_inputs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise OnnxqError(f"--set {item}: write NAME=file.npy")
        sets[name] = path
    options = {k: getattr(args, k) for k in (
        "text", "tokenizer", "images", "size", "mean", "std", "layout", "random", "samples", "seq_len", "seed")}
    return {**options, "set_inputs": sets}


def run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        print(api.inspect(args.model).table())
    elif args.command == "quantize":
        _, summary = api.quantize_with_summary(args.model, args.output, args.log,
                                                  **_config_options(args, QuantizeConfig))
        print("\n".join(summary.lines()))
        print(f"wrote {args.output}")
        if args.log:
            print(f"wrote {args.log} (per-layer losses)")
        if args.verify:
            options = _config_options(args, QuantizeConfig)
            report = verify_models(api.model_file(args.model), api.model_file(args.output), options.get("calibration"),
                                   seed=options.get("seed", 0))
            print(report.table())
    elif args.command == "split":
        _, report = api.split_with_report(args.model, args.output, activations=args.activations,
                                          calibration=args.calibration, seed=args.seed)
        print("\n".join(report.lines()))
        print(f"wrote {args.output}")
    elif args.command == "verify":
        report = verify_models(args.float_model, args.quantized_model, args.calibration, args.samples, args.seed)
        print(report.table())
    elif args.command == "calib":
        calibration = api.calibrate(args.model, args.output, **_calib_options(args))
        for note in calibration.notes:
            print(f"onnxq: note: {note}", file=sys.stderr)
        print(f"wrote {args.output} ({os.path.getsize(args.output):,} bytes): {calibration.summary()}")
    elif args.command == "convert":
        _, summary = api.convert_with_summary(args.model, args.output, args.format, args.accuracy_level)
        print("\n".join(summary.lines()))
        print(f"wrote {args.output}")
    elif args.command == "demo":
        if args.llm is not None:
            if args.model is not None or args.bits is not None:
                raise OnnxqError("--model and --bits choose the digits demo; drop them with --llm")
            print(run_llm_demo(args.llm))
        else:
            model = args.model or "all"
            print(run_demo(models=("mlp", "cnn") if model == "all" else (model,), bits=tuple(args.bits or (2, 4, 8))))
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so temp folders (weight copies) are removed on the way out."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse_freed_memory()  # this process solves the small layer groups itself
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with run_temp_dir():
            return run(args)
    except OnnxqError as exc:
        print(f"onnxq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        name = exc.args[0] if exc.args else "SIGINT"
        print(f"onnxq: error: interrupted ({name}); temp files were removed and no output was written",
              file=sys.stderr)
        return 128 + getattr(signal, name, signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
