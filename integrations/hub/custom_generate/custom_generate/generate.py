"""zipage as a transformers ``custom_generate`` method: Compressed PagedAttention for ``model.generate``.

    model.generate(**inputs, custom_generate="<this repo>", trust_remote_code=True, budget=1024)

Every field of ``zipage.ZipageConfig`` (``budget``, ``page_size``, ``scorer``, ``buffer``, ``window``,
...) may be given as a keyword, or all of them as ``zipage_config=`` (or ``cache_config=``) a dict or a
``ZipageConfig``; the rest goes to ``generate()`` unchanged. The result is exactly
``model.generate(..., cache_implementation="zipage", cache_config=...)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import zipage  # registers cache_implementation="zipage"
from transformers import GenerationMixin
from zipage.hf import cache_kwarg

ZIPAGE_FIELDS = frozenset(f.name for f in dataclasses.fields(zipage.ZipageConfig))


def _zipage_config(kwargs: dict[str, Any], model: Any = None) -> zipage.ZipageConfig:
    """Take the zipage arguments out of ``kwargs`` (in place) and build their validated config. With none
    given as ``zipage_config=`` / ``cache_config=``, a generation config asking for the zipage cache (the
    ``generation_config=`` argument, else the model's) gives its ``cache_config``, as ``model.generate`` reads it."""
    given = kwargs.pop("zipage_config", None)
    if kwargs.get("cache_config") is not None:  # generate()'s own spelling of the same thing
        if given is not None:
            raise TypeError("give the zipage settings as zipage_config= or cache_config=, not both")
        given = kwargs.pop("cache_config")
    keywords = {name: kwargs.pop(name) for name in sorted(ZIPAGE_FIELDS & kwargs.keys())}
    if given is None:
        # the generation config's, as model.generate reads it: the one passed where it names a cache, else the
        # model's own; keywords override its fields (as they would a cache_config given to model.generate)
        for generation in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
            implementation = getattr(generation, "cache_implementation", None)
            if implementation is None:
                continue
            if implementation == "zipage" and getattr(generation, "cache_config", None) is not None:
                carried = generation.cache_config
                if isinstance(carried, zipage.ZipageConfig):
                    return carried.replace(**keywords) if keywords else carried
                if isinstance(carried, dict):
                    return zipage.ZipageConfig.from_dict({**carried, **keywords})
            break
        return zipage.ZipageConfig.from_dict(keywords)
    if isinstance(given, zipage.ZipageConfig):
        return given.replace(**keywords) if keywords else given
    if isinstance(given, dict):
        both = sorted(set(given) & set(keywords))
        if both:
            raise TypeError(f"{both} given both as keywords and in zipage_config")
        return zipage.ZipageConfig.from_dict({**given, **keywords})
    raise TypeError(f"zipage_config must be a dict or a zipage.ZipageConfig, got {type(given).__name__}")


def generate(*args, model=None, **kwargs):
    """``model.generate`` with a zipage cache: the same arguments, plus zipage's (see the module docstring).
    ``model`` is a keyword (transformers passes it so, and a repo loaded with trust_remote_code binds it so),
    which leaves the first positional argument to the inputs, as in ``model.generate(input_ids, ...)``."""
    if model is None:
        if not args or not isinstance(args[0], GenerationMixin):
            raise TypeError("generate() needs the model: generate(input_ids, model=model, ...)")
        model, args = args[0], args[1:]  # (called as generate(model, input_ids, ...))
    config = _zipage_config(kwargs, model)  # a bad field raises here, named
    for name in ("past_key_values", "cache"):  # (transformers 5.24 renamed the first the second)
        if kwargs.get(name) is not None:
            raise ValueError(f"custom_generate='zipage' builds its own ZipageCache: do not pass {name} "
                             f"(or call model.generate({cache_kwarg()}=zipage.ZipageCache(...)) directly)")
    if kwargs.get("cache_implementation") not in (None, "zipage"):
        raise ValueError(f"custom_generate='zipage' uses cache_implementation='zipage', got "
                         f"{kwargs['cache_implementation']!r}")
    kwargs.update(cache_implementation="zipage", cache_config=config)
    # GenerationMixin.generate itself: the model's own generate may be this function (a repo loaded
    # with trust_remote_code replaces it), which would recurse.
    return GenerationMixin.generate(model, *args, **kwargs)
