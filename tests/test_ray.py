"""``--ray``: data-parallel sequential calibration gives the same bytes as one process, a killed actor is one clear
error with nothing written, and a two-node cluster (``ray start --head`` plus ``ray start --address``) works.
Every cluster here listens on 127.0.0.1 and is stopped by the test that started it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Ray resolves 127.0.0.1 to the machine's own interface address unless its "single machine" switch is set: every
# cluster of these tests (and its children, which inherit this) listens on the loopback address only
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnxq[ray]')")

import onnxq  # noqa: E402
from onnxq.calibration import distributed  # noqa: E402
from onnxq.calibration.shards import LOCAL_CLUSTER  # noqa: E402
from onnxq.demo import data_path  # noqa: E402
from onnxq.errors import OnnxqError  # noqa: E402
from onnxq.solve_pool import SolvePool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB = {"method": "decoupleq", "bits": 2, "group_size": 16, "progress": False}  # the digits layers are 64 wide


def temporary_folders() -> set[Path]:
    """onnxq's temporary folders (the actors run on this machine and share its temporary directory)."""
    return set(Path(tempfile.gettempdir()).glob("onnxq-*"))


def remove_the_killed_actors_folder(before: set[Path]) -> None:
    """Only the killed actor (SIGKILL: no clean-up possible) left a folder; the test removes it."""
    left = temporary_folders() - before
    assert len(left) <= 1, left
    for folder in left:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def cluster():
    """A local 2-CPU Ray cluster on 127.0.0.1 for this module (onnxq's own start rule), shut down at the end."""
    assert not ray.is_initialized()
    distributed.connect(ray, LOCAL_CLUSTER, 2)
    yield
    ray.shutdown()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_two_actors_give_the_local_bytes(cluster, name, monkeypatch):
    """Calibration and the layers' solves both on the actors (no local solve process) give the local bytes."""
    model, calib = data_path(f"digits_{name}.onnx"), data_path("digits_calib.npz")
    local = onnxq.quantize(model, calibration=calib, **JOB)
    solved_on_actors = []
    run = distributed.DistributedCalibration.run

    def counted(self, tasks):
        solved_on_actors.extend(tasks)
        return run(self, tasks)

    monkeypatch.setattr(distributed.DistributedCalibration, "run", counted)
    monkeypatch.setattr(SolvePool, "run", lambda self, tasks: pytest.fail("a local solve in a --ray run"))
    before = temporary_folders()
    remote, summary = onnxq.quantize_with_summary(model, calibration=calib, ray="auto", ray_workers=2, **JOB)
    assert temporary_folders() <= before  # the actors removed their files
    assert len(solved_on_actors) >= len(summary.layers) > 0  # every layer's rows went to an actor
    assert any("calibration on Ray: 2 actors, 8 shards of 16 batches" in note for note in summary.notes)
    assert remote.SerializeToString() == local.SerializeToString()
    assert ray.util.list_named_actors() == []  # every actor was killed


def test_a_killed_actor_is_one_clear_error_and_nothing_written(cluster, tmp_path, monkeypatch):
    """Actor 2's process is killed (SIGKILL) before layer group 2: the run stops with the actor, its host and pid and
    the group named, writes no output and leaves no actor behind."""
    step = distributed.DistributedCalibration.step

    def kill_then_step(self, index):
        if index == 1:
            os.kill(ray.get(self.actors[1].pid.remote()), signal.SIGKILL)
        return step(self, index)

    monkeypatch.setattr(distributed.DistributedCalibration, "step", kill_then_step)
    output = tmp_path / "out.onnx"
    start = time.perf_counter()
    before = temporary_folders()
    with pytest.raises(OnnxqError, match=r"Ray actor 2 of 2 \(.+:\d+ node \w+\) failed at layer group 2 of \d+: .*Actor"
                                         r".*nothing written"):
        onnxq.quantize(data_path("digits_mlp.onnx"), output, calibration=data_path("digits_calib.npz"), ray="auto",
                       ray_workers=2, **JOB)
    assert time.perf_counter() - start < 120
    assert list(tmp_path.iterdir()) == []
    assert ray.util.list_named_actors() == []
    remove_the_killed_actors_folder(before)


