"""Bad configurations and unsupported models get errors that name the problem."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import GPT2Config, MistralConfig, Qwen2Config, T5Config

import zipage
from zipage import ZipageCache, ZipageConfig


def test_paper_settings_stay_reachable():
    cfg = ZipageConfig.paper()
    assert (cfg.budget, cfg.window, cfg.global_decay, cfg.redundancy) == (2048, 16, 0.8, "lightning")
    assert (cfg.redundancy_lambda, cfg.redundancy_tau, cfg.pooling_kernel) == (0.2, 0.4, 5)
    assert cfg.use_global and (cfg.pooling, cfg.pooling_scope, cfg.group_reduce, cfg.recent) == ("max", "first", "max", 0)
    assert cfg.buffer == cfg.page_size and cfg.capacity == cfg.budget + cfg.buffer
    assert ZipageConfig.paper(budget=64, page_size=16).budget == 64


def test_defaults():
    """Memory defaults from the paper; scorer defaults as measured (benchmarks/results/quality.md):
    window attention only, without the redundancy term and the global score, plus a recency floor."""
    cfg = ZipageConfig()
    assert (cfg.budget, cfg.window, cfg.page_size) == (2048, 16, 256)
    assert (cfg.redundancy, cfg.use_global) == ("none", False)
    assert (cfg.pooling, cfg.pooling_kernel, cfg.pooling_scope, cfg.group_reduce) == ("max", 5, "first", "mean")
    assert cfg.recent == 64
    assert cfg.buffer == cfg.page_size and cfg.capacity == cfg.budget + cfg.buffer


@pytest.mark.parametrize(
    "fields, exc, words",
    [
        ({"budget": 0}, ValueError, ["budget", "0", ">= 1"]),
        ({"budget": 8.5}, TypeError, ["budget", "int"]),
        ({"budget": True}, TypeError, ["budget"]),
        ({"page_size": 24}, ValueError, ["page_size", "24", "power of two"]),
        ({"page_size": 2048}, ValueError, ["page_size", "<= 1024"]),
        ({"buffer": 0}, ValueError, ["buffer", ">= 1"]),
        ({"window": 0}, ValueError, ["window"]),
        ({"budget": 8}, ValueError, ["ZipageConfig.budget=8", "window=16", "budget >= 16"]),
        ({"budget": 8, "window": 12}, ValueError, ["ZipageConfig.window=12", "budget=8", "window <= 8"]),
        ({"budget": 20, "window": 16, "sinks": 8}, ValueError, ["sinks", "budget=20"]),
        ({"sinks": -1}, ValueError, ["sinks"]),
        ({"global_decay": 1.5}, ValueError, ["global_decay", "1.5", "[0.0, 1.0]"]),
        ({"redundancy": "pairs"}, ValueError, ["redundancy", "lightning", "full", "none"]),
        ({"redundancy": None}, TypeError, ["redundancy"]),
        ({"redundancy_lambda": -0.1}, ValueError, ["redundancy_lambda"]),
        ({"redundancy_tau": 0.0}, ValueError, ["redundancy_tau"]),
        ({"similarity_threshold": 2}, ValueError, ["similarity_threshold"]),
        # NaN fails every comparison: it must fail the range checks too, not pass them
        ({"global_decay": float("nan"), "use_global": True}, ValueError, ["global_decay", "nan"]),
        ({"redundancy_lambda": float("nan")}, ValueError, ["redundancy_lambda", "nan"]),
        ({"redundancy_tau": float("nan")}, ValueError, ["redundancy_tau", "nan"]),
        ({"similarity_threshold": float("nan")}, ValueError, ["similarity_threshold", "nan"]),
        ({"pooling": "median"}, ValueError, ["pooling", "max", "avg"]),
        ({"pooling_kernel": 4}, ValueError, ["pooling_kernel", "odd"]),
        ({"use_global": 1}, TypeError, ["use_global", "bool"]),
        ({"pooling_scope": "every"}, ValueError, ["pooling_scope", "first", "all"]),
        ({"group_reduce": "sum"}, ValueError, ["group_reduce", "max", "mean"]),
        ({"window_reduce": "sum"}, ValueError, ["window_reduce", "mean", "max"]),
        ({"global_mode": "min"}, ValueError, ["global_mode", "max", "sum"]),
        ({"value_weight": 1}, TypeError, ["value_weight", "bool"]),
        ({"recent": -1}, ValueError, ["recent", ">= 0"]),
        ({"scorer": 3}, TypeError, ["scorer", "Scorer object"]),
    ],
)
def test_invalid_fields_are_named(fields, exc, words):
    with pytest.raises(exc) as err:
        ZipageConfig(**fields)
    for word in words:
        assert word in str(err.value)


def test_an_unknown_scorer_is_refused_where_the_scorer_is_built():
    """The config only checks the form of ``scorer``; the cache and the engine look the name up."""
    words = ["scorer", "snapkv2", "h2o", "knorm", "random", "snapkv", "streaming"]
    model = tiny_model("llama")
    cfg = ZipageConfig(scorer="snapkv2", budget=16, page_size=4)
    for build in (lambda: ZipageCache(config=model.config, zipage_config=cfg),
                  lambda: zipage.LLM(model, scorer="snapkv2", budget=16, page_size=4, num_pages=16),
                  lambda: model.generate(torch.tensor([[5, 6]]), cache_implementation="zipage", max_new_tokens=2,
                                         cache_config={"scorer": "snapkv2"}, pad_token_id=0)):
        with pytest.raises(ValueError) as err:
            build()
        for word in words:
            assert word in str(err.value)


def test_config_imports_nothing_of_the_library():
    """One-way: scoring (and everything else) depends on config, config on none of them."""
    import ast
    import inspect

    import zipage.config

    tree = ast.parse(inspect.getsource(zipage.config))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("zipage") or m.startswith(".") or m == ""], imported
    levels = [n.level for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(levels), "config.py has a relative import"


@pytest.mark.parametrize("budget, buffer", [(1, 1), (8, 4), (16, 1), (16, 16), (5, 64)])
def test_compression_trigger_is_one_rule(budget, buffer):
    """``compresses`` is the rule generate() applies before every step, and ``next_compression``
    (which the engine's scheduler uses) is where a sequence storing one token per step meets it."""
    cfg = ZipageConfig(budget=budget, buffer=buffer, window=1, page_size=1)
    for stored in range(0, budget + buffer + 8):
        for q in (1, 2, 7):
            assert cfg.compresses(stored, q) == (stored > budget and stored + q > budget + buffer)
        first = next(s for s in range(stored, stored + budget + buffer + 2) if cfg.compresses(s, 1))
        assert cfg.next_compression(stored) == first
    # generate(): a prompt stored in one step, then one token per step
    for prompt in (1, budget, budget + buffer + 3):
        stored, points = 0, []
        for q in [prompt] + [1] * (3 * (budget + buffer)):
            if cfg.compresses(stored, q):
                points.append(stored)
                stored = budget
            stored += q
        assert points[0] == cfg.next_compression(prompt)
        assert set(points[1:]) == {cfg.next_compression(budget)}


def test_unknown_field_from_dict_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown ZipageConfig field\(s\) \['bugdet'\].*budget"):
        ZipageConfig.from_dict({"bugdet": 3})


def test_cache_constructor_errors():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="config=model.config"):
        ZipageCache(budget=8)
    with pytest.raises(TypeError, match="not both"):
        ZipageCache(config=model.config, zipage_config=ZipageConfig(), budget=8)
    with pytest.raises(TypeError, match="ZipageConfig"):
        ZipageCache(config=model.config, zipage_config={"budget": 8})
    cache = ZipageCache(config=model.config, zipage_config=ZipageConfig(budget=32, page_size=8))
    assert cache.zipage_config.budget == 32 and len(cache.layers) == 2


