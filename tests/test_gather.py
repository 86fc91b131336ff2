"""Embedding lookups (``--op-types MatMul,Gather``): every format × bits on a tiny language model whose table is tied
to its lm_head (genai and optimum layouts) or not; the lookup equals the numpy RTN reference of the table exactly at
every ORT level, a tied table is one solution (stored once in ``matmulnbits``), and inspect, the size summary,
``onnxq convert`` and the already-quantized refusal know GatherBlockQuantized."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import tied_lm_model
from onnx import numpy_helper
from ort_helpers import exact_kernels, relative_error

import onnxq
from onnxq.api import quantize_with_summary
from onnxq.config import default_scale_storage
from onnxq.errors import OnnxqError
from onnxq.ir.model import model_bytes
from onnxq.layer_table import LOOKUP_FLOAT, inspect_model, quantized_layer_counts
from onnxq.quantized_size import quantized_layers
from onnxq.solvers.grouping import resolve_group_size
from onnxq.solvers.rtn import quantize_rtn

LEVELS = [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL]
RUNNABLE = ["matmulnbits", "qdq", "fake"]  # the onnxq format's MatMulLowBit needs the custom-op library
IDS = np.array([[0, 5, 63, 7], [63, 1, 2, 5]], dtype=np.int64)
GATHER = ("MatMul", "Gather")


def table_of(model: onnx.ModelProto) -> np.ndarray:
    """The float table T[V, H] the lookup reads."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return inits["embed.weight"] if "embed.weight" in inits else inits["lm_head.weight"].T


def reference(model: onnx.ModelProto, bits: int, group_size: int, dtype=np.float32) -> np.ndarray:
    """The table dequantized by the numpy RTN solver (asymmetric, integer zero points, groups along H)."""
    table = table_of(model).astype(np.float64)
    storage = np.float16 if dtype == np.float16 else np.dtype(default_scale_storage(bits)).type
    qw = quantize_rtn(table, bits, resolve_group_size(table.shape[1], group_size), False, "integer",
                      scale_dtype=storage)
    return qw.dequantize(np.float64).astype(dtype)


def outputs(model: onnx.ModelProto, level) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input_ids": IDS}), strict=True))


def check_lookup(quantized: onnx.ModelProto, table: np.ndarray) -> None:
    """Checker, then at every ORT level ``embeds`` is exactly the reference table's rows."""
    onnx.checker.check_model(quantized, full_check=True)
    for level in LEVELS:
        np.testing.assert_array_equal(outputs(quantized, level)["embeds"], table[IDS], err_msg=str(level))


@pytest.mark.parametrize("fmt", RUNNABLE)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("style", ["genai", "optimum"])
def test_tied_table_is_one_solution_exact_at_every_level(fmt, bits, style):
    model = tied_lm_model(style=style, seed=bits)
    quantized, summary = quantize_with_summary(model, bits=bits, group_size=32, format=fmt, op_types=GATHER,
                                               quantize_lm_head=True, **exact_kernels(fmt))
    table = reference(model, bits, 32)
    check_lookup(quantized, table)
    fake = onnxq.quantize(model, bits=bits, group_size=32, format="fake", op_types=GATHER, quantize_lm_head=True)
    for level in LEVELS:  # the lm_head computes with the same dequantized table as the lookup
        assert relative_error(outputs(quantized, level)["logits"], outputs(fake, ort.GraphOptimizationLevel
                                                                           .ORT_DISABLE_ALL)["logits"]) < 1e-5
    fake_inits = {t.name: numpy_helper.to_array(t) for t in fake.graph.initializer}
    assert any(np.array_equal(v, table.T) for v in fake_inits.values())  # lm_head's fake weight is the table too
    ops = [n.op_type for n in quantized.graph.node]
    if fmt == "matmulnbits":
        assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
        assert sum(t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 3 for t in quantized.graph.initializer) \
            == 2  # B of the layer and of the lm_head: the lookup reads the lm_head's through Reshape
        assert any("one quantized table" in line for line in summary.lines())
    else:
        assert any("stored twice" in line for line in summary.lines())
    assert quantized.SerializeToString() == onnxq.quantize(
        model, bits=bits, group_size=32, format=fmt, op_types=GATHER, quantize_lm_head=True,
        **exact_kernels(fmt)).SerializeToString()


