"""Adversarial inputs: every bad model, path or option ends in exactly one stderr line ``onnxq: error: ...``, a
non-zero exit and no traceback, with nothing left in the output folder or TMPDIR and the input files unchanged.

Most cases run ``onnxq.cli.main`` in-process (a subprocess costs ~1.5 s of imports); SIGTERM needs a real process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import matmul_model
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq import cli
from onnxq.errors import OnnxqError
from onnxq.ir.model import load_model, save_model
from onnxq.ir.paths import remove_stale_temps

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Workspace:
    inp: Path  # the input folder: model.onnx, victim.onnx + victim.onnx.data, calib.npz
    out: Path  # the output folder
    tmp: Path  # this test's TMPDIR

    @property
    def model(self) -> str:
        return str(self.inp / "model.onnx")

    @property
    def victim(self) -> str:
        return str(self.inp / "victim.onnx")

    @property
    def calib(self) -> str:
        return str(self.inp / "calib.npz")

    def o(self, name: str = "q.onnx") -> str:
        return str(self.out / name)

    def tmp_leftovers(self) -> list[str]:
        """What is in TMPDIR, but ``.ses``: onnxruntime's import writes that session-id file there itself."""
        return [p.name for p in self.tmp.iterdir() if p.name != ".ses"]


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Workspace:
    space = Workspace(tmp_path / "in", tmp_path / "out", tmp_path / "tmp")
    for folder in (space.inp, space.out, space.tmp):
        folder.mkdir()
    save_model(matmul_model(k=64, n=32), space.model)
    save_model(matmul_model(k=64, n=32, seed=1), space.victim, external_data=True)
    np.savez(space.calib, x=np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32))
    monkeypatch.setenv("TMPDIR", str(space.tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(space.tmp))
    monkeypatch.chdir(tmp_path)
    return space


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry below ``folder``: sha256 of regular files, link targets, the kind of anything else."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "link:" + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = stat.filemode(path.lstat().st_mode)
    return out


def run_main(args: list[str]) -> tuple[int, str, str]:
    """``onnxq.cli.main(args)`` in-process: (exit status, stdout, stderr); any escaping exception fails the test."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = cli.main(args)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    return code, stdout.getvalue(), stderr.getvalue()


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> str:
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnxq: error: ") and "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- inputs made for single cases


def with_location(ws: Workspace, name: str, location: str, folder: Path | None = None) -> str:
    """A copy of victim.onnx (in ``folder``, default the input folder) whose external data sits at ``location``."""
    model = onnx.load(ws.victim, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path = (folder or ws.inp) / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return str(path)


def linked_out(ws: Workspace) -> str:
    """A model in in/sub whose data file in/sub/l.data is a symlink to in/victim.onnx.data (outside in/sub)."""
    (ws.inp / "sub").mkdir()
    symlink(ws.inp / "sub" / "l.data", ws.inp / "victim.onnx.data")
    return with_location(ws, "link.onnx", "l.data", ws.inp / "sub")


def truncated_data(ws: Workspace) -> str:
    data = ws.inp / "cut.onnx.data"
    data.write_bytes((ws.inp / "victim.onnx.data").read_bytes()[:100])
    return with_location(ws, "cut.onnx", "cut.onnx.data")


def failing_reshape_model(ws: Workspace) -> str:
    """Reshape to [3, -1, 64] (fails in ORT for any batch), Relu, MatMul: weights quantize, calibration cannot run."""
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r0"]), helper.make_node("Relu", ["r0"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"),
                               numpy_helper.from_array(np.array([3, -1, 64], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = ws.inp / "reshape.onnx"
    save_model(model, path)
    return str(path)


def relu_only(ws: Workspace) -> str:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = ws.inp / "relu.onnx"
    save_model(helper.make_model(graph), path)
    return str(path)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def symlink(link: Path, target: str | Path) -> str:
    link.symlink_to(target)
    return str(link)


def hardlink(link: Path, target: str) -> str:
    os.link(target, link)
    return str(link)


def fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


def folder(path: Path) -> str:
    path.mkdir()
    return str(path)


def q(ws: Workspace, model: str, *args: str) -> list[str]:
    return ["quantize", model, "-o", ws.o(), *args]


# (id, args built in the workspace, fragments of the one error line)
Case = tuple[str, Callable[[Workspace], list[str]], tuple[str, ...]]
CASES: list[Case] = [
    # --- the input model
    ("missing-model", lambda ws: q(ws, str(ws.inp / "nope.onnx")), ("nope.onnx", "no such file")),
    ("empty-file", lambda ws: q(ws, write(ws.inp / "empty.onnx", b"")), ("empty.onnx", "no graph")),
    ("directory-as-model", lambda ws: q(ws, str(ws.inp)), ("is a directory",)),
    ("truncated-protobuf",
     lambda ws: q(ws, write(ws.inp / "cut.onnx", Path(ws.model).read_bytes()[:3000])), ("cut.onnx", "truncated")),
    ("text-file", lambda ws: q(ws, write(ws.inp / "notes.onnx", b"not a model\n" * 20)), ("notes.onnx", "not ONNX")),
    ("fifo-as-model", lambda ws: q(ws, fifo(ws.inp / "pipe.onnx")), ("pipe.onnx", "not a regular file")),
    ("no-quantizable-layers", lambda ws: q(ws, relu_only(ws)), ("no quantizable layers",)),
    ("inspect-missing", lambda ws: ["inspect", str(ws.inp / "nope.onnx")], ("no such file",)),
    # --- external data
    ("external-data-missing", lambda ws: q(ws, with_location(ws, "gone.onnx", "gone.onnx.data")),
     ("gone.onnx.data", "missing")),
    ("external-data-parent", lambda ws: q(ws, with_location(ws, "trav.onnx", "../victim.onnx.data", ws.inp / "sub")),
     ("external data '../victim.onnx.data'", "tensor 'w'", "outside the model folder")),
    ("external-data-absolute", lambda ws: q(ws, with_location(ws, "abs.onnx", str(ws.inp / "victim.onnx.data"))),
     ("external data '/", "outside the model folder")),
    ("external-data-symlink-out", lambda ws: q(ws, linked_out(ws)), ("external data 'l.data'", "outside the model")),
    ("external-data-truncated", lambda ws: q(ws, truncated_data(ws)), ("cut.onnx.data", "truncated")),
    ("external-data-no-location", lambda ws: q(ws, with_location(ws, "noloc.onnx", "")), ("has no location",)),
    ("external-data-is-a-folder", lambda ws: q(ws, with_location(ws, "dir.onnx", Path(folder(ws.inp / "d")).name)),
     ("'d'", "not a file")),
    ("inspect-external-outside", lambda ws: ["inspect", with_location(ws, "abs.onnx", "/etc/hostname")],
     ("outside the model folder",)),
    # --- -o
    ("output-equals-input", lambda ws: ["quantize", ws.model, "-o", ws.model], ("equals the input",)),
    ("output-equals-input-relative", lambda ws: ["quantize", ws.model, "-o", "out/../in/model.onnx"],
     ("equals the input",)),
    ("output-symlink-to-input", lambda ws: ["quantize", ws.model, "-o", symlink(ws.out / "q.onnx", ws.model)],
     ("equals the input",)),
    ("output-hardlink-to-input", lambda ws: ["quantize", ws.model, "-o", hardlink(ws.out / "q.onnx", ws.model)],
     ("equals the input",)),
    ("output-is-input-data", lambda ws: ["quantize", ws.victim, "-o", ws.victim + ".data"],
     ("victim.onnx.data", "equals the input")),
    ("output-data-is-input-data", lambda ws: ["quantize", with_location(ws, "a.onnx", "victim.onnx.data"), "-o",
                                              str(ws.out / ".." / "in" / "victim.onnx")],
     ("victim.onnx.data", "would replace the input file")),
    ("output-is-calibration",
     lambda ws: ["quantize", ws.model, "-o", ws.calib, "--method", "gptq", "--calib", ws.calib],
     ("calib.npz", "equals the input")),
    ("output-is-directory", lambda ws: ["quantize", ws.model, "-o", str(ws.out)], ("is a directory",)),
    ("output-is-fifo", lambda ws: ["quantize", ws.model, "-o", fifo(ws.out / "pipe")], ("not a regular file",)),
    ("output-is-device", lambda ws: ["quantize", ws.model, "-o", symlink(ws.out / "null", os.devnull)],
     ("not a regular file",)),
    ("output-folder-missing", lambda ws: ["quantize", ws.model, "-o", str(ws.out / "no" / "q.onnx")],
     ("does not exist",)),
    ("split-output-equals-input", lambda ws: ["split", ws.model, "-o", ws.model], ("equals the input",)),
    # --- --log
    ("log-is-directory", lambda ws: q(ws, ws.model, "--log", folder(ws.out / "logs")), ("--log", "is a directory")),
    ("log-folder-missing", lambda ws: q(ws, ws.model, "--log", str(ws.out / "no" / "l.tsv")),
     ("--log", "does not exist")),
    ("log-equals-output", lambda ws: q(ws, ws.model, "--log", ws.o()), ("--log and -o", "same file")),
    ("log-equals-input", lambda ws: q(ws, ws.model, "--log", ws.model), ("--log", "equals the input")),
    ("log-is-fifo", lambda ws: q(ws, ws.model, "--log", fifo(ws.out / "pipe")), ("--log", "not a regular file")),
    # --- options
    ("bits-1", lambda ws: q(ws, ws.model, "--bits", "1"), ("--bits 1",)),
    ("bits-5", lambda ws: q(ws, ws.model, "--bits", "5"), ("--bits 5",)),
    ("bits-not-a-number", lambda ws: q(ws, ws.model, "--bits", "four"), ("--bits", "invalid int value")),
    ("group-size-0", lambda ws: q(ws, ws.model, "--group-size", "0"), ("--group-size 0",)),
    ("group-size-1", lambda ws: q(ws, ws.model, "--group-size", "1"), ("--group-size 1",)),
    ("unknown-format", lambda ws: q(ws, ws.model, "--format", "gguf"), ("--format", "gguf")),
    ("unknown-command", lambda ws: ["frobnicate", ws.model], ("frobnicate",)),
    ("op-types-unknown", lambda ws: q(ws, ws.model, "--op-types", "Foo"), ("--op-types Foo",)),
    ("include-bad-regex", lambda ws: q(ws, ws.model, "--include", "("), ("--include '('", "regular expression")),
    ("exclude-bad-regex", lambda ws: q(ws, ws.model, "--exclude", "[a-"), ("--exclude '[a-'", "regular expression")),
    ("max-memory-negative", lambda ws: q(ws, ws.model, "--method", "gptq", "--calib", ws.calib, "--max-memory", "-1"),
     ("--max-memory", "positive")),
    ("max-memory-zero", lambda ws: q(ws, ws.model, "--method", "gptq", "--calib", ws.calib, "--max-memory", "0"),
     ("--max-memory",)),
    ("max-memory-nan", lambda ws: q(ws, ws.model, "--max-memory", "nan"), ("--max-memory", "finite")),
    ("damp-zero", lambda ws: q(ws, ws.model, "--method", "gptq", "--calib", ws.calib, "--damp", "0"), ("--damp",)),
    ("damp-nan", lambda ws: q(ws, ws.model, "--method", "gptq", "--calib", ws.calib, "--damp", "nan"), ("--damp",)),
    ("iters-negative", lambda ws: q(ws, ws.model, "--method", "decoupleq", "--calib", ws.calib, "--iters", "-1"),
     ("--iters",)),
    ("seed-negative", lambda ws: q(ws, ws.model, "--seed", "-3"), ("--seed -3",)),
    ("decoupleq-sym", lambda ws: q(ws, ws.model, "--method", "decoupleq", "--calib", ws.calib, "--sym"),
     ("--sym", "float zero", "--method gptq")),
    ("decoupleq-zero-integer",
     lambda ws: q(ws, ws.model, "--method", "decoupleq", "--calib", ws.calib, "--zero", "integer"),
     ("--zero integer", "--method gptq")),
    ("sym-with-float-zero", lambda ws: q(ws, ws.model, "--sym", "--zero", "float"), ("--sym", "--zero float")),
    ("rtn-act-order", lambda ws: q(ws, ws.model, "--act-order"), ("--act-order", "rtn")),
    ("rtn-damp", lambda ws: q(ws, ws.model, "--damp", "0.1"), ("--damp", "rtn")),
    ("gptq-iters", lambda ws: q(ws, ws.model, "--method", "gptq", "--calib", ws.calib, "--iters", "8"),
     ("--iters", "decoupleq")),
    ("rtn-round-train", lambda ws: q(ws, ws.model, "--round", "train"), ("--round", "decoupleq")),
    ("gptq-clip-search", lambda ws: q(ws, ws.model, "--method", "gptq", "--calib", ws.calib, "--clip-search"),
     ("--clip-search",)),
    ("accuracy-level-with-qdq", lambda ws: q(ws, ws.model, "--format", "qdq", "--accuracy-level", "4"),
     ("--accuracy-level", "matmulnbits")),
    ("split-activations-without-split",
     lambda ws: q(ws, ws.model, "--split-activations", "--calib", ws.calib), ("--split-activations", "--split")),
    ("method-needs-calibration", lambda ws: q(ws, ws.model, "--method", "gptq"), ("calibration",)),
    # --- calibration data
    ("calib-missing", lambda ws: q(ws, ws.model, "--method", "gptq", "--calib", str(ws.inp / "none.npz")),
     ("none.npz", "not found")),
    ("calib-not-npz", lambda ws: q(ws, ws.model, "--method", "gptq", "--calib", write(ws.inp / "c.npz", b"hello")),
     ("c.npz", "not a readable .npz")),
    ("calib-empty-folder", lambda ws: q(ws, ws.model, "--method", "gptq", "--calib", folder(ws.inp / "cal")),
     ("no .npz files",)),
    ("calib-wrong-name", lambda ws: q(ws, ws.model, "--method", "gptq", "--calib",
                                      npz(ws.inp / "c.npz", y=np.ones((4, 64), np.float32))), ("'x' is missing",)),
    ("calib-wrong-shape", lambda ws: q(ws, ws.model, "--method", "gptq", "--calib",
                                       npz(ws.inp / "c.npz", x=np.ones((4, 65), np.float32))), ("shape (4, 65)",)),
    ("calib-wrong-dtype", lambda ws: q(ws, ws.model, "--method", "gptq", "--calib",
                                       npz(ws.inp / "c.npz", x=np.ones((4, 64), np.int64))), ("dtype int64",)),
    ("act-bits-ort-failure", lambda ws: q(ws, failing_reshape_model(ws), "--act-bits", "8", "--calib", ws.calib),
     ("ONNX Runtime failed",)),
    ("split-activations-ort-failure",
     lambda ws: q(ws, failing_reshape_model(ws), "--split", "--split-activations", "--calib", ws.calib),
     ("ONNX Runtime failed",)),
    ("split-command-ort-failure",
     lambda ws: ["split", failing_reshape_model(ws), "-o", ws.o(), "--activations", "--calib", ws.calib],
     ("ONNX Runtime failed",)),
    ("split-activations-need-calib", lambda ws: ["split", ws.model, "-o", ws.o(), "--activations"], ("--calib",)),
]


@pytest.mark.parametrize("build, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_no_trace(ws, build, fragments):
    args = build(ws)
    inputs, outputs = snapshot(ws.inp), snapshot(ws.out)
    code, _, stderr = run_main(args)
    assert_one_line_error(code, stderr, *fragments)
    assert snapshot(ws.inp) == inputs, "the input files changed"
    assert snapshot(ws.out) == outputs, "something was left in the output folder"
    assert not ws.tmp_leftovers(), "something was left in TMPDIR"


def test_unwritable_output_folder(ws):
    if os.geteuid() == 0:
        target = Path("/sys")  # root writes anywhere else; sysfs refuses new files
    else:
        target = ws.out / "ro"
        target.mkdir()
        target.chmod(0o500)
    inputs = snapshot(ws.inp)
    code, _, stderr = run_main(["quantize", ws.model, "-o", str(target / "q.onnx")])
    assert_one_line_error(code, stderr, str(target))
    assert snapshot(ws.inp) == inputs and not (target / "q.onnx").exists()


# ----------------------------------------------------------------------------- the Python API's argument types


@pytest.mark.parametrize("options, fragment", [
    ({"bits": 8.0}, "--bits must be an integer"),
    ({"bits": True}, "--bits must be an integer"),
    ({"bits": np.int64(4)}, "--bits must be an integer (Python int), got int64"),
    ({"group_size": np.ones((40, 40))}, "--group-size must be an integer (Python int), got ndarray array([[1., 1."),
    ({"group_size": None}, "--group-size must be an integer"),
    ({"group_size": "64"}, "--group-size must be an integer"),
    ({"iters": "4"}, "--iters must be an integer"),
    ({"symmetric": 1}, "--sym must be True or False"),
    ({"clip_search": "yes"}, "--clip-search must be True or False"),
    ({"damp": math.nan, "method": "gptq", "calibration": {"x": np.ones((4, 64), np.float32)}}, "--damp nan"),
    ({"damp": "0.01"}, "--damp must be a number"),
    ({"max_memory": -1}, "--max-memory must be positive"),
    ({"max_memory": 1.5}, "--max-memory must be an integer (Python int) or None"),
    ({"op_types": "MatMul"}, "--op-types must be a tuple of strings"),
    ({"calibration": 3}, "--calib must be a path"),
    ({"accuracy_level": True}, "--accuracy-level must be an integer"),
    ({"act_bits": 8.0}, "--act-bits must be an integer (Python int) or None"),
    ({"seed": 1.5}, "--seed must be an integer"),
    ({"include": 3}, "--include must be a string or None"),
    ({"format": None}, "--format must be a string"),
    ({"zero_convention": "zero"}, "--zero zero is unknown"),
])
def test_api_argument_types(ws, options, fragment):
    inputs = snapshot(ws.inp)
    with pytest.raises(OnnxqError) as info:
        onnxq.quantize(ws.model, ws.o(), **options)
    message = str(info.value)
    assert "\n" not in message and fragment in message, message
    assert snapshot(ws.inp) == inputs and not list(ws.out.iterdir())


@pytest.mark.parametrize("options", [
    {"method": "decoupleq"}, {"method": "decoupleq", "zero_convention": "float", "act_order": True},
    {"method": "gptq", "symmetric": True, "act_order": True, "zero_convention": "integer"},
    {"method": "gptq", "act_order": True, "zero_convention": "float", "max_memory": 1 << 30},
    {"method": "rtn", "clip_search": True, "symmetric": True, "bits": 4, "damp": 0.01, "iters": 4},
])
def test_api_defaults_are_never_refused(ws, options):
    """Options left at (or set to) their defaults never trigger a refusal, whatever the method."""
    needs_calib = options["method"] != "rtn"
    onnxq.quantize(ws.model, ws.o(), bits=options.pop("bits", 2), group_size=32,
                   calibration=ws.calib if needs_calib else None, **options)
    assert Path(ws.o()).is_file()


# ----------------------------------------------------------------------------- honoured inputs and notes


def test_external_data_symlink_inside_the_folder_is_honoured(ws):
    (ws.inp / "store").mkdir()
    (ws.inp / "victim.onnx.data").rename(ws.inp / "store" / "weights.bin")
    symlink(ws.inp / "w.data", "store/weights.bin")
    path = with_location(ws, "linked.onnx", "w.data")
    code, stdout, stderr = run_main(["quantize", path, "-o", ws.o()])
    assert code == 0, stderr
    assert "quantized 1 layers" in stdout


def test_external_data_without_length_reads_the_tensor_bytes(ws):
    """Without a ``length`` entry a tensor reads its own size from its offset (not the rest of a shared file)."""
    model = onnx.load(ws.victim, load_external_data=False)
    entries = model.graph.initializer[0].external_data
    kept = [(e.key, e.value) for e in entries if e.key != "length"]
    del entries[:]
    for key, value in kept:
        entries.add(key=key, value=value)
    with (ws.inp / "victim.onnx.data").open("ab") as data:
        data.write(b"trailing bytes of another tensor")
    path = ws.inp / "nolength.onnx"
    path.write_bytes(model.SerializeToString())
    loaded = load_model(path)
    expected = numpy_helper.to_array(matmul_model(k=64, n=32, seed=1).graph.initializer[0])
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), expected)


def test_inspect_does_not_read_external_data(ws, monkeypatch):
    import onnxq.ir.model

    def refuse(*_):
        raise AssertionError("inspect read the external data")

    monkeypatch.setattr(onnxq.ir.model, "load_external_data", refuse)
    monkeypatch.setattr(onnxq.api, "load_external_data", refuse)
    report = onnxq.inspect(ws.victim)
    assert report.total_bytes == 64 * 32 * 4 and report.rows[0].shape == (32, 64)


def test_inspect_survives_empty_weights_and_malformed_nodes(ws):
    """A 64x0 weight (listed as skipped, with the reason) and a MatMulNBits without its N/K attributes (passed over)
    never crash inspect."""
    w = numpy_helper.from_array(np.zeros((64, 0), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="empty"),
             helper.make_node("MatMulNBits", ["x", "w"], ["z"], name="broken", domain="com.microsoft")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 0])], [w])
    path = ws.inp / "odd.onnx"
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code, stdout, stderr = run_main(["inspect", str(path)])
    assert code == 0 and not stderr, stderr
    assert "skipped MatMul 'empty': weight 'w' is empty (shape [64, 0])" in stdout


def test_format_onnxq_without_library_notes_it(ws, monkeypatch):
    monkeypatch.setenv("ONNXQ_CUSTOM_OPS_LIBRARY", str(ws.inp / "missing.so"))
    code, stdout, stderr = run_main(["quantize", ws.model, "-o", ws.o(), "--format", "onnxq"])
    assert code == 0, stderr
    note = next(line for line in stdout.splitlines() if "custom-op library" in line)
    assert note.startswith("note: ") and "missing.so" in note and "fetch_ort_headers.py" in note
    assert any(n.op_type == "MatMulLowBit" for n in onnx.load(ws.o()).graph.node)  # still written, still valid


def test_format_onnxq_with_library_has_no_note(ws):
    if not onnxq.custom_ops.available():
        pytest.skip("the custom-op library is not built here")
    code, stdout, _ = run_main(["quantize", ws.model, "-o", ws.o(), "--format", "onnxq"])
    assert code == 0 and "custom-op library" not in stdout


# ----------------------------------------------------------------------------- interrupted runs


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temp_folders_of_dead_runs_are_removed(ws):
    dead = ws.out / f".onnxq-{dead_pid()}-abc_1234"
    (dead / "inner").mkdir(parents=True)
    (dead / "q.onnx").write_bytes(b"partial")
    dead_file = ws.out / f".onnxq-{dead_pid()}-zz99zz99"
    dead_file.write_text("partial log")
    alive = ws.out / f".onnxq-{os.getppid()}-abcdefgh"  # a live process (pytest's parent)
    other = ws.out / ".onnxq-notapid-abcdefgh"
    unrelated = ws.out / f".onnxq-{dead_pid()}-toolongname"
    for keep in (alive, other, unrelated):
        keep.mkdir()
    code, _, stderr = run_main(["quantize", ws.model, "-o", ws.o()])
    assert code == 0, stderr
    assert sorted(p.name for p in ws.out.iterdir()) == sorted([alive.name, other.name, unrelated.name, "q.onnx"])
    assert remove_stale_temps(ws.out) == []


def test_stale_run_folders_in_tmpdir_are_removed(ws):
    dead = ws.tmp / f"onnxq-{dead_pid()}-abcd1234"
    (dead / "onnxq-calib-xyz").mkdir(parents=True)
    (dead / "onnxq-calib-xyz" / "weights.data").write_bytes(b"weights")
    other = ws.tmp / "onnxq-calib-abcdefgh"  # not a run folder: left alone
    other.mkdir()
    code, _, stderr = run_main(["quantize", ws.model, "-o", ws.o()])
    assert code == 0, stderr
    assert ws.tmp_leftovers() == [other.name]


def test_temp_names_carry_the_pid(ws, monkeypatch):
    seen = []
    real = tempfile.mkdtemp

    def spy(*args, **kwargs):
        path = real(*args, **kwargs)
        seen.append(Path(path).name)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    save_model(matmul_model(k=64, n=32), ws.o())
    assert seen and all(name.startswith(f".onnxq-{os.getpid()}-") for name in seen)


def slow_model(ws: Workspace) -> tuple[str, str]:
    """A model and calibration set that keep decoupleQ busy for several seconds: four 768-wide layers (each solved
    as row tasks on the worker processes; a small model's rows stop improving after a few iterations)."""
    rng = np.random.default_rng(0)
    width, nodes, inits, current = 768, [], [], "x"
    for i in range(4):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
                                             f"W{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        current = f"h{i}"
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["b", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime 1.31 loads
    path = ws.inp / "slow.onnx"
    save_model(model, path)
    calib = npz(ws.inp / "slow_calib.npz", x=rng.standard_normal((2048, width)).astype(np.float32))
    return str(path), calib


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_temp_files(ws, sig):
    model, calib = slow_model(ws)
    inputs = snapshot(ws.inp)
    env = {**os.environ, "TMPDIR": str(ws.tmp), "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen([sys.executable, "-m", "onnxq", "quantize", model, "-o", ws.o(), "--method",
                                "decoupleq", "--bits", "2", "--group-size", "-1", "--iters", "50", "--calib", calib],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    # child (a shell's background job, e.g. `pytest &`, ignores SIGINT, and its children inherit that)
    deadline = time.monotonic() + 120
    while not list(ws.tmp.glob("onnxq-*/onnxq-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # until calibration has its temp folder (a weight copy) inside the run's temp folder
    assert process.poll() is None, "finished before it could be interrupted"
    process.send_signal(sig)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack on stderr
        pytest.fail(f"still running 120 s after {signal.Signals(sig).name}:\n{process.communicate()[1][-4000:]}")
    assert process.returncode == 128 + sig, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"onnxq: error: interrupted ({signal.Signals(sig).name})"), stderr
    assert not ws.tmp_leftovers() and not list(ws.out.iterdir())
    assert snapshot(ws.inp) == inputs
