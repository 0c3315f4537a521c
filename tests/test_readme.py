"""The README's quick start stays true: CI runs exactly its test command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(readme: str) -> list[str]:
    blocks = readme.split("```bash\n")[1:]
    return [b.split("```")[0].strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start")[1].split("\n## ")[0]
    commands = _commands(quick)
    assert len(commands) == 2, "the quick start has exactly two commands"
    demo, tests = commands
    assert "zipage.demo" in demo and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, ".ci/run must call the README's test command verbatim"


def test_cli_info_lists_the_scorers(capsys):
    from zipage.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "scorers:" in out and "zipage" in out and "snapkv" in out
