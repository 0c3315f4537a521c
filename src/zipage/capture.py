"""Capture of the (post-RoPE) queries a scorer needs, whatever attention the model was loaded with.

transformers' attention modules call ``past_key_values.update(...)`` and then
look their attention function up by ``config._attn_implementation``. Right
after a ``ZipageCache`` update, the cache points that name, on the model's
own config object and for that one lookup, at a thin wrapper registered with
``AttentionInterface``. The wrapper hands the queries and the mask to the
cache, puts the name back, and calls the model's original implementation
(eager, sdpa, flash, flex, a hub kernel...) unchanged. The wrapper is
registered under its own name together with the original's mask function, so
masks are built exactly as before. Nothing global is patched.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Callable

import torch

from .attention_checks import check_attention_call
from .compress import attention_scale

PREFIX = "zipage_capture:"
# The names the zipage engine sets on a model's config for the length of its forwards (its steps, its FP8
# calibration): a ZipageCache update that finds one is another thread's generate() on that model mid-step.
ENGINE_ATTENTION = "zipage_engine"
CALIBRATION_ATTENTION = "zipage_calibration"

_pending = threading.local()
_registered: set[str] = set()
# (module type, None) -> its eager function; (module type, name) -> (the function registered under name, what
# the model gets for it)
_originals: dict[tuple[type, str | None], Any] = {}
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> what it last passed the checks with
_last_vars: tuple = (None, None)  # (config, its __dict__): every layer of a forward arms the same config


def _config_vars(config) -> dict:
    """The instance dict of ``config``: the attention name is read and written there directly, as
    transformers' config attribute hooks cost more than the rest of a decode step's capture."""
    global _last_vars
    last = _last_vars
    if last[0] is not config:
        last = _last_vars = (config, vars(config))
    return last[1]


def _set_attn(config, name: str | None) -> None:
    _config_vars(config)["_attn_implementation_internal"] = name


# Threads with an armed capture on a config (its id -> how many). The name on the config is shared by every
# thread that runs the model; the wrapper passes the calls it was not armed for straight to the original, so
# the name stays the wrapper's until the last thread's armed call has run (generate() in several threads).
_armed: dict[int, int] = {}
_armed_lock = threading.Lock()


def _release(config, original: str | None) -> None:
    """One armed capture on ``config`` ran or was dropped: the last one puts the model's name back."""
    with _armed_lock:
        _release_locked(config, original)


def _release_locked(config, original: str | None) -> None:
    left = _armed.get(id(config), 1) - 1
    if left > 0:
        _armed[id(config)] = left
        return
    _armed.pop(id(config), None)
    current = _config_vars(config).get("_attn_implementation_internal")
    if not (isinstance(current, str) and current in (ENGINE_ATTENTION, CALIBRATION_ATTENTION)):
        _set_attn(config, original)
    # (else an engine's forward began after this capture was armed and set its own name: left alone, the engine
    # puts back the name it found, which settled_name turns into the model's own now that none is armed)


def own_name(name: str | None) -> str | None:
    """The model's own attention name behind ``name`` (a capture wrapper's name without its prefix)."""
    return name[len(PREFIX):] if isinstance(name, str) and name.startswith(PREFIX) else name


def settled_name(config, name: str | None) -> str | None:
    """The name an engine's forward puts back on ``config`` when it found ``name`` there: a capture's wrapper
    name whose armed captures all ran (or were released) meanwhile is the model's own name again."""
    if own_name(name) != name:
        with _armed_lock:
            if id(config) not in _armed:
                return own_name(name)
    return name


def _eager_fallback(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain attention, used only when a model module has no ``eager_attention_forward`` of its own."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = attention_scale(scaling, query.shape[-1])
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask[..., : key.shape[-2]], float("-inf"))
        else:
            weights = weights + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _upcast_and_reordered(module, query, key, value, attention_mask, **kwargs):
    """The eager path of GPT-2-style attention with ``reorder_and_upcast_attn`` (float32 logits), which such
    a model takes only while its attention name reads ``"eager"`` (not under the capture's name)."""
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
    return module._upcast_and_reordered_attn(query, key, value, attention_mask)


