"""Peak memory of a command's whole process tree (the onnxq process and its solve workers), sampled from ``/proc``.

    python -m tools.tree_memory --tsv rss.tsv -- onnxq quantize model.onnx -o out.onnx --method decoupleq ...

``/usr/bin/time -v``'s "Maximum resident set size" is the peak of the largest single process; the solve workers
are separate processes, so it does not see their memory.  This runs the command and, every ``--interval`` seconds,
reads ``Rss`` and ``Pss`` (``/proc/<pid>/smaps_rollup``) of it and all its descendants.  The RSS sum counts a
shared page once per process that maps it (the workers map one copy of a group's task arrays from ``/dev/shm``);
the PSS sum counts it once in all.  Prints the peaks of both sums and of the largest process, in GiB, and exits
with the command's status.  Linux only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple


class Memory(NamedTuple):
    rss: int  # bytes
    pss: int  # bytes


def process_memory(pid: int) -> Memory:
    """``Rss`` and ``Pss`` of process ``pid`` in bytes (zeros once it is gone)."""
    values = {"Rss:": 0, "Pss:": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            field = line.split(maxsplit=1)[0] if line else ""
            if field in values:
                values[field] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return Memory(values["Rss:"], values["Pss:"])


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                pending.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                pass
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--tsv", type=Path, help="write one line per sample: seconds, tree RSS, tree PSS, largest")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    start = time.perf_counter()
    process = subprocess.Popen(command)
    peaks = {"tree RSS": 0, "tree PSS": 0, "largest process RSS": 0}
    out = args.tsv.open("w") if args.tsv else None
    try:
        if out:
            out.write("seconds\ttree_rss_bytes\ttree_pss_bytes\tlargest_rss_bytes\tprocesses\n")
        while process.poll() is None:
            samples = [process_memory(pid) for pid in descendants(process.pid)]
            row = (sum(m.rss for m in samples), sum(m.pss for m in samples), max(m.rss for m in samples))
            for name, value in zip(peaks, row, strict=True):
                peaks[name] = max(peaks[name], value)
            if out:
                out.write(f"{time.perf_counter() - start:.1f}\t{row[0]}\t{row[1]}\t{row[2]}\t{len(samples)}\n")
                out.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:  # the command got the Ctrl-C too: let it stop, then report what was seen
        process.wait()
    finally:
        if out:
            out.close()
    print("peak memory of the process tree: " + ", ".join(f"{name} {value / 2**30:.2f} GiB"
                                                          for name, value in peaks.items()), file=sys.stderr)
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
