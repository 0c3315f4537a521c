"""The ``kernels`` folder is ``zipage.kernels``; under the top-level name ``kernels`` (a checkout's root on
``sys.path``) it hands the import to another ``kernels`` package where one is installed (Hugging Face's, which
transformers imports), and stays itself where none is."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
import kernels
import zipage.kernels as z
print(json.dumps(dict(
    top=kernels.__file__, marker=getattr(kernels, "MARKER", None), ours=z.__file__, ours_compact=hasattr(z, "compact"),
    layer=__import__("kernels.layer").layer.WHERE if getattr(kernels, "MARKER", None) else None,
    top_is_ours=hasattr(kernels, "compact"))))
"""


def run_from_root(extra_path: Path | None) -> dict:
    """``SCRIPT`` run with the checkout's root first on ``sys.path`` (``python -c`` from the root), ``extra_path``
    after it."""
    env = dict(os.environ)
    parts = [str(extra_path)] if extra_path else []
    env["PYTHONPATH"] = os.pathsep.join(parts + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_another_kernels_package_is_not_shadowed_by_the_checkout(tmp_path):
    pkg = tmp_path / "kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("MARKER = 'other'\n")
    (pkg / "layer.py").write_text("from . import MARKER\nWHERE = 'other.layer:' + MARKER\n")
    out = run_from_root(tmp_path)
    assert out["marker"] == "other" and Path(out["top"]).resolve() == (pkg / "__init__.py").resolve()
    assert out["layer"] == "other.layer:other"  # its submodules come from it too
    assert Path(out["ours"]).resolve() == ROOT / "kernels" / "__init__.py" and out["ours_compact"]


def test_without_another_kernels_package_the_folder_stays_itself():
    try:
        importlib.metadata.distribution("kernels")
        pytest.skip("Hugging Face's kernels is installed here: the test above covers the hand-over")
    except importlib.metadata.PackageNotFoundError:
        pass
    out = run_from_root(None)
    assert out["top_is_ours"] and Path(out["top"]).resolve() == ROOT / "kernels" / "__init__.py"
    assert out["ours_compact"]


def test_no_script_of_the_checkout_shadows_an_installed_module():
    """Scripts run as ``python benchmarks/<name>.py`` (and the tests, whose folders go on ``sys.path``) put their
    folder first on ``sys.path``: a file there named like an installed module shadows it for every import, as
    ``benchmarks/kernels.py`` did Hugging Face's ``kernels`` (transformers 5.25 failed to import in every
    benchmark script, and in tensor-parallel ranks started after a test had loaded a benchmark)."""
    import importlib.machinery

    ours = {ROOT, ROOT / "src", ROOT / "tests", ROOT / "benchmarks", ROOT / "kernels"}
    outside = [p for p in sys.path if p and Path(p).resolve() not in ours]  # (a venv inside the checkout stays)
    for folder in ("benchmarks", "tests"):
        for script in sorted((ROOT / folder).glob("*.py")):
            name = script.stem
            if name == "__init__":
                continue
            assert name not in sys.stdlib_module_names, f"{folder}/{script.name} shadows the standard library"
            assert name != "kernels", f"{folder}/{script.name} shadows Hugging Face's kernels (transformers 5.25)"
            found = importlib.machinery.PathFinder.find_spec(name, outside)
            assert found is None, f"{folder}/{script.name} shadows the installed module {name} ({found.origin})"
