"""ZipageCache: a transformers ``Cache`` that stores KV in pages and evicts tokens to a budget.

Layout: one growable ``PagePool`` and one page table per batch row, shared by
all layers; keys and values in pools stacked over layers,
``[L, num_pages, page_size, H_kv, D]`` (plus a float32 score state for stateful
scorers), each layer's ``keys``/``values`` being a view of its slice. Every row
of a ``generate()`` batch receives the same number of tokens per step, so all
rows and layers store the same number ``S`` of tokens and compress at the same
step: at the first layer's update, every layer at once, in groups of
``layer_stride`` layers (a layer is just more batch rows for the kernels; by
default as many as ``compress_scratch_bytes`` of gathered keys allow).

Sliding-window layers (``sliding_attention`` in ``config.layer_types``) are not compressed: they
keep exactly their window in pages of their own (``sliding_cache.py``), and everything below
speaks of the full-attention layers.

Lengths: ``get_seq_length()`` is the logical length ``L`` (tokens seen, which
positions come from); ``stored_length()`` is ``S <= L``. The mask is built for
the last ``S + q`` logical positions (``get_mask_sizes`` returns
``(S + q, L - S)``). Left padding is evicted before any real token and kept
padding stays in front, so that mask is exact for padded rows too.

Kept positions: stored slot ``j >= budget`` (and every slot before the first
compression) holds logical position ``L - S + j``; only the compacted prefix
``[0, budget)`` needs a map, ``[B, H_kv, budget]`` per layer, which each
compression gathers with its kept indices (``kept_positions`` reads it; decode
steps never touch it).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import capture
from .attention_checks import check_model_config, sink_logits, sliding_layers
from .compress import LayerPages, attention_scale, compress_layers, layer_batches
from .config import ZipageConfig
from .kernels import dequantize_reference, gather_kv, kv_dtype, paged_decode_attention, slot_indices, store_kv
from .kernels.fp8 import SCALE_DTYPE, is_fp8
from .kernels._triton import use_triton
from .memory.pool import PagePool
from .scoring import get_scorer
from .sliding_cache import SlidingLayer, WindowPages


class ZipageLayer(CacheLayerMixin):
    """One layer of a ``ZipageCache``: views of its pools, its lengths and its captured window queries."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: ZipageCache, layer_idx: int, index: int | None = None) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.index = layer_idx if index is None else index  # this layer's slice of the (full-layer) pools
        self.seen = 0  # logical length L
        self.stored = 0  # stored length S
        self.state: torch.Tensor | None = None
        self.key_scales = self.value_scales = None  # FP8 pages: [num_pages, page_size, H_kv] float32
        self.valid: torch.Tensor | None = None  # [B, S] bool, False for padding
        self.window_queries: torch.Tensor | None = None  # [B, Hq, <=w, D]
        self.prefix_positions: torch.Tensor | None = None  # [B, H_kv, budget] logical positions of slots < budget
        self.scaling: float | None = None
        self.paged_ok = False  # the capture reached this layer's attention with plain softmax attention
        self.paged_step = False  # this step's attention reads the pages directly

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.cache._init_pools(key_states, value_states)

    def bind(self) -> None:
        """Point this layer's tensors at its slice of the stacked pools."""
        c = self.cache
        self.keys, self.values = c.k_pool[self.index], c.v_pool[self.index]
        self.state = c.state_pool[self.index] if c.state_pool is not None else None
        if c.k_scale is not None:
            self.key_scales, self.value_scales = c.k_scale[self.index], c.v_scale[self.index]
        self.dtype, self.device = c.model_dtype, self.keys.device
        if self.valid is None:
            self.valid = torch.ones(c.batch_size_, 0, dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def pages(self) -> LayerPages:
        return LayerPages(self.keys, self.values, self.state, self.key_scales, self.value_scales, self.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.cache._update_layer(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.cache._stored_after_compression(self.stored, query_length)
        return stored + query_length, self.seen - stored

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = self.stored = 0
        self.valid = self.window_queries = self.prefix_positions = None
        self.keys = self.values = self.state = self.key_scales = self.value_scales = None
        self.paged_ok = self.paged_step = False
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "ZipageCache cannot be cropped: evicted tokens cannot be restored. Generation modes that roll the "
            "cache back (assisted / prompt-lookup decoding) are not supported with zipage."
        )


class ZipageCache(Cache):
    """A compressed paged KV cache for ``model.generate``.

    Args:
        config: the model's config (pass ``model.config`` itself: the cache uses that object to capture
            the queries it needs for scoring).
        zipage_config: a ``ZipageConfig``; or give its fields as keyword arguments instead
            (``kv_cache_dtype="fp8"``: FP8 pages with a scale per token and KV head).

    Example::

        cache = zipage.ZipageCache(config=model.config, budget=256, page_size=16)
        model.generate(**inputs, past_key_values=cache, max_new_tokens=512)
        cache.stored_length()  # <= budget + buffer
    """

    def __init__(self, config: Any = None, zipage_config: ZipageConfig | None = None, **fields: Any) -> None:
        if config is None:
            raise TypeError("ZipageCache needs the model config: ZipageCache(config=model.config, ...)")
        if zipage_config is not None and fields:
            raise TypeError(f"give ZipageCache either zipage_config= or its fields, not both (got {sorted(fields)})")
        if zipage_config is not None and not isinstance(zipage_config, ZipageConfig):
            raise TypeError(f"zipage_config must be a ZipageConfig, got {type(zipage_config).__name__}")
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        check_model_config(config)
        self.zipage_config = zipage_config if zipage_config is not None else ZipageConfig.from_dict(fields)
        self.zipage_config.validate()  # a config object may have been edited since it was built
        self.model_config = config
        self.scorer = get_scorer(self.zipage_config.scorer, self.zipage_config)
        self.pool = PagePool(0, growable=True)
        self.row_pages: list[list[int]] = []
        self.page_table: torch.Tensor | None = None  # [B, max_pages] int64
        self.k_pool: torch.Tensor | None = None  # [L, num_pages, page_size, H_kv, D]
        self.v_pool: torch.Tensor | None = None
        self.state_pool: torch.Tensor | None = None  # [L, num_pages, page_size, H_kv] float32
        self.k_scale: torch.Tensor | None = None  # FP8 pages: [L, num_pages, page_size, H_kv] float32
        self.v_scale: torch.Tensor | None = None
        self.model_dtype: torch.dtype | None = None  # the keys' dtype as the model hands them over
        self.batch_size_ = 0
        self._step_slots: torch.Tensor | None = None
        self.num_compressions = 0
        self.tokens_evicted = 0
        self.padding_gap = False  # padding inside a sequence seen: masks come from the cache's validity
        self.capture_ok = True  # False once a layer's attention was seen to bypass the capture wrapper
        window, sliding = sliding_layers(config)
        self.window_pages = WindowPages(sum(sliding), window, self.zipage_config.page_size) if any(sliding) else None
        layers: list[ZipageLayer | SlidingLayer] = []
        for i, slides in enumerate(sliding):
            if slides:
                layers.append(SlidingLayer(self, i, sum(sliding[:i]), self.window_pages))
            else:
                layers.append(ZipageLayer(self, i, i - sum(sliding[:i])))
        self.full: list[ZipageLayer] = [lyr for lyr in layers if isinstance(lyr, ZipageLayer)]  # compressed
        super().__init__(layers=layers)

    # ------------------------------------------------------------------ public introspection
    def stored_length(self, layer_idx: int | None = None) -> int:
        """Tokens physically stored per row (and per KV head) in ``layer_idx`` (default: the first
        full-attention layer; a sliding-window layer stores its window)."""
        layer = self.full[0] if layer_idx is None else self.layers[layer_idx]
        return layer.stored() if isinstance(layer, SlidingLayer) else layer.stored

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Which logical positions layer ``layer_idx`` keeps: ``[batch, kv_heads, stored]`` int64, per KV
        head in slot order (ascending): slot ``j`` of head ``h`` in row ``b`` holds the token at position
        ``[b, h, j]``.

        A position is the token's index in the row's stream as the model saw it (prompt columns, then one
        per generated token), left padding included: position ``p`` of row ``b`` is padding where that
        column of the attention mask is 0. Padding is evicted before any real token, and the padding that
        is kept (a budget larger than the real tokens) is masked out of the attention all the same."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.layers):
            raise IndexError(f"layer_idx={layer_idx!r} is out of range: the model has {len(self.layers)} layers")
        layer = self.layers[layer_idx]
        if self.k_pool is None:
            heads = getattr(self.model_config, "num_key_value_heads", None) or self.model_config.num_attention_heads
            return torch.empty(max(self.batch_size_, 0), heads, 0, dtype=torch.long)
        B, H = self.batch_size_, self.k_pool.shape[3]
        if isinstance(layer, SlidingLayer):  # the window its last query attended (older stored slots are not read)
            first = max(layer.seen - layer.sliding_window, 0)
            return torch.arange(first, layer.seen, device=self.k_pool.device).expand(B, H, -1).clone()
        return _slot_positions(layer.prefix_positions, B, H, layer.seen, layer.stored, self.k_pool.device)

    def stats(self) -> dict[str, int | float]:
        """Memory accounting: tokens seen vs stored, pages in use, and KV bytes against a full cache."""
        layer = self.full[0]
        bytes_per_token = per_layer = 0
        full_per_token = full_layer = 0  # a full cache holds the model's dtype
        if self.k_pool is not None:
            per_layer = self.k_pool[0, 0, 0].numel() * self.k_pool.element_size()
            if self.k_scale is not None:
                per_layer += self.k_scale[0, 0, 0].numel() * SCALE_DTYPE.itemsize
            bytes_per_token = 2 * per_layer * self.k_pool.shape[0]
            full_layer = 2 * self.k_pool[0, 0, 0].numel() * self.model_dtype.itemsize
            full_per_token = full_layer * self.k_pool.shape[0]
        page = self.zipage_config.page_size
        rows = max(self.batch_size_, 1)
        window = {}
        if self.window_pages is not None:  # sliding layers: their window's pages, in bytes too
            w, n = self.window_pages, len(self.layers) - len(self.full)
            window = {"window_pages_in_use": w.pool.num_used, "window_pages_total": w.pool.num_pages,
                      "window_kv_bytes_in_use": w.pool.num_used * page * full_layer * n,
                      "window_kv_bytes_full": rows * layer.seen * full_layer * n}
        return {**window,
            "batch_size": self.batch_size_,
            "tokens_seen": layer.seen,
            "tokens_stored": layer.stored,
            "pages_in_use": self.pool.num_used,
            "pages_free": self.pool.num_free,
            "pages_total": self.pool.num_pages,
            "peak_pages": self.pool.peak_used,
            "compressions": self.num_compressions,
            "kv_bytes_in_use": self.pool.num_used * page * bytes_per_token,
            "kv_bytes_full": rows * layer.seen * full_per_token,
            "kv_bytes_pool": self.pool.num_pages * page * bytes_per_token,
        }

    # ------------------------------------------------------------------ storage
    def _init_pools(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.k_pool is not None:
            if key_states.shape[1] != self.k_pool.shape[3] or key_states.shape[3] != self.k_pool.shape[4]:
                raise ValueError(
                    "zipage needs the same number of KV heads and head dim in every layer; got "
                    f"{tuple(key_states.shape[1::2])} after {tuple(self.k_pool.shape[3:])}"
                )
            for layer in self.full:
                layer.bind()
            return
        _, H, _, D = key_states.shape
        L, n, p = len(self.full), self.pool.num_pages, self.zipage_config.page_size
        dev = key_states.device
        self.model_dtype = key_states.dtype
        dtype = kv_dtype(self.zipage_config.kv_cache_dtype, key_states.dtype)
        self.k_pool = torch.zeros(L, n, p, H, D, dtype=dtype, device=dev)
        self.v_pool = torch.zeros(L, n, p, H, value_states.shape[-1], dtype=dtype, device=dev)
        if self.zipage_config.kv_cache_dtype == "fp8":
            self.k_scale = torch.zeros(L, n, p, H, dtype=SCALE_DTYPE, device=dev)
            self.v_scale = torch.zeros_like(self.k_scale)
        if self.scorer.stateful:
            self.state_pool = torch.zeros(L, n, p, H, dtype=torch.float32, device=dev)
        for layer in self.full:
            layer.bind()

    def _grow_pools(self) -> None:
        if self.k_pool is None:
            return
        extra = self.pool.num_pages - self.k_pool.shape[1]
        if extra <= 0:
            return
        grow = lambda t: torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], dim=1)  # noqa: E731
        self.k_pool, self.v_pool = grow(self.k_pool), grow(self.v_pool)
        if self.state_pool is not None:
            self.state_pool = grow(self.state_pool)
        if self.k_scale is not None:
            self.k_scale, self.v_scale = grow(self.k_scale), grow(self.v_scale)
        for layer in self.full:
            layer.bind()

    # ------------------------------------------------------------------ the update path
    def _stored_after_compression(self, stored: int, q: int) -> int:
        cfg = self.zipage_config
        return cfg.budget if cfg.compresses(stored, q) else stored

    def _begin_step(self, batch: int, q: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Before the first layer stores a step: compress every layer if due, free the pages no
        layer needs any more, and give every row the pages this step needs."""
        if self.page_table is None:
            self.batch_size_ = batch
            self.row_pages = [[] for _ in range(batch)]
        elif batch != self.batch_size_:
            raise ValueError(f"ZipageCache was filled with batch size {self.batch_size_}, got {batch} now")
        cfg = self.zipage_config
        stored = self.full[0].stored
        if self.window_pages is not None:
            self.window_pages.begin(batch, q, self.full[0].seen, key_states)
        after = self._stored_after_compression(stored, q)
        if after != stored:
            self._compress_all(stored)
            self._trim_pages(after)
        need = -(-(after + q) // cfg.page_size)
        have = len(self.row_pages[0])
        if need > have:
            for pages in self.row_pages:
                pages.extend(self.pool.allocate(need - have))
            self._grow_pools()
            self.page_table = torch.tensor(self.row_pages, dtype=torch.long, device=key_states.device)
        if self.k_pool is None:
            self._init_pools(key_states, value_states)
        self._step_slots = slot_indices(self.page_table, 0, after + q, cfg.page_size)

    def _trim_pages(self, stored: int) -> None:
        need = -(-stored // self.zipage_config.page_size)
        if need < len(self.row_pages[0]):
            for pages in self.row_pages:
                self.pool.free(pages[need:])
                del pages[need:]
            self.page_table = self.page_table[:, :need].contiguous()

    def _before_update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The model's first layer starts a step (whichever its type)."""
        if layer_idx == 0:
            B, _, q, _ = key_states.shape
            self._begin_step(B, q, key_states, value_states)

    def _update_layer(self, layer: ZipageLayer, key_states: torch.Tensor, value_states: torch.Tensor):
        B, _, q, _ = key_states.shape
        self._before_update(layer.layer_idx, key_states, value_states)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        after = layer.stored
        slots = self._step_slots
        if slots.shape[1] != after + q:
            raise RuntimeError(f"zipage: layer {layer.layer_idx} updated out of step with layer 0")
        new = slots[:, after:]
        store_kv(layer.keys, new, key_states.transpose(1, 2), layer.values, value_states.transpose(1, 2),
                 layer.key_scales, layer.value_scales)
        if layer.state is not None:
            store_kv(layer.state, new, torch.zeros(B, q, layer.state.shape[-1], device=layer.state.device))
        layer.stored = after + q
        layer.seen += q
        # Assume real tokens; the capture wrapper overwrites this with what the attention mask says.
        layer.valid = torch.cat([layer.valid[:, :after], layer.valid.new_ones(B, q)], dim=1)
        stale = capture.pending_layer(self)
        if stale is not None:
            capture.disarm()  # put the model's attention name back
            if stale < layer.layer_idx:  # same forward: that layer's attention bypassed the AttentionInterface
                self.capture_ok = False
                if self.scorer.needs_queries:
                    raise RuntimeError(
                        f"zipage could not capture the queries of layer {stale}: this model's attention does not "
                        "go through transformers' AttentionInterface, and the scorer "
                        f"{self.scorer.name!r} needs them. Use a scorer that reads no queries "
                        "(e.g. 'streaming' or 'knorm') with this model."
                    )
        if self.capture_ok:
            capture.arm(self, layer.layer_idx, self.model_config)
        # Decode on CUDA: once the capture is known to reach this layer's attention, the wrapper
        # attends straight from the pages (Triton paged attention), so no dense copy is made.
        layer.paged_step = q == 1 and layer.paged_ok and not self.padding_gap and use_triton(layer.keys)
        if layer.paged_step:
            return key_states, value_states
        keys = gather_kv(layer.keys, slots).transpose(1, 2)
        values = gather_kv(layer.values, slots).transpose(1, 2)
        if layer.key_scales is not None:  # FP8 pages: the model's attention gets their values
            keys = dequantize_reference(keys, gather_kv(layer.key_scales, slots).transpose(1, 2), key_states.dtype)
            values = dequantize_reference(values, gather_kv(layer.value_scales, slots).transpose(1, 2),
                                          value_states.dtype)
        return keys, values

    def _on_attention(self, layer_idx: int, query: torch.Tensor, attention_mask, scaling, kwargs: dict):
        """Called by the capture wrapper with the layer's queries and mask, right after its update.

        Returns ``(output, mask)``: the attention output ``[B, q, H, D]`` when it computed it from the
        pages itself (paged decode), else None (the model's own attention then runs on the dense K/V
        with ``mask``, the model's mask, or, once padding inside a sequence was seen, that mask with
        the stored tokens' columns taken from the cache's own validity)."""
        layer = self.layers[layer_idx]
        w = self.zipage_config.window
        q = query.shape[2]
        recent = query[:, :, -w:, :].detach()
        if layer.window_queries is None or q >= w:
            layer.window_queries = recent.clone()
        else:
            layer.window_queries = torch.cat([layer.window_queries, recent], dim=2)[:, :, -w:, :]
        if scaling is not None:
            layer.scaling = float(scaling)
        layer.valid[:, layer.stored - q :] = _new_token_validity(attention_mask, query.shape[0], q, query.device)
        if q > 1 and not self.padding_gap and _has_gap(layer.valid):
            # Padding inside a sequence: the mask the model builds covers the last ``stored`` positions,
            # which stop matching the stored tokens once a compression has run, and the paged kernel
            # only skips leading padding. From now on the dense path with the cache's own validity runs.
            self.padding_gap = True
        if self.padding_gap and self.num_compressions and not layer.paged_step:  # (before one, the model's mask is right)
            impl = getattr(self.model_config, "_attn_implementation", None)
            attention_mask = _mask_from_validity(
                attention_mask, layer.valid[:, : layer.stored - q], q, impl, query.dtype
            )
        # Paged attention only where nothing beyond plain softmax attention is asked for.
        layer.paged_ok = not self.padding_gap and not any(
            kwargs.get(name) is not None for name in _NON_PLAIN_ATTENTION_KWARGS
        )
        if not layer.paged_step:
            return None, attention_mask
        B, H, _, D = query.shape
        scale = attention_scale(layer.scaling, D)
        lens = torch.full((B,), layer.stored, dtype=torch.int32, device=query.device)
        starts = (~layer.valid).sum(dim=1, dtype=torch.int32)
        out = paged_decode_attention(
            query[:, :, 0, :].contiguous(), layer.keys, layer.values, self.page_table, lens, scale, starts,
            max_len_hint=layer.stored, k_scale=layer.key_scales, v_scale=layer.value_scales,
            sinks=sink_logits(kwargs), softcap=kwargs.get("softcap"),
        )
        return out.view(B, 1, H, D), attention_mask

    def _compress_all(self, stored: int) -> None:
        """Compress every layer from ``stored`` tokens to the budget, ``layer_stride`` layers per batch."""
        cfg = self.zipage_config
        for layer in self.full:
            if layer.stored != stored or layer.valid is None or layer.valid.shape[1] != stored:
                raise RuntimeError(f"zipage lost track of layer {layer.layer_idx} ({layer.stored} vs {stored})")
            if self.scorer.needs_queries and (
                layer.window_queries is None or layer.window_queries.shape[2] < cfg.window
            ):
                raise RuntimeError(
                    f"zipage could not capture the queries of layer {layer.layer_idx}: build ZipageCache with "
                    "config=model.config (the very object the model holds), and use a model whose attention goes "
                    "through transformers' AttentionInterface"
                )
        slots = slot_indices(self.page_table, 0, stored, cfg.page_size)
        per_layer = self.batch_size_ * stored * self.k_pool[0, 0, 0].numel() * self.model_dtype.itemsize
        scales = [lyr.scaling for lyr in self.full]
        for start, stop, scaling in layer_batches(cfg, scales, self.k_pool.shape[-1], per_layer):
            self._compress_group(self.full[start:stop], slots, scaling)
        for layer in self.full:
            layer.stored = cfg.budget
        self.num_compressions += 1
        self.tokens_evicted += (stored - cfg.budget) * self.batch_size_

    def _compress_group(self, group: list[ZipageLayer], slots: torch.Tensor, scaling: float) -> None:
        cfg = self.zipage_config
        l0, l1 = group[0].index, group[-1].index + 1
        part = lambda t: t[l0:l1] if t is not None else None  # noqa: E731
        pools = LayerPages(self.k_pool[l0:l1], self.v_pool[l0:l1], part(self.state_pool), part(self.k_scale),
                           part(self.v_scale), self.model_dtype)
        queries = torch.stack([lyr.window_queries for lyr in group]) if self.scorer.needs_queries else None
        key_mask = torch.stack([lyr.valid for lyr in group])
        keep = compress_layers(
            pools, slots, key_mask, queries, self.scorer, k=cfg.budget, window=cfg.window, sinks=cfg.sinks,
            scaling=scaling, page_size=cfg.page_size, first=self.num_compressions == 0,
            layer_idx=group[0].layer_idx if len(group) == 1 else -1,
        )
        for lyr, kept in zip(group, keep):
            lyr.valid = lyr.valid.gather(1, kept[:, 0])
            before = _slot_positions(lyr.prefix_positions, *kept.shape[:2], lyr.seen, lyr.stored, kept.device)
            lyr.prefix_positions = before.gather(2, kept)

    # ------------------------------------------------------------------ generate() plumbing
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]`` (all rows store the same length)."""
        if self.page_table is None:
            return
        stored = self.full[0].stored
        slots = slot_indices(self.page_table, 0, stored, self.zipage_config.page_size)
        idx = beam_idx.to(slots.device)
        if self.window_pages is not None:
            self.window_pages.reorder(idx)
        L, P, p = self.k_pool.shape[:3]
        for pool in (self.k_pool, self.v_pool, self.state_pool, self.k_scale, self.v_scale):
            if pool is not None:
                pool = pool.view(torch.uint8) if is_fp8(pool) else pool  # (moved as bytes)
                flat = pool.view(L, P * p, *pool.shape[3:])
                flat[:, slots] = flat[:, slots].index_select(1, idx)
        for layer in self.full:
            if layer.valid is not None:
                layer.valid = layer.valid.index_select(0, idx)
            if layer.window_queries is not None:
                layer.window_queries = layer.window_queries.index_select(0, idx)
            if layer.prefix_positions is not None:
                layer.prefix_positions = layer.prefix_positions.index_select(0, idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("ZipageCache cannot change its batch size after it has been filled")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("ZipageCache cannot change its batch size after it has been filled")

    def reset(self) -> None:
        super().reset()
        for pages in self.row_pages:
            self.pool.free(pages)
        self.row_pages, self.page_table, self.batch_size_ = [], None, 0
        self.k_pool = self.v_pool = self.state_pool = self.k_scale = self.v_scale = None
        if self.window_pages is not None:
            self.window_pages.reset()
        self.num_compressions = self.tokens_evicted = 0
        self.padding_gap = False

    @property
    def batch_size(self) -> int:
        return self.batch_size_ if self.page_table is not None else -1

    def __repr__(self) -> str:
        return f"ZipageCache({self.zipage_config}, stored={self.stored_length()}, seen={self.get_seq_length()})"


def _slot_positions(prefix: torch.Tensor | None, batch: int, heads: int, seen: int, stored: int,
                    device) -> torch.Tensor:
    """``[batch, heads, stored]`` logical positions of the stored slots: the compacted ``prefix`` map
    (``[batch, heads, n]``, None before the first compression), then the slots stored since, one
    position each, up to ``seen``."""
    n = 0 if prefix is None else prefix.shape[2]
    tail = torch.arange(seen - stored + n, seen, device=device).expand(batch, heads, stored - n)
    return tail.clone() if prefix is None else torch.cat([prefix, tail], dim=2)


_NON_PLAIN_ATTENTION_KWARGS = ("sliding_window", "output_attentions")


def _new_token_validity(mask, batch: int, q: int, device) -> torch.Tensor:
    """Which of the ``q`` new tokens are real (not padding), read off the mask the model built."""
    if mask is not None and _is_block_mask(mask):  # flex attention: ask its mask function
        q_len, kv_len = mask.seq_lengths
        rows = torch.arange(batch, device=device)[:, None]
        if mask.shape[0] != batch:  # one mask for every row
            rows = torch.zeros_like(rows)
        cols = torch.arange(kv_len - q, kv_len, device=device)[None, :]
        valid = mask.mask_mod(rows, torch.zeros_like(rows), torch.full_like(rows, q_len - 1), cols)
        return torch.as_tensor(valid, device=device).to(torch.bool).expand(batch, q).clone()
    if mask is None or not isinstance(mask, torch.Tensor):
        return torch.ones(batch, q, dtype=torch.bool, device=device)
    if mask.dim() == 2:  # flash-style [B, L] padding mask
        return mask[:, -q:].to(device=device, dtype=torch.bool)
    row = mask[:, 0, -1, -q:]  # the last query sees every real key
    if row.dtype == torch.bool:
        valid = row
    else:
        valid = row > torch.finfo(row.dtype).min / 2
    return valid.expand(batch, q).to(device)


def _is_block_mask(mask) -> bool:
    return hasattr(mask, "mask_mod") and hasattr(mask, "seq_lengths") and not isinstance(mask, torch.Tensor)


def _has_gap(valid: torch.Tensor) -> bool:
    """True if some row has a padding token after a real one (padding inside the sequence, as when a
    continuation is left-padded), i.e. the invalid tokens are not a prefix of the row."""
    return valid.shape[1] > 1 and bool((valid[:, :-1] & ~valid[:, 1:]).any())


def _mask_from_validity(mask, valid: torch.Tensor, q: int, impl: str | None, dtype: torch.dtype):
    """``mask`` (the model's attention mask of this step) with its first ``valid.shape[1]`` key columns,
    the tokens stored before this step, set from the cache's own record of which are real. Where the
    model passed no mask, one is built in the form its attention implementation ``impl`` takes."""
    n = valid.shape[1]
    if n == 0:
        return mask
    if mask is None:  # nothing to mask among the positions the model thinks are stored
        if bool(valid.all()):
            return None
        B = valid.shape[0]
        new = torch.ones(B, q, dtype=torch.bool, device=valid.device)
        if impl is not None and impl.startswith("flash"):
            return torch.cat([valid, new], dim=1).long()
        causal = torch.ones(q, q, dtype=torch.bool, device=valid.device).tril()
        allowed = torch.cat([valid[:, None, None, :].expand(B, 1, q, n), causal.expand(B, 1, q, q)], dim=-1)
        if impl in (None, "eager"):  # eager attention adds its mask
            return torch.zeros((), dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)
        return allowed
    if _is_block_mask(mask):
        raise NotImplementedError(
            "zipage: padding inside a sequence (a left-padded continuation of a cache that has been compressed) "
            "is not supported with attn_implementation='flex_attention'; use 'sdpa' or 'eager'"
        )
    if not isinstance(mask, torch.Tensor):
        return mask
    out = mask.clone()
    if mask.dim() == 2:  # flash-style [B, L] padding mask
        out[:, :n] = valid.to(out.dtype)
        return out
    v = valid[:, None, None, :].expand(out.shape[0], out.shape[1], out.shape[2], n)
    if out.dtype == torch.bool:
        out[..., :n] = v
    else:
        out[..., :n] = torch.zeros((), dtype=out.dtype, device=out.device).masked_fill(~v, torch.finfo(out.dtype).min)
    return out
