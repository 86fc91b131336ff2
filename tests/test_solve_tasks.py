"""tools/solve_tasks.py: a real block's row tasks are dumped without an output, and solved again to the same bytes."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from tools import solve_tasks

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.real
def test_minilm_block_is_dumped_and_solved_to_the_same_bytes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tasks.pkl"
    assert solve_tasks.main(["dump", "minilm", "--block", "0", "--out", str(out)]) == 0
    groups = pickle.loads(out.read_bytes())
    assert [len(tasks) for tasks in groups] == [3, 1, 3, 1]  # q/k/v (one task each), o, 1536 rows in 3, output
    assert {tasks[0].original.shape[1] for tasks in groups} == {384, 1536}
    assert list(tmp_path.iterdir()) == [out]  # no quantized model was written

    here = solve_tasks.solve(out)
    capsys.readouterr()
    assert solve_tasks.main(["compare", str(out), "--trees", str(REPO), str(REPO), "--rounds", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(f"hash {here['hash']}") == 2  # each checkout in its own interpreter: the bytes of this one
    assert "loss per group" in printed and all(0 < g["loss"] < 0.5 * g["loss_rtn"] for g in here["groups"])
