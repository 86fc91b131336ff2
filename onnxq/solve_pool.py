"""Solve a layer group's row tasks in parallel worker processes (``--workers``).

Rows of a weight are independent in every Hessian method (:mod:`onnxq.solvers.base`), and a layer group's layers
(q/k/v, gate/up) are solved from statistics already collected, so all tasks of a group can run at once.  Each task
runs with one BLAS thread wherever it runs, so the output bytes do not depend on the number of workers.

The workers are plain ``python -m onnxq.solve_worker`` processes fed pickled tasks through their stdin and answering
on their stdout (not ``multiprocessing``, whose ``spawn`` re-runs the caller's script unless it has a
``__main__`` guard, and whose ``fork`` copies ONNX Runtime's threads).  They start on the first group that has more
than one task and enough work to pay for them (:data:`PARALLEL_WORK`), and stop when the run ends; they ignore
Ctrl-C, which the parent handles by stopping them.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from onnxq.errors import OnnxqError
from onnxq.heap import release_free_memory
from onnxq.ir.paths import RUN_TEMP, remove_stale_temps, temp_prefix
from onnxq.solvers.base import RowResult, RowTask, run_task

PARALLEL_WORK = 1e8  # Σ rows·K² of a group below which it is solved here (~0.3 s; a worker starts in ~0.7 s)
SHARE_BYTES = 1 << 20  # task arrays this large reach the workers through shared memory, not the pipe
SHARED_MEMORY = "/dev/shm"  # where shared arrays are written when it exists (a RAM file system); else TMPDIR


def _work(task: RowTask) -> float:
    """A task's cost in the units of :data:`PARALLEL_WORK` (the column sweeps cost ``rows·K²``)."""
    rows, k = task.original.shape
    return float(rows) * k * k


def default_workers() -> int:
    """One worker per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class SolveTaskError(OnnxqError):
    """A task's solver refused its input: ``index`` is the task's position in the list given to ``run``."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index, self.message = index, message


class SolvePool:
    """``run(tasks)``: the tasks' results in order, computed by up to ``workers`` processes (1: in this one)."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self._processes: list[subprocess.Popen] = []

    def run(self, tasks: list[RowTask]) -> list[RowResult]:
        if self.workers == 1 or len(tasks) <= 1 or sum(_work(task) for task in tasks) < PARALLEL_WORK:
            results = []
            for index, task in enumerate(tasks):
                try:
                    results.append(run_task(task))
                except OnnxqError as exc:
                    raise SolveTaskError(index, str(exc)) from None
            return results
        if not self._processes:
            self._processes = [_start_worker() for _ in range(self.workers)]
        return _Dispatch(self._processes, tasks).results()

    def close(self, kill: bool = False) -> None:
        """Stop the workers: let them finish (end of their input), or ``kill`` them (an interrupted run)."""
        for process in self._processes:
            if process.poll() is None:
                try:
                    if kill:
                        raise OSError
                    process.stdin.close()
                    process.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    process.kill()
                    process.wait()
            for stream in (process.stdin, process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        self._processes = []

    def __enter__(self) -> SolvePool:
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        self.close(kill=kind is not None)


def _start_worker() -> subprocess.Popen:
    """A worker with one BLAS thread that imports this very ``onnxq`` (whatever ``sys.path`` found it)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.Popen([sys.executable, "-m", "onnxq.solve_worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)


class SharedArrays:
    """The large arrays of a dispatch's tasks (a layer's ``H``, ``U``, ``C``, its rows), each written once to a file
    in shared memory and mapped read-only by every worker that solves a task reading it: a layer group's statistics
    are then in memory once for all workers, instead of once more in each worker for every task sent to it.

    The folder is ``/dev/shm/onnxq-<pid>-xxxxxxxx`` (or in TMPDIR), removed by :meth:`close`; a killed run's folder
    is removed by the next run (:func:`onnxq.ir.paths.remove_stale_temps`)."""

    def __init__(self) -> None:
        base = SHARED_MEMORY if os.access(SHARED_MEMORY, os.W_OK) else tempfile.gettempdir()
        remove_stale_temps(base, RUN_TEMP)
        self.folder = Path(tempfile.mkdtemp(prefix=temp_prefix(RUN_TEMP), dir=base))
        self._references: dict[int, tuple[str, str, tuple[int, ...]]] = {}
        self._arrays: list[np.ndarray] = []  # keeps every shared array (and so its id) alive while shared
        self._lock = threading.Lock()

    def reference(self, array: np.ndarray) -> tuple[str, str, tuple[int, ...]]:
        """``(file, dtype, shape)`` of ``array``'s shared copy, written at its first reference."""
        with self._lock:
            found = self._references.get(id(array))
            if found is None:
                path = self.folder / f"{len(self._references)}.bin"
                data = np.ascontiguousarray(array)
                data.tofile(path)
                found = (str(path), data.dtype.str, data.shape)
                self._references[id(array)] = found
                self._arrays.append(array)
            return found

    def close(self) -> None:
        self._references.clear()
        self._arrays.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


class _Pickler(pickle.Pickler):
    """Pickle protocol 5 whose arrays of :data:`SHARE_BYTES` or more are sent as :class:`SharedArrays` references."""

    def __init__(self, file, shared: SharedArrays | None, buffers: list) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self.shared = shared

    def persistent_id(self, obj: object) -> tuple | None:
        if self.shared is not None and type(obj) is np.ndarray and obj.nbytes >= SHARE_BYTES:
            return self.shared.reference(obj)
        return None


class _Unpickler(pickle.Unpickler):
    """Maps each :class:`SharedArrays` reference read-only (a plain ndarray over the mapped file)."""

    def persistent_load(self, reference: tuple) -> np.ndarray:
        path, dtype, shape = reference
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, dtype=np.dtype(dtype)).reshape(shape)


class _Dispatch:
    """Hand ``tasks`` to the workers (one thread each, feeding its worker the next task as it finishes one); their
    large arrays go through :class:`SharedArrays`."""

    def __init__(self, processes: list[subprocess.Popen], tasks: list[RowTask]) -> None:
        self.tasks = tasks
        self.answers: list[tuple[str, object] | None] = [None] * len(tasks)
        self.next = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._feed, args=(p,), daemon=True) for p in processes]
        self.shared: SharedArrays | None = None

    def results(self) -> list[RowResult]:
        self.shared = SharedArrays()
        try:
            for thread in self.threads:
                thread.start()
            for thread in self.threads:
                while thread.is_alive():
                    thread.join(0.2)  # a short wait keeps Ctrl-C deliverable to this thread
        finally:
            self.shared.close()
        out = []
        for index, answer in enumerate(self.answers):
            kind, value = answer if answer is not None else ("died", "")
            if kind == "ok":
                out.append(value)
            elif kind == "refused":
                raise SolveTaskError(index, str(value))
            elif kind == "died":
                raise OnnxqError(f"a solver process died (out of memory?); rerun with fewer --workers, or "
                                 f"--workers 1{value}")
            else:
                raise RuntimeError(f"solver worker failed on task {index}:\n{value}")
        return out

    def _feed(self, process: subprocess.Popen) -> None:
        while True:
            with self.lock:
                index = self.next
                if index >= len(self.tasks) or any(a is not None and a[0] != "ok" for a in self.answers):
                    return
                self.next += 1
            try:
                send(process.stdin, self.tasks[index], self.shared)
                self.answers[index] = receive(process.stdout)
            except Exception:  # noqa: BLE001 - a dead worker, or its pipes closed under us by an interrupt
                self.answers[index] = ("died", f" (exit code {process.poll()})")
                return