@pytest.mark.parametrize(
    "config, words",
    [
        (MistralConfig(num_hidden_layers=2, sliding_window=4096), ["sliding", "4096"]),
        (
            # every layer slides (layers from max_window_layers on do): nothing to compress
            Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=64, max_window_layers=0),
            ["sliding", "every layer"],
        ),
        (T5Config(num_layers=2), ["encoder-decoder"]),
    ],
)
def test_unsupported_models_are_refused(config, words):
    with pytest.raises(ValueError) as err:
        ZipageCache(config=config)
    for word in words:
        assert word in str(err.value)


def test_model_without_interface_attention_fails_clearly():
    """A cache built on a copy of the config cannot capture queries: compression says why."""
    import copy

    model = tiny_model("llama")
    cache = ZipageCache(config=copy.deepcopy(model.config), budget=16, page_size=4, buffer=4)
    ids = torch.randint(3, 96, (1, 30))
    with pytest.raises(RuntimeError, match="could not capture the queries"):
        model(ids, past_key_values=cache)
        model(ids[:, :1], past_key_values=cache)


def test_multi_head_model_with_learned_positions_works():
    """GPT-2: no GQA, no RoPE, its own attention module; positions still come from the logical length."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=512, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(3, 96, (2, 10))
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    out = model.generate(ids, cache_implementation="zipage", cache_config={"budget": 64, "page_size": 8}, **kw)
    assert torch.equal(ref, out)
    cache = ZipageCache(config=model.config, budget=16, page_size=8)
    model.generate(ids, past_key_values=cache, **{**kw, "max_new_tokens": 100})
    assert cache.stored_length() <= 24 and cache.num_compressions > 0


def test_custom_scorer_object():
    class Newest(zipage.Scorer):
        name = "newest-test"

        def score(self, x):
            return torch.arange(x.keys.shape[2], dtype=torch.float32).expand(*x.keys.shape[:3])

    model = tiny_model("llama")
    cache = ZipageCache(config=model.config, budget=16, page_size=4, buffer=4, scorer=Newest())
    ids = torch.randint(3, 96, (1, 10))
    model.generate(ids, past_key_values=cache, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert cache.stored_length() <= 20 and cache.num_compressions > 0
