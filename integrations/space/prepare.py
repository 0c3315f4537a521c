"""Make a folder ready to push to a Hugging Face Space: the app's files, a zipage wheel built from this
checkout, and a ``requirements.txt`` that names the wheel (zipage is not on PyPI yet, so the Space's
``pip install -r requirements.txt`` could not find it by name).

    python integrations/space/prepare.py OUT_DIR      # then push OUT_DIR to a Gradio Space repository

Builds with the setuptools installed here (``--no-build-isolation``, no network) when there is one, else in
pip's isolated build environment (which downloads setuptools).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
APP_FILES = ("app.py", "sidebyside.py", "views.py", "README.md")


def prepare(out: Path) -> Path:
    """Fill ``out`` (created if missing; old zipage wheels in it removed) and return the wheel's path."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("zipage-*.whl"):
        old.unlink()
    for name in APP_FILES:
        shutil.copy2(HERE / name, out / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out), str(ROOT)],
                   check=True)
    wheels = sorted(out.glob("zipage-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one zipage wheel in {out}, found {[w.name for w in wheels]}")
    lines = []
    for line in (HERE / "requirements.txt").read_text().splitlines():
        lines.append(f"./{wheels[0].name}" if line.strip() == "zipage" else line)
    (out / "requirements.txt").write_text("\n".join(lines) + "\n")
    return wheels[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to fill (a clone of the Space's repository, say)")
    args = parser.parse_args(argv)
    wheel = prepare(args.out)
    print(f"{args.out}: {', '.join(APP_FILES)}, requirements.txt and {wheel.name}; push it to the Space")
    return 0


if __name__ == "__main__":
    sys.exit(main())