def test_an_actor_killed_before_solving_is_one_clear_error(cluster, tmp_path, monkeypatch):
    """Actor 2 dies between calibrating and solving the first group: one error naming it and the solve, no output."""
    run = distributed.DistributedCalibration.run

    def kill_then_run(self, tasks):
        os.kill(ray.get(self.actors[1].pid.remote()), signal.SIGKILL)
        time.sleep(1)
        return run(self, tasks + tasks)  # at least one task reaches actor 2

    monkeypatch.setattr(distributed.DistributedCalibration, "run", kill_then_run)
    output = tmp_path / "out.onnx"
    before = temporary_folders()
    with pytest.raises(OnnxqError, match=r"Ray actor 2 of 2 \(.+:\d+ node \w+\) failed at solving layer group 1 of "
                                         r"\d+: .*Actor.*nothing written"):
        onnxq.quantize(data_path("digits_mlp.onnx"), output, calibration=data_path("digits_calib.npz"), ray="auto",
                       ray_workers=2, **JOB)
    assert list(tmp_path.iterdir()) == []
    assert ray.util.list_named_actors() == []
    remove_the_killed_actors_folder(before)


def test_refusals_need_no_cluster():
    with pytest.raises(OnnxqError, match="--ray distributes the calibration of --method gptq/decoupleq"):
        onnxq.quantize(data_path("digits_mlp.onnx"), ray="auto")
    with pytest.raises(OnnxqError, match="drop --no-sequential or --ray"):
        onnxq.quantize(data_path("digits_mlp.onnx"), calibration=data_path("digits_calib.npz"), ray="auto",
                       sequential=False, **JOB)
    with pytest.raises(OnnxqError, match="--ray-workers works with --ray only"):
        onnxq.quantize(data_path("digits_mlp.onnx"), ray_workers=2)
    with pytest.raises(OnnxqError, match="with --ray the Ray actors solve the layers: drop --workers"):
        onnxq.quantize(data_path("digits_mlp.onnx"), calibration=data_path("digits_calib.npz"), ray="auto", workers=2,
                       **JOB)
    with pytest.raises(OnnxqError, match="--calib-shards orders the sums of sequential calibration"):
        onnxq.quantize(data_path("digits_mlp.onnx"), calib_shards=2)
    with pytest.raises(OnnxqError, match="--calib-shards 0 is out of range"):
        onnxq.quantize(data_path("digits_mlp.onnx"), calibration=data_path("digits_calib.npz"), calib_shards=0, **JOB)


# `ray start`, except that a second node on this machine may join on 127.0.0.1: Ray refuses a worker node when its
# single-machine switch (above) is set, and otherwise swaps 127.0.0.1 for the interface address
RAY_CLI = ("import ray._private.ray_constants as constants, ray._private.services as services; "
           "constants.ENABLE_RAY_CLUSTER = True; services.resolve_ip_for_localhost = lambda host: host; "
           "from ray.scripts.scripts import main; main()")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "onnxq", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _local_bytes(tmp: Path) -> bytes:
    path = tmp / "local.onnx"
    onnxq.quantize(data_path("digits_mlp.onnx"), path, calibration=data_path("digits_calib.npz"), **JOB)
    return path.read_bytes()


CLI_JOB = ("--method", "decoupleq", "--bits", "2", "--group-size", "16", "--calib", str(data_path("digits_calib.npz")),
           "--quiet")


def test_cli_starts_and_stops_its_own_cluster(tmp_path):
    """``--ray`` alone: onnxq starts a local cluster, calibrates on 2 actors and shuts the cluster down."""
    out = tmp_path / "ray.onnx"
    done = _cli("quantize", str(data_path("digits_mlp.onnx")), "-o", str(out), *CLI_JOB, "--ray-workers", "2", "--ray")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "calibration on Ray: 2 actors" in done.stdout
    assert out.read_bytes() == _local_bytes(tmp_path)


