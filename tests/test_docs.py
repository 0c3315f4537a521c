"""The documentation site builds with ``mkdocs build --strict`` (a broken link or a stale API
reference fails it), its API reference covers every public name, and its scorer examples run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zipage
from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if shutil.which("mkdocs") is None and not _has_module("mkdocs"):
        if os.environ.get("CI"):
            pytest.fail("mkdocs is missing: the dev extra installs mkdocs-material and mkdocstrings")
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_site_builds_strict(site):
    assert (site / "index.html").is_file()
    for page in ("quickstart", "concepts", "method", "comparison", "api", "guide/space", "guide/custom-generate"):
        assert (site / page / "index.html").is_file(), page


def test_api_reference_lists_every_public_name(site):
    html = (site / "api" / "index.html").read_text()
    anchors = set(re.findall(r'id="(zipage[._][A-Za-z_]+)"', html))
    missing = [name for name in zipage.__all__ if f"zipage.{name}" not in anchors]
    assert not missing, f"the API reference lacks {missing}"
    assert "zipage_cli" in anchors  # the command line
    # Generated from the docstrings, not written by hand: a docstring line shows up on the page.
    assert "A compressed paged KV cache for" in html


def test_every_figure_the_docs_show_is_committed():
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text()):
            assert (page.parent / target).resolve().is_file(), f"{page.relative_to(ROOT)} shows missing {target}"


def test_method_page_cites_the_paper_and_only_the_repository():
    text = (DOCS / "method.md").read_text()
    assert "arXiv 2603.08743" in text and "Findings of ACL 2026" in text
    assert "shared/" not in text and "ALGORITHM" not in text
    assert "| Zipage (the paper's engine) | 2,557 | 87.0 |" in text


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_writing_a_scorer_examples_run(monkeypatch):
    """Every scorer class on the page registers, and generate() compresses with it."""
    import zipage.scoring

    monkeypatch.setattr(zipage.scoring, "_REGISTRY", dict(zipage.scoring._REGISTRY))  # leave no names behind
    namespace: dict = {}
    names = []
    for block in _python_blocks(DOCS / "guide" / "writing-a-scorer.md"):
        code = "\n".join(line for line in block.splitlines() if not line.startswith(("model.", "llm = ")))
        exec(compile(code, "writing-a-scorer.md", "exec"), namespace)  # noqa: S102
        names += re.findall(r'name = "(\w+)"', block)
    assert names == ["vnorm", "lastq", "decayed_knorm"]
    model = tiny_model("llama")
    prompt = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(0))
    for name in names:
        assert name in zipage.list_scorers()
        cache = zipage.ZipageCache(config=model.config, budget=8, page_size=4, window=4, scorer=name)
        model.generate(prompt, past_key_values=cache, max_new_tokens=12, do_sample=False)
        assert cache.stats()["compressions"] >= 2 and cache.stored_length() <= 12
