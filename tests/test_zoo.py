"""The conformance zoo (models/zoo.py): foreign ONNX graphs quantized by onnxq, scored on real inputs.

For every zoo model: INT8 per-channel RTN in every format is near-lossless (cosine to fp32 ≥ 0.999 for
transformers and synthetic graphs, ≥ 0.99 on CNN logits); every weight layer is quantized or listed as skipped
with a reason; the output passes ``onnx.checker`` when the input does; ``onnxq split`` is exact (to 1e-5, or to
the float model's own rounding noise where that is larger); INT4 g32 RTN runs and beats W2 g64 RTN; W2 g64
decoupleQ beats W2 g64 RTN. The SmolLM2 rows other than INT8 and the decoupleQ rows of real models are ``slow``.
Models are built on first use into ``<cache>/zoo`` (``python -m models.zoo``; SmolLM2's three exports take
~3 min on an idle 2-core machine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.zoo import ZOO
from models.zoo_eval import (
    RowResult,
    quantize_row,
    run,
    split_row,
    split_tolerance,
    unreported_layers,
    weight_layers,
)

pytestmark = pytest.mark.real

FORMATS = ("matmulnbits", "qdq", "fake", "onnxq")
ALL = list(ZOO)


def _heavy_is_slow(names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if ZOO[n].heavy else n for n in names]


def _real_is_slow(names: list[str]) -> list:
    """decoupleQ on a real model takes 1-2 min (sequential calibration): only the synthetic graphs run in CI."""
    return [n if ZOO[n].kind == "synthetic" else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


_ROWS: dict[tuple[str, str], RowResult] = {}


def _row(name: str, workdir: Path, setting: str, **options: object) -> RowResult:
    """``quantize_row``, once per (model, setting) in this session (several tests read the same row)."""
    if (name, setting) not in _ROWS:
        _ROWS[name, setting] = quantize_row(ZOO[name], workdir, setting, **options)
    return _ROWS[name, setting]


def _describe(row: RowResult) -> str:
    return f"{row.model} {row.setting}: error={row.error} metric={row.metric:.6f} notes={row.notes[:3]}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ALL)
def test_int8_per_channel_is_near_lossless(name: str, fmt: str, workdir: Path) -> None:
    """Quantize, save, onnx.checker, load in ORT, run on real inputs: cosine to fp32 ≥ the model's threshold."""
    entry = ZOO[name]
    row = _row(name, workdir, f"int8 {fmt}", bits=8, group_size=-1, format=fmt)
    assert row.error is None, _describe(row)
    assert row.metric >= entry.threshold, _describe(row)


@pytest.mark.parametrize("name", ALL)
def test_every_weight_layer_is_quantized_or_skipped_with_a_reason(name: str, workdir: Path) -> None:
    """Each MatMul/Gemm/Conv/ConvTranspose reading a constant (any subgraph, Constant node or initializer) is in
    the summary: quantized, or skipped with a reason."""
    entry = ZOO[name]
    row = _row(name, workdir, "int8 qdq", bits=8, group_size=-1, format="qdq")
    assert row.error is None, _describe(row)
    missing = unreported_layers(entry.build(), row)
    assert not missing, f"{name}: {len(missing)} weight layers neither quantized nor skipped: {missing[:5]}"
    assert row.quantized, f"{name}: nothing quantized; skipped: {row.skipped[:3]}"


@pytest.mark.parametrize("name", ALL)
def test_inspect_lists_the_layers_quantize_quantizes(name: str, workdir: Path) -> None:
    """``onnxq inspect`` on the float model shows as quantizable exactly the layers ``onnxq quantize`` quantizes."""
    import onnxq

    row = _row(name, workdir, "int8 qdq", bits=8, group_size=-1, format="qdq")
    assert row.error is None, _describe(row)
    path = ZOO[name].build()
    listed = {r.name for r in onnxq.inspect(path).rows if r.state == "float"}  # not "float, kept" (lm_head)
    weight_of = {node: weight for node, _, weight in weight_layers(path)}
    inspect_only = sorted(n for n in listed - set(row.quantized) if weight_of.get(n) not in row.weights)
    quantize_only = sorted(set(row.quantized) - listed)
    assert not inspect_only and not quantize_only, f"inspect only: {inspect_only[:3]}, quantize only: " \
        f"{quantize_only[:3]}"


@pytest.mark.parametrize("name", _heavy_is_slow(ALL))
def test_split_is_exact(name: str, workdir: Path) -> None:
    row = split_row(ZOO[name], workdir)
    assert row.error is None, _describe(row)
    assert row.metric <= split_tolerance(row), f"{_describe(row)} noise={row.noise:.2e}"


@pytest.mark.parametrize("name", _heavy_is_slow(ALL))
def test_int4_g32_runs_and_beats_w2(name: str, workdir: Path) -> None:
    int4 = _row(name, workdir, "int4 g32 rtn", bits=4, group_size=32)
    w2 = _row(name, workdir, "w2 g64 rtn", bits=2, group_size=64)
    assert int4.error is None, _describe(int4)
    assert w2.error is None, _describe(w2)
    assert int4.metric > w2.metric, f"{_describe(int4)} vs {_describe(w2)}"


@pytest.mark.parametrize("name", _real_is_slow(ALL))
def test_w2_g64_decoupleq_beats_rtn(name: str, workdir: Path) -> None:
    rtn = _row(name, workdir, "w2 g64 rtn", bits=2, group_size=64)
    decoupleq = _row(name, workdir, "w2 g64 decoupleq", bits=2, group_size=64, method="decoupleq")
    assert rtn.error is None, _describe(rtn)
    assert decoupleq.error is None, _describe(decoupleq)
    assert decoupleq.metric > rtn.metric, f"{_describe(decoupleq)} vs {_describe(rtn)}"


def test_a_weight_that_is_a_graph_output_is_returned_unchanged(workdir: Path) -> None:
    """The model's own output ``w_out`` is data, not a layer: every format must return it bit for bit."""
    import onnx

    import onnxq

    entry = ZOO["weight-is-output"]
    path = entry.build()
    feeds = entry.inputs(path)
    expected = run(path, feeds)["w_out"]
    for fmt in FORMATS:
        out = workdir / f"weight-is-output.{fmt}.onnx"
        onnxq.quantize(path, out, bits=8, group_size=-1, format=fmt)
        onnx.checker.check_model(str(out))
        actual = run(out, feeds, custom_ops=fmt == "onnxq")["w_out"]
        np.testing.assert_array_equal(actual, expected, err_msg=fmt)


def test_one_signed_depthwise_channels_keep_their_range(workdir: Path) -> None:
    """Issue 11's regression: per-channel INT8 of one-signed depthwise kernels is within 1% of fp32 (max abs error
    of the output relative to its max)."""
    entry = ZOO["depthwise-one-signed"]
    path = entry.build()
    feeds = entry.inputs(path)
    expected = run(path, feeds)["pointwise"]
    import onnxq

    for fmt in ("qdq", "fake"):
        out = workdir / f"depthwise.{fmt}.onnx"
        onnxq.quantize(path, out, bits=8, group_size=-1, format=fmt)
        actual = run(out, feeds)["pointwise"]
        assert np.abs(actual - expected).max() <= 0.01 * np.abs(expected).max(), fmt
