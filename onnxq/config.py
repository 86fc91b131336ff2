"""Every option of ``onnxq quantize`` in one typed dataclass; the command line is generated from its fields.

Each field's metadata gives how the command line spells it (``flag``, default ``--field-name``), its help text,
choices and parser; ``cli=False`` marks API-only options.  A method's own options are the fields of its params type
(:data:`onnxq.solvers.base.PARAMS`): :meth:`QuantizeConfig.solver_params` builds it, and an option the chosen method
has no field for is refused (:func:`onnxq.config_checks.check_method_options`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

from onnxq.calibration.data import check_batch_size
from onnxq.calibration.shards import DEFAULT_SHARDS, LOCAL_CLUSTER
from onnxq.config_checks import check_method_options, check_ranges, check_ray, check_types
from onnxq.errors import OnnxqError
from onnxq.formats.registry import EMITTERS
from onnxq.ir.targets import SUPPORTED_OP_TYPES, TARGET_OP_TYPES
from onnxq.quantized_weight import SUPPORTED_BITS
from onnxq.solvers.base import PARAMS, DecoupleqParams, GptqParams, RtnParams, SolverParams

FAST_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations
COMPACT_STORAGE_BITS = 3  # at this many bits or fewer, fp32 models store scales and float zeros in float16


def default_scale_storage(bits: int) -> str:
    """Storage of scales and float zeros in fp32 models when none is given: float16 at 2-3 bits, where float32
    parameters cost ``32/g`` bits per weight each (0.5 at g64, a quarter of a 2-bit code), else float32."""
    return "float16" if bits <= COMPACT_STORAGE_BITS else "float32"


def default_accuracy_level(bits: int) -> int:
    """MatMulNBits' accuracy level when none is given: :data:`FAST_ACCURACY_LEVEL` at 2-3 bits, else 0 (exact)."""
    return FAST_ACCURACY_LEVEL if bits <= 3 else 0


