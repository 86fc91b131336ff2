"""``tools.tree_memory`` sees the memory of a command's child processes, which ``/usr/bin/time -v`` does not add up
(issue #14: the peak-RSS bound of a run with solve workers)."""

from __future__ import annotations

import subprocess
import sys

CHILD = "import time, numpy as np; a = np.ones(300 * 2**20 // 8); time.sleep(2.5)"
PARENT = f"""
import subprocess, sys, time
import numpy as np
a = np.ones(100 * 2**20 // 8)
subprocess.run([sys.executable, "-c", {CHILD!r}], check=True)
sys.exit(3)
"""


def test_counts_children_and_keeps_the_exit_status(tmp_path):
    tsv = tmp_path / "memory.tsv"
    run = subprocess.run([sys.executable, "-m", "tools.tree_memory", "--interval", "0.1", "--tsv", str(tsv), "--",
                          sys.executable, "-c", PARENT], capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
    tree_pss = max(int(row[2]) for row in rows) / 2**20
    largest = max(int(row[3]) for row in rows) / 2**20
    assert tree_pss >= 400, tree_pss  # 100 MiB in the parent + 300 MiB in its child, each summed once
    assert 300 <= largest < 400, largest  # the child alone: what time -v would report
    assert "tree PSS" in run.stderr
