"""A reference for compressed decoding that shares no code with zipage.

It replays a token stream through the model in one plain forward (no cache: every layer computes
the keys and values of every token), with an eager attention in which each query of each layer and
KV head sees exactly a given set of positions: a decoded token the positions the compressed cache
kept when that token went through the model, a prompt token every real token up to itself. Each
token's keys and values then come out as they did under eviction, so the logits must be those the
compressed cache produced. Only ``torch`` and ``transformers`` are used, never ``zipage``.
"""

from __future__ import annotations

import copy
import threading

import torch
from transformers import AttentionInterface

NAME = "kept_positions_reference"
_allowed = threading.local()


def masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(Q K^T * scale, masked) V in float32, query head ``h`` reading KV head ``h // group``.

    The model's own ``attention_mask`` is ignored: ``_allowed.masks[layer]`` (``[B, H_kv, T, T]``
    bool) says which keys each query sees. Learned sink logits (``s_aux``, one per query head, as
    GPT-OSS passes them) join each softmax's denominator."""
    allowed = _allowed.masks[module.layer_idx]
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    kv_of = torch.arange(Hq, device=query.device) // (Hq // Hkv)
    k, v, mask = key[:, kv_of].float(), value[:, kv_of].float(), allowed.to(query.device)[:, kv_of]
    scale = scaling if scaling is not None else D**-0.5
    scores = torch.einsum("bhqd,bhkd->bhqk", query.float(), k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        column = sinks.float().view(1, Hq, 1, 1).expand(B, Hq, T, 1)
        probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
    return out.transpose(1, 2).to(query.dtype).contiguous(), probs


AttentionInterface.register(NAME, masked_attention)


def allowed_masks(real: torch.Tensor, kept: list[dict[int, list[torch.Tensor]]], layers: int,
                  kv_heads: int, windows: list[int | None] | None = None) -> list[torch.Tensor]:
    """Per layer, ``[B, H_kv, T, T]`` bool: which keys each query sees.

    ``real``: ``[B, T]`` bool, False for padding. ``kept[b][t]``: for query ``t`` of row ``b``, one
    ``[H_kv, n]`` tensor of positions per layer; queries not listed see every real position up to
    their own (within the last ``windows[layer]`` positions, for a sliding-window layer). Padding is
    never seen (a padding query sees only itself, to stay finite)."""
    B, T = real.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    base = (causal[None] & real[:, None, :])[:, None].expand(B, kv_heads, T, T)
    masks = []
    for layer in range(layers):
        m = base.clone()
        window = windows[layer] if windows is not None else None
        if window is not None:
            m &= torch.ones(T, T, dtype=torch.bool).triu(-(window - 1))
        for b, rows in enumerate(kept):
            for t, per_layer in rows.items():
                pos = per_layer[layer].cpu()
                if pos.shape[0] != kv_heads or int(pos.max()) != t or int(pos.min()) < 0:
                    raise ValueError(f"kept positions of row {b}, query {t}, layer {layer} are not a set up to {t}")
                m[b, :, t] = False
                m[b, torch.arange(kv_heads)[:, None], t, pos] = True
                m[b, :, t] &= real[b]
        eye = torch.eye(T, dtype=torch.bool)
        m = m | (eye & ~real[:, :, None])[:, None]
        masks.append(m)
    return masks


def reference_logits(model, ids: torch.Tensor, real: torch.Tensor, kept: list[dict[int, list[torch.Tensor]]]):
    """Logits ``[B, T, V]`` (float32) of one plain forward of ``ids`` (``[B, T]``) in which every query
    sees what ``allowed_masks`` says (layers typed ``sliding_attention`` slide over the model's
    ``sliding_window``). Positions for the rotary embedding count real tokens only, as
    ``generate()`` does for left-padded rows. ``model`` is left untouched (a copy runs)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(NAME)
    cfg = ref.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    position_ids = (real.long().cumsum(-1) - 1).masked_fill(~real, 0)
    dev = next(ref.parameters()).device
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    windows = [cfg.sliding_window if t == "sliding_attention" else None for t in types]
    _allowed.masks = allowed_masks(real.cpu(), kept, cfg.num_hidden_layers, heads, windows)
    try:
        with torch.no_grad():
            out = ref(input_ids=ids.to(dev), position_ids=position_ids.to(dev), use_cache=False)
    finally:
        _allowed.masks = None
    return out.logits.float().cpu()
