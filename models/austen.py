"""Recipe ``austen``: Jane Austen's six novels as plain text, from Debian's ``r-cran-janeaustenr``.

``python -m models.austen`` writes ``<cache>/austen/<novel>.txt`` (one line of the R character vector per line,
UTF-8). The package's lazy-load data is read without R: ``Rdata.rdx`` is a compressed RDS index mapping each
novel to (offset, length) in ``Rdata.rdb``, whose entries are a 4-byte big-endian length plus a zlib stream
holding an RDS-serialized character vector; both are parsed with the ``rdata`` package.
If the R package is not installed, the .deb is fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``
(R itself is never installed). Idempotent: existing, verified text files are kept.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

from models.cache import atomic_output, cache_dir
from onnxq.errors import OnnxqError

DEBIAN_PACKAGE = "r-cran-janeaustenr"
INSTALLED_DATA_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")

# Object name in the R package → title, in publication order (the package's own factor order).
NOVELS: dict[str, str] = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

# Sanity bounds on line counts (janeaustenr 1.0.0: 7,856 for Northanger Abbey up to 16,235 for Emma).
MIN_LINES = 7_000
MAX_LINES = 17_000
# A phrase each novel contains (all in its opening chapters), to catch a shuffled or truncated extraction.
OPENING_PHRASES: dict[str, str] = {
    "sensesensibility": "The family of Dashwood",
    "prideprejudice": "It is a truth universally acknowledged",
    "mansfieldpark": "Miss Maria Ward",
    "emma": "Emma Woodhouse, handsome, clever, and rich",
    "northangerabbey": "No one who had ever seen Catherine Morland",
    "persuasion": "Sir Walter Elliot, of Kellynch Hall",
}


def austen_dir() -> Path:
    """``<cache>/austen``, where the novels' text files live."""
    return cache_dir("austen")


def novel_path(name: str) -> Path:
    """Path of one novel's text file (not built by this call)."""
    if name not in NOVELS:
        raise OnnxqError(f"unknown novel {name!r}: choose one of {', '.join(NOVELS)}")
    return austen_dir() / f"{name}.txt"


def _read_rds_bytes(payload: bytes) -> object:
    """Parse RDS-serialized bytes (uncompressed XDR) into Python objects with ``rdata``."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns "Unknown file type: assumed RDS" for bare serializations
        parsed = rdata.parser.parse_data(payload)
        return rdata.conversion.convert(parsed)


def read_lazyload_vectors(data_dir: Path) -> dict[str, list[str]]:
    """Read every character vector of an R lazy-load database ``Rdata.rdx``/``Rdata.rdb`` in ``data_dir``."""
    index = _read_rds_bytes((data_dir / "Rdata.rdx").read_bytes())
    database = (data_dir / "Rdata.rdb").read_bytes()
    vectors: dict[str, list[str]] = {}
    for name, (offset, length) in index["variables"].items():
        entry = database[int(offset) : int(offset) + int(length)]
        (expected_size,) = struct.unpack(">I", entry[:4])
        payload = zlib.decompress(entry[4:])
        if len(payload) != expected_size:
            raise OnnxqError(
                f"corrupt entry {name!r} in {data_dir}/Rdata.rdb: size mismatch; reinstall {DEBIAN_PACKAGE}"
            )
        values = _read_rds_bytes(payload)
        vectors[str(name)] = ["" if value is None else str(value) for value in values]
    return vectors


def _download_package_data(work_dir: Path) -> Path:
    """Fetch and unpack the .deb (no install) into ``work_dir``; return its R ``data`` directory."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise OnnxqError(f"{DEBIAN_PACKAGE} is not installed and apt-get/dpkg-deb are missing: install it with apt")

    def download() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=work_dir, capture_output=True, text=True)

    result = download()
    if result.returncode != 0:  # package lists may be missing: refresh once and retry
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        result = download()
    debs = sorted(work_dir.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        raise OnnxqError(
            f"could not download {DEBIAN_PACKAGE} with apt-get ({result.stderr.strip().splitlines()[-1:]}): "
            "run `apt-get update` as root, or install the package"
        )
    unpacked = work_dir / "unpacked"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], check=True)
    return unpacked / INSTALLED_DATA_DIR.relative_to("/")


def verify_novels(texts: dict[str, str]) -> None:
    """Fail loudly unless all six novels are present, of sane length, and each opens as expected."""
    missing = sorted(set(NOVELS) - set(texts))
    if missing:
        raise OnnxqError(f"austen: novels missing: {', '.join(missing)}; rerun `python -m models.austen --force`")
    for name, text in texts.items():
        line_count = text.count("\n")
        if not MIN_LINES <= line_count <= MAX_LINES:
            raise OnnxqError(f"austen: {name} has {line_count} lines, expected {MIN_LINES}..{MAX_LINES}; rebuild it")
        if OPENING_PHRASES[name] not in " ".join(text.split()[:3000]):
            raise OnnxqError(f"austen: {name} does not contain {OPENING_PHRASES[name]!r} near its start; rebuild it")


def build_austen(force: bool = False) -> dict[str, Path]:
    """Extract the six novels into the cache (skipped if present and valid); return name → text file path."""
    paths = {name: novel_path(name) for name in NOVELS}
    if not force and all(path.exists() for path in paths.values()):
        try:
            verify_novels({name: path.read_text(encoding="utf-8") for name, path in paths.items()})
            return paths
        except OnnxqError:
            pass  # fall through and rebuild
    with tempfile.TemporaryDirectory(prefix="onnxq-austen-") as work:
        data_dir = INSTALLED_DATA_DIR
        if not (data_dir / "Rdata.rdb").exists():
            data_dir = _download_package_data(Path(work))
        vectors = read_lazyload_vectors(data_dir)
        texts = {name: "\n".join(vectors[name]) + "\n" for name in NOVELS if name in vectors}
        verify_novels(texts)
    for name, text in texts.items():
        with atomic_output(paths[name]) as temp_path:
            temp_path.write_text(text, encoding="utf-8")
    return paths


def novel_lines(name: str) -> list[str]:
    """The novel's lines (built on first use), as in the R package: blank lines separate paragraphs."""
    path = novel_path(name)
    if not path.exists():
        build_austen()
    return path.read_text(encoding="utf-8").splitlines()


def novel_text(name: str) -> str:
    """The novel as one string with its original line breaks (built on first use)."""
    return "\n".join(novel_lines(name)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.austen",
        description="Extract Jane Austen's six novels (Debian r-cran-janeaustenr) to <cache>/austen/*.txt.",
        epilog="Example: python -m models.austen   (ONNXQ_CACHE overrides ~/.cache/onnxq)",
    )
    parser.add_argument("--force", action="store_true", help="re-extract even if the text files are valid")
    args = parser.parse_args(argv)
    paths = build_austen(force=args.force)
    for name, path in paths.items():
        text = path.read_text(encoding="utf-8")
        print(f"{NOVELS[name]:<20} {text.count(chr(10)):>6} lines {len(text.split()):>7} words  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
