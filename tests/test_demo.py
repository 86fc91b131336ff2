"""The built-in digits models: fp32 accuracy, quantized accuracy bars, and the demo table."""

import pytest

from onnxq.demo import demo_rows, format_table


@pytest.fixture(scope="module")
def rows():
    return demo_rows(("mlp", "cnn"), (2, 4, 8))


def test_fp32_models_are_accurate(rows):
    for r in rows:
        if r.bits is None:
            assert r.accuracy >= 0.95, r


def test_eight_bit_within_one_point_of_fp32(rows):
    base = {r.model: r.accuracy for r in rows if r.bits is None}
    for r in rows:
        if r.bits == 8:
            assert r.accuracy >= base[r.model] - 0.01, r


def test_four_and_two_bit_bars_and_sizes(rows):
    base = {r.model: r for r in rows if r.bits is None}
    for r in rows:
        if r.bits in (2, 4):
            assert r.accuracy >= base[r.model].accuracy - (0.01 if r.bits == 4 else 0.03), r
        if r.bits == 2 and r.format != "fake":
            assert r.weight_bytes <= 0.12 * base[r.model].weight_bytes, r


def test_table_has_a_row_per_model_bits_format(rows):
    table = format_table(rows)
    assert table.count("\n| mlp |") == 1 + 3 * 3 and table.count("\n| cnn |") == 1 + 3 * 3


@pytest.fixture(scope="module")
def methods():
    from onnxq.demo import method_rows

    return method_rows(("mlp", "cnn"))


def test_calibrated_methods_beat_rtn_at_two_bits(methods):
    """On the held-out digits, GPTQ and decoupleQ (calibrated on train-split samples) are at least as accurate as
    RTN at 2 bits, every method stays within 3 points of fp32, and RTN/GPTQ cost about 3 bits per weight all-in."""
    by = {(r.model, r.method): r for r in methods}
    for model in ("mlp", "cnn"):
        fp32 = by[(model, "fp32")].accuracy
        rtn = by[(model, "rtn")]
        assert by[(model, "gptq")].accuracy >= rtn.accuracy and by[(model, "decoupleq")].accuracy >= rtn.accuracy
        assert all(by[(model, m)].accuracy >= fp32 - 0.03 for m in ("rtn", "gptq", "decoupleq", "split+rtn"))
        assert 2.0 < rtn.bits_per_weight < 3.5 and by[(model, "gptq")].bits_per_weight == rtn.bits_per_weight
