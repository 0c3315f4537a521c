"""What attention zipage serves: plain causal softmax attention, nothing more.

Both front ends keep a subset of a sequence's past tokens and attend over it with plain causal
softmax, scored the same way (the engine through its paged kernels, ``generate()`` through
``ZipageCache``). A model whose attention needs more is refused with an error naming the
feature: logit softcapping, attention sinks (``s_aux``), ALiBi or any other additive bias, a
sliding window that is actually applied, non-causal attention, requests for the attention
weights. Three places look:

- ``check_model_config``: the config, when an ``LLM`` or a ``ZipageCache`` is built;
- ``check_model``: the modules too (learned sink logits have no config flag), when an ``LLM`` is
  built or ``generate(cache_implementation="zipage")`` starts;
- ``check_attention_call``: the keyword arguments each attention call receives, for whatever
  neither of them shows (``output_attentions=True`` given to ``generate``, a model passing a
  window or a softcap its config does not name).

A sliding window of at least ``max_position_embeddings`` tokens never masks anything, and is not
refused; neither is a ``sliding_window`` field that the model's layers do not use (Qwen2 and
Qwen3 without ``use_sliding_window``, layers typed ``full_attention``).
"""

from __future__ import annotations

from typing import Any

import torch

ALIBI_MODEL_TYPES = ("bloom",)  # ALiBi without a config flag


def _window(config: Any) -> int | None:
    """The sliding window the model's layers apply (None when none does, or it never masks)."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None  # the window belongs to layers this model does not have
    bound = getattr(config, "max_position_embeddings", None)
    return None if bound is not None and window >= bound else window


def config_features(config: Any) -> list[str]:
    """The unsupported attention features a (text) model config asks for, in words."""
    found = []
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        found.append(f"attention logit softcapping (attn_logit_softcapping={softcap})")
    window = _window(config)
    if window is not None:
        found.append(f"sliding-window attention (sliding_window={window} < max_position_embeddings="
                     f"{getattr(config, 'max_position_embeddings', None)}; set config.sliding_window=None if the "
                     "model was trained with full attention)")
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if other:
        found.append(f"layers of type {other} (only full-attention layers can be compressed: linear-attention "
                     "and hybrid models are refused)")
    attn_config = getattr(config, "attn_config", None)
    if getattr(config, "alibi", False) or getattr(attn_config, "alibi", False):
        found.append("ALiBi position biases (alibi=True)")
    elif getattr(config, "model_type", None) in ALIBI_MODEL_TYPES:
        found.append(f"ALiBi position biases ({config.model_type} models always add them)")
    elif getattr(config, "position_embedding_type", None) == "alibi":
        found.append("ALiBi position biases (position_embedding_type='alibi')")
    if getattr(config, "use_bidirectional_attention", False) or getattr(config, "is_causal", True) is False:
        found.append("bidirectional (non-causal) attention")
    if getattr(config, "output_attentions", False):
        found.append("output_attentions=True (no attention weights exist over evicted tokens)")
    for attr in ("kv_lora_rank", "num_kv_shared_layers"):
        if getattr(config, attr, None):
            found.append(f"latent or shared KV ({attr}={getattr(config, attr)})")
    return found


def check_model_config(config: Any) -> None:
    """Raise ValueError for a model config whose attention zipage cannot serve correctly."""
    name = type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"zipage supports decoder-only models; {name} is an encoder-decoder")
    if getattr(config, "num_hidden_layers", None) is None or getattr(config, "num_attention_heads", None) is None:
        raise ValueError(f"zipage needs num_hidden_layers and num_attention_heads in the model config ({name})")
    found = config_features(config)
    if found:
        raise ValueError(f"zipage does not support {name}: its attention uses {'; '.join(found)}. zipage serves "
                         "plain causal softmax attention only")


def check_model(model: Any) -> None:
    """``check_model_config`` on the model's text config, then its modules: learned attention sinks."""
    config = model.config.get_text_config(decoder=True)
    check_model_config(config)
    for path, module in model.named_modules():
        if isinstance(getattr(module, "sinks", None), torch.Tensor):
            raise ValueError(f"zipage does not support {type(config).__name__}: its attention uses attention sinks "
                             f"(learned sink logits, s_aux, at {path}.sinks). zipage serves plain causal softmax "
                             "attention only")


def check_attention_call(module: Any, kwargs: dict, where: str) -> None:
    """Raise NotImplementedError when an attention call asks for more than plain causal softmax."""
    found = []
    if kwargs.get("softcap") is not None:
        found.append(f"logit softcapping (softcap={kwargs['softcap']})")
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            found.append(f"attention sinks ({name})")
    window = kwargs.get("sliding_window")
    bound = getattr(getattr(module, "config", None), "max_position_embeddings", None)
    if window is not None and (bound is None or window < bound):
        found.append(f"a sliding window (sliding_window={window})")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        found.append("non-causal attention (is_causal=False)")
    if kwargs.get("output_attentions"):
        found.append("the attention weights (output_attentions=True)")
    if found:
        raise NotImplementedError(f"{where} serves plain causal softmax attention only; layer "
                                  f"{getattr(module, 'layer_idx', '?')} ({type(module).__name__}) asks for "
                                  f"{'; '.join(found)}")
