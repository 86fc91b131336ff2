"""One onnxruntime per environment: ``onnxruntime`` and ``onnxruntime-gpu`` install into one folder (two
``libonnxruntime.so``, and ``pip check`` sees nothing wrong), so ``onnxq[llm]`` takes onnxruntime-genai in the
flavour of onnxq's own onnxruntime: ``onnxruntime-genai-cuda`` (requires ``onnxruntime-gpu``) where onnxq depends on
``onnxruntime-gpu`` (Linux x86_64), ``onnxruntime-genai`` (requires ``onnxruntime``) elsewhere.

Facts checked: on each platform the ORT that the ``llm`` extra's genai package needs is the ORT of onnxq's core
dependencies; this environment holds exactly one of ``onnxruntime`` / ``onnxruntime-gpu``, and, when an
onnxruntime-genai package is installed (CI installs ``.[test]``, which includes ``llm``), the ORT it requires is
that one.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
from packaging.requirements import Requirement  # noqa: E402

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
ORT_FLAVOURS = ("onnxruntime", "onnxruntime-gpu")
GENAI_NEEDS = {"onnxruntime-genai": "onnxruntime", "onnxruntime-genai-cuda": "onnxruntime-gpu"}  # PyPI metadata
PLATFORMS = {  # platform_system, platform_machine
    "linux-x86_64": ("Linux", "x86_64"), "linux-aarch64": ("Linux", "aarch64"), "macos-arm64": ("Darwin", "arm64"),
    "windows-amd64": ("Windows", "AMD64"),
}


def requirements(extra: str | None = None) -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def names_on(reqs: list[Requirement], platform: str) -> set[str]:
    system, machine = PLATFORMS[platform]
    env = {"platform_system": system, "platform_machine": machine, "extra": ""}
    return {r.name for r in reqs if r.marker is None or r.marker.evaluate(env)}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_llm_extra_needs_the_ort_onnxq_already_has(platform):
    core = names_on(requirements(), platform) & set(ORT_FLAVOURS)
    genai = names_on(requirements("llm"), platform) & set(GENAI_NEEDS)
    assert len(core) == 1 and len(genai) == 1, (core, genai)
    assert {GENAI_NEEDS[name] for name in genai} == core
    assert "tokenizers" in names_on(requirements("llm"), platform)


def installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def test_one_onnxruntime_is_installed_and_genai_requires_it():
    flavours = [name for name in ORT_FLAVOURS if installed(name)]
    assert len(flavours) == 1, f"two onnxruntime packages share one folder: {flavours}"
    for genai in (name for name in GENAI_NEEDS if installed(name)):
        needed = {Requirement(line).name for line in metadata.requires(genai) or []} & set(ORT_FLAVOURS)
        assert needed == set(flavours), (genai, needed, flavours)
