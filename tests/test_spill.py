"""Arrays spilled to memory-mapped files (``onnxq.spill``): activations past ``--max-memory`` and solved codes
waiting for the emitters (issue #14: a 1 B model's codes are 1 GB by the end of a run)."""

from __future__ import annotations

import tempfile

import graphs
import numpy as np
import pytest

import onnxq.spill
from onnxq.api import quantize_with_summary
from onnxq.spill import SpillFolder


def test_spilled_arrays_are_read_only_maps_removed_on_close(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = SpillFolder("onnxq-test-")
    assert not list(tmp_path.iterdir())  # nothing until the first array
    value = np.arange(12, dtype=np.uint8).reshape(3, 4)
    spilled = folder.put(value)
    assert isinstance(spilled, np.memmap) and not spilled.flags.writeable
    assert np.array_equal(spilled, value) and spilled.dtype == value.dtype
    assert len(list(tmp_path.glob("onnxq-test-*/*.npy"))) == 1
    folder.close()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["rtn", "decoupleq"])
def test_solved_codes_wait_on_disk_and_are_removed(tmp_path, monkeypatch, method):
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    spilled = []
    put = SpillFolder.put

    def counting_put(self, value):
        if self.prefix == "onnxq-codes-":
            spilled.append(value.shape)
        return put(self, value)

    monkeypatch.setattr(onnxq.spill.SpillFolder, "put", counting_put)
    model = graphs.residual_model()
    x = np.random.default_rng(4).standard_normal((16, 24)).astype(np.float32)
    _, summary = quantize_with_summary(model, tmp_path / "out.onnx", method=method, bits=2, group_size=8,
                                       calibration={"x": x})
    assert len(spilled) == len(summary.layers) == 9  # every solved layer, as its group finished
    assert not list(work.glob("onnxq-codes-*"))