@pytest.mark.parametrize("fmt", RUNNABLE)
@pytest.mark.parametrize("group_size", [16, 48, -1])
def test_untied_lookup_is_rtn_whatever_the_method_options(fmt, group_size):
    model = tied_lm_model(style="untied", hidden=80)
    quantized, summary = quantize_with_summary(model, bits=4, group_size=group_size, format=fmt, op_types=GATHER,
                                               symmetric=True)
    check_lookup(quantized, reference(model, 4, group_size))
    assert any("RTN (asymmetric" in line for line in summary.lines())
    if fmt == "matmulnbits" and group_size == 48:
        assert "GatherBlockQuantized" not in [n.op_type for n in quantized.graph.node]
        assert any("emitted as qdq" in line for line in summary.lines())


def test_float16_table_and_odd_rows_use_a_wider_container():
    model = tied_lm_model(style="untied", hidden=42, dtype=np.float16)
    quantized, summary = quantize_with_summary(model, bits=2, group_size=16, op_types=("Gather",))
    check_lookup(quantized, reference(model, 2, 16, np.float16))
    assert any("2-bit codes stored in 4-bit fields" in line for line in summary.lines())


def test_tied_table_with_float_lm_head_stays_float():
    model = tied_lm_model(style="optimum")
    quantized, summary = quantize_with_summary(model, bits=4, op_types=GATHER)
    assert "Gather" in [n.op_type for n in quantized.graph.node]
    assert any("also read by 'lm_head'" in line and "--quantize-lm-head" in line for line in summary.lines())


def test_note_names_the_float_embedding():
    _, summary = quantize_with_summary(tied_lm_model(style="untied"), bits=4)
    assert any("--op-types MatMul,Gemm,Conv,Gather quantizes it" in line for line in summary.lines())


def test_float_zeros_on_a_tied_table_are_refused():
    with pytest.raises(OnnxqError, match="embed_tokens.*float zeros.*--exclude"):
        onnxq.quantize(tied_lm_model(style="genai"), method="decoupleq", bits=4, op_types=GATHER,
                       quantize_lm_head=True, calibration={"input_ids": IDS})


def test_size_inspect_and_refusal_know_the_lookup():
    model = tied_lm_model(style="untied", hidden=64)
    quantized = onnxq.quantize(model, bits=4, group_size=32, op_types=GATHER, quantize_lm_head=True)
    lookup = next(layer for layer in quantized_layers(quantized) if layer.op_type == "GatherBlockQuantized")
    assert lookup.shape == (64, 64)
    assert lookup.bits_per_weight == pytest.approx(4 + 32 / 32 + 4 / 32)  # codes, fp32 scales, 4-bit zero points
    rows = inspect_model(model).rows
    assert [r.state for r in rows if r.op_type == "Gather"] == [LOOKUP_FLOAT]  # not quantized by default
    assert quantized_layer_counts(quantized)["GatherBlockQuantized"] == 1
    with pytest.raises(OnnxqError, match="already quantized"):
        onnxq.quantize(quantized, op_types=("Gather",))
    assert model_bytes(quantized) < model_bytes(model) / 5


@pytest.mark.parametrize("style", ["genai", "optimum", "untied"])
def test_convert_round_trip_keeps_the_lookup_and_the_shared_table(style):
    model = tied_lm_model(style=style, hidden=64)
    table = reference(model, 4, 32)
    quantized = onnxq.quantize(model, bits=4, group_size=32, op_types=GATHER, quantize_lm_head=True)
    qdq = onnxq.convert(quantized, format="qdq")
    check_lookup(qdq, table)
    back = onnxq.convert(qdq, format="matmulnbits", accuracy_level=0)
    check_lookup(back, table)
    direct = onnxq.convert(quantized, format="fake")
    check_lookup(direct, table)
    again = onnxq.convert(quantized, format="matmulnbits", accuracy_level=0)
    check_lookup(again, table)
    if style != "untied":  # read back as the lm_head's weight, so stored once again (qdq stores it twice)
        assert [n.op_type for n in again.graph.node].count("Reshape") == 1
        assert model_bytes(again) == model_bytes(quantized)
    for level in LEVELS:
        np.testing.assert_allclose(outputs(back, level)["logits"], outputs(quantized, level)["logits"], rtol=0,
                                   atol=1e-4)


def test_gptq_run_quantizes_the_lookup_by_rtn_and_calibrates_the_products():
    model = tied_lm_model(style="untied", hidden=64)
    calibration = {"input_ids": np.random.default_rng(0).integers(0, 64, (16, 8)).astype(np.int64)}
    quantized, summary = quantize_with_summary(model, method="gptq", bits=4, group_size=32, op_types=GATHER,
                                               quantize_lm_head=True, calibration=calibration)
    check_lookup(quantized, reference(model, 4, 32))
    assert any("RTN (asymmetric" in line and "not gptq" in line for line in summary.lines())
    assert [n.op_type for n in quantized.graph.node].count("MatMulNBits") == 2
