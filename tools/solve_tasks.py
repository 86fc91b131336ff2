"""A real run's decoupleQ row tasks, dumped once, then solved by two checkouts side by side.

    python -m tools.solve_tasks dump smollm2 --block 5 --out /tmp/tasks.pkl
    python -m tools.solve_tasks compare /tmp/tasks.pkl --trees /path/to/old/checkout . --rounds 2

``dump`` runs a job until the solve calls of one block (its layer groups: q/k/v, o, gate/up, down), saves their
:class:`onnxq.solvers.base.RowTask` lists (pickle) and stops before writing any output.  Jobs: ``minilm`` and
``smollm2`` are ``tools/compare.py``'s W2 g64 decoupleQ with its calibration file (made as the harness makes it);
``llama-1b`` is the 1.1 B model's job of ``docs/performance.md`` (``python -m models.llama_1b`` builds it).

``compare`` solves the tasks in a fresh interpreter per checkout and round (rounds interleaved, one BLAS thread, in
the order the pool gets them) and prints per checkout: seconds per layer group and in all, the hash of the solved
bytes, and the summed undamped loss per layer group against its RTN loss.  The last lines give each checkout's time
and loss relative to the first one (best round).  Exit 1 when a checkout cannot load the tasks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROUPS_PER_BLOCK = 4  # solve calls per transformer block: q/k/v, o, gate/up, down


class _Dumped(Exception):
    """Raised once the block's tasks are saved: stops the job before it writes anything."""


def dump(job: str, block: int, out: Path) -> int:
    """Run ``job`` until block ``block``'s solve calls and pickle their task lists to ``out``."""
    import onnxq
    from onnxq.solve_pool import SolvePool

    groups: list = []
    calls = iter(range(10**9))
    run = SolvePool.run

    def capture(pool: SolvePool, tasks: list) -> list:
        index = next(calls)
        if GROUPS_PER_BLOCK * block <= index:
            groups.append(tasks)
            if len(groups) == GROUPS_PER_BLOCK:
                out.write_bytes(pickle.dumps(groups, protocol=5))
                raise _Dumped
        return run(pool, tasks)

    SolvePool.run = capture
    model, options = _job(job)
    try:
        with tempfile.TemporaryDirectory(prefix="onnxq-solve-tasks-") as folder:
            onnxq.quantize_with_summary(model, Path(folder) / "model.onnx", **options)
    except _Dumped:
        print(f"{out}: {len(groups)} layer groups, {sum(len(g) for g in groups)} tasks of block {block}")
        return 0
    finally:
        SolvePool.run = run
    print(f"{job} has fewer than {block + 1} blocks", file=sys.stderr)
    return 1


def _job(name: str) -> tuple[Path, dict]:
    if name in ("minilm", "smollm2"):
        from models.cache import cache_dir, write_npz
        from tools.compare import model_spec

        path, _, make_calibration, _, _, exclude = model_spec(name)
        calibration = cache_dir("compare") / f"{name}_calib.npz"
        if not calibration.is_file():  # the harness's file, made as the harness makes it
            write_npz(calibration, make_calibration())
        return path, dict(method="decoupleq", bits=2, group_size=64, format="matmulnbits", exclude=exclude,
                          quantize_lm_head=True, accuracy_level=0, calibration=str(calibration))
    if name == "llama-1b":
        from models.llama_1b import scale_run

        return scale_run()
    raise SystemExit(f"unknown job {name!r}; use minilm, smollm2 or llama-1b")


def solve(path: Path) -> dict:
    """Solve the dumped tasks here (the onnxq on ``sys.path``): seconds, hash and losses per layer group."""
    try:
        from onnxq.heap import reuse_freed_memory
        reuse_freed_memory()
    except ImportError:  # an older checkout
        pass
    from onnxq.solvers.base import run_task

    groups = pickle.loads(path.read_bytes())
    digest = hashlib.sha256()
    rows = []
    for tasks in groups:
        start = time.perf_counter()
        rtn = method = 0.0
        for task in tasks:
            result = run_task(task)
            for array in (result.weight.codes, result.weight.scales, result.weight.zero_points,
                          result.weight.float_zeros):
                if array is not None:
                    digest.update(array.tobytes())
            rtn, method = rtn + result.loss_rtn, method + result.loss_method
        shape = f"{sum(t.rows for t in tasks)}x{tasks[0].original.shape[1]}"
        rows.append(dict(shape=shape, seconds=time.perf_counter() - start, loss_rtn=rtn, loss=method))
    return dict(groups=rows, hash=digest.hexdigest()[:16])


def compare(path: Path, trees: list[Path], rounds: int) -> int:
    results: dict[Path, list[dict]] = {tree: [] for tree in trees}
    for round_ in range(rounds):
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=str(tree.resolve()), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
            done = subprocess.run([sys.executable, __file__, "solve", str(path)], env=env, capture_output=True,
                                  text=True)
            if done.returncode != 0:
                print(f"{tree}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}",
                      file=sys.stderr)
                return 1
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[tree].append(result)
            seconds = sum(g["seconds"] for g in result["groups"])
            groups = "  ".join(f"{g['shape']} {g['seconds']:.2f}s loss/rtn {g['loss'] / g['loss_rtn']:.5f}"
                               for g in result["groups"])
            print(f"round {round_ + 1} {tree}: {seconds:.2f} s  hash {result['hash']}  {groups}")
    first = trees[0]
    best = {tree: min(sum(g["seconds"] for g in r["groups"]) for r in runs) for tree, runs in results.items()}
    for tree in trees:
        losses = [g["loss"] / f["loss"] for g, f in zip(results[tree][0]["groups"], results[first][0]["groups"],
                                                         strict=True)]
        print(f"{tree}: best {best[tree]:.2f} s = {best[tree] / best[first]:.3f}x of {first}; loss per group "
              f"vs {first}: " + " ".join(f"{v:.5f}" for v in losses))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dumping = commands.add_parser("dump", help="save one block's row tasks of a job")
    dumping.add_argument("job", choices=["minilm", "smollm2", "llama-1b"])
    dumping.add_argument("--block", type=int, default=5)
    dumping.add_argument("--out", type=Path, required=True)
    comparing = commands.add_parser("compare", help="solve dumped tasks with several checkouts, side by side")
    comparing.add_argument("tasks", type=Path)
    comparing.add_argument("--trees", type=Path, nargs="+", required=True, help="checkouts (folders holding onnxq/)")
    comparing.add_argument("--rounds", type=int, default=2)
    solving = commands.add_parser("solve", help="(internal) solve dumped tasks with the onnxq on sys.path")
    solving.add_argument("tasks", type=Path)
    args = parser.parse_args(argv)
    if args.command == "dump":
        return dump(args.job, args.block, args.out)
    if args.command == "compare":
        return compare(args.tasks, args.trees, max(1, args.rounds))
    print(json.dumps(solve(args.tasks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
