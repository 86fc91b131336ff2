"""Memory planning for calibration: measure one batch's activations and split the Hessian keys into passes over the
data, each of which fits under ``max_memory``."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from onnxq.calibration.data import InputSpec, batch_samples
from onnxq.calibration.keys import HessianKey
from onnxq.calibration.sessions import Feed, run_session
from onnxq.errors import OnnxqError
from onnxq.stats.unfold import PATCH_BLOCK_BYTES, ROW_BLOCK, Unfolding


def measure_activations(
    session: ort.InferenceSession | None, names: list[str], first: tuple[str, Feed], specs: Mapping[str, InputSpec]
) -> dict[str, int]:
    """Bytes of each layer-input tensor for one batch: one-sample probe run, scaled to the first batch's size.

    Graph inputs and initializers cost nothing extra (they are in memory anyway).
    """
    origin, feed = first
    if any(spec.fixed_batch is not None for spec in specs.values()):
        return {name: int(v.nbytes) for name, v in run_session(session, names, feed, origin).items()}
    one = {name: a[:1] if np.ndim(a) > 0 else a for name, a in feed.items()}
    scale = batch_samples(feed)
    return {name: int(v.nbytes) * scale for name, v in run_session(session, names, one, origin).items()}


def _working_bytes(unit: Unfolding, activation: int) -> int:
    """Transient memory of one key's update: copies of the activation, one block of rows, one syrk result."""
    if unit.kind == "conv":
        copies = activation  # the padded copy
        patches = activation * math.prod(unit.kernel) // math.prod(unit.strides) + 1
        block = min(PATCH_BLOCK_BYTES, patches)
    else:
        copies = activation if unit.kind == "columns" else 0
        block = min(ROW_BLOCK * unit.size * 4, activation)
    return copies + block + 4 * unit.groups * unit.size * unit.size


def plan_passes(
    keys: Mapping[HessianKey, Unfolding], activation_bytes: Mapping[str, int], max_memory: int
) -> list[list[HessianKey]]:
    """Split keys (in order) into passes with ``Σ H + Σ distinct activations + max working memory ≤ max_memory``."""
    passes: list[list[HessianKey]] = []
    current: list[HessianKey] = []

    def cost(members: list[HessianKey]) -> int:
        tensors = {keys[k].tensor for k in members}
        return (
            sum(keys[k].hessian_bytes for k in members)
            + 2 * sum(activation_bytes.get(t, 0) for t in tensors)  # two batches in flight
            + max(_working_bytes(keys[k], activation_bytes.get(keys[k].tensor, 0)) for k in members)
        )

    for key in keys:
        alone = cost([key])
        if alone > max_memory:
            unit = keys[key]
            raise OnnxqError(
                f"max_memory {_mib(max_memory)} is too small: the Hessian of layer input '{unit.tensor}' "
                f"({_mib(unit.hessian_bytes)}) plus one batch of its activations needs {_mib(alone)}; "
                "raise --max-memory or use a smaller calibration batch size"
            )
        if current and cost([*current, key]) > max_memory:
            passes.append(current)
            current = []
        current.append(key)
    if current:
        passes.append(current)
    return passes


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