def send(stream, value: object, shared: SharedArrays | None = None) -> None:
    """Write ``value`` to a binary stream as pickle protocol 5 with its arrays' bytes out of band: a length-prefixed
    header, then each buffer length-prefixed, written straight from the array (no pickled copy in memory); with
    ``shared``, arrays of :data:`SHARE_BYTES` or more travel as references to their shared-memory copies."""
    buffers: list[pickle.PickleBuffer] = []
    header_file = io.BytesIO()
    _Pickler(header_file, shared, buffers).dump(value)
    header = header_file.getvalue()
    stream.write(struct.pack("<QQ", len(header), len(buffers)))
    stream.write(header)
    for buffer in buffers:
        raw = buffer.raw()
        stream.write(struct.pack("<Q", raw.nbytes))
        stream.write(raw)
    stream.flush()


def receive(stream) -> object:
    """Read one value written by :func:`send` (``EOFError`` at the end of the stream): piped arrays come back
    writable, read straight into their own memory; shared ones read-only, mapped from their file."""
    size, count = struct.unpack("<QQ", _read_exactly(stream, 16))
    header = _read_exactly(stream, size)
    buffers = []
    for _ in range(count):
        (length,) = struct.unpack("<Q", _read_exactly(stream, 8))
        buffers.append(_read_exactly(stream, length, bytearray(length)))
    return _Unpickler(io.BytesIO(header), buffers=buffers).load()


def _read_exactly(stream, length: int, into: bytearray | None = None) -> bytearray:
    out = bytearray(length) if into is None else into
    view, done = memoryview(out), 0
    while done < length:
        got = stream.readinto(view[done:])
        if not got:
            raise EOFError
        done += got
    return out


def serve(source, sink) -> None:
    """The worker loop: read a :class:`RowTask` from ``source`` (:func:`receive`), write ``(kind, value)`` to
    ``sink``."""
    while True:
        try:
            task = receive(source)
        except EOFError:
            return
        try:
            answer: tuple[str, object] = ("ok", run_task(task))
        except OnnxqError as exc:
            answer = ("refused", str(exc))
        except Exception:  # noqa: BLE001 - a bug: its traceback goes to the parent
            import traceback

            answer = ("failed", traceback.format_exc())
        task = None
        send(sink, answer)
        answer = None
        release_free_memory()  # an idle worker holds no freed task arrays
