"""The command line: every user error is one line, a non-zero exit, no traceback, no output file."""

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from graphs import conv_model, matmul_model
from onnx import TensorProto, helper

from onnxq.ir.model import save_model


def onnxq_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxq", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onnxq: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    save_model(matmul_model(k=64, n=32), path)
    return path


def test_quantize_and_inspect(model_path, tmp_path):
    out = tmp_path / "q.onnx"
    result = onnxq_cli("quantize", str(model_path), "-o", str(out), "--bits", "2", "--group-size", "32")
    assert result.returncode == 0, result.stderr
    assert "quantized 1 layers" in result.stdout and "weights:" in result.stdout
    onnx.checker.check_model(str(out))
    inspected = onnxq_cli("inspect", str(out))
    assert inspected.returncode == 0 and "MatMulNBits" in inspected.stdout and "quantized" in inspected.stdout


def test_help_has_examples():
    for command in ("quantize", "inspect", "split", "demo"):
        result = onnxq_cli(command, "-h")
        assert result.returncode == 0 and "examples:" in result.stdout


def test_missing_file(tmp_path):
    assert_one_line_error(onnxq_cli("inspect", str(tmp_path / "nope.onnx")), "nope.onnx", "no such file")


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    result = onnxq_cli("quantize", str(bad), "-o", str(tmp_path / "o.onnx"))
    assert_one_line_error(result, "notes.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_protobuf(model_path, tmp_path):
    data = model_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(onnxq_cli("inspect", str(cut)), "cut.onnx", "truncated")


def test_missing_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    save_model(matmul_model(k=64, n=32), path, external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    assert_one_line_error(onnxq_cli("inspect", str(path)), "ext.onnx.data", "missing")


def test_no_quantizable_layers(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "relu.onnx"
    save_model(helper.make_model(graph), path)
    out = tmp_path / "o.onnx"
    assert_one_line_error(onnxq_cli("quantize", str(path), "-o", str(out)), "no quantizable layers")
    assert not out.exists()


@pytest.mark.parametrize("args,fragment", [
    (["--bits", "5"], "--bits 5"),
    (["--bits", "1"], "--bits 1"),
    (["--group-size", "0"], "--group-size 0"),
    (["--group-size", "1"], "--group-size 1"),
    (["--method", "decoupleq"], "calibration"),
])
def test_bad_options(model_path, tmp_path, args, fragment):
    out = tmp_path / "o.onnx"
    assert_one_line_error(onnxq_cli("quantize", str(model_path), "-o", str(out), *args), fragment)
    assert not out.exists()


def test_output_equal_to_input(model_path):
    before = model_path.read_bytes()
    assert_one_line_error(onnxq_cli("quantize", str(model_path), "-o", str(model_path)), "equals the input")
    assert model_path.read_bytes() == before


def test_unwritable_output_directory(model_path, tmp_path):
    if os.geteuid() == 0:
        folder = Path("/sys")  # root writes anywhere else; sysfs refuses new files
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
    result = onnxq_cli("quantize", str(model_path), "-o", str(folder / "o.onnx"))
    assert_one_line_error(result, str(folder))
    assert not (folder / "o.onnx").exists()


def test_missing_output_directory(model_path, tmp_path):
    result = onnxq_cli("quantize", str(model_path), "-o", str(tmp_path / "no" / "dir" / "o.onnx"))
    assert_one_line_error(result, "does not exist")


def test_conv_fallback_is_reported(tmp_path):
    path = tmp_path / "conv.onnx"
    save_model(conv_model(cin=4, cout=8, kernel=(3, 3)), path)
    result = onnxq_cli("quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--format", "matmulnbits")
    assert result.returncode == 0, result.stderr
    assert "Conv is not supported by MatMulNBits; emitted as qdq" in result.stdout


def test_decoupleq_layer_log_on_digits(tmp_path):
    """--log writes one row per layer; decoupleQ never ends above RTN's H-weighted loss (it keeps, per
    channel, the better of the two), and on the digits MLP at 2 bits it is far below it."""
    data = Path(__file__).resolve().parents[1] / "onnxq" / "data"
    log = tmp_path / "layers.tsv"
    result = onnxq_cli("quantize", str(data / "digits_mlp.onnx"), "-o", str(tmp_path / "q.onnx"), "--method",
                       "decoupleq", "--bits", "2", "--calib", str(data / "digits_calib.npz"), "--log", str(log))
    assert result.returncode == 0, result.stderr
    assert "layer output error on the calibration data" in result.stdout and "not model quality" in result.stdout
    header, *rows = log.read_text().splitlines()
    assert header.split("\t") == ["layer", "op", "shape", "error", "loss_rtn", "loss_method", "ratio"]
    assert len(rows) == 3
    ratios = [float(row.split("\t")[-1]) for row in rows]
    assert all(r <= 1.0 + 1e-9 for r in ratios)
    assert min(ratios) < 0.5


def test_log_folder_missing_fails_before_work(model_path, tmp_path):
    result = onnxq_cli("quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "--log",
                       str(tmp_path / "no" / "log.tsv"))
    assert_one_line_error(result, "--log", "does not exist")
    assert not (tmp_path / "q.onnx").exists()


def test_summary_groups_many_skipped_nodes():
    from onnxq.ir.targets import Skipped
    from onnxq.passes.quantize import QuantizeSummary

    skipped = [Skipped(f"attn_{i}", "MatMul", "no constant weight input") for i in range(60)]
    lines = QuantizeSummary(skipped=[*skipped, Skipped("c", "Conv", "dynamic weight")]).lines()
    assert "skipped 60 MatMul nodes (no constant weight input): 'attn_0', 'attn_1', ..." in lines
    assert "skipped Conv 'c': dynamic weight" in lines
    assert sum(line.startswith("skipped") for line in lines) == 2


@pytest.mark.parametrize("flags, note", [
    ([], "sequential calibration: 3 layer groups, each layer fit to the float model's output"),
    (["--no-float-target"], "sequential calibration: 3 layer groups\n"),
    (["--no-sequential"], None),
])
def test_sequential_flags(tmp_path, flags, note):
    data = Path(__file__).resolve().parents[1] / "onnxq" / "data"
    result = onnxq_cli("quantize", str(data / "digits_mlp.onnx"), "-o", str(tmp_path / "q.onnx"), "--method",
                       "gptq", "--bits", "4", "--calib", str(data / "digits_calib.npz"), *flags)
    assert result.returncode == 0, result.stderr
    if note is None:
        assert "sequential calibration" not in result.stdout
    else:
        assert note in result.stdout
