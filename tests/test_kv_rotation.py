"""``kv_rotation`` (ZipageConfig, LLM, ``zipage serve --kv-rotation``): 8-bit pages stored in the Hadamard-rotated
basis or as they are, per engine or cache rather than through the environment. What a rotated page holds is
tested against dense references in test_fp8_engine.py and test_fp8_kernels.py, with the rotation chosen by the
environment; here the setting must give exactly those pages and tokens, and override the environment."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import tiny_model
from test_engine import prompts_of

from zipage import LLM, SamplingParams, ZipageConfig
from zipage.kernels.fp8 import _hadamard, kv_rotation

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(autouse=True)
def _defaults(monkeypatch):
    monkeypatch.delenv("ZIPAGE_FP8_ROTATION", raising=False)
    monkeypatch.delenv("ZIPAGE_INT8_ROTATION", raising=False)


def test_the_setting_picks_the_rotation_and_refuses_what_it_cannot_do(monkeypatch):
    h = _hadamard(64, "cpu")
    assert kv_rotation("fp8", 64, "cpu") is None and torch.equal(kv_rotation("int8", 64, "cpu"), h)  # defaults
    assert torch.equal(kv_rotation("fp8", 64, "cpu", True), h)
    assert kv_rotation("int8", 64, "cpu", False) is None
    assert kv_rotation("auto", 64, "cpu", False) is None and kv_rotation("int8", 80, "cpu") is None
    monkeypatch.setenv("ZIPAGE_FP8_ROTATION", "1")  # the environment moves the default only
    assert torch.equal(kv_rotation("fp8", 64, "cpu"), h) and kv_rotation("fp8", 64, "cpu", False) is None
    with pytest.raises(ValueError, match="power-of-two head dim, this model's is 80"):
        kv_rotation("fp8", 80, "cpu", True)
    with pytest.raises(ValueError, match="applies to 8-bit pages"):
        kv_rotation("auto", 64, "cpu", True)
    with pytest.raises(TypeError, match="kv_rotation=1 is invalid"):
        kv_rotation("int8", 64, "cpu", 1)


def test_config_and_llm_refuse_a_bad_setting_by_name():
    assert ZipageConfig(kv_cache_dtype="fp8", kv_rotation=True).kv_rotation is True
    assert ZipageConfig(kv_rotation=False).kv_rotation is False  # (bf16 pages are stored as they are anyway)
    with pytest.raises(ValueError, match=r"ZipageConfig.kv_rotation=True applies to 8-bit pages"):
        ZipageConfig(kv_rotation=True)
    with pytest.raises(TypeError, match=r"ZipageConfig.kv_rotation='yes' is invalid"):
        ZipageConfig(kv_cache_dtype="int8", kv_rotation="yes")
    model = tiny_model("qwen3")
    with pytest.raises(ValueError, match=r"LLM\(kv_rotation=True\) applies to 8-bit pages"):
        LLM(model, budget=None, page_size=4, num_pages=16, kv_rotation=True)
    with pytest.raises(ValueError, match=r"ZipageConfig.kv_rotation=True applies to 8-bit pages"):
        LLM(model, budget=16, page_size=4, num_pages=16, kv_rotation=True)


def _engine(monkeypatch, env: dict, **kw):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    llm = LLM(tiny_model("qwen3"), page_size=4, num_pages=96, max_num_seqs=3, **kw)
    outs = llm.generate(prompts_of((12, 30, 7), seed=3), GREEDY, use_tqdm=False)
    for name in env:
        monkeypatch.delenv(name)
    return llm, [o.token_ids for o in outs]


@pytest.mark.parametrize("budget", [16, None])
@pytest.mark.parametrize("kv, setting, env", [("fp8", True, {"ZIPAGE_FP8_ROTATION": "1"}),
                                              ("int8", False, {"ZIPAGE_INT8_ROTATION": "0"})])
def test_engine_setting_gives_the_environments_pages(budget, kv, setting, env, monkeypatch):
    """The same pages, byte for byte, and the same tokens as the environment variable gives; the other
    choice gives other pages (the setting is not a no-op)."""
    fields = dict(budget=budget, kv_cache_dtype=kv)
    if budget is not None:
        fields.update(buffer=4, window=4)
    by_env, tokens_env = _engine(monkeypatch, env, **fields)
    by_setting, tokens_setting = _engine(monkeypatch, {}, kv_rotation=setting, **fields)
    other, _ = _engine(monkeypatch, {}, kv_rotation=not setting, **fields)
    assert (by_setting.runner.rotation is not None) == setting and (other.runner.rotation is None) == setting
    assert tokens_setting == tokens_env
    assert torch.equal(by_setting.runner.k_pool.view(torch.uint8), by_env.runner.k_pool.view(torch.uint8))
    assert torch.equal(by_setting.runner.v_pool.view(torch.uint8), by_env.runner.v_pool.view(torch.uint8))
    assert torch.equal(by_setting.runner.k_scale, by_env.runner.k_scale)
    assert not torch.equal(other.runner.k_pool.view(torch.uint8), by_env.runner.k_pool.view(torch.uint8))
    if budget is not None:
        assert by_setting.stats()["compressions"] > 0


def test_setting_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("ZIPAGE_FP8_ROTATION", "1")
    llm = LLM(tiny_model("qwen3"), budget=None, page_size=4, num_pages=16, kv_cache_dtype="fp8", kv_rotation=False)
    assert llm.runner.rotation is None


def test_generate_setting_gives_the_environments_cache(monkeypatch):
    """generate(cache_implementation="zipage") with ``cache_config={"kv_rotation": True}`` on FP8 pages: the
    sequences and stored codes of ``ZIPAGE_FP8_ROTATION=1``, and not those of unrotated pages."""
    model = tiny_model("qwen3")
    ids = torch.tensor(prompts_of((20, 20), seed=5))
    cfg = dict(budget=12, page_size=4, buffer=4, window=4, kv_cache_dtype="fp8")
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="zipage",
              return_dict_in_generate=True)
    plain = model.generate(ids, cache_config=cfg, **kw)
    monkeypatch.setenv("ZIPAGE_FP8_ROTATION", "1")
    by_env = model.generate(ids, cache_config=cfg, **kw)
    monkeypatch.delenv("ZIPAGE_FP8_ROTATION")
    by_setting = model.generate(ids, cache_config={**cfg, "kv_rotation": True}, **kw)
    assert torch.equal(by_setting.sequences, by_env.sequences)
    assert by_setting.past_key_values.num_compressions > 0
    stored = by_setting.past_key_values.full[0].stored  # (slots past it are scratch, never initialized)
    assert all(c.past_key_values.full[0].stored == stored for c in (plain, by_env))
    codes = [c.past_key_values.full[0].keys[:, :stored].view(torch.uint8) for c in (plain, by_env, by_setting)]
    assert torch.equal(codes[2], codes[1]) and not torch.equal(codes[2], codes[0])


def _serve_args(**kw) -> argparse.Namespace:
    from zipage_cli import serve_parser

    argv = []
    for name, value in kw.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return serve_parser().parse_args(argv)


def test_serve_flag_reaches_the_engine_and_refuses_bf16_pages():
    pytest.importorskip("fastapi")
    from zipage.serve.server import check_args, engine_from_args

    assert "--kv-rotation on: it applies to 8-bit pages" in check_args(_serve_args(kv_rotation="on"))
    assert check_args(_serve_args(kv_rotation="off")) is None
    args = _serve_args(kv_rotation="on", kv_cache_dtype="fp8", budget=16, page_size=4, num_pages=32, max_num_seqs=2)
    assert check_args(args) is None
    llm = engine_from_args(tiny_model("qwen3"), None, args)
    assert llm.zipage_config.kv_rotation is True and llm.runner.rotation is not None
    with pytest.raises(SystemExit):
        _serve_args(kv_rotation="maybe")
