"""Loading a model by name for ``LLM("...")``: a Hub id, or a local folder that must exist.

transformers treats any string that is not an existing folder as a Hub repo id, so a mistyped
local path comes back as "Repo id must be in the form 'repo_name' or 'namespace/repo_name'".
``load_model`` says instead that the path does not exist when the string can only be a path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# A Hub repo id: "name" or "namespace/name" (letters, digits, '-', '_', '.'; no '--' or '..').
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def looks_like_path(name: str | os.PathLike) -> bool:
    """True when ``name`` can only be a filesystem path, not a Hub repo id (``/x``, ``./x``, ``~/x``,
    ``a/b/c``, ``C:\\x``, anything with characters a repo id cannot hold)."""
    if isinstance(name, os.PathLike):
        return True
    text = str(name)
    if text.startswith(("/", ".", "~")) or "\\" in text or text.endswith("/"):
        return True
    return not _REPO_ID.match(text) or ".." in text or "--" in text


def load_model(name: str | os.PathLike, tokenizer: Any = None, *, dtype: Any = None, device: Any = None,
               with_tokenizer: bool = True):
    """``(model, tokenizer)`` for a Hub repo id or a local folder; the tokenizer is loaded unless given
    (or unless ``with_tokenizer`` is False: a tensor-parallel rank other than 0 needs none).

    Raises FileNotFoundError naming the path when ``name`` is a path (see ``looks_like_path``) and
    nothing is there. ``dtype`` None loads the checkpoint's own (``"auto"``); ``device`` is passed
    to transformers as ``device_map``."""
    local = Path(os.path.expanduser(str(name)))
    if not local.exists() and looks_like_path(name):
        raise FileNotFoundError(f"model path {str(name)!r} does not exist")
    if local.exists() and not local.is_dir():
        raise NotADirectoryError(f"model path {str(name)!r} is a file: give the folder holding the checkpoint")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(local) if local.exists() else str(name)
    if with_tokenizer and tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:  # no tokenizer files there, or ones transformers cannot read
            said = " ".join(str(error).split()) or type(error).__name__
            said = said if len(said) <= 160 else said[:157] + "..."
            raise ValueError(f"no tokenizer could be loaded from {source!r} (give one with tokenizer=..., or use a "
                             f"folder that holds the tokenizer's files); transformers said: {said}") from error
    # use_kernels=False: transformers 5.25 swaps in Hugging Face Hub kernels by default (fetched at load time), which
    # replace the modules' forwards the engine fuses (its own RMSNorm, SiLU, RoPE); before 5.25 it was the default
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto", device_map=device, use_kernels=False)
    return model, tokenizer
