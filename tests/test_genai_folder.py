"""``onnxq quantize GENAI_DIR -o OUT_DIR``: an onnxruntime-genai model folder in, a folder out (tiny graphs; the
onnxruntime-genai runs are in ``test_genai_generate.py``).

Facts checked: the decoder named by ``genai_config.json`` is quantized under its own name (with external data when
the input had it); every other file is copied byte for byte; the input folder's bytes are unchanged; the ``onnxq``
format gets the custom-op library inside the folder and named in the decoder's session options; refusals are one
line and leave nothing behind; an already quantized model gets "already quantized", not "no quantizable layers".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest
from graphs import matmul_model
from test_calib_sources import cli
from test_cli import assert_one_line_error, onnxq_cli

import onnxq.api as api
import onnxq.custom_ops as custom_ops
import onnxq.ir.genai_folder as genai_folder
from onnxq.errors import OnnxqError
from onnxq.ir.model import save_model

CONFIG = {"model": {"decoder": {"filename": "decoder.onnx", "session_options": {"provider_options": []}}}}


def folder_bytes(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def genai_dir(tmp_path: Path) -> Path:
    """A genai-like folder: config, a decoder with external data, a tokenizer and a file in a sub-folder."""
    folder = tmp_path / "genai"
    folder.mkdir()
    save_model(matmul_model(k=64, n=32), folder / "decoder.onnx", external_data=True)
    (folder / "genai_config.json").write_text(json.dumps(CONFIG, indent=4))
    (folder / "tokenizer.json").write_text('{"model": "not read by quantize"}')
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("copied as is\n")
    return folder


def test_folder_in_folder_out_copies_the_rest_and_never_touches_the_input(genai_dir, tmp_path):
    before = folder_bytes(genai_dir)
    out = tmp_path / "out"
    result = onnxq_cli("quantize", str(genai_dir), "-o", str(out), "--bits", "4", "--group-size", "32")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert folder_bytes(genai_dir) == before
    after = folder_bytes(out)
    assert sorted(after) == sorted(before)  # same names: decoder.onnx and its decoder.onnx.data too
    for name in ("genai_config.json", "tokenizer.json", "extra/notes.txt"):
        assert after[name] == before[name]
    assert after["decoder.onnx"] != before["decoder.onnx"]
    model = onnx.load(str(out / "decoder.onnx"))
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    assert not list(tmp_path.glob(".onnxq-*"))


def test_a_previous_output_is_replaced_whole(genai_dir, tmp_path):
    out = tmp_path / "out"
    api.quantize(genai_dir, out, bits=8)
    (out / "stale.txt").write_text("from an older run")
    api.quantize(genai_dir, out, bits=4)
    assert not (out / "stale.txt").exists()
    assert folder_bytes(out)["tokenizer.json"] == folder_bytes(genai_dir)["tokenizer.json"]


def test_onnxq_format_names_the_custom_op_library_inside_the_folder(genai_dir, tmp_path):
    out = tmp_path / "out"
    _, summary = api.quantize_with_summary(genai_dir, out, bits=2, group_size=32, format="onnxq")
    options = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    if not custom_ops.available("cpu"):
        assert "custom_ops_library" not in options
        assert any("gets no custom_ops_library" in note for note in summary.notes)
        return
    library = Path(custom_ops.library_path("cpu"))
    assert options == {"provider_options": [], "custom_ops_library": library.name}
    assert (out / library.name).read_bytes() == library.read_bytes()
    assert any("custom_ops_library = " + library.name in note for note in summary.notes)


@pytest.mark.parametrize("where", ["same", "inside", "parent", "file", "other"])
def test_output_folder_refusals_are_one_line_and_leave_nothing(genai_dir, tmp_path, where, capsys):
    out = {"same": genai_dir, "inside": genai_dir / "q", "parent": tmp_path, "file": tmp_path / "x.onnx",
           "other": tmp_path / "other"}[where]
    if where == "file":
        out.write_text("a file")
    if where == "other":
        out.mkdir()
        (out / "keep.txt").write_text("someone's file")
    before = folder_bytes(tmp_path)
    expected = {"same": "names the input folder", "inside": "inside the input folder",
                "parent": "holds the input folder", "file": "names a folder", "other": "neither empty nor"}[where]
    assert_one_line_error(cli(capsys, "quantize", str(genai_dir), "-o", str(out)), expected)
    assert folder_bytes(tmp_path) == before


def test_a_failed_write_leaves_no_folder(genai_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OnnxqError("disk full (simulated)")

    monkeypatch.setattr(genai_folder, "save_model", fail)
    with pytest.raises(OnnxqError, match="simulated"):
        api.quantize(genai_dir, tmp_path / "out", bits=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genai"]


def test_a_folder_without_genai_config_is_refused(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert_one_line_error(cli(capsys, "quantize", str(tmp_path / "m"), "-o", str(tmp_path / "o")),
                          "without genai_config.json")


@pytest.mark.parametrize("fmt, found", [("matmulnbits", "1 MatMulNBits"), ("qdq", "1 DequantizeLinear weights"),
                                        ("onnxq", "1 MatMulLowBit")])
def test_an_already_quantized_model_says_so(tmp_path, fmt, found, capsys):
    quantized = tmp_path / "q.onnx"
    api.quantize(matmul_model(k=64, n=32), quantized, bits=4, group_size=32, format=fmt)
    assert_one_line_error(cli(capsys, "quantize", str(quantized), "-o", str(tmp_path / "qq.onnx")),
                          f"already quantized ({found}); quantize the float model")


def test_calib_takes_a_genai_folder_for_its_decoder(genai_dir, tmp_path):
    by_folder, by_file = tmp_path / "a.npz", tmp_path / "b.npz"
    api.calibrate(genai_dir, by_folder, random=True, samples=2)
    api.calibrate(genai_dir / "decoder.onnx", by_file, random=True, samples=2)
    assert by_folder.read_bytes() == by_file.read_bytes()
