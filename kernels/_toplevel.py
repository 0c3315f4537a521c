"""This folder under the top-level name ``kernels``, and why it steps aside there.

The folder is the package ``zipage.kernels`` (pyproject's ``package-dir``). Where a checkout's root is on
``sys.path`` (``python -m zipage.demo`` or ``python -m pytest`` run from the root put it first), it is also
importable as ``kernels``, a name that belongs to the Hugging Face ``kernels`` distribution, which transformers
imports whenever it is installed (from 5.25 it always is): transformers then got this folder and failed
(``cannot import name 'CUDAProperties' from 'kernels'``). So under that name the folder hands the import over to
any other ``kernels`` on ``sys.path``; where there is none, it stays itself (scripts in ``benchmarks/`` import it
so from a checkout without zipage installed).
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
    folder = os.path.dirname(os.path.realpath(init_file))
    root = os.path.dirname(folder)
    path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.origin is None or os.path.dirname(os.path.realpath(spec.origin)) == folder:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
    return True