def gigabytes(text: str) -> int:
    """``--max-memory`` in GB, as bytes (its range is checked with the other options)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of GB")
    return int(value * (1 << 30))


def comma_list(text: str) -> tuple[str, ...]:
    """``MatMul, Gemm`` → ``("MatMul", "Gemm")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def option(default: Any, help: str, **cli: Any) -> Any:  # noqa: A002 - argparse's word
    """A config field with its command-line spelling: ``flag``, ``negative`` (a bool's off switch), ``choices``,
    ``metavar``, ``parse`` (text → value), ``shown`` (the default as help prints it), ``cli=False`` (API only)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class QuantizeConfig:
    """Every option of ``onnxq quantize`` (see each field's help)."""

    method: str = option("rtn", "solver", choices=tuple(PARAMS))
    bits: int = option(4, "bits per weight: 2, 3, 4 or 8")
    group_size: int = option(64, "columns per scale along the reduction axis; -1 = per output channel")
    symmetric: bool = option(False, "symmetric grid (zero point 2^(b-1))", flag="--sym", negative="--asym")
    format: str = option("matmulnbits", "matmulnbits: com.microsoft::MatMulNBits; qdq: ONNX DequantizeLinear; "
                         "fake: float weights; onnxq: the onnxq::MatMulLowBit custom op (needs the custom-op "
                         "library)", choices=tuple(EMITTERS))
    zero_convention: str | None = option(None, "integer zero point w=s(q-zp) or float zero w=s*q+z (default: float "
                                         "for decoupleq, else integer)", flag="--zero", choices=("integer", "float"))
    clip_search: bool = option(False, "RTN: MSE-optimal range shrinking per group")
    include: str | None = option(None, "only layers whose node name matches", metavar="REGEX")
    exclude: str | None = option(None, "skip layers whose node name matches", metavar="REGEX")
    quantize_lm_head: bool = option(False, "also quantize a language model's output projection (lm_head: the layer "
                                    "whose output is 'logits'), which stays float by default")
    op_types: tuple[str, ...] = option(TARGET_OP_TYPES, "comma-separated, of MatMul,Gemm,Conv,Gather; Gather (not in "
                                       "the default) quantizes embedding tables by RTN whatever the method, one "
                                       "table with a tied lm_head", parse=comma_list, shown=",".join(TARGET_OP_TYPES))
    accuracy_level: int | None = option(None, "MatMulNBits accuracy_level: 0 exact fp32 activations, 4 int8 "
                                        "activations (default 4 at 2-3 bits, where level 0 decodes ~15x slower on CPU; "
                                        "else 0)")
    scale_storage: str | None = option(None, "how fp32 models store scales and float zeros (fp16 models always use "
                                       "float16): float16 halves their size, the solvers work on the float16 grid "
                                       "(default float16 at 2-3 bits, else float32)", choices=("float16", "float32"))
    calibration: object = option(None, "calibration inputs: .npz or folder of .npz (gptq/decoupleq)", flag="--calib",
                                 metavar="PATH")
    calib_text: str | None = option(None, "make the calibration data from this text file (as 'onnxq calib --text' "
                                    "does: token windows, masks, positions, empty past)", metavar="FILE")
    calib_images: str | None = option(None, "make the calibration data from the photos in this folder (as 'onnxq calib "
                                      "--images' does, at the model's fixed size, pixels/255; use 'onnxq calib' for "
                                      "another size, mean or std)", metavar="DIR")
    calib_tokenizer: str | None = option(None, "with --calib-text: tokenizer.json or its folder (default: beside the "
                                         "model)", metavar="PATH")
    calib_samples: int | None = option(None, "with --calib-text/--calib-images: samples (default 128)", metavar="N")
    calib_seq_len: int | None = option(None, "with --calib-text: tokens per sample (default 512)", metavar="L")
    calib_batch_size: int | None = option(None, "calibration samples per ONNX Runtime run (default: the model's "
                                          "fixed batch, else 8 samples or, for token ids, 1024 positions; "
                                          "1 when the model fails or mixes samples in a batch)",
                                          metavar="N")
    iters: int = option(4, "decoupleq alternations")
    damp: float = option(0.01, "Hessian damping λ·mean(diag H)")
    act_order: bool = option(False, "GPTQ column order by decreasing Hessian diagonal")
    round_mode: str = option("gptq", "decoupleq integer step", flag="--round", choices=("gptq", "train"))
    max_memory: int | None = option(None, "bound for calibration Hessians and kept activations (beyond it they go "
                                    "to temp files)", parse=gigabytes, metavar="GB")
    progress: bool | None = option(None, "progress on stderr with the time left (default on: a bar on a terminal, "
                                   "else a line every 15 s; the CLI's --quiet turns it off)", cli=False)
    split: bool = option(False, "run SplitQuant first, then quantize each branch")
    split_activations: bool = option(False, "with --split: also split activations")
    act_bits: int | None = option(None, "add per-tensor activation fake-quantization (QDQ) with calibrated ranges",
                                  choices=(4, 8))
    seed: int = option(0, "random seed (k-means, sampling)")
    sequential: bool = option(True, "calibrate each layer group on the outputs of the already-quantized earlier "
                              "layers (costs one forward pass over the calibration data, like --no-sequential)")
    calib_shards: int = option(DEFAULT_SHARDS, "sequential calibration sums H over this many contiguous shards of "
                               "the batches and adds the shard sums in order; the output depends on it, not on "
                               "--ray or its workers (1: one running sum)", metavar="N")
    ray: str | None = option(None, "data-parallel sequential calibration on Ray (pip install 'onnxq[ray]'): the flag "
                             "alone starts a local cluster; 'auto' or an address joins a running one; same output as "
                             "without --ray", metavar="ADDRESS", const=LOCAL_CLUSTER)
    ray_workers: int | None = option(None, "with --ray: calibration actors, which also solve "
                                     "the layers (default: the cluster's CPUs, at most --calib-shards)", metavar="N")
    workers: int | None = option(None, "processes that solve the weights of a layer group in parallel (default: one "
                                 "per CPU; 1: in this process; with --ray the actors solve); the output is the same "
                                 "for any number", metavar="N")
    float_target: bool = option(True, "with --sequential: fit each layer's output on quantized inputs to the float "
                                "model's output on float inputs (runs the float model alongside)")

    @property
    def resolved_accuracy_level(self) -> int:
        """The MatMulNBits accuracy level this run emits: the given one, else 4 at 2-3 bits (fast int8-activation
        kernels; ORT's 2-bit kernel at level 0 is ~15x slower than fp32 decoding) and 0 at 4 and 8 bits."""
        return default_accuracy_level(self.bits) if self.accuracy_level is None else self.accuracy_level

    @property
    def resolved_scale_storage(self) -> str:
        """The storage of scales and float zeros for fp32 models: the given one, else :func:`default_scale_storage`."""
        return default_scale_storage(self.bits) if self.scale_storage is None else self.scale_storage

    def solver_params(self, group_size: int, scale_dtype: type) -> SolverParams:
        """The method's params object (:mod:`onnxq.solvers.base`) for one weight of resolved ``group_size``."""
        zero_convention = self.zero_convention or ("float" if self.method == "decoupleq" else "integer")
        common = {"bits": self.bits, "group_size": group_size, "scale_dtype": scale_dtype}
        if self.method == "rtn":
            return RtnParams(**common, symmetric=self.symmetric, zero_convention=zero_convention,
                             clip_search=self.clip_search)
        if self.method == "gptq":
            return GptqParams(**common, symmetric=self.symmetric, zero_convention=zero_convention, damp=self.damp,
                              act_order=self.act_order)
        return DecoupleqParams(**common, iters=self.iters, damp=self.damp, round_mode=self.round_mode)

    def source_options(self) -> dict[str, object] | None:
        """Options of :func:`~onnxq.calibration.sources.make.build_calibration` for ``--calib-text``/``--calib-images``
        (None when the run reads ``--calib`` or nothing)."""
        if self.calib_text is None and self.calib_images is None:
            return None
        options: dict[str, object] = {"text": self.calib_text, "images": self.calib_images, "seed": self.seed}
        if self.calib_text is not None:
            options["tokenizer"] = self.calib_tokenizer
        for key, value in (("samples", self.calib_samples), ("seq_len", self.calib_seq_len)):
            if value is not None:
                options[key] = value
        return options

    @property
    def needs_calibration(self) -> bool:
        """Whether this run reads calibration data (Hessian methods, activation ranges, activation splits)."""
        return self.method != "rtn" or self.act_bits is not None or self.split_activations

    def validate(self) -> None:
        """One-line errors for a wrong type, value or combination of options (onnxq.config_checks)."""
        check_types(self)
        if self.bits not in SUPPORTED_BITS:
            raise OnnxqError(f"--bits {self.bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size != -1 and not 2 <= self.group_size <= 1 << 16:
            raise OnnxqError(f"--group-size {self.group_size} is out of range; use -1 (per channel) or 2..65536")
        if self.format not in EMITTERS:
            raise OnnxqError(f"--format {self.format} is unknown; use one of {', '.join(EMITTERS)}")
        if self.method not in PARAMS:
            raise OnnxqError(f"--method {self.method} is unknown; use one of {', '.join(PARAMS)}")
        if self.act_bits not in (None, 4, 8):
            raise OnnxqError(f"--act-bits {self.act_bits} is not supported; use 8 or 4")
        sources = [name for name, value in (("--calib", self.calibration), ("--calib-text", self.calib_text),
                                            ("--calib-images", self.calib_images)) if value is not None]
        if len(sources) > 1:
            raise OnnxqError(f"{' and '.join(sources)} are two calibration sources; give one")
        if self.needs_calibration and not sources:
            raise OnnxqError("this run needs calibration data (gptq/decoupleq, --act-bits, split activations); "
                             "pass --calib data.npz, --calib-text FILE or --calib-images DIR")
        for name, value in (("--calib-tokenizer", self.calib_tokenizer), ("--calib-seq-len", self.calib_seq_len)):
            if value is not None and self.calib_text is None:
                raise OnnxqError(f"{name} works with --calib-text only; add it or drop {name}")
        if self.calib_samples is not None and self.calib_text is None and self.calib_images is None:
            raise OnnxqError("--calib-samples works with --calib-text or --calib-images; add one or drop it")
        if self.scale_storage not in (None, "float16", "float32"):
            raise OnnxqError(f"--scale-storage {self.scale_storage} is unknown; use float16 or float32")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise OnnxqError(f"--accuracy-level {self.accuracy_level} is out of range; use 0..4")
        bad = set(self.op_types) - set(SUPPORTED_OP_TYPES)
        if bad:
            supported = ",".join(SUPPORTED_OP_TYPES)
            raise OnnxqError(f"--op-types {','.join(sorted(bad))} not supported; use some of {supported}")
        check_batch_size(self.calib_batch_size)
        if self.calib_batch_size is not None and not self.needs_calibration:
            raise OnnxqError("--calib-batch-size applies to runs that calibrate (gptq/decoupleq, --act-bits, "
                             "split activations); drop it")
        check_ranges(self)
        check_method_options(self)
        check_ray(self)
