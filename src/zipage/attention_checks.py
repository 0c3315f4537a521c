"""What attention zipage serves: causal softmax attention, full or sliding-window, sinks, softcapping.

Both front ends keep a subset of a sequence's past tokens in its full-attention layers and attend
over it with causal softmax, scored the same way (the engine through its paged kernels,
``generate()`` through ``ZipageCache``). Layers typed ``sliding_attention`` in
``config.layer_types`` (Gemma 3, GPT-OSS, Qwen2 with ``use_sliding_window``) keep exactly their
window instead, never scored; learned per-head sink logits (GPT-OSS's ``sinks``, passed to the
attention as ``s_aux``) and logit softcapping (Gemma 2's ``attn_logit_softcapping``, passed as
``softcap``) are served too. A model whose attention needs more is refused with an error naming
the feature: ALiBi or any other additive bias, a sliding window on every layer (nothing left to compress; no ``layer_types`` naming full-attention layers),
non-causal attention, requests for the attention weights. Three places look:

- ``check_model_config``: the config, when an ``LLM`` or a ``ZipageCache`` is built;
- ``check_model``: the modules too, when an ``LLM`` is built or
  ``generate(cache_implementation="zipage")`` starts;
- ``check_attention_call``: the keyword arguments each attention call receives, for whatever
  neither of them shows (``output_attentions=True`` given to ``generate``, a model passing a
  window or a softcap its config does not name).

A sliding window of at least ``max_position_embeddings`` tokens never masks anything, and is not
refused (its layers count as full attention); neither is a ``sliding_window`` field that the
model's layers do not use (Qwen2 and Qwen3 without ``use_sliding_window``, layers typed
``full_attention``).
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


def sliding_layers(config: Any) -> tuple[int | None, list[bool]]:
    """``(window, is_sliding)``: the window the model's ``sliding_attention`` layers apply and which
    layers they are (``(None, all False)`` when no layer applies a window). A window without
    ``layer_types`` (every layer slides) is no mixed model: ``config_features`` refuses it."""
    n = config.num_hidden_layers
    window = _window(config)
    layer_types = getattr(config, "layer_types", None)
    if window is None or layer_types is None:
        return None, [False] * n
    return int(window), [t == "sliding_attention" for t in layer_types[:n]]


def config_features(config: Any) -> list[str]:
    """The unsupported attention features a (text) model config asks for, in words."""
    found = []
    window = _window(config)
    layer_types = getattr(config, "layer_types", None)
    if window is not None and (layer_types is None or "full_attention" not in layer_types):
        found.append(f"sliding-window attention on every layer (sliding_window={window} < max_position_embeddings="
                     f"{getattr(config, 'max_position_embeddings', None)}, and no layer_types naming full-attention "
                     "layers): zipage compresses full-attention layers and keeps sliding ones as they are, so such a "
                     "model has nothing to compress; set config.sliding_window=None if the model was trained with "
                     "full attention")
    other = sorted({t for t in layer_types or [] if t not in ("full_attention", "sliding_attention")})
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
    if getattr(config, "cross_attention_layers", None):  # (Mllama: its image keys and values in the cache)
        found.append(f"cross-attention layers (cross_attention_layers={list(config.cross_attention_layers)[:8]}): "
                     "their keys and values are an encoder's, not the tokens'")
    return found


def _safe(config: Any, attr: str) -> Any:
    """``config.attr``, or None where it is missing or differs from layer to layer (transformers raises then)."""
    try:
        return getattr(config, attr, None)
    except Exception:
        return None


def layer_shapes(config: Any) -> dict[tuple[Any, Any], list[int]]:
    """The layers of each (KV heads, head dim) where a config gives them per layer (``per_layer_config``, as
    Gemma 4's full and sliding layers differ); {} where it gives one value for the model."""
    per_layer = getattr(config, "per_layer_config", None)
    layers = getattr(config, "num_hidden_layers", None)
    if per_layer is None or not isinstance(layers, int):
        return {}
    shapes: dict[tuple[Any, Any], list[int]] = {}
    for i in range(layers):
        try:
            layer = per_layer[i]
            shape = (getattr(layer, "num_key_value_heads", None), getattr(layer, "head_dim", None))
        except Exception:
            return {}
        shapes.setdefault(shape, []).append(i)
    return shapes


def check_engine_config(config: Any) -> None:
    """Raise ValueError for a model the engine cannot page: its layers must share one number of KV heads and one
    head dim, and its values the keys' head dim (``generate(cache_implementation="zipage")`` keeps each layer's
    keys and values in their own shapes)."""
    v_dim, k_dim = getattr(config, "v_head_dim", None), _safe(config, "head_dim")
    if v_dim is not None and k_dim is not None and v_dim != k_dim:
        raise ValueError(f"zipage.LLM needs values of the keys' head dim, and {type(config).__name__} has "
                         f"v_head_dim={v_dim}, head_dim={k_dim} (the engine's KV pages hold keys and values of one "
                         "shape); generate(cache_implementation='zipage') serves such a model")
    shapes = layer_shapes(config)
    if len(shapes) > 1:
        text = "; ".join(f"layer{'s' if len(ids) > 1 else ''} {_ranges(ids)}: {h} KV heads of dim {d}"
                        for (h, d), ids in shapes.items())
        raise ValueError(f"zipage.LLM needs one KV-head count and head dim in every layer, and "
                         f"{type(config).__name__} gives them per layer ({text}); "
                         "generate(cache_implementation='zipage') serves such a model")


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    parts, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(parts)


def check_model_config(config: Any, top: Any = None) -> None:
    """Raise ValueError for a model config whose attention zipage cannot serve correctly (``config``: the text
    decoder's; ``top``: the model's own, where it differs, as an encoder-decoder's whose decoder config says
    nothing of an encoder)."""
    name = type(config).__name__
    for c in (config, top):
        if c is not None and getattr(c, "is_encoder_decoder", False):
            raise ValueError(f"zipage supports decoder-only models; {type(c).__name__} is an encoder-decoder")
    if getattr(config, "num_hidden_layers", None) is None or getattr(config, "num_attention_heads", None) is None:
        raise ValueError(f"zipage needs num_hidden_layers and num_attention_heads in the model config ({name}): "
                         "it compresses the keys and values of attention layers, and a model without them "
                         "(a state-space or recurrent model such as Mamba or RWKV) has none")
    found = config_features(config)
    if found:
        raise ValueError(f"zipage does not support {name}: its attention uses {'; '.join(found)}. zipage serves "
                         "causal softmax attention (full or sliding-window layers, sink logits, softcapping) only")


def check_model(model: Any) -> None:
    """``check_model_config`` on the model's text config, then its modules: sink logits must be one per
    query head (what the kernels take)."""
    config = model.config.get_text_config(decoder=True)
    check_model_config(config, model.config)
    heads = config.num_attention_heads
    for path, module in model.named_modules():
        sinks = getattr(module, "sinks", None)
        if isinstance(sinks, torch.Tensor) and tuple(sinks.shape) != (heads,):
            raise ValueError(f"zipage does not support {type(config).__name__}: its attention sinks at {path}.sinks "
                             f"have shape {tuple(sinks.shape)}, not one logit per query head ({heads},)")


def sink_logits(kwargs: dict) -> torch.Tensor | None:
    """The per-head sink logits an attention call received (GPT-OSS passes them as ``s_aux``)."""
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def check_attention_call(module: Any, kwargs: dict, where: str, window: int | None = None) -> None:
    """Raise NotImplementedError when an attention call asks for more than causal softmax attention with
    sink logits, softcapping and, where the caller applies one to this layer, the sliding ``window``."""
    found = []
    asked = kwargs.get("sliding_window")
    bound = getattr(getattr(module, "config", None), "max_position_embeddings", None)
    if asked is not None and (bound is None or asked < bound) and asked != window:
        found.append(f"a sliding window (sliding_window={asked}) on a layer that config.layer_types does not "
                     "type sliding_attention")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        found.append("non-causal attention (is_causal=False)")
    if kwargs.get("output_attentions"):
        found.append("the attention weights (output_attentions=True)")
    if found:
        raise NotImplementedError(f"{where} serves plain causal softmax attention only; layer "
                                  f"{getattr(module, 'layer_idx', '?')} ({type(module).__name__}) asks for "
                                  f"{'; '.join(found)}")
