"""``model.generate(..., cache_implementation="zipage")``.

transformers has no registry of cache implementations: ``generate`` validates
the name against ``generation.configuration_utils.ALL_CACHE_IMPLEMENTATIONS``
and builds the cache in ``GenerationMixin._prepare_cache_for_generation``.
``import zipage`` adds "zipage" to that tuple and wraps that method (once,
reversibly); everything else in ``generate`` is untouched. The hook is
checked against transformers 5.17 through 5.25.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import transformers
from packaging.version import Version

from .attention_checks import check_model
from .cache import ZipageCache
from .config import ZipageConfig

CACHE_IMPLEMENTATION = "zipage"
MIN_VERSION, MAX_VERSION = Version("5.17.0"), Version("5.26.0")  # [min, max)
_ORIGINAL: dict[str, Any] = {}

# Modes that roll the cache back or change its batch size: an evicting cache cannot serve them.
_REFUSED_MODES = {
    "assisted_generation": "assisted / prompt-lookup decoding crops the cache, and evicted tokens cannot be restored",
    "contrastive_search": "contrastive search re-batches and crops the cache",
    "dola_generation": "DoLa is not supported with zipage",
    "group_beam_search": "group beam search is not supported with zipage",
    "constrained_beam_search": "constrained beam search is not supported with zipage",
}


def transformers_version() -> Version:
    return Version(Version(transformers.__version__).base_version)


def cache_kwarg_for(version: Version, cache_names: Any = None) -> str:
    """The cache's model-kwarg name for transformers ``version`` whose ``generation.utils.ALL_CACHE_NAMES`` is
    ``cache_names`` (None where it has none): that list's first name, which generate() stores the cache under,
    where it is one of the two known names (exact for development builds too); else by version."""
    if cache_names and cache_names[0] in ("cache", "past_key_values"):
        return cache_names[0]
    return "cache" if version >= Version("5.24.0") else "past_key_values"


@functools.cache
def cache_kwarg() -> str:
    """The name generate() keeps the cache under among its model kwargs (and models take it by): ``cache`` from
    transformers 5.24, which renamed ``past_key_values`` (still taken by ``generate`` and the models' forwards,
    deprecated), ``past_key_values`` before. Read once from the installed transformers."""
    from transformers.generation import utils as generation_utils

    return cache_kwarg_for(transformers_version(), getattr(generation_utils, "ALL_CACHE_NAMES", None))


def check_transformers_version(version: Version | None = None) -> None:
    """Raise RuntimeError unless transformers is a version the generate() hook was checked against."""
    found = str(version) if version is not None else transformers.__version__
    version = version if version is not None else transformers_version()
    if not MIN_VERSION <= version < MAX_VERSION:
        raise RuntimeError(
            f"zipage's generate() integration supports transformers >={MIN_VERSION},<{MAX_VERSION}; found {found}. "
            f"Install a supported version (pip install 'transformers>={MIN_VERSION},<{MAX_VERSION}')."
        )


def _zipage_config_from(cache_config: Any) -> ZipageConfig:
    if cache_config is None:
        return ZipageConfig()
    if isinstance(cache_config, ZipageConfig):
        return cache_config
    if isinstance(cache_config, dict):
        return ZipageConfig.from_dict(cache_config)
    raise TypeError(f"cache_config must be a dict of ZipageConfig fields or a ZipageConfig, got {type(cache_config)}")


def _check_mode(generation_mode: Any) -> None:
    mode = getattr(generation_mode, "value", generation_mode)
    if mode in _REFUSED_MODES:
        raise ValueError(f"generate() mode {mode!r} cannot run on a ZipageCache: {_REFUSED_MODES[mode]}")


def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, *args, **kwargs):
    original = _ORIGINAL["prepare"]
    key = cache_kwarg()
    user_cache = model_kwargs.get(key)
    wants_zipage = generation_config.cache_implementation == CACHE_IMPLEMENTATION
    if not wants_zipage and not isinstance(user_cache, ZipageCache):
        return original(self, generation_config, model_kwargs, generation_mode, *args, **kwargs)
    if wants_zipage and user_cache is None and generation_config.use_cache is False:
        # no cache asked for: transformers then runs without one whatever cache_implementation says (said, since
        # a checkpoint saved with use_cache=False, MPT's default, would otherwise run uncompressed unawares)
        warnings.warn("cache_implementation='zipage' has no effect with use_cache=False (passed, or the model's "
                      "generation_config.use_cache): generate() runs with no cache at all; pass use_cache=True to "
                      "compress", UserWarning, stacklevel=_caller_level())
        return original(self, generation_config, model_kwargs, generation_mode, *args, **kwargs)
    if isinstance(user_cache, ZipageCache) and generation_config.use_cache is False:
        # (transformers would feed the whole sequence again at every step into the cache: garbage, silently)
        raise ValueError(f"generate() was given {key}=ZipageCache with use_cache=False (passed, or the "
                         "model's generation_config.use_cache, e.g. from a checkpoint saved without a cache): pass "
                         "use_cache=True, or no cache")
    check_transformers_version()
    _check_mode(generation_mode)
    check_model(self)
    _keep_cache_through_prepare_inputs(type(self))
    text_config = self.config.get_text_config(decoder=True)
    max_cache_len = _max_cache_length(generation_config, args, kwargs)
    if isinstance(user_cache, ZipageCache):
        # the input's length: its embeddings' where given, else its attention mask's (transformers drops a mask
        # of ones and keeps its length)
        mask, embeds = model_kwargs.get("attention_mask"), model_kwargs.get("inputs_embeds")
        length = (embeds.shape[1] if embeds is not None else mask.shape[-1] if mask is not None
                  else getattr(generation_config, "_mask_length", None))
        seen = user_cache.get_seq_length()
        if seen and length is not None and length <= seen:
            # transformers would feed the last input tokens again as new ones (or all of them, at the
            # same length), at positions the cache has passed: wrong tokens, silently
            raise ValueError(
                f"generate() got {length} tokens with a ZipageCache that has seen "
                f"{seen}: pass the whole conversation, the tokens the cache has seen followed by new ones (a "
                "cache cannot go back: it may have evicted them)")
        user_cache.bind_model_config(text_config)  # (its queries are captured through the modules' config object)
        user_cache.max_cache_len = max_cache_len
        if not wants_zipage:
            return original(self, generation_config, model_kwargs, generation_mode, *args, **kwargs)
    if user_cache is not None:
        raise ValueError(
            f"Passing both cache_implementation='zipage' and {key} is unsupported; use one of the two"
        )
    zipage_config = _zipage_config_from(generation_config.cache_config)
    model_kwargs[key] = ZipageCache(
        config=text_config, zipage_config=zipage_config, max_cache_len=max_cache_len
    )


def _keep_cache_through_prepare_inputs(cls: type) -> None:
    """Wrap ``cls.prepare_inputs_for_generation`` where the model class has its own (once per class) so that a
    ZipageCache it drops is restarted instead of replaced.

    Phi-3's, PhiMoE's and Phi-4-multimodal's drop the cache once the sequence passes
    ``original_max_position_embeddings`` (LongRoPE switches to its long factors there, which changes every
    position's rotation), so that the model recomputes the whole sequence into a cache it makes itself: a
    DynamicCache, which generate() would carry on with, uncompressed, for the rest of the run (and a
    ZipageCache the caller passed would be left behind). Wrapped, the ZipageCache is emptied and given the
    whole sequence again, as a prompt (compressed to its budget as prompts are); what it had evicted comes
    back from the input ids. (transformers 5.17's Phi-3 feeds the new cache only the last token after the switch;
    the ZipageCache then gets what a DynamicCache would.) Other models' inputs pass through untouched."""
    from transformers.generation.utils import GenerationMixin

    owner = next((c for c in cls.__mro__ if "prepare_inputs_for_generation" in c.__dict__), GenerationMixin)
    prepare = owner.__dict__.get("prepare_inputs_for_generation")
    if owner is GenerationMixin or not callable(prepare) or hasattr(prepare, "_zipage"):
        return

    @functools.wraps(prepare)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        key = cache_kwarg()
        given = kwargs.get(key)
        inputs = prepare(self, *args, **kwargs)
        if isinstance(given, ZipageCache) and inputs.get(key) is None:
            given.reset()  # (the model recomputes the whole sequence: it starts over as from a prompt)
            inputs[key] = given
        return inputs

    prepare_inputs_for_generation._zipage = prepare
    _ORIGINAL.setdefault("prepare_inputs", {})[owner] = prepare
    owner.prepare_inputs_for_generation = prepare_inputs_for_generation


def _caller_level() -> int:
    """The ``stacklevel`` that names the first frame outside transformers, torch, peft and zipage (the user's call of
    generate(), whatever decorators a version wraps it in)."""
    import sys

    frame, level = sys._getframe(1), 1
    wrappers = ("transformers", "torch", "zipage", "peft")
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in wrappers:
        frame, level = frame.f_back, level + 1
    return level


def _max_cache_length(generation_config, args: tuple, kwargs: dict) -> int | None:
    """The most tokens this generate() call feeds the cache (its storage never grows past what they
    need): transformers passes it after the batch size; else ``max_length - 1`` (the last token
    sampled is never fed back)."""
    value = kwargs.get("max_cache_length", args[1] if len(args) > 1 else None)
    if value is None and isinstance(getattr(generation_config, "max_length", None), int):
        value = generation_config.max_length - 1
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def register() -> None:
    """Make ``cache_implementation="zipage"`` available (idempotent; done by ``import zipage``)."""
    if _ORIGINAL:
        return
    from transformers.generation import configuration_utils as gen_cfg
    from transformers.generation.utils import GenerationMixin

    if not hasattr(gen_cfg, "ALL_CACHE_IMPLEMENTATIONS") or not hasattr(
        GenerationMixin, "_prepare_cache_for_generation"
    ):
        raise RuntimeError(
            f"transformers {transformers.__version__} lacks the generate() internals zipage hooks into; "
            f"supported: >={MIN_VERSION},<{MAX_VERSION}. ZipageCache itself still works passed as past_key_values= "
            "(cache= from 5.24)."
        )
    _ORIGINAL["all_cache_implementations"] = gen_cfg.ALL_CACHE_IMPLEMENTATIONS
    _ORIGINAL["prepare"] = GenerationMixin._prepare_cache_for_generation
    if CACHE_IMPLEMENTATION not in gen_cfg.ALL_CACHE_IMPLEMENTATIONS:
        gen_cfg.ALL_CACHE_IMPLEMENTATIONS = (*gen_cfg.ALL_CACHE_IMPLEMENTATIONS, CACHE_IMPLEMENTATION)
    wrapped = functools.wraps(_ORIGINAL["prepare"])(_prepare_cache_for_generation)
    GenerationMixin._prepare_cache_for_generation = wrapped


def unregister() -> None:
    """Undo ``register()``."""
    if not _ORIGINAL:
        return
    from transformers.generation import configuration_utils as gen_cfg
    from transformers.generation.utils import GenerationMixin

    gen_cfg.ALL_CACHE_IMPLEMENTATIONS = _ORIGINAL.pop("all_cache_implementations")
    GenerationMixin._prepare_cache_for_generation = _ORIGINAL.pop("prepare")
    for cls, prepare in _ORIGINAL.pop("prepare_inputs", {}).items():
        cls.prepare_inputs_for_generation = prepare
