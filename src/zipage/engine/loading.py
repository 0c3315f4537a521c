"""Loading a model by Hub id or local path, with errors that say what is wrong."""

from __future__ import annotations

import os
from typing import Any


def load_model(name: str | os.PathLike, tokenizer: Any = None, *, dtype: Any = None, device: Any = None):
    """``(model, tokenizer)`` from a Hub id or a local folder; a path that does not exist is named."""
    name = os.fspath(name)
    looks_like_path = (os.path.isabs(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1
                       or os.sep in name and os.path.exists(os.path.dirname(name) or "."))
    if looks_like_path and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"model path {name!r} does not exist")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = os.path.expanduser(name)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto", device_map=device)
    return model, tokenizer
