"""README's two commands are the ones CI and users run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_demo_and_test_commands():
    demo, tests = readme_commands()
    assert demo.endswith("onnxq demo") and "pip install -e ." in demo
    assert 'pip install -e ".[test]"' in tests


def test_ci_runs_the_readme_test_command():
    test_command = readme_commands()[1].split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]
