"""Checks of a :class:`~onnxq.config.QuantizeConfig` that need no model: each option's type (API callers
can pass anything), its range, and options the chosen method cannot honour (refused, never silently ignored).

Errors name the option as the command line spells it (the field's ``flag``: ``symmetric`` is ``--sym``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping

from onnxq.calibration.data import CalibrationBatches
from onnxq.calibration.shards import DEFAULT_SHARDS
from onnxq.errors import OnnxqError
from onnxq.solvers.base import PARAMS


def option_name(field: dataclasses.Field) -> str:
    """How the command line spells the option behind a config field (API-only options by their field name)."""
    if field.metadata.get("cli", True) is False:
        return f"{field.name} (API option)"
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # numpy integers are not ints (nor JSON-able)


def _is_float(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_tuple(value: object) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)


# annotation (as written in the dataclass) -> (check, what it must be)
TYPE_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "int": (_is_int, "an integer (Python int)"),
    "float": (_is_float, "a number (Python int or float)"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "tuple[str, ...]": (_is_str_tuple, "a tuple of strings"),
}


def check_types(config: object) -> None:
    """Every field of the dataclass ``config`` against its annotation (``X | None`` allows None); fields of other
    annotations (``object``) are not checked here."""
    for field in dataclasses.fields(config):
        annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        optional = annotation.endswith(" | None")
        check = TYPE_CHECKS.get(annotation.removesuffix(" | None"))
        value = getattr(config, field.name)
        if check is None or (optional and value is None) or check[0](value):
            continue
        allowed = check[1] + (" or None" if optional else "")
        shown = " ".join(repr(value).split())[:60]  # one line, however large the value
        raise OnnxqError(f"{option_name(field)} must be {allowed}, got {type(value).__name__} {shown}")


def check_ranges(config) -> None:
    """Ranges of the numeric options and the values of the choice options, beyond what ``validate`` checked."""

    sources = (str, os.PathLike, Mapping, CalibrationBatches)
    if config.calibration is not None and not isinstance(config.calibration, sources):
        raise OnnxqError(f"--calib must be a path (.npz file or folder of them) or a dict of arrays, "
                         f"got {type(config.calibration).__name__}")
    if config.iters < 0:
        raise OnnxqError(f"--iters {config.iters} is negative; use 0 or more decoupleQ alternations")
    if not (math.isfinite(config.damp) and config.damp > 0):
        raise OnnxqError(f"--damp {config.damp} must be a positive finite number (e.g. 0.01)")
    if config.max_memory is not None and config.max_memory <= 0:
        raise OnnxqError(f"--max-memory must be positive (got {config.max_memory} bytes); give a bound in GB")
    if config.seed < 0:
        raise OnnxqError(f"--seed {config.seed} is negative; use 0 or more")
    if config.zero_convention not in (None, "integer", "float"):
        raise OnnxqError(f"--zero {config.zero_convention} is unknown; use integer or float")
    if config.round_mode not in ("gptq", "train"):
        raise OnnxqError(f"--round {config.round_mode} is unknown; use gptq or train")
    if not config.op_types:
        raise OnnxqError("--op-types is empty; name some of MatMul,Gemm,Conv")
    for option, pattern in (("--include", config.include), ("--exclude", config.exclude)):
        try:
            re.compile(pattern or "")
        except re.error as exc:
            raise OnnxqError(f"{option} {pattern!r} is not a valid regular expression ({exc}); fix it") from None


# options with a rule of their own below (their meaning depends on the value, not only on being given); act_order:
# decoupleQ always sweeps in act order, so --act-order is refused for rtn only
VALUE_RULES = {"bits", "group_size", "scale_dtype", "symmetric", "zero_convention", "act_order"}


def check_method_options(config) -> None:
    """Refuse options set (to a value other than their default) that the method or format would ignore: a solver
    option is one of the method's params fields (:data:`onnxq.solvers.base.PARAMS`) or refused."""
    fields = {f.name: f for f in dataclasses.fields(config)}

    def given(name: str) -> bool:
        return getattr(config, name) != fields[name].default

    method = config.method
    refusals = [
        (method == "decoupleq" and config.symmetric,
         "--method decoupleq solves a float zero per group, so --sym cannot be honoured; drop --sym or use "
         "--method gptq"),
        (method == "decoupleq" and config.zero_convention == "integer",
         "--method decoupleq solves a float zero per group, so --zero integer cannot be honoured; drop --zero or "
         "use --method gptq"),
        (method != "decoupleq" and config.symmetric and config.zero_convention == "float",
         "--sym grids have no zero offset, so --zero float cannot be honoured; drop --sym (asymmetric grids take "
         "a float zero) or --zero float"),
        (method == "rtn" and config.act_order,
         "--act-order orders GPTQ's columns and --method rtn has none; drop it or use --method gptq"),
        (method == "rtn" and given("max_memory"),
         "--max-memory bounds the calibration Hessians and --method rtn has none; drop it"),
        (config.split_activations and not config.split,
         "--split-activations works with --split only; add --split or drop it"),
        (config.format != "matmulnbits" and given("accuracy_level"),
         f"--accuracy-level applies to --format matmulnbits only, not {config.format}; drop it"),
    ]
    for refused, message in refusals:
        if refused:
            raise OnnxqError(message)
    owners: dict[str, list[str]] = {}
    for name, params in PARAMS.items():
        for param in dataclasses.fields(params):
            owners.setdefault(param.name, []).append(name)
    for name, methods in owners.items():
        if name in VALUE_RULES or method in methods or not given(name):
            continue
        flag = option_name(fields[name])
        raise OnnxqError(f"{flag} is an option of --method {'/'.join(methods)} that --method {method} would ignore; "
                         f"drop it or use --method {methods[0]}")


def check_ray(config) -> None:
    """``--calib-shards``, ``--ray``, ``--ray-workers`` and ``--workers``: ranges, and refusals where they would change
    nothing (Ray distributes the sequential calibration of the Hessian methods and their solves, nothing else)."""
    if config.calib_shards < 1:
        raise OnnxqError(f"--calib-shards {config.calib_shards} is out of range; use 1 or more")
    shards_given = config.calib_shards != DEFAULT_SHARDS
    if shards_given and (config.method == "rtn" or not config.sequential):
        raise OnnxqError("--calib-shards orders the sums of sequential calibration (gptq/decoupleq); drop it")
    if config.workers is not None and config.workers < 1:
        raise OnnxqError(f"--workers {config.workers} is out of range; use 1 or more")
    if config.ray_workers is not None and config.ray_workers < 1:
        raise OnnxqError(f"--ray-workers {config.ray_workers} is out of range; use 1 or more")
    if config.ray is None:
        if config.ray_workers is not None:
            raise OnnxqError("--ray-workers works with --ray only; add --ray or drop it")
        return
    if not config.ray.strip():
        raise OnnxqError("--ray got an empty address; give none (a local cluster), 'auto' or HOST:PORT")
    if config.method == "rtn":
        raise OnnxqError("--ray distributes the calibration of --method gptq/decoupleq and --method rtn has none; "
                         "drop --ray")
    if not config.sequential:
        raise OnnxqError("--ray distributes sequential calibration; drop --no-sequential or --ray")
    if config.workers is not None:
        raise OnnxqError("--workers sets the local solve processes; with --ray the Ray actors solve the layers: "
                         "drop --workers (--ray-workers sets the actors)")
