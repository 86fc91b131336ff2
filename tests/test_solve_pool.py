"""Parallel solving (``--workers``): the same bytes as one process, refusals name the node, a dead worker is an
error, and a layer's rows may be split into tasks without changing its result."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import onnxq
from onnxq import solve_pool
from onnxq.errors import OnnxqError
from onnxq.solve_pool import SolvePool, SolveTaskError
from onnxq.solvers.base import ROWS_PER_TASK, DecoupleqParams, GptqParams, LayerStats, plan, solve
from onnxq.solvers.hessian import prepare_hessian
from tests.test_adversarial import Workspace, slow_model
from tests.test_solver_decoupleq import correlated_problem

DATA = Path(onnxq.__file__).parent / "data"


@pytest.mark.parametrize("method", ["decoupleq", "gptq"])
def test_workers_give_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    monkeypatch.setattr(solve_pool, "PARALLEL_WORK", 0)  # the digits layers are small: use the workers anyway
    monkeypatch.setattr(solve_pool, "SHARE_BYTES", 1)  # and send every array through shared memory
    digests = []
    for workers in (1, 2):
        out = tmp_path / f"{method}_{workers}.onnx"
        onnxq.quantize(DATA / "digits_mlp.onnx", out, method=method, bits=2, group_size=32, workers=workers,
                       calibration=str(DATA / "digits_calib.npz"), progress=False)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_shared_arrays_arrive_equal_read_only_and_leave_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task's large arrays travel as references to one shared-memory copy: equal on arrival, read-only (a solver
    writing into H would fail loudly), written once however often they are sent, and removed by close()."""
    import io

    monkeypatch.setattr(solve_pool, "SHARE_BYTES", 1024)
    big, small = np.arange(4096, dtype=np.float64).reshape(64, 64), np.ones(3)
    row = big[3:5]  # a view of 1 KiB: shared on its own
    shared = solve_pool.SharedArrays()
    stream = io.BytesIO()
    for _ in range(2):
        solve_pool.send(stream, {"h": big, "again": big, "row": row, "small": small}, shared)
    assert len(list(shared.folder.iterdir())) == 2  # big once, its row view once; small went through the pipe
    stream.seek(0)
    for _ in range(2):
        got = solve_pool.receive(stream)
        assert np.array_equal(got["h"], big) and np.array_equal(got["row"], big[3:5])
        assert np.array_equal(got["small"], small) and got["small"].flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            got["h"][0, 0] = 1.0
    shared.close()
    assert not shared.folder.exists()


def test_rows_split_into_tasks_give_the_rows_solved_alone() -> None:
    weight, hessian = correlated_problem(n=ROWS_PER_TASK + 40, k=64, seed=3)
    stats = LayerStats((prepare_hessian(hessian, act_order=True),), (None,))
    params = DecoupleqParams(bits=2, group_size=32, iters=2)
    tasks = plan(weight, params, stats, None)
    assert len(tasks) == 2 and all(t.rows <= ROWS_PER_TASK for t in tasks)
    whole, _ = solve(weight, params, stats)
    head, _ = solve(weight[:40], params, stats)
    assert np.array_equal(whole.codes[:40], head.codes)
    np.testing.assert_allclose(whole.scales[:40], head.scales, rtol=1e-6)


def test_a_refusal_in_a_worker_names_its_task() -> None:
    weight, hessian = correlated_problem(n=8, k=32, seed=1)
    stats = LayerStats((prepare_hessian(hessian),), (None,))
    good = plan(weight, GptqParams(bits=2, group_size=16), stats, None)
    bad = plan(weight, DecoupleqParams(bits=2, group_size=16, iters=-1), stats, None)
    with SolvePool(2) as pool, pytest.MonkeyPatch.context() as patch:
        patch.setattr(solve_pool, "PARALLEL_WORK", 0)
        with pytest.raises(SolveTaskError, match="iters must be >= 0") as info:
            pool.run(good + bad)
    assert info.value.index == len(good)


def test_a_dead_worker_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(solve_pool, "PARALLEL_WORK", 0)
    weight, hessian = correlated_problem(n=8, k=32, seed=2)
    tasks = plan(weight, GptqParams(bits=2, group_size=16), LayerStats((prepare_hessian(hessian),), (None,)), None)
    with SolvePool(2) as pool:
        first = pool.run(tasks * 2)
        for process in pool._processes:
            process.kill()
            process.wait()
        with pytest.raises(OnnxqError, match="solver process died"):
            pool.run(tasks * 2)
    assert len(first) == 2 * len(tasks)


def test_workers_out_of_range_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError, match="--workers 0 is out of range"):
        onnxq.quantize(DATA / "digits_mlp.onnx", tmp_path / "out.onnx", method="decoupleq", bits=2, workers=0,
                       calibration=str(DATA / "digits_calib.npz"), progress=False)
    assert not (tmp_path / "out.onnx").exists()


def _workers_of(pid: int) -> list[int]:
    """Pids of the solver worker processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"onnxq.solve_worker" in command:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_ctrl_c_while_workers_solve_stops_them(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "in", tmp_path / "out", tmp_path / "tmp")
    for folder in (ws.inp, ws.out, ws.tmp):
        folder.mkdir()
    model, calib = slow_model(ws)
    process = subprocess.Popen([sys.executable, "-m", "onnxq", "quantize", model, "-o", str(ws.out / "q.onnx"),
                                "--method", "decoupleq", "--bits", "2", "--iters", "50", "--calib", calib,
                                "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a terminal's child
    deadline = time.monotonic() + 120
    while not _workers_of(process.pid) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _workers_of(process.pid)
    assert workers and process.poll() is None, "the run ended before its workers started"
    time.sleep(0.5)  # inside a group's tasks
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert stderr.strip().startswith("onnxq: error: interrupted (SIGINT)"), stderr
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert not list(ws.out.iterdir())