@pytest.mark.slow  # ≈ 70 s here: two `ray start` node processes, then the CLI joins them
def test_two_node_processes(tmp_path):
    """A head node and a second node (``ray start --address``), one CPU each, both on 127.0.0.1 and both stopped
    here (``--block`` processes, terminated by pid): the two actors land on different nodes, same bytes."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="onnxq-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # a throw-away cluster on 127.0.0.1: no token (else every process of the test must find the same one)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--block", "--disable-usage-stats"]
    head = subprocess.Popen([sys.executable, "-c", RAY_CLI, "start", "--head", "--port", str(port), "--temp-dir", temp,
                             "--include-dashboard", "false", *common], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    nodes = [head]
    try:
        _wait_for_nodes(port, 1, head, env)
        nodes.append(subprocess.Popen([sys.executable, "-c", RAY_CLI, "start", "--address", f"127.0.0.1:{port}",
                                       *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        _wait_for_nodes(port, 2, nodes[-1], env)
        out = tmp_path / "ray.onnx"
        done = _cli("quantize", str(data_path("digits_mlp.onnx")), "-o", str(out), *CLI_JOB, "--ray",
                    f"127.0.0.1:{port}", env={"RAY_AUTH_MODE": "disabled"})
        assert done.returncode == 0, done.stderr[-2000:]
        places = re.search(r"calibration on Ray: 2 actors, .*\((.*)\)", done.stdout).group(1)
        assert len(set(re.findall(r"node (\w+)", places))) == 2, places  # one actor per node
        assert out.read_bytes() == _local_bytes(tmp_path)
    finally:
        for node in reversed(nodes):  # --block: SIGTERM stops the node and the processes it started
            os.killpg(node.pid, signal.SIGTERM)
        for node in reversed(nodes):
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(port: int, count: int, process: subprocess.Popen, env: dict[str, str], timeout: float = 90) -> None:
    """Until the cluster at ``port`` lists ``count`` alive nodes (asked from a subprocess: this process keeps no
    Ray connection)."""
    code = (f"import json, ray; ray.init(address='127.0.0.1:{port}', log_to_driver=False); "
            "print(json.dumps(sum(n['Alive'] for n in ray.nodes())))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "a ray node process exited"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
        if done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1]) >= count:
            return
        time.sleep(1)
    raise AssertionError(f"the Ray cluster did not reach {count} nodes in {timeout:.0f} s")


@pytest.mark.slow  # MiniLM W2 g64 decoupleQ, sequential with float targets: ≈ 3 min on 2 busy cores
@pytest.mark.real
def test_minilm_on_two_actors_gives_the_golden_bytes(cluster):
    from models import minilm
    from tools import evaluation, golden

    calibration = evaluation.make_minilm_calibration(n_samples=32, seq_len=128)
    remote = onnxq.quantize(minilm.build_minilm(), method="decoupleq", bits=2, group_size=64,
                            calibration=calibration, ray="auto", ray_workers=2, progress=False)
    recorded = json.loads(golden.HASHES_PATH.read_text()).get(golden.machine_kind(), {})
    expected = recorded.get("minilm_w2_g64_decoupleq")
    if expected is None:
        local = onnxq.quantize(minilm.build_minilm(), method="decoupleq", bits=2, group_size=64,
                               calibration=calibration, progress=False)
        expected = hashlib.sha256(local.SerializeToString()).hexdigest()
    assert hashlib.sha256(remote.SerializeToString()).hexdigest() == expected


def _calibration_workers() -> set[int]:
    """Pids of live Ray calibration actors on this machine (read from ps; nothing is signalled by name)."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[0]) for line in ps.splitlines() if "ray::CalibrationWorker" in line}


@pytest.mark.slow  # ≈ 40 s: a MiniLM run is interrupted once its actors work
@pytest.mark.real
def test_ctrl_c_stops_the_actors_and_the_local_cluster(tmp_path):
    import numpy as np

    from models import minilm
    from tools import evaluation

    np.savez(tmp_path / "calib.npz", **evaluation.make_minilm_calibration(n_samples=32, seq_len=128))
    before = _calibration_workers()
    out = tmp_path / "out.onnx"
    args = [sys.executable, "-m", "onnxq", "quantize", str(minilm.build_minilm()), "-o", str(out), "--method",
            "decoupleq", "--bits", "2", "--calib", str(tmp_path / "calib.npz"), "--ray-workers", "2", "--ray"]
    run = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's child
    try:
        deadline = time.monotonic() + 120
        while len(_calibration_workers() - before) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        workers = _calibration_workers() - before
        assert len(workers) == 2
        time.sleep(5)
        run.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130 and "interrupted" in output, output[-2000:]
    assert not out.exists()
    deadline = time.monotonic() + 30
    while _calibration_workers() & workers and time.monotonic() < deadline:
        time.sleep(1)
    assert not _calibration_workers() & workers
