#!/usr/bin/env python3
"""Fetch the ONNX Runtime C/C++ API headers needed to build the onnxq custom-op library.

ONNX Runtime's pip wheels ship no headers.  The npm package ``com.github.asus4.onnxruntime@0.4.9``
(MIT licence) bundles Microsoft's ONNX Runtime 1.29 (C API version 29) Android archive, whose
``headers/`` folder holds ``onnxruntime_c_api.h`` and friends.  This script downloads that tarball
(with ``npm pack`` when npm is installed, otherwise straight from the npm registry over HTTPS),
checks its SHA-512 against the value pinned below *and* against the registry's ``dist.integrity``,
and unpacks only the headers into a cache directory (never into the repository).

Usage::

    python custom_ops/fetch_ort_headers.py            # prints the include directory
    python custom_ops/fetch_ort_headers.py --dest DIR

``ONNXQ_ORT_INCLUDE=/path/to/headers`` skips the download entirely (any directory holding
``onnxruntime_c_api.h`` of API version >= 29).  Standard library only: importable from setup.py.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

NPM_PACKAGE = "com.github.asus4.onnxruntime"
NPM_VERSION = "0.4.9"
# sha512 of com.github.asus4.onnxruntime-0.4.9.tgz, as npm's Subresource Integrity string.
PINNED_INTEGRITY = "sha512-BkzxduSZ9IkeDP6Q8lz2TFU2ie7hSSvS7ZIfzMooExoq0CNzJnuuGaUJ7IsojBgqO4ouD1jXah8OYyJbCN29Fg=="
AAR_MEMBER = "package/Plugins/Android/onnxruntime.aar"
LICENSE_MEMBER = "package/LICENSE"
REQUIRED_HEADER = "onnxruntime_c_api.h"
DEFAULT_REGISTRY = "https://registry.npmjs.org"
ENV_REGISTRY = "ONNXQ_NPM_REGISTRY"  # a mirror of the npm registry, if any
ENV_INCLUDE = "ONNXQ_ORT_INCLUDE"
COMPLETE_MARKER = ".complete"


class FetchError(RuntimeError):
    """The headers could not be obtained (offline, no npm, checksum mismatch, ...)."""


def log(message: str) -> None:
    print(f"[onnxq fetch-ort-headers] {message}", file=sys.stderr)


def default_cache_dir() -> Path:
    """``$ONNXQ_CACHE_DIR`` or ``$XDG_CACHE_HOME/onnxq`` or ``~/.cache/onnxq``, then ``ort-headers/<pkg>-<ver>``."""
    root = os.environ.get("ONNXQ_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "onnxq") if xdg else os.path.join(Path.home(), ".cache", "onnxq")
    return Path(root) / "ort-headers" / f"{NPM_PACKAGE}-{NPM_VERSION}"


def integrity_of(path: Path) -> str:
    """npm-style ``sha512-<base64>`` integrity string of a file."""
    digest = hashlib.sha512()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def _npm_executable() -> str | None:
    return shutil.which("npm")


def _registry() -> str:
    return os.environ.get(ENV_REGISTRY, DEFAULT_REGISTRY).rstrip("/")


def _registry_metadata() -> dict:
    url = f"{_registry()}/{NPM_PACKAGE}/{NPM_VERSION}"
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (fixed https URL)
        return json.load(response)


def _download_tarball(workdir: Path) -> tuple[Path, str]:
    """Download the package tarball into ``workdir``; return (path, registry integrity)."""
    npm = _npm_executable()
    if npm:
        spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
        registry = ["--registry", _registry()]
        try:
            view = subprocess.run(
                [npm, "view", spec, "dist.integrity", "--json", "--fetch-retries=0", *registry],
                capture_output=True, text=True, check=True, timeout=120,
            )
            registry_integrity = json.loads(view.stdout)
            subprocess.run(
                [npm, "pack", spec, "--silent", "--fetch-retries=1", *registry],
                cwd=workdir, capture_output=True, text=True, check=True, timeout=900,
            )
        except (subprocess.SubprocessError, OSError, json.JSONDecodeError) as exc:
            log(f"npm failed ({exc}); trying the registry over HTTPS")
        else:
            tarballs = sorted(workdir.glob("*.tgz"))
            if tarballs:
                return tarballs[0], str(registry_integrity)
    try:
        meta = _registry_metadata()
        url = meta["dist"]["tarball"]
        registry_integrity = meta["dist"]["integrity"]
        target = workdir / f"{NPM_PACKAGE}-{NPM_VERSION}.tgz"
        with urllib.request.urlopen(url, timeout=120) as response, open(target, "wb") as out:  # noqa: S310
            shutil.copyfileobj(response, out, 1 << 20)
    except (OSError, KeyError, ValueError) as exc:
        raise FetchError(f"cannot download {NPM_PACKAGE}@{NPM_VERSION} from the npm registry: {exc}") from exc
    return target, registry_integrity


def _extract_headers(tarball: Path, destination: Path) -> None:
    """Copy ``headers/*`` of the Android archive inside ``tarball`` (and the package LICENSE) to ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        aar_path = Path(tmp) / "onnxruntime.aar"
        found_aar = False
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive:
                if member.name in (AAR_MEMBER, LICENSE_MEMBER) and member.isfile():
                    source = archive.extractfile(member)
                    assert source is not None
                    target = aar_path if member.name == AAR_MEMBER else destination / "LICENSE"
                    with open(target, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
                    found_aar |= member.name == AAR_MEMBER
        if not found_aar:
            raise FetchError(f"{AAR_MEMBER} not found in {tarball.name}")
        with zipfile.ZipFile(aar_path) as aar:
            for name in aar.namelist():
                if name.startswith("headers/") and not name.endswith("/"):
                    relative = Path(name).relative_to("headers")
                    if ".." in relative.parts:
                        continue
                    out_path = destination / relative
                    out_path.parent.mkdir(parents=True, exist_ok=True)
                    out_path.write_bytes(aar.read(name))
    if not (destination / REQUIRED_HEADER).is_file():
        raise FetchError(f"{REQUIRED_HEADER} missing from the headers of {NPM_PACKAGE}@{NPM_VERSION}")


def fetch(destination: Path | None = None) -> Path:
    """Return a directory holding the ONNX Runtime headers, downloading and verifying them if needed."""
    destination = Path(destination) if destination else default_cache_dir()
    if (destination / COMPLETE_MARKER).is_file() and (destination / REQUIRED_HEADER).is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as tmp:
        workdir = Path(tmp)
        log(f"downloading {NPM_PACKAGE}@{NPM_VERSION} (~150 MB, once; cached in {destination})")
        tarball, registry_integrity = _download_tarball(workdir)
        actual = integrity_of(tarball)
        if actual != PINNED_INTEGRITY:
            raise FetchError(f"checksum mismatch for {tarball.name}: got {actual}, pinned {PINNED_INTEGRITY}")
        if registry_integrity != PINNED_INTEGRITY:
            raise FetchError(f"registry integrity {registry_integrity} differs from the pinned {PINNED_INTEGRITY}")
        staging = workdir / "headers"
        _extract_headers(tarball, staging)
        (staging / COMPLETE_MARKER).write_text(f"{NPM_PACKAGE}@{NPM_VERSION} {PINNED_INTEGRITY}\n")
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    log(f"headers ready in {destination}")
    return destination


def resolve_include_dir(allow_download: bool = True) -> Path:
    """``$ONNXQ_ORT_INCLUDE`` if set, else the cached headers, else :func:`fetch` (when allowed)."""
    override = os.environ.get(ENV_INCLUDE)
    if override:
        path = Path(override)
        if not (path / REQUIRED_HEADER).is_file():
            raise FetchError(f"{ENV_INCLUDE}={override} does not contain {REQUIRED_HEADER}")
        return path
    cached = default_cache_dir()
    if (cached / COMPLETE_MARKER).is_file() and (cached / REQUIRED_HEADER).is_file():
        return cached
    if not allow_download:
        raise FetchError(f"no ONNX Runtime headers in {cached} and downloading is disabled")
    return fetch(cached)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, help="directory for the headers (default: the onnxq cache)")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.dest) if args.dest else resolve_include_dir()
    except FetchError as exc:
        log(f"error: {exc}")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
