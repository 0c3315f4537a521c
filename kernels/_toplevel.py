"""This folder under the top-level name ``kernels``, and why it steps aside there.

The folder is the package ``zipage.kernels`` (pyproject's ``package-dir``). Where a checkout's root is on
``sys.path`` (``python -m zipage.demo`` or ``python -m pytest`` run from the root put it first), it is also
importable as ``kernels``, a name that belongs to the Hugging Face ``kernels`` distribution, which transformers
imports whenever it is installed (from 5.25 it always is): transformers then got this folder and failed
(``cannot import name 'CUDAProperties' from 'kernels'``). So under that name the folder hands the import over to
any other ``kernels`` on ``sys.path``; where there is none, it stays itself (scripts in ``benchmarks/`` import it
so from a checkout without zipage installed: with transformers 5.25, which always installs Hugging Face's, those
scripts need zipage installed).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def handed_over(name: str, init_file: str) -> bool:
    """Whether the import of ``name`` (this package's ``__name__``) was handed to another package: only under the
    top-level name ``kernels``, and only where one other than this folder is found on ``sys.path`` (it is then
    executed and put in ``sys.modules`` in this one's place, which the import statement returns)."""
    if name != "kernels":
        return False
    # every sys.path entry that holds a zipage kernels folder is left out (this checkout's, and another checkout's
    # or worktree's: two copies handing the import to each other would recurse)
    path = [p for p in sys.path if not os.path.isfile(os.path.join(p or os.getcwd(), "kernels", "_toplevel.py"))]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.origin is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    sys.modules.pop("kernels._toplevel", None)  # (this module, under the other package's name)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise
    return True