def _original_function(module, name: str | None) -> Callable:
    """The attention function the model would call under ``name``: its module's eager function for
    ``"eager"`` (GPT-2's upcast path where the module asks for it), else the one registered now under
    ``name`` (looked up again when the registration changes)."""
    if name is None or name == "eager":
        if module.__dict__.get("reorder_and_upcast_attn") and hasattr(module, "_upcast_and_reordered_attn"):
            return _upcast_and_reordered
        key = (type(module), None)
        fn = _originals.get(key)
        if fn is None:
            fn = _originals[key] = _eager_default(module)
        return fn
    current = _attention_functions().get(name)
    cached = _originals.get((type(module), name))
    if cached is None or cached[0] is not current:
        cached = (current, _attention_functions().get_interface(name, _eager_default(module)))
        _originals[(type(module), name)] = cached
    return cached[1]


def _eager_default(module) -> Callable:
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", _eager_fallback)


_interfaces: list = []  # transformers' ALL_ATTENTION_FUNCTIONS, imported at the first use


def _attention_functions():
    if not _interfaces:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _interfaces.append(ALL_ATTENTION_FUNCTIONS)
    return _interfaces[0]


def _check_call(module, kwargs: dict) -> None:
    """``check_attention_call`` once per module and set of attention arguments (not every step)."""
    get = kwargs.get  # (every layer of every step passes here: no generator, no tuple concatenation)
    sig = (get("softcap") is not None, get("s_aux") is not None, get("sinks") is not None,
           get("output_attentions") is not None, get("sliding_window"), get("is_causal"),
           getattr(module, "is_causal", True))
    if _checked.get(module) != sig:
        check_attention_call(module, kwargs, "ZipageCache")
        _checked[module] = sig


def _capture_attention(module, query, key, value, attention_mask, **kwargs) -> Any:
    item = getattr(_pending, "item", None)
    original = None
    if item is not None and item[1] == getattr(module, "layer_idx", None):
        cache, layer_idx, config, original = item
        _pending.item = None
        _release(config, original)
        _check_call(module, kwargs)
        out, attention_mask = cache._on_attention(layer_idx, query, attention_mask, kwargs.get("scaling"), kwargs)
        if out is not None:
            return out, None
        if cache.dense_without_cudnn:
            fn = _original_function(module, original or None)
            if cache._capture_all:  # every layer of this step comes through here: one switch per call
                return _without_cudnn(fn, module, query, key, value, attention_mask, kwargs)
            return _with_cudnn_held(cache, layer_idx, fn, module, query, key, value, attention_mask, kwargs)
    else:
        original = own_name(getattr(getattr(module, "config", None), "_attn_implementation", None) or "")
    return _original_function(module, original or None)(module, query, key, value, attention_mask, **kwargs)


_cudnn_off = {"depth": 0, "saved": True}  # calls inside _without_cudnn, and the setting they found
_cudnn_lock = threading.Lock()


def _without_cudnn(fn, module, query, key, value, attention_mask, kwargs):
    """``fn`` with SDPA's cuDNN backend off for this one call. The flag is global in torch, so calls that
    overlap (generate() in several threads) share one switch: the first turns it off, the last puts back
    what the first found; another thread's SDPA meanwhile may run without cuDNN, never with a wrong result."""
    cudnn_off()
    try:
        return fn(module, query, key, value, attention_mask, **kwargs)
    finally:
        cudnn_restore()


def cudnn_off() -> None:
    """Turn SDPA's cuDNN backend off until the matching ``cudnn_restore`` (calls may nest and overlap)."""
    with _cudnn_lock:
        if _cudnn_off["depth"] == 0:
            _cudnn_off["saved"] = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
        _cudnn_off["depth"] += 1


def cudnn_restore() -> None:
    """Undo one ``cudnn_off``: the last one puts back the setting the first found."""
    with _cudnn_lock:
        _cudnn_off["depth"] -= 1
        if _cudnn_off["depth"] == 0:
            torch.backends.cuda.enable_cudnn_sdp(_cudnn_off["saved"])


