"""Write calibration arrays as an ``.npz`` that ``numpy.load`` reads and that is byte-identical across runs.

``numpy.savez`` stamps the current time into each zip entry; this writer stores the arrays in sorted name order,
each as ``<name>.npy`` (deflate-compressed) dated 1980-01-01 with mode 0644.  The file is written under a temp name
in the output's folder and renamed into place, so an error or Ctrl-C leaves no partial ``.npz``.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from onnxq.errors import OnnxqError
from onnxq.ir.paths import check_output_file, write_atomic

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_npz(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    compress: bool = True,
    option: str = "-o",
    reads: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``arrays`` to ``path`` (rules in the module docstring); ``path`` is checked by
    :func:`onnxq.ir.paths.check_output_file` against the files the run reads (``reads``) and must end in ``.npz``."""
    path = Path(path)
    if path.suffix != ".npz":
        raise OnnxqError(f"{path}: {option} must end in .npz (calibration data is read from .npz files)")
    check_output_file(path, option, [Path(r) for r in reads])
    write_atomic(path, lambda handle: _write_zip(handle, arrays, compress), option, binary=True)
    return path


def _write_zip(handle: BinaryIO, arrays: Mapping[str, np.ndarray], compress: bool) -> None:
    os.fchmod(handle.fileno(), 0o644)  # the temp file is made 0600
    with zipfile.ZipFile(handle, "w") as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            archive.writestr(info, buffer.getvalue())
