"""Output paths and temporary files: refuse outputs that would overwrite an input, a folder or a device; temp
files carry the pid so a later run can remove what a killed run left."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from onnxq.errors import OnnxqError


def check_output_folder(path: str | os.PathLike, option: str = "-o") -> Path:
    """The folder ``path`` will be written into; an error naming ``option`` if it is missing or read-only."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxqError(f"{folder}: output folder does not exist; create it or choose another {option} path")
    if not os.access(folder, os.W_OK):
        raise OnnxqError(f"{folder}: output folder is not writable; choose another {option} path")
    return folder


def check_output_file(path: str | os.PathLike, option: str = "-o", inputs: Iterable[Path] = ()) -> Path:
    """The folder ``path`` will be written into; a one-line error naming ``option`` when ``path`` is one of the
    ``inputs`` (through symlinks and hard links too), is a directory or not a regular file (a device must never be
    replaced by a file), or when its folder is missing or read-only."""
    path = Path(path)
    for existing in inputs:
        if same_file(path, existing):
            raise OnnxqError(f"{path}: {option} path equals the input file {existing}; choose another {option} path "
                             "(the input is never modified)")
    if path.is_dir():
        raise OnnxqError(f"{path}: is a directory; give {option} a file path")
    if path.exists() and not path.is_file():
        raise OnnxqError(f"{path}: not a regular file (a device, pipe or socket); choose another {option} path")
    return check_output_folder(path, option)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: same device and inode when both exist, else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def data_file_of(path: str | os.PathLike) -> Path:
    """Where :func:`save_model` puts the external data of a model saved to ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".data")


OUTPUT_TEMP = ".onnxq-"  # temp files beside an output (renamed into place when complete)


RUN_TEMP = "onnxq-"  # the folder in TMPDIR holding every temp file of one command-line run


def temp_prefix(kind: str = OUTPUT_TEMP) -> str:
    """Temp names carry the pid (``.onnxq-<pid>-xxxxxxxx``) so that later runs can tell a killed run's leftovers."""
    return f"{kind}{os.getpid()}-"


def remove_stale_temps(folder: str | os.PathLike, kind: str = OUTPUT_TEMP) -> list[Path]:
    """Remove the ``<kind><pid>-xxxxxxxx`` temp files and folders in ``folder`` whose process is gone (a run
    killed outright); returns what was removed."""
    pattern = re.compile(re.escape(kind) + r"(\d+)-[a-z0-9_]{8}")  # tempfile's names: 8 characters of [a-z0-9_]
    removed = []
    for entry in Path(folder).glob(kind + "*"):
        match = pattern.fullmatch(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


@contextmanager
def run_temp_dir() -> Iterator[Path]:
    """A private folder ``$TMPDIR/onnxq-<pid>-xxxxxxxx`` that holds every temp file made through :mod:`tempfile`
    while the context is open, and is removed however the context ends (error, Ctrl-C, SIGTERM); folders left by
    runs killed outright (``kill -9``) are removed first."""
    base = Path(tempfile.gettempdir())
    remove_stale_temps(base, RUN_TEMP)
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix(RUN_TEMP), dir=base))
    previous, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def write_text(path: str | os.PathLike, text: str, option: str = "-o") -> None:
    """Write a text file atomically (temp file in the same folder, then rename)."""
    write_atomic(path, lambda handle: handle.write(text), option)


def write_atomic(path: str | os.PathLike, write: Callable[[IO], object], option: str = "-o",
                 binary: bool = False) -> None:
    """Write a file atomically: ``write(handle)`` fills a temp file in the same folder, which is then renamed onto
    ``path``; on any error the temp file is removed and nothing partial is left."""
    folder = check_output_folder(path, option)
    remove_stale_temps(folder)
    try:
        handle, tmp = tempfile.mkstemp(prefix=temp_prefix(), dir=folder)
    except OSError as exc:
        raise OnnxqError(f"{folder}: cannot write {path} ({exc.strerror}); choose another {option} path") from None
    try:
        with os.fdopen(handle, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OnnxqError(f"{path}: writing failed ({exc.strerror}); check free space and permissions") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