class CudnnHold:
    """One cache's share of the switch across a forward (see ``_with_cudnn_held``)."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = False

    def take(self) -> None:
        if not self.held:
            cudnn_off()
            self.held = True

    def give(self) -> None:
        if self.held:
            self.held = False
            cudnn_restore()


def _with_cudnn_held(cache, layer_idx: int, fn, module, query, key, value, attention_mask, kwargs):
    """A dense decode step whose middle layers skip the capture: cuDNN goes off at the first full layer's
    attention and stays off through the layers in between (they call the model's SDPA directly) until the
    last full layer's attention has run. An exception inside the forward gives the switch back at once here,
    or, if it was raised between these two layers, at the cache's next step, reset or collection."""
    hold = cache.cudnn_hold
    hold.take()
    try:
        out = fn(module, query, key, value, attention_mask, **kwargs)
    except BaseException:
        hold.give()
        raise
    if layer_idx == cache.full[-1].layer_idx:
        hold.give()
    return out


def _register(original: str | None) -> str:
    """Register (once) the capturing wrapper for ``original`` and return its name."""
    name = PREFIX + (original or "eager")
    if name in _registered:
        return name
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if name not in _registered:
        AttentionInterface.register(name, _capture_attention)
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(original or "eager")
        if mask_fn is not None:
            AttentionMaskInterface.register(name, mask_fn)
        _registered.add(name)
    return name


_wrapper_names: dict[str | None, str] = {}  # the model's attention name -> its registered wrapper's


def _calling_module(depth: int = 12):
    """The ``torch.nn.Module`` whose method called into the cache (the attention module that called
    ``update``), found among the callers' frames; None if none is."""
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module):
            return owner
    return None


_own_attention: dict[type, bool] = {}


def runs_own_attention(module) -> bool:
    """Whether ``module``'s forward picks its attention code by comparing the config's attention name (as
    Falcon's does: ``_attn_implementation == "sdpa"``) and never looks it up in transformers'
    ``AttentionInterface``: renaming the attention to arm the capture would switch its code path (Falcon's then
    adds an SDPA-style boolean mask as a bias: wrong attention, no error), and no capture could run anyway."""
    if module is None:  # (an update called from no module: nothing to compare)
        return False
    cls = type(module)
    if cls not in _own_attention:
        import inspect

        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError, AttributeError):
            src = ""
        _own_attention[cls] = "_attn_implementation" in src and "ALL_ATTENTION_FUNCTIONS" not in src and \
            "attention_interface" not in src
    return _own_attention[cls]


def arm(cache, layer_idx: int, config) -> None:
    """Route the next attention lookup of ``config`` (for ``layer_idx``) through the capture wrapper."""
    attrs = _config_vars(config)
    original = attrs.get("_attn_implementation_internal")
    if original in (ENGINE_ATTENTION, CALIBRATION_ATTENTION):  # (refused before anything is armed or set)
        raise RuntimeError(
            "a ZipageCache forward was run while a zipage engine on the same model (or on a model sharing its "
            "config object) is stepping in another thread: the model's attention name is the engine's for the "
            "length of its forward; run generate() when no engine on the model is stepping, or on a copy of it")
    name = _wrapper_names.get(original)
    if name is None:
        # (a previous update's attention never ran, an exception or a model that bypasses the AttentionInterface:
        # the original name from the prefixed one)
        original = own_name(original)
        name = _register(original)
        _wrapper_names[original] = name
    with _armed_lock:
        prev = getattr(_pending, "item", None)
        if prev is None or prev[2] is not config:
            if prev is not None:  # (this thread's capture armed on another model, never run)
                _release_locked(prev[2], prev[3])
            _armed[id(config)] = _armed.get(id(config), 0) + 1
        _pending.item = (cache, layer_idx, config, original)
        attrs["_attn_implementation_internal"] = name


def disarm() -> None:
    item = getattr(_pending, "item", None)
    if item is not None:
        _pending.item = None
        _release(item[2], item[3])


def pending_layer(cache) -> int | None:
    """The layer ``cache`` armed whose attention has not run yet (None if there is none)."""
    item = getattr(_pending, "item", None)
    return item[1] if item is not None and item[0] is cache else None
