"""Shared fixtures: tiny random-weight models of the supported families (how transformers tests itself)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter (must be set before they are defined).
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import zipage  # noqa: F401  (registers cache_implementation="zipage")
from zipage.kernels._triton import HAS_TRITON, interpreting

CUDA = torch.cuda.is_available()
BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load_bench(name: str):
    """A fresh module object of ``benchmarks/<name>.py`` (the folder on ``sys.path``, so a script's
    own imports of its neighbours resolve); executing it again re-runs whatever it registers."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"zipage_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _fp8_scale(request, monkeypatch):
    """FP8 pages' plain ``max|x| / 448`` scale in every test but those marked ``fp8_scale_search`` (which run
    the default search, ``kernels/fp8.py``). The search picks each row's scale by comparing sums of rounding
    errors, so a row whose two best scales nearly tie can take the other one, with every code changed, when
    its float32 values differ in the last bits. Tests that compare two computations of the same keys (one
    forward against decode steps, the engine's batches against generate()'s, two samples of one prompt) are
    about the logic around the codes, and would see those last-bit differences become whole rows of other
    codes; with one scale per row they see single codes at most, as before."""
    if request.node.get_closest_marker("fp8_scale_search") is None:
        monkeypatch.setenv("ZIPAGE_FP8_SCALE_STEPS", "1")
    else:
        monkeypatch.delenv("ZIPAGE_FP8_SCALE_STEPS", raising=False)


# Triton kernel tests: compiled on a GPU, in Triton's interpreter on a CPU, skipped without Triton.
requires_triton = pytest.mark.skipif(not HAS_TRITON or not (CUDA or interpreting()),
                                     reason="needs triton (GPU or interpreter)")

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=2048,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16, "use_sliding_window": False}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}


def tiny_model(family: str = "llama", seed: int = 0, attn: str = "sdpa", scale: float = 2.0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**_COMMON, **extra, **overrides})
    config._attn_implementation = attn
    model = model_cls(config).eval()
    # Larger random weights make the logits less flat, so greedy decoding has fewer near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


SLIDING_WINDOW = 6


def tiny_sliding_model(family: str, seed: int = 0, scale: float = 2.0, **overrides):
    """A tiny model whose layers mix ``sliding_attention`` (window ``SLIDING_WINDOW``) and
    ``full_attention``: ``"gemma3"`` (query pre-scaling, a RoPE base per layer type, (1 + w) norms,
    sdpa) or ``"gpt_oss"`` (learned sink logits, a mixture of experts, eager attention)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GptOssConfig, GptOssForCausalLM

    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, sliding_window=SLIDING_WINDOW, max_position_embeddings=512, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    if family == "gemma3":
        config = Gemma3TextConfig(**{**common, "intermediate_size": 128, "query_pre_attn_scalar": 24,
                                     "layer_types": ["sliding_attention", "sliding_attention", "full_attention",
                                                     "sliding_attention"], **overrides})
        config._attn_implementation = "sdpa"
        model = Gemma3ForCausalLM(config).eval()
    elif family == "gpt_oss":
        config = GptOssConfig(**{**common, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **overrides})
        config._attn_implementation = "eager"
        model = GptOssForCausalLM(config).eval()
    else:
        raise ValueError(f"no tiny sliding-window model {family!r}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):  # learned sink logits: large enough to matter
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
            elif p.dim() >= 2:
                p.mul_(scale)
    return model


def left_padded_batch(seed: int = 0, lengths=(12, 7, 10), vocab: int = 96):
    """A left-padded batch of 3 prompts of different lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


@pytest.fixture
def llama():
    return tiny_model("llama")
