"""ZipageCache: a transformers ``Cache`` that stores KV row by row and evicts tokens to a budget.

Layout (``zipage.memory.rows``): every row of a ``generate()`` batch receives the same number of
tokens per step, so all rows and layers store the same number ``S`` of tokens and compress at
the same step. Each layer holds its keys and values as ``[B, capacity, H_kv, D]`` (plus a float32
score state for stateful scorers), row ``b``'s tokens at ``[b, :S]`` in order: attention reads
them as views, compaction keeps their order, and the CUDA paged kernels read the same memory as
pages (where none do, on the CPU, that is a view of ``[B, H_kv, capacity, D]`` memory, which
attention reads a head at a time). The capacity follows from the config (at most ``budget + buffer``
once the prompt is in) and ``max_cache_len``, grows one layer at a time and shrinks after a
compression that leaves less to hold. Compressions run at the first layer's update, one layer after another.
FP8 and INT8 pages (``kv_cache_dtype="fp8"`` / ``"int8"``) keep a float32 scale per token and KV head beside them.

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

import copy
import operator
import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import capture, environment
from .attention_checks import check_model_config, sink_logits, sliding_layers
from .compress import LayerPages, attention_scale, compress_layer
from .config import ZipageConfig
from .environment import check_environment
from .kernels import dequantize_reference, exact_merge, kv_dtype, paged_decode_attention, store_kv
from .kernels._triton import use_triton
from .kernels.fp8 import QUANTIZED_KV, SCALE_DTYPE, is_quantized, kv_rotation, query_weighting, rotate
from .memory.rows import (
    KERNEL_PAGE,
    as_pages,
    head_major_copy,
    plan_capacity,
    resized,
    row_page_table,
    row_slots,
    stored_limit,
)
from .query_moments import QueryMoments
from .scoring import get_scorer
from .sliding_cache import SlidingLayer, WindowPages


def _avoid_cudnn() -> bool:
    """``ZIPAGE_DENSE_CUDNN``: 0 (default) holds the model's SDPA off cuDNN on dense CUDA decode steps; 1 lets
    torch choose (to compare)."""
    return environment.value("ZIPAGE_DENSE_CUDNN", "0") == "0"


class ZipageLayer(CacheLayerMixin):
    """One layer of a ``ZipageCache``: its row-contiguous storage, its lengths and its captured window queries."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: ZipageCache, layer_idx: int, index: int | None = None) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.index = layer_idx if index is None else index  # this layer's place among the full layers
        self.seen = 0  # logical length L
        self.stored = 0  # stored length S
        self.state: torch.Tensor | None = None  # [B, capacity, H_kv] float32 score state (stateful scorers), 0 past S
        self._transposed: tuple | None = None  # (keys, values, both as [B, H_kv, capacity, D] views): see stored_kv
        self.key_scales = self.value_scales = None  # FP8 pages: [B, capacity, H_kv] float32
        # ZipageConfig.exact_tail: the last exact_tail - 1 stored tokens' keys and values in the model's dtype
        # ([B, H_kv, <= exact_tail - 1, D]), unrotated: those of the tokens in the last stored slots (a compression
        # keeps them there, but for padding it evicts from the window: ``realign_tail``).
        self.tail: tuple[torch.Tensor, torch.Tensor] | None = None
        self.step_exact: tuple[torch.Tensor, torch.Tensor] | None = None  # exact_recent's, for a paged decode step
        self.restore: tuple | None = None  # a prompt step's keys to store again (ZipageCache._restore_keys)
        self.valid: torch.Tensor | None = None  # [B, S] bool, False for padding
        self.window_queries: torch.Tensor | None = None  # [B, Hq, <=w, D]
        self.prefix_positions: torch.Tensor | None = None  # [B, H_kv, budget] logical positions of slots < budget
        self.scaling: float | None = None
        self.paged_ok = False  # the capture reached this layer's attention with plain softmax attention
        self.captured = False  # the capture wrapper has seen this layer's attention (its scaling and arguments)
        self.paged_step = False  # this step's attention reads the pages directly

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty storage (``[B, 0, H_kv, D]``) in the dtype and on the device of the first keys."""
        B, H, _, D = key_states.shape
        first = self.cache.full[0]
        if first.keys is not None and first is not self and (H, D) != tuple(first.keys.shape[2:]):
            raise ValueError(
                "zipage needs the same number of KV heads and head dim in every layer; got "
                f"{(H, D)} after {tuple(first.keys.shape[2:])}"
            )
        dev = key_states.device
        dtype = kv_dtype(self.cache.zipage_config.kv_cache_dtype, key_states.dtype)
        self.cache.model_dtype = key_states.dtype
        self.keys = torch.empty(B, 0, H, D, dtype=dtype, device=dev)
        self.values = torch.empty(B, 0, H, value_states.shape[-1], dtype=dtype, device=dev)
        if self.cache.zipage_config.kv_cache_dtype in QUANTIZED_KV:
            self.key_scales = torch.empty(B, 0, H, dtype=SCALE_DTYPE, device=dev)
            self.value_scales = torch.empty(B, 0, H, dtype=SCALE_DTYPE, device=dev)
        if self.cache.scorer.stateful:
            self.state = torch.empty(B, 0, H, dtype=torch.float32, device=dev)
        if self.valid is None:  # layer 0's empty record for every layer, so that they share the next ones
            shared = self.cache._shared_valid if first is not self else None
            if shared is None or shared.shape[1] != 0:
                shared = torch.ones(B, 0, dtype=torch.bool, device=dev)
            self.valid = shared
        self.dtype, self.device = key_states.dtype, dev
        self.is_initialized = True

    def resize(self, capacity: int) -> None:
        """Hold ``capacity`` tokens per row, keeping the stored ones (one layer's copy in flight)."""
        self._transposed = None
        head_major = self.cache._head_major  # (keys and values only: scales and state are small)
        self.keys = resized(self.keys, capacity, self.stored, head_major)
        self.values = resized(self.values, capacity, self.stored, head_major)
        if self.state is not None and self.state.shape[1] != capacity:
            self.state = resized(self.state, capacity, self.stored)
            self.state[:, self.stored :].zero_()  # the state of tokens yet to come
        self.key_scales = resized(self.key_scales, capacity, self.stored)
        self.value_scales = resized(self.value_scales, capacity, self.stored)

    def head_major_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as ``[B, H_kv, capacity, D]`` views (made once per storage)."""
        t = self._transposed
        if t is None or t[0] is not self.keys or t[1] is not self.values:  # new storage: new views
            t = self._transposed = (self.keys, self.values, self.keys.transpose(1, 2), self.values.transpose(1, 2))
        return t[2], t[3]

    def stored_kv(self, stored: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``stored`` tokens of every row as ``[B, H_kv, stored, D]`` keys and values (views)."""
        keys, values = self.head_major_views()
        return stored_view(keys, stored), stored_view(values, stored)

    def exact_recent(self, new_keys: torch.Tensor, new_values: torch.Tensor,
                     keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values ``[B, H_kv, n, D]`` this step's queries read exactly (``ZipageConfig.exact_tail``):
        the ``keep`` last stored before this step (as many as there are) and this step's ``new_keys`` /
        ``new_values``, the stored sequence's last ``n`` tokens. The last ``keep`` of them stay for the next step."""
        if self.tail is not None:
            new_keys = torch.cat([self.tail[0], new_keys], dim=2)
            new_values = torch.cat([self.tail[1], new_values], dim=2)
        # (copies: a view would hold a whole prompt's keys alive)
        self.tail = (new_keys[:, :, -keep:].clone(), new_values[:, :, -keep:].clone()) if keep else None
        return new_keys, new_values

    def read_back(self, lo: int, hi: int, key_rotation: torch.Tensor | None, value_rotation: torch.Tensor | None,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``lo..hi-1`` of every row of 8-bit pages as ``[B, H_kv, hi - lo, D]`` keys and values in ``dtype``,
        rotated back from the basis the pages store them in."""
        values = self.stored_kv(hi)[1]
        return (self.read_back_keys(lo, hi, key_rotation, dtype),
                rotate(dequantize_reference(values[:, :, lo:], self.value_scales[:, lo:hi].transpose(1, 2)),
                       value_rotation, dtype))

    def read_back_keys(self, lo: int, hi: int, rotation: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """``read_back``'s keys alone."""
        keys = self.stored_kv(hi)[0]
        return rotate(dequantize_reference(keys[:, :, lo:], self.key_scales[:, lo:hi].transpose(1, 2)), rotation, dtype)

    def realign_tail(self, keep: torch.Tensor, stored: int, key_rotation: torch.Tensor | None,
                     value_rotation: torch.Tensor | None) -> None:
        """After a compression from ``stored`` slots (``keep`` ``[B, H_kv, k]``, the old slots now in slots
        ``0..k-1``): the tail again holds the tokens of the last slots. Each is the tail entry of its token where
        the token was in the tail (always, but where padding among the kept last tokens was evicted and older ones moved
        up), else the token as the pages hold it."""
        tk, tv = self.tail
        n, k = tk.shape[2], keep.shape[2]
        n = min(n, k)
        old = keep[:, :, k - n:] - (stored - tk.shape[2])  # [B, H, n]: index into the old tail, < 0 if not in it
        inside = (old >= 0)[..., None]
        idx = old.clamp(min=0)[..., None]
        paged_k, paged_v = self.read_back(k - n, k, key_rotation, value_rotation, tk.dtype)
        self.tail = (torch.where(inside, tk.gather(2, idx.expand(-1, -1, -1, tk.shape[-1])), paged_k),
                     torch.where(inside, tv.gather(2, idx.expand(-1, -1, -1, tv.shape[-1])), paged_v))

    def pages(self) -> LayerPages:
        """The storage as ``B`` pages of ``capacity`` tokens (what ``compress_layer`` takes)."""
        return LayerPages(self.keys, self.values, self.state, self.key_scales, self.value_scales, self.dtype)

    def compress(self, slots: torch.Tensor, queries: torch.Tensor | None, **kwargs) -> torch.Tensor:
        """``compress_layer`` on this layer's storage: its first ``k`` slots of every row then hold the
        kept tokens. Returns the kept indices ``[B, H_kv, k]``."""
        head_major = not self.keys.is_contiguous()
        if head_major:  # into page layout for the compaction and back, one tensor at a time (as a resize)
            self._transposed = None
            self.keys = self.keys.contiguous()
            self.values = self.values.contiguous()
        keep = compress_layer(self.pages(), slots, self.valid, queries, **kwargs)
        if head_major:
            self.keys = head_major_copy(self.keys, keep.shape[-1])
            self.values = head_major_copy(self.values, keep.shape[-1])
        return keep

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        try:
            return self.cache._update_layer(self, key_states, value_states)
        except BaseException:
            # an update that raised after it armed the capture: its attention will not run, so the model's
            # attention name goes back now (else the next forward in this thread, with any cache, would route
            # that layer's attention to this cache)
            if capture.pending_layer(self.cache) is not None:
                capture.disarm()
            raise

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
        self.keys = self.values = self.state = self.key_scales = self.value_scales = self.tail = self.restore = None
        self._transposed = None
        self.paged_ok = self.paged_step = self.captured = False
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
        max_cache_len: the most tokens the cache will see, if known (``generate()`` sets it from its
            ``max_length``): the storage then never grows past what those tokens need.

    Example::

        cache = zipage.ZipageCache(config=model.config, budget=256, page_size=16)
        model.generate(**inputs, past_key_values=cache, max_new_tokens=512)
        cache.stored_length()  # <= budget + buffer
    """

    def __init__(self, config: Any = None, zipage_config: ZipageConfig | None = None,
                 max_cache_len: int | None = None, **fields: Any) -> None:
        if config is None:
            raise TypeError("ZipageCache needs the model config: ZipageCache(config=model.config, ...)")
        check_environment()
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
        self.max_cache_len = max_cache_len
        self.model_dtype: torch.dtype | None = None  # the keys' dtype as the model hands them over
        self.batch_size_ = 0
        self.capacity_ = 0  # tokens per row each layer holds (after its update this step)
        self.peak_capacity = 0
        self.peak_stored = 0
        self.page_table: torch.Tensor | None = None  # [B, capacity / KERNEL_PAGE], for the CUDA paged kernels
        self._step_stored = 0  # tokens every layer stores once this step's update is done
        self._step_slots: torch.Tensor | None = None  # [B, q] flat slots of this step's tokens in every layer
        self._step_index: torch.Tensor | None = None  # [q] their positions in every row (unquantized, unpaged rows)
        # (the last attention mask seen, which of its new tokens are real, the last record they were written to)
        self._mask_read: tuple = (None, None, None)
        self._lens_key: tuple | None = None  # (validity record, stored, kv_lens, kv_starts) of the paged kernel
        self._keep_queries = True  # this step's queries may be needed by the next compression
        self._capture_all = True  # every layer's attention goes through the capture this step (see _on_attention)
        # This step's ``_step_index`` once the first full layer's attention found that the others need nothing
        # but their store and views (``_update_lean``); None until then and in every other step
        self._lean_index: torch.Tensor | None = None
        # CUDA steps whose attention the model's SDPA runs over the rows (strided views): held off cuDNN's backend
        self.dense_without_cudnn = False
        # Such steps that capture only the first and last full layers hold cuDNN off between them (capture.py);
        # a forward that raised in between gives the switch back at the next step, a reset or collection.
        self.cudnn_hold = capture.CudnnHold()
        weakref.finalize(self, self.cudnn_hold.give)
        self._shared_valid: torch.Tensor | None = None  # layer 0's validity record before this step
        # Keys and values in [B, H_kv, capacity, D] memory (seen as [B, capacity, H_kv, D]): where no paged
        # kernel reads them (decided at the first update), so that attention reads each head as one block.
        self._head_major: bool | None = None
        self.num_compressions = 0
        self._waited = 0  # steps a due compression has waited for its window queries (_stored_after_compression)
        self.tokens_evicted = 0
        self.padding_gap = False  # padding inside a sequence seen: masks come from the cache's validity
        # No attention mask reached the capture yet, so every stored token is real (known on the host: after a
        # compression every layer shares one validity record again without comparing them on the device)
        self.all_real = True
        self.capture_ok = True  # False once a layer's attention was seen to bypass the capture wrapper
        # FP8 pages: the moments of the prompt queries the keys' scale search is weighted by (query_moments.py),
        # made at the first step
        self.query_moments: QueryMoments | None = None
        self._restores = False  # a layer holds a prompt step's keys to store again (ZipageLayer.restore)
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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``Cache.update`` with ``layer_idx`` checked first: one of the model's layers, counted from 0 (an
        IndexError naming it otherwise, not another layer's update or an index into the list)."""
        if type(layer_idx) is not int or not 0 <= layer_idx < len(self.layers):  # (the common case: one test)
            layer_idx = self._layer_index(layer_idx)
        if torch.is_grad_enabled():
            # A forward with autograd on (generate() runs under no_grad): the cache stores and reads outside the
            # graph and attention gets detached copies of the keys and values (gradients reach every weight but
            # through them). Tracked, the rows' views made under generate()'s no_grad refused the in-place store;
            # and the rows themselves, saved by attention for its backward, were changed by the next step's store
            # (a backward over several steps failed).
            with torch.no_grad():
                keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
                return keys.clone(), values.clone()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> ZipageCache:
        """A copy of the stored keys, values and state that reads the same model config object (the queries
        are captured through the config the model's attention modules hold: a copied config would lose them)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name == "model_config":  # (a copy made beside the model's, in the same deepcopy, is the one to read)
                new.model_config = memo.get(id(value), value)
            elif name == "cudnn_hold":  # (a switch this cache holds is its own to give back, not the copy's)
                new.cudnn_hold = capture.CudnnHold()
                weakref.finalize(new, new.cudnn_hold.give)
            else:
                setattr(new, name, copy.deepcopy(value, memo))
        return new

    def bind_model_config(self, config: Any) -> None:
        """Read the attention through ``config`` (the object the model's attention modules hold: ``generate()``
        passes it), after checking that it describes the layers this cache was built for. A cache built from
        another model's config would serve its layers wrongly (a full layer given a sliding window) or fail
        late with an unclear error."""
        window, sliding = sliding_layers(config)
        mine = [isinstance(layer, SlidingLayer) for layer in self.layers]
        theirs = [bool(s) for s in sliding]
        mine_window = self.window_pages.window if self.window_pages is not None else None
        if theirs != mine or (any(theirs) and window != mine_window):
            def describe(flags: list[bool], w: int | None) -> str:
                return f"{len(flags)} layers" + (f", {sum(flags)} of them sliding (window {w})" if any(flags) else "")

            raise ValueError(f"this ZipageCache was built for {describe(mine, mine_window)}, but the model has "
                             f"{describe(theirs, window)}: build the cache with config=model.config of the model "
                             "that uses it")
        self.model_config = config

    @property
    def max_cache_len(self) -> int | None:
        """The most tokens the cache will see (None: unknown); bounds how far its storage grows."""
        return self._max_cache_len

    @max_cache_len.setter
    def max_cache_len(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"ZipageCache.max_cache_len={value!r} is invalid: expected an int >= 1 or None")
        self._max_cache_len = value

    # ------------------------------------------------------------------ public introspection
    def stored_length(self, layer_idx: int | None = None) -> int:
        """Tokens physically stored per row (and per KV head) in ``layer_idx`` (default: the first
        full-attention layer; a sliding-window layer stores its window)."""
        layer = self.full[0] if layer_idx is None else self.layers[self._layer_index(layer_idx)]
        return layer.stored() if isinstance(layer, SlidingLayer) else layer.stored

    def _layer_index(self, layer_idx: Any) -> int:
        """``layer_idx`` as an int in range (numpy and 0-d torch integers taken), else an IndexError naming it."""
        try:
            i = operator.index(layer_idx) if not isinstance(layer_idx, bool) else None
        except TypeError:
            i = None
        if i is None or not 0 <= i < len(self.layers):
            raise IndexError(f"layer_idx={layer_idx!r} is out of range: the model has {len(self.layers)} layers "
                             f"(0 .. {len(self.layers) - 1})")
        return i

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Which logical positions layer ``layer_idx`` keeps: ``[batch, kv_heads, stored]`` int64, per KV
        head in slot order (ascending): slot ``j`` of head ``h`` in row ``b`` holds the token at position
        ``[b, h, j]``.

        A position is the token's index in the row's stream as the model saw it (prompt columns, then one
        per generated token), left padding included: position ``p`` of row ``b`` is padding where that
        column of the attention mask is 0. Padding is evicted before any real token, and the padding that
        is kept (a budget larger than the real tokens) is masked out of the attention all the same."""
        layer_idx = self._layer_index(layer_idx)
        layer = self.layers[layer_idx]
        first = self.full[0]
        if first.keys is None:
            heads = getattr(self.model_config, "num_key_value_heads", None) or self.model_config.num_attention_heads
            return torch.empty(max(self.batch_size_, 0), heads, 0, dtype=torch.long)
        B, H = self.batch_size_, first.keys.shape[2]
        if isinstance(layer, SlidingLayer):  # the window its last query attended (older stored slots are not read)
            start = max(layer.seen - layer.sliding_window, 0)
            return torch.arange(start, layer.seen, device=first.keys.device).expand(B, H, -1).clone()
        return _slot_positions(layer.prefix_positions, B, H, layer.seen, layer.stored, layer.keys.device)

    def stats(self) -> dict[str, int | float]:
        """Memory accounting: tokens seen vs stored, and KV bytes stored, held and at most held, against
        a full cache. ``pages_in_use`` counts pages of the config's ``page_size`` over the stored tokens.
        ``kv_bytes_held`` is the memory the cache's storage takes now: every full layer's rows at their
        capacity (``kv_bytes_pool``, with 8-bit scales), the sliding layers' window pool and the exact
        tail; what a memory comparison against a full cache should use (``kv_bytes_in_use`` counts only
        the stored tokens)."""
        layer = self.full[0]
        bytes_per_token = full_per_token = full_layer = 0  # a full cache holds the model's dtype
        if layer.keys is not None:
            per_layer = layer.keys[0, 0].numel() * layer.keys.element_size()
            per_layer += layer.values[0, 0].numel() * layer.values.element_size()
            if layer.key_scales is not None:
                per_layer += 2 * layer.key_scales[0, 0].numel() * SCALE_DTYPE.itemsize
            bytes_per_token = per_layer * len(self.full)
            full_layer = (layer.keys[0, 0].numel() + layer.values[0, 0].numel()) * self.model_dtype.itemsize
            full_per_token = full_layer * len(self.full)
        page = self.zipage_config.page_size
        rows = max(self.batch_size_, 1)
        window, window_held = {}, 0
        if self.window_pages is not None:  # sliding layers: their window's pages, in bytes too
            w, n = self.window_pages, len(self.layers) - len(self.full)
            window = {"window_pages_in_use": w.pool.num_used, "window_pages_total": w.pool.num_pages,
                      "window_kv_bytes_in_use": w.pool.num_used * page * full_layer * n,
                      "window_kv_bytes_full": rows * layer.seen * full_layer * n}
            if w.k_pool is not None:
                window_held = (w.k_pool.numel() + w.v_pool.numel()) * w.k_pool.element_size()
        tail = rows * (layer.tail[0].shape[2] if layer.tail is not None else 0) * full_per_token
        return {**window,
            "batch_size": self.batch_size_,
            "tokens_seen": layer.seen,
            "tokens_stored": layer.stored,
            "capacity_tokens": self.capacity_,
            "pages_in_use": self.batch_size_ * -(-layer.stored // page),
            "peak_pages": self.batch_size_ * -(-self.peak_stored // page),
            "compressions": self.num_compressions,
            "kv_bytes_in_use": rows * layer.stored * bytes_per_token,
            "kv_bytes_full": rows * layer.seen * full_per_token,
            "kv_bytes_pool": rows * self.capacity_ * bytes_per_token,
            "kv_bytes_peak": rows * self.peak_capacity * bytes_per_token,
            "kv_bytes_held": rows * self.capacity_ * bytes_per_token + window_held + tail,
            # (ZipageConfig.exact_tail: the last tokens' keys and values kept beside the pages, the model's dtype)
            "exact_tail_bytes": tail,
        }

    # ------------------------------------------------------------------ the update path
    def _stored_after_compression(self, stored: int, q: int) -> int:
        cfg = self.zipage_config
        if not cfg.compresses(stored, q):
            return stored
        # A compression due before the window queries are there waits for them: a generate() call that ended
        # early (an EOS past the budget) kept none, and the next call's steps supply them. After ``window``
        # steps without them (each step brings at least one) it compresses, and raises if they never came.
        return cfg.budget if self._has_queries() or self._waited >= cfg.window else stored

    def _has_queries(self) -> bool:
        """Whether every full layer holds the ``window`` queries a compression scores with (or none are read)."""
        w = self.zipage_config.window
        return not self.scorer.needs_queries or all(
            layer.window_queries is not None and layer.window_queries.shape[2] >= w for layer in self.full)

    def _check_early_layers(self, key_states: torch.Tensor) -> None:
        """Layers made before the first step (``early_initialization``) must match what the model stores."""
        def said(b, h, d, dtype, device) -> str:
            return f"batch size {b}, {h} KV heads of dim {d}, {dtype} on {device}"

        B, H, _, D = key_states.shape
        got = (B, H, D, key_states.dtype, key_states.device)
        for layer in self.layers:
            keys = getattr(layer, "keys", None)
            if keys is None or not getattr(layer, "is_initialized", False):
                continue
            made = (keys.shape[0], keys.shape[2], keys.shape[3], getattr(layer, "dtype", keys.dtype), keys.device)
            if made != got:
                raise ValueError(
                    f"ZipageCache's layers were made (early_initialization) for {said(*made)}, but the model's first "
                    f"step gives {said(*got)}: call early_initialization with the model's shapes, dtype and device, "
                    "or leave it out (the cache makes its layers at the first step)")

    def _begin_step(self, batch: int, q: int, key_states: torch.Tensor) -> None:
        """Before the first layer stores a step: compress every layer if due, and decide how many
        tokens per row every layer holds for this step (each layer resizes in its own update)."""
        self.cudnn_hold.give()  # (held only if the last step's forward raised between its first and last layers)
        if not self.batch_size_:
            self._check_early_layers(key_states)
            self.batch_size_ = batch
        elif batch != self.batch_size_:
            raise ValueError(f"ZipageCache was filled with batch size {self.batch_size_}, got {batch} now")
        cfg = self.zipage_config
        first = self.full[0]
        stored = first.stored
        if self._restores:  # (a layer whose attention never reached the capture: nothing to hold on to)
            for layer in self.full:
                layer.restore = None
            self._restores = False
        if self.query_moments is None and not first.seen and query_weighting(cfg.kv_cache_dtype, key_states.shape[-1]):
            self.query_moments = QueryMoments(len(self.full), key_states.shape[1], key_states.shape[-1],
                                              key_states.device)
        if self.window_pages is not None:
            self.window_pages.begin(batch, q, first.seen, key_states)
        after = self._stored_after_compression(stored, q)
        if after != stored:
            self._compress_all(stored)
            self._waited = 0
        elif cfg.compresses(stored, q):  # (waiting for the window queries)
            self._waited += 1
        # (a bound the input has passed is stale, e.g. a generate() call's kept for a loop of forwards after it, or
        # counting only the new tokens of a conversation: unknown then, rows grow geometrically)
        known = self.max_cache_len is not None and first.seen + q <= self.max_cache_len
        remaining = self.max_cache_len - first.seen if known else None
        limit = stored_limit(after, q, cfg.capacity, remaining)
        if self._head_major is None:
            self._head_major = not use_triton(key_states) or self._dense_on_gpu(key_states)
        # The run's end, not the budget, sets the limit: rows hold exactly that many tokens.
        exact = remaining is not None and limit < cfg.capacity
        capacity = plan_capacity(self.capacity_, after + q, limit, len(self.layers),
                                 1 if self._head_major else KERNEL_PAGE, decode=q == 1, exact=exact)
        # Paged kernels read whole pages; rows sized to the run's end otherwise attend densely (its last steps).
        paged = not self._head_major and capacity % KERNEL_PAGE == 0
        if capacity != self.capacity_ or (paged and self.page_table is None):
            self.capacity_ = capacity
            self.page_table = row_page_table(batch, capacity, key_states.device) if paged else None
        self._step_stored = after + q
        # The paged store takes slot ids; the PyTorch store copies into ``[:, after:after + q]`` of every row.
        self._step_slots = row_slots(batch, capacity, after + q, key_states.device)[:, after:] if paged else None
        # Unquantized rows written by the PyTorch store: positions ``after .. after + q - 1`` of every row.
        self._step_index = None if paged or cfg.kv_cache_dtype in QUANTIZED_KV else torch.arange(
            after, after + q, device=key_states.device)
        self._keep_queries = self._queries_needed(after + q, first.seen + q, q)
        self._capture_all = True
        self._lean_index = None
        # Dense decode steps on CUDA: SDPA's cuDNN backend builds a plan for every new K/V shape it meets (~34 ms
        # of host time on an H200, benchmarks/sdpa_host.py) and a decode step meets a new length every time;
        # FlashAttention takes the rows' views with no plan (~50 us a call either way once cuDNN's plans exist).
        self.dense_without_cudnn = q == 1 and not paged and key_states.is_cuda and _avoid_cudnn()
        self._mask_read = (None, None, None)
        self._lens_key = None
        self.peak_capacity = max(self.peak_capacity, capacity)
        self.peak_stored = max(self.peak_stored, after + q)

    def _dense_on_gpu(self, key_states: torch.Tensor) -> bool:
        """On CUDA, 16-bit rows keep the CPU's head-major layout and the model's SDPA (FlashAttention, cuDNN held
        off) attends over them: a decode step at generate()'s sizes is bound by the host's launch work, and one SDPA
        call costs less of it than the paged kernel's launches (H200, Qwen3-0.6B shapes, batch 16: 22.6 ms a step
        against 28.6 paged and 22.1 for DynamicCache; benchmarks/results/issue15/s24). 8-bit rows stay paged
        (SDPA would read a dequantized copy), as does float32 (no FlashAttention). ``ZIPAGE_GENERATE_ATTENTION``:
        ``auto`` (this), ``paged`` or ``dense``."""
        choice = environment.value("ZIPAGE_GENERATE_ATTENTION", "auto")
        if choice != "auto":
            return choice == "dense"
        return key_states.dtype in (torch.float16, torch.bfloat16) and (
            self.zipage_config.kv_cache_dtype not in QUANTIZED_KV)

    def _queries_needed(self, stored: int, seen: int, q: int) -> bool:
        """Whether the queries of a step of ``q`` tokens that leaves ``stored`` tokens stored (``seen`` seen) may
        be among the last ``window`` before a compression: only then are they kept (they weigh as much as
        ``window * H_q / H_kv`` tokens of KV per layer, and keeping them costs a copy a layer)."""
        cfg = self.zipage_config
        if not self.scorer.needs_queries:
            return False
        anytime = stored > cfg.budget - cfg.window  # (a compression comes only past the budget, whatever the steps)
        if self.max_cache_len is None or seen > self.max_cache_len - cfg.window:
            # steps of any size may follow: a loop of the caller's, or a later generate() continuing this cache
            # after the last ``window`` steps of this one (its first step may compress at once)
            return anytime
        # Within one generate() call no step is longer than the one before it (the prompt or its chunks, then
        # one token a step), so the next compression comes no sooner than steps of ``q`` tokens would bring it;
        # the call may end before it.
        fires_at = cfg.next_compression(stored, q)
        return stored > fires_at - cfg.window and seen + fires_at - stored + 1 <= self.max_cache_len

    def _before_update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The model's first layer starts a step (whichever its type)."""
        if layer_idx == 0:
            B, _, q, _ = key_states.shape
            self._begin_step(B, q, key_states)

    def _update_layer(self, layer: ZipageLayer, key_states: torch.Tensor, value_states: torch.Tensor):
        # Every layer of every decode step runs this: per-step work belongs in ``_begin_step``.
        if self._lean_index is not None and layer.captured and layer.layer_idx:
            out = self._update_lean(layer, key_states, value_states)
            if out is not None:
                return out
        B, _, q, _ = key_states.shape
        if layer.layer_idx == 0:
            self._begin_step(B, q, key_states)
        if layer.keys is None:
            layer.lazy_initialization(key_states, value_states)
        after = layer.stored
        stored = after + q
        if stored != self._step_stored:
            self.cudnn_hold.give()
            raise RuntimeError(f"zipage: layer {layer.layer_idx} updated out of step with layer 0")
        if layer.keys.shape[1] != self.capacity_:
            layer.resize(self.capacity_)
        # Into the rows' slots ``[:, after:stored]`` (one launch for keys and values on CUDA, a slice
        # copy each otherwise; FP8 pages get codes and scales; rotated 8-bit pages that basis, kernels/fp8.py).
        index = self._step_index
        if index is not None and key_states.dtype == layer.keys.dtype == value_states.dtype:  # 16/32-bit rows
            rot = None
            store_rows(*layer.head_major_views(), index, key_states, value_states)
        else:
            rot = self._rotation(key_states)
            rows = rotate(key_states, rot).transpose(1, 2)
            weights = self._key_weights(layer, key_states.device)
            store_kv(layer.keys, self._step_slots, rows, layer.values,
                     rotate(value_states, self._rotation(value_states)).transpose(1, 2), layer.key_scales,
                     layer.value_scales, span_start=after, key_weights=weights)
            # a prompt's keys once more when its queries are counted (_on_attention): (rows, first slot, what to patch)
            wanted = q > 1 and self.capture_ok and self.query_moments is not None and self.query_moments.wants(
                layer.index)
            layer.restore = (rows, after) if wanted else None
            self._restores |= wanted
        layer.stored = stored
        layer.seen += q
        # Assume real tokens; the capture wrapper overwrites this with what the attention mask says.
        # Layers whose records are the same object (every layer until a compression or a beam
        # reorder) share this step's record as well: one mask, one record.
        prev = layer.valid
        first = self.full[0]
        if layer is not first and prev is self._shared_valid:
            layer.valid = first.valid
        else:
            layer.valid = torch.cat([prev[:, :after], prev.new_ones(B, q)], dim=1)
        if layer is first:
            self._shared_valid = prev
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
                        "(e.g. 'streaming' or 'knorm') with this model. (Or the cache reads another config "
                        "object than the model's attention: a cache loaded with torch.load and run outside "
                        "generate() needs cache.bind_model_config(model.config) first.)"
                    )
        if self.capture_ok and not layer.captured and capture.runs_own_attention(capture._calling_module()):
            self.capture_ok = False  # (its attention is its own code, chosen by the attention's name: never renamed)
            if self.scorer.needs_queries:
                raise RuntimeError(
                    f"zipage could not capture the queries of layer {layer.layer_idx}: this model's attention is its "
                    "own code (it does not go through transformers' AttentionInterface), and the scorer "
                    f"{self.scorer.name!r} needs them. Use a scorer that reads no queries "
                    "(e.g. 'streaming' or 'knorm') with this model.")
        if self.capture_ok and (self._capture_all or not layer.captured or (
                self.cudnn_hold.held and layer is self.full[-1])):  # (the last full layer gives cuDNN back)
            capture.arm(self, layer.layer_idx, self.model_config)
        # Decode on CUDA: once the capture is known to reach this layer's attention, the wrapper
        # attends straight from the pages (Triton paged attention).
        layer.paged_step = q == 1 and layer.paged_ok and not self.padding_gap and self.page_table is not None
        if layer.paged_step:
            if self.zipage_config.exact_tail:  # (read by this layer's attention, _on_attention)
                layer.step_exact = layer.exact_recent(key_states, value_states, self.zipage_config.exact_tail - 1)
            return key_states, value_states
        # The stored tokens of every row, in order: views, nothing is copied (FP8: their values).
        if layer.key_scales is None:
            return layer.stored_kv(stored)
        # 8-bit pages: read back (rotated back, for the model's own attention)
        keys, values = layer.read_back(0, stored, rot, self._rotation(value_states), key_states.dtype)
        if layer.restore is not None and not self.zipage_config.exact_tail:  # (with one, a step reads its own exactly)
            layer.restore += (keys,)
        if self.zipage_config.exact_tail:  # the last tokens as the model computed them
            exact_k, exact_v = layer.exact_recent(key_states, value_states, self.zipage_config.exact_tail - 1)
            keys[:, :, -exact_k.shape[2]:] = exact_k
            values[:, :, -exact_v.shape[2]:] = exact_v
        return keys, values

    def _update_lean(self, layer: ZipageLayer, key_states: torch.Tensor, value_states: torch.Tensor):
        """``_update_layer`` for the layers after the first in a decode step that needs only their store and their
        views (set by the first full layer's attention): unquantized, unpaged rows of this step's capacity, every
        layer's record the first's, no capture armed but the last full layer's while cuDNN is held off. It is the
        host work of every layer of such a step, so it does nothing else; None where a check fails (the general
        path then runs, and raises for what is wrong)."""
        keys, values = layer.head_major_views()
        stored = layer.stored + 1
        if (stored != self._step_stored or keys.shape[2] != self.capacity_ or layer.valid is not self._shared_valid
                or key_states.dtype != keys.dtype or value_states.dtype != values.dtype):
            return None
        store_rows(keys, values, self._lean_index, key_states, value_states)
        layer.stored = stored
        layer.seen += 1
        layer.valid = self.full[0].valid
        layer.paged_step = False
        if layer is self.full[-1] and self.cudnn_hold.held:  # (it gives cuDNN back after its attention)
            capture.arm(self, layer.layer_idx, self.model_config)
        return stored_view(keys, stored), stored_view(values, stored)

    def _key_weights(self, layer: ZipageLayer, device) -> torch.Tensor | None:
        """The query weights of ``layer``'s key store (on ``device``), or None (none, or no query counted yet:
        the plain squared error)."""
        if self.query_moments is None or not self.query_moments.tokens[layer.index]:
            return None
        weights = self.query_moments.layer_weights[layer.index]
        return weights if weights.device == device else weights.to(device)  # (a model split over devices)

    def _restore_keys(self, layer: ZipageLayer) -> None:
        """A prompt step's keys stored again, with the weights its own queries now give (``layer.restore``);
        where the layer's attention reads them from the pages' values, the tensor it reads is patched too."""
        rows, after, *patch = layer.restore
        layer.restore = None
        store_kv(layer.keys, self._step_slots, rows, scale=layer.key_scales, span_start=after,
                 key_weights=self._key_weights(layer, rows.device))
        if patch:
            keys, hi = patch[0], after + rows.shape[1]
            keys[:, :, after:hi] = layer.read_back_keys(after, hi, self._rotation(keys), keys.dtype)

    def _rotation(self, states: torch.Tensor) -> torch.Tensor | None:
        """The rotation the pages store ``states``' head dim in (``ZipageConfig.kv_rotation``), or None."""
        zc = self.zipage_config
        return kv_rotation(zc.kv_cache_dtype, states.shape[-1], states.device, zc.kv_rotation)

    def _on_attention(self, layer_idx: int, query: torch.Tensor, attention_mask, scaling, kwargs: dict):
        """Called by the capture wrapper with the layer's queries and mask, right after its update.

        Returns ``(output, mask)``: the attention output ``[B, q, H, D]`` when it computed it from the
        pages itself (paged decode), else None (the model's own attention then runs on the dense K/V
        with ``mask``, the model's mask, or, once padding inside a sequence was seen, that mask with
        the stored tokens' columns taken from the cache's own validity)."""
        layer = self.layers[layer_idx]
        layer.captured = True
        w = self.zipage_config.window
        q = query.shape[2]
        rot = self._rotation(query)
        exact_query = query
        query = rotate(query, rot, query.dtype)  # rotated pages: the scorers and the paged kernel see rotated queries
        if (layer is self.full[0] and q == 1 and attention_mask is None and not self._keep_queries
                and not self.padding_gap and self.page_table is None
                and not (self.dense_without_cudnn and self.window_pages is not None)):
            # A decode step that needs nothing from the attention of the other layers: no queries to keep,
            # no mask to read (every new token is real, as their updates assumed), no paged attention.
            # Their updates do not arm the capture (those it has seen once: it knows their scaling). Dense
            # CUDA steps: cuDNN is held off from here to the last full layer, which still arms to give it
            # back (models with sliding-window layers, which would run in between, keep one switch per layer).
            self._capture_all = False
            for other in self.full:
                other.window_queries = None
            if self.capture_ok and self._step_index is not None:  # (unquantized rows, the store by index)
                self._lean_index = self._step_index
        if not self._keep_queries:
            layer.window_queries = None
        elif layer.window_queries is None or q >= w:
            layer.window_queries = query[:, :, -w:, :].detach().clone()
        else:
            layer.window_queries = torch.cat([layer.window_queries, query.detach()], dim=2)[:, :, -w:, :]
        if scaling is not None:
            layer.scaling = float(scaling)
        if attention_mask is not None:  # without a mask every new token is real, as the update assumed
            self.all_real = False
            read = self._mask_read
            if attention_mask is not read[0]:  # the layers of a forward share one mask: read it once
                read = (attention_mask, _new_token_validity(attention_mask, query.shape[0], q, query.device), None)
            if layer.valid is not read[2]:  # (layers that share a record share its write too)
                layer.valid[:, layer.stored - q :] = read[1]
                read = (read[0], read[1], layer.valid)
            self._mask_read = read
        if q > 1 and self.query_moments is not None:  # a prompt's queries (in the pages' basis), not its padding
            dev = self.query_moments.sums.device
            added = self.query_moments.add(layer.index, query.transpose(1, 2).to(dev),
                                           layer.valid[:, layer.stored - q:layer.stored].to(dev))
            if added and layer.restore is not None:
                self._restore_keys(layer)
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
        layer.paged_ok = not self.padding_gap and kwargs.get("sliding_window") is None and (
            kwargs.get("output_attentions") is None)
        if not layer.paged_step:
            return None, attention_mask
        B, H, _, D = query.shape
        scale = attention_scale(layer.scaling, D)
        lens, starts = self._paged_lens(layer, B, query.device)
        k_scale = as_pages(layer.key_scales) if layer.key_scales is not None else None
        v_scale = as_pages(layer.value_scales) if layer.value_scales is not None else None
        exact = layer.step_exact
        if exact is None:
            out = paged_decode_attention(
                query[:, :, 0, :].contiguous(), as_pages(layer.keys), as_pages(layer.values), self.page_table, lens,
                scale, starts, max_len_hint=layer.stored, k_scale=k_scale, v_scale=v_scale,
                sinks=sink_logits(kwargs), softcap=kwargs.get("softcap"),
            )
            return rotate(out, rot, out.dtype).view(B, 1, H, D), attention_mask
        # Exact tails: the pages but their last n tokens, and those n as the model computed them, merged.
        layer.step_exact = None
        n = exact[0].shape[2]
        out, lse = paged_decode_attention(
            query[:, :, 0, :].contiguous(), as_pages(layer.keys), as_pages(layer.values), self.page_table, lens - n,
            scale, starts, max_len_hint=layer.stored, k_scale=k_scale, v_scale=v_scale, softcap=kwargs.get("softcap"),
            return_lse=True,
        )
        out = exact_merge(exact_query[:, :, 0, :].contiguous(), rotate(out, rot, out.dtype), lse, *exact,
                          layer.valid[:, layer.stored - n:], scale, kwargs.get("softcap"), sink_logits(kwargs))
        return out.view(B, 1, H, D), attention_mask

    def _paged_lens(self, layer: ZipageLayer, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The paged kernel's ``kv_lens`` and ``kv_starts`` (leading padding) for ``layer``: made once per
        step for every layer that shares its validity record and stored count (all of them in most steps)."""
        key = self._lens_key
        if key is None or key[0] is not layer.valid or key[1] != layer.stored:
            lens = torch.full((batch,), layer.stored, dtype=torch.int32, device=device)
            starts = (~layer.valid).sum(dim=1, dtype=torch.int32)
            key = self._lens_key = (layer.valid, layer.stored, lens, starts)
        return key[2], key[3]

    def _compress_all(self, stored: int) -> None:
        """Compress every layer from ``stored`` tokens to the budget, one layer at a time (the scratch
        a compression needs is one layer's)."""
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
        first = self.full[0]
        slots = row_slots(self.batch_size_, first.keys.shape[1], stored, first.keys.device)
        shared = None
        for layer in self.full:
            keep = layer.compress(
                slots, layer.window_queries if self.scorer.needs_queries else None,
                scorer=self.scorer, k=cfg.budget, window=cfg.kept_last, sinks=cfg.sinks,
                scaling=attention_scale(layer.scaling, layer.keys.shape[-1]), page_size=cfg.page_size,
                first=self.num_compressions == 0, layer_idx=layer.layer_idx,
            )
            if layer.tail is not None:
                layer.realign_tail(keep, stored, self._rotation(layer.tail[0]), self._rotation(layer.tail[1]))
            valid = layer.valid.gather(1, keep[:, 0])
            # Layers whose kept tokens are alike real or padding share one record again, so that the
            # decode steps extend one record, not one per layer (and take ``_update_lean``): all of them
            # where no mask was ever seen, else those equal to the first's, compared where that costs no
            # wait for the device (not on CUDA).
            if shared is None:
                shared = valid
            elif self.all_real or (not valid.is_cuda and torch.equal(valid, shared)):
                valid = shared
            layer.valid = valid
            if layer.state is not None:  # the slots past the kept tokens take new tokens, whose state starts at 0
                layer.state[:, cfg.budget :].zero_()
            before = _slot_positions(layer.prefix_positions, *keep.shape[:2], layer.seen, layer.stored, keep.device)
            layer.prefix_positions = before.gather(2, keep)
            layer.stored = cfg.budget
        self.num_compressions += 1
        self.tokens_evicted += (stored - cfg.budget) * self.batch_size_

    # ------------------------------------------------------------------ generate() plumbing
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]`` (all rows store the same length)."""
        if not self.batch_size_:
            return
        if beam_idx.dim() != 1 or beam_idx.shape[0] != self.batch_size_:
            raise ValueError(f"reorder_cache: beam_idx must hold one source row for each of the cache's "
                             f"{self.batch_size_} rows, got shape {tuple(beam_idx.shape)}")
        if self.window_pages is not None:
            self.window_pages.reorder(beam_idx.to(self.full[0].keys.device))
        moved = lambda t: t if t is None else (  # noqa: E731  (FP8 moved as bytes)
            t.view(torch.uint8).index_select(0, idx).view(t.dtype) if is_quantized(t) else t.index_select(0, idx))
        # (head-major keys and values are moved in their own layout, which they keep)
        moved_kv = (lambda t: moved(t.transpose(1, 2)).transpose(1, 2)) if self._head_major else moved  # noqa: E731
        for layer in self.full:
            if layer.keys is None:
                continue
            idx = beam_idx.to(layer.keys.device)
            layer._transposed = None
            layer.keys, layer.values, layer.state = moved_kv(layer.keys), moved_kv(layer.values), moved(layer.state)
            layer.key_scales, layer.value_scales = moved(layer.key_scales), moved(layer.value_scales)
            for name in ("valid", "window_queries", "prefix_positions"):
                value = getattr(layer, name)
                if value is not None:
                    setattr(layer, name, value.index_select(0, idx))
            if layer.tail is not None:
                layer.tail = tuple(t.index_select(0, idx) for t in layer.tail)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("ZipageCache cannot change its batch size (contrastive search re-batches the cache: "
                                  "use greedy, sampling or beam search)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("ZipageCache cannot change its batch size (contrastive search re-batches the cache: "
                                  "use greedy, sampling or beam search)")

    def reset(self) -> None:
        self.cudnn_hold.give()
        super().reset()
        self.batch_size_ = self.capacity_ = self.peak_capacity = self.peak_stored = self._step_stored = 0
        self.page_table = None
        if self.window_pages is not None:
            self.window_pages.reset()
        self.num_compressions = self.tokens_evicted = self._waited = 0
        self.padding_gap = False
        self.all_real = True
        self._head_major = None
        self.query_moments = None

    @property
    def batch_size(self) -> int:
        return self.batch_size_ if self.batch_size_ else -1

    def __repr__(self) -> str:
        return f"ZipageCache({self.zipage_config}, stored={self.stored_length()}, seen={self.get_seq_length()})"


def stored_view(rows: torch.Tensor, stored: int) -> torch.Tensor:
    """``rows.narrow(2, 0, stored)`` of ``[B, H_kv, capacity, D]`` rows by one ``as_strided`` (half a narrow's host
    time, which goes through slice; generate() takes two such views per layer and step)."""
    b, h, capacity, d = rows.shape
    if stored > capacity:  # (as_strided would read past the row, into the next head's)
        raise RuntimeError(f"zipage: {stored} tokens stored in rows of {capacity}")
    return rows.as_strided((b, h, stored, d), rows.stride())


def store_rows(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, new_keys: torch.Tensor,
               new_values: torch.Tensor) -> None:
    """New tokens into unquantized rows: ``keys[:, :, index] = new_keys`` (``[B, H_kv, capacity, D]`` views), the
    same for values; one op each, which costs less host time than a slice's view and copy."""
    keys.index_copy_(2, index, new_keys)
    values.index_copy_(2, index, new_values)


def _slot_positions(prefix: torch.Tensor | None, batch: int, heads: int, seen: int, stored: int,
                    device) -> torch.Tensor:
    """``[batch, heads, stored]`` logical positions of the stored slots: the compacted ``prefix`` map
    (``[batch, heads, n]``, None before the first compression), then the slots stored since, one
    position each, up to ``seen``."""
    n = 0 if prefix is None else prefix.shape[2]
    tail = torch.arange(seen - stored + n, seen, device=device).expand(batch, heads, stored - n)
    return tail.clone() if prefix is None else torch.cat([prefix, tail], dim=2)


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
