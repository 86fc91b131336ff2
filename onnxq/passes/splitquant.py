"""SplitQuant: each MatMul/Gemm/Conv (and, on request, each activation) becomes three k-means branches summed by Add.

Weights: 1-D k-means with k = 3 on the weight values (MatMul/Gemm: the whole tensor; Conv: each output
kernel) gives thresholds ``t₁ < t₂``, the midpoints of the sorted centres.  Branch ``c`` keeps the values
of cluster ``c`` and zeros elsewhere, so ``W = W₀ + W₁ + W₂`` and

    Y = op(X, W₀, C₀) + op(X, W₁, C₁) + op(X, W₂, C₂)        (two Adds, original output name kept)

with the bias split the same way (a bias with fewer than three distinct values stays on the lower branch).
Each branch has a third of the value range to cover, so a uniform quantizer gets a finer grid per branch.

Activations (``activations=True``): with thresholds from k-means on the activation's output values
(captured with ONNX Runtime on calibration data),

    y = Where(y > t₁, 0, y) + Where(t₁ < y ≤ t₂, y, 0) + Where(y > t₂, y, 0),

which is bit-exact in float (adding zeros is exact); activation quantizers then see three narrow ranges.
"""

from __future__ import annotations

import time

import onnx

from onnxq.errors import OnnxqError
from onnxq.ir.index import allow_free_initializers, remove_unused
from onnxq.ir.model import copy_model, model_bytes
from onnxq.ir.targets import constants_to_initializers
from onnxq.passes.split_activations import (
    ActivationSite,
    activation_thresholds,
    find_activation_sites,
    split_activation_sites,
)
from onnxq.passes.split_report import SplitReport
from onnxq.passes.split_weights import split_weights

METHODS = ("exact", "sklearn")


# ----------------------------------------------------------------------------- report


# ----------------------------------------------------------------------------- the pass


def split_model(
    model: onnx.ModelProto,
    activations: bool = False,
    calibration: object = None,
    seed: int = 0,
    method: str = "exact",
) -> tuple[onnx.ModelProto, SplitReport]:
    """Split a copy of ``model`` (the input is never modified); returns the split model and its report."""
    split = copy_model(model)
    return split, split_in_place(split, activations, calibration, seed, method)


def split_in_place(
    model: onnx.ModelProto,
    activations: bool = False,
    calibration: object = None,
    seed: int = 0,
    method: str = "exact",
) -> SplitReport:
    """The SplitQuant pass: rewrite ``model`` in place; returns what it changed."""
    start = time.perf_counter()
    if method not in METHODS:
        raise OnnxqError(f"k-means method '{method}' is unknown; use one of {', '.join(METHODS)}")
    if activations and calibration is None:
        raise OnnxqError("splitting activations needs calibration data to place the thresholds; pass --calib data.npz")
    constants_to_initializers(model)
    report = SplitReport(method=method, seed=seed, nodes_before=len(model.graph.node), bytes_before=model_bytes(model))

    sites: list[ActivationSite] = []
    if activations:
        sites = activation_thresholds(model, find_activation_sites(model), calibration, seed, method, report)
    split_weights(model, seed, method, report)
    if sites:
        split_activation_sites(model, sites, report)
    remove_unused(model)
    allow_free_initializers(model)
    report.nodes_after = len(model.graph.node)
    report.bytes_after = model_bytes(model)
    report.seconds = time.perf_counter() - start
    return report


# ----------------------------------------------------------------------------- activations


# ----------------------------------------------------------------------------- helpers


