"""Outputs stay byte-identical to the hashes recorded in tests/golden_hashes.json (tools/golden.py) for this machine
kind. A job whose output changes on purpose is re-recorded with ``python -m tools.golden --write --only NAME``
in the same commit, which says why."""

from __future__ import annotations

import json

import pytest

from tools import golden

RECORDED = json.loads(golden.HASHES_PATH.read_text()).get(golden.machine_kind(), {})
DIGITS = sorted(name for name in golden.jobs("digits"))


def _check(name: str) -> None:
    if name not in RECORDED:
        pytest.skip(f"no golden hash recorded for {name} on a {golden.machine_kind()} machine")
    assert golden.model_sha256(golden.jobs(name)[name]()) == RECORDED[name]


@pytest.mark.parametrize("name", DIGITS)
def test_digits_outputs_are_byte_identical(name: str) -> None:
    _check(name)


@pytest.mark.real
@pytest.mark.parametrize("name", ["minilm_w4_g64_rtn", "minilm_split",
                                  pytest.param("minilm_w2_g64_decoupleq", marks=pytest.mark.slow)])
def test_minilm_outputs_are_byte_identical(name: str) -> None:
    _check(name)
