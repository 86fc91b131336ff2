"""onnxruntime-genai model folders in and out: a folder holding ``genai_config.json`` names its decoder model file
(``model.decoder.filename``); onnxq quantizes that file and writes a new folder beside it.

Rules:

* the output folder is never the input folder, inside it, or holding it (the input is never modified);
* the output folder does not exist, is empty, or is itself a genai folder (a previous output, replaced whole);
* everything is written into a temp folder ``.onnxq-<pid>-xxxxxxxx`` next to the output, then renamed into place:
  a failed or interrupted run leaves nothing partial (a killed run's temp folder is removed by the next run);
* every file of the input folder other than the model file and its external data is copied byte for byte;
  ``genai_config.json`` too, unless a custom-op library is given: it is copied into the output folder and named
  (by file name) in the decoder's ``session_options.custom_ops_library`` (onnxruntime-genai only loads a library
  from inside the model's folder).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from onnxq.errors import OnnxqError
from onnxq.ir.model import external_data_files, load_model, save_model
from onnxq.ir.paths import check_output_folder, remove_stale_temps, same_file, temp_prefix

GENAI_CONFIG = "genai_config.json"
CUSTOM_OPS_KEY = "custom_ops_library"


def is_genai_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding ``genai_config.json``."""
    return Path(path).is_dir() and (Path(path) / GENAI_CONFIG).is_file()


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``genai_config.json`` of ``folder`` as a dict; a one-line error when it is missing or not JSON."""
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        raise OnnxqError(f"{folder}: is a directory without {GENAI_CONFIG}; pass the .onnx file inside it, or an "
                         "onnxruntime-genai model folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OnnxqError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise OnnxqError(f"{path}: not a JSON object")
    return config


def decoder_file(folder: str | os.PathLike) -> Path:
    """The model file ``genai_config.json`` names (``model.decoder.filename``), which must be inside ``folder``."""
    folder = Path(folder)
    name = read_config(folder).get("model", {}).get("decoder", {}).get("filename")
    if not isinstance(name, str) or not name:
        raise OnnxqError(f"{folder / GENAI_CONFIG}: no model.decoder.filename; onnxq quantizes the decoder it names")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise OnnxqError(f"{folder / GENAI_CONFIG}: model.decoder.filename {name!r} is outside the folder")
    if not path.is_file():
        raise OnnxqError(f"{path}: the decoder named in {GENAI_CONFIG} does not exist")
    return path


def provider_device(folder: str | os.PathLike) -> str:
    """``cuda`` when the decoder's ``session_options.provider_options`` name CUDA, else ``cpu``: the custom-op
    library build a genai folder needs."""
    options = read_config(folder).get("model", {}).get("decoder", {}).get("session_options", {})
    providers = options.get("provider_options", []) if isinstance(options, dict) else []
    names = {key.lower() for entry in providers if isinstance(entry, dict) for key in entry}
    return "cuda" if "cuda" in names else "cpu"


def check_output_dir(source: str | os.PathLike, output: str | os.PathLike, option: str = "-o") -> Path:
    """Check the output folder before any work (see the module's rules); returns the folder it is written into."""
    source, output = Path(source), Path(output)
    src, out = source.resolve(), output.resolve()
    if same_file(source, output) or out == src:
        raise OnnxqError(f"{output}: {option} names the input folder; choose another {option} folder "
                         "(the input is never modified)")
    if out.is_relative_to(src):
        raise OnnxqError(f"{output}: {option} is inside the input folder {source}; choose a folder outside it")
    if src.is_relative_to(out):
        raise OnnxqError(f"{output}: {option} holds the input folder {source}; choose another {option} folder")
    if output.exists() and not output.is_dir():
        raise OnnxqError(f"{output}: is a file; with a model folder as input, {option} names a folder")
    if output.is_dir() and any(output.iterdir()) and not is_genai_folder(output):
        raise OnnxqError(f"{output}: a folder that is neither empty nor a genai model folder; choose a new "
                         f"{option} folder (onnxq replaces only a previous output)")
    return check_output_folder(output, option)


def model_files(folder: Path, model_path: Path) -> set[Path]:
    """The model file and its external-data files (resolved): the files quantizing replaces."""
    model = load_model(model_path, external_data=False)
    return {model_path.resolve(), *(p.resolve() for p in external_data_files(model, model_path).values())}


def decoder_files(folder: str | os.PathLike) -> list[Path]:
    """The decoder file of a genai folder and its external-data files, sorted (what its size on disk counts)."""
    return sorted(model_files(Path(folder), decoder_file(folder)))


def write_folder(source: str | os.PathLike, output: str | os.PathLike, model: onnx.ModelProto,
                 custom_ops_library: str | os.PathLike | None = None) -> None:
    """Write ``model`` as the decoder of a copy of the genai folder ``source`` at ``output`` (atomically).

    The model keeps its file name; it is saved with external data (``<name>.data``) when the input's was."""
    source, output = Path(source), Path(output)
    model_path = decoder_file(source)
    replaced = model_files(source, model_path)
    parent = check_output_dir(source, output)
    remove_stale_temps(parent)
    try:
        temp = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=parent))
    except OSError as exc:
        raise OnnxqError(f"{parent}: cannot write the output folder ({exc.strerror}); choose another -o") from None
    try:
        _chmod_as_umask(temp)
        _copy_tree(source, temp, replaced)
        target = temp / model_path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, target, external_data=True if len(replaced) > 1 else None)
        if custom_ops_library is not None:
            _add_custom_ops_library(temp, Path(custom_ops_library))
        _replace(temp, output)
    except OSError as exc:
        raise OnnxqError(f"{output}: writing failed ({exc.strerror}); check free space and permissions") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _chmod_as_umask(folder: Path) -> None:
    """Give a ``mkdtemp`` folder (mode 700) the mode a plain ``mkdir`` would have."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def _copy_tree(source: Path, target: Path, skip: set[Path]) -> None:
    """Copy every file of ``source`` (recursively, following links, in sorted order) except those in ``skip``."""
    for entry in sorted(source.iterdir()):
        if entry.resolve() in skip:
            continue
        if entry.is_dir():
            (target / entry.name).mkdir()
            _copy_tree(entry, target / entry.name, skip)
        elif entry.is_file():
            shutil.copyfile(entry, target / entry.name)


def _add_custom_ops_library(folder: Path, library: Path) -> None:
    """Copy ``library`` into ``folder`` and name it in the decoder's session options of ``genai_config.json``."""
    shutil.copyfile(library, folder / library.name)
    config = read_config(folder)
    decoder = config.setdefault("model", {}).setdefault("decoder", {})
    decoder.setdefault("session_options", {})[CUSTOM_OPS_KEY] = library.name
    (folder / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")


def _replace(temp: Path, output: Path) -> None:
    """Rename the finished ``temp`` folder onto ``output`` (a previous output is moved aside, then removed)."""
    if not output.exists():
        os.replace(temp, output)
        return
    aside = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=output.parent))
    os.replace(output, aside / "old")
    try:
        os.replace(temp, output)
    except OSError:
        os.replace(aside / "old", output)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
