"""Attention beyond causal softmax (full or sliding-window layers, sinks) is refused by both front
ends, naming the feature.

Real transformers model classes with tiny configs: Gemma2 (bidirectional attention), Falcon and Bloom (ALiBi), Mistral with a window on every layer. The config checks
refuse them when an ``LLM`` is built and when ``generate(cache_implementation="zipage")`` starts;
with those checks switched off, the attention call itself refuses them when a step runs. Windows
that never mask anything and softcapping of the final logits only are not refused (same tokens as
without them); neither are mixed sliding/full layers (Gemma2, Qwen2 with ``max_window_layers``),
Gemma2's logit softcapping nor GPT-OSS's sinks: tests/test_sliding_*.py check those against
transformers.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MptConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import zipage.cache
import zipage.engine.llm as llm_mod
import zipage.engine.runner as runner_mod
import zipage.hf
from zipage import LLM, SamplingParams, ZipageCache
from zipage.engine.runner import engine_attention

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256)
FULL = dict(layer_types=["full_attention"] * 2)
ZIPAGE = {"budget": 8, "page_size": 4, "buffer": 4, "window": 2}
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

MODELS = {  # name: (model class, config, words the error must contain)
    "gemma2 bidirectional": (Gemma2ForCausalLM, lambda: Gemma2Config(**TINY, head_dim=16, **FULL,
                                                                     attn_logit_softcapping=None,
                                                                     use_bidirectional_attention=True),
                             ["non-causal"]),
    "falcon alibi": (FalconForCausalLM, lambda: FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=2, alibi=True), ["ALiBi"]),
    "bloom": (BloomForCausalLM, lambda: BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=2),
              ["ALiBi", "bloom"]),
    "mistral window": (MistralForCausalLM, lambda: MistralConfig(**TINY, sliding_window=16),
                       ["sliding", "16", "every layer"]),
    "output_attentions": (LlamaForCausalLM, lambda: LlamaConfig(**TINY, output_attentions=True),
                          ["output_attentions"]),
}


def build(name: str):
    model_cls, config, _ = MODELS[name]
    torch.manual_seed(0)
    return model_cls(config()).eval()


def generate(model, **kw):
    ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    return model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, cache_implementation="zipage",
                          cache_config=ZIPAGE, **kw)


def assert_names(err, words) -> None:
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize("name", list(MODELS))
def test_refused_when_the_engine_or_generate_starts(name):
    model = build(name)
    words = MODELS[name][2]
    with pytest.raises(ValueError) as err:
        LLM(model, num_pages=32, **ZIPAGE)
    assert_names(err, words)
    with pytest.raises(ValueError) as err:
        generate(model)
    assert_names(err, words)


def test_mpt_config_with_alibi_is_refused():
    with pytest.raises(ValueError, match="ALiBi"):
        ZipageCache(config=MptConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=64), **ZIPAGE)


@pytest.fixture
def without_config_checks(monkeypatch):
    """Switch the build-time checks off: what is left to refuse a model is the attention call."""
    for module, name in ((llm_mod, "check_model_config"), (runner_mod, "check_model"),
                         (zipage.cache, "check_model_config"), (zipage.hf, "check_model")):
        monkeypatch.setattr(module, name, lambda *_: None, raising=False)


@pytest.mark.parametrize("name, words", [
    ("gemma2 bidirectional", ["is_causal=False"]),
    ("mistral window", ["sliding_window=16"]),
])
def test_refused_by_the_attention_call(without_config_checks, name, words):
    model = build(name)
    llm = LLM(model, num_pages=32, **ZIPAGE)
    with pytest.raises(NotImplementedError) as err:
        llm.generate([[5, 6, 7, 8, 9]], PARAMS, use_tqdm=False)
    assert_names(err, words + ["zipage engine", "plain causal softmax"])
    assert llm.blocks.num_free == llm.blocks.num_pages
    with pytest.raises(NotImplementedError) as err:
        generate(model)
    assert_names(err, words + ["ZipageCache"])


def test_engine_refuses_a_model_whose_attention_bypasses_it():
    """A layer that does not look its attention up through the model's config (here: its own copy
    of the config) would attend over the packed tokens of every request, not over its pages."""
    import copy

    model = tiny_model("llama")
    attn = model.model.layers[1].self_attn
    attn.config = copy.deepcopy(attn.config)
    llm = LLM(model, num_pages=32, **ZIPAGE)
    with pytest.raises(NotImplementedError, match=r"layers \[1\] of this LlamaForCausalLM .* AttentionInterface"):
        llm.generate([[5, 6, 7, 8, 9]], PARAMS, use_tqdm=False)


def test_engine_refuses_a_mask_it_did_not_build():
    model = tiny_model("llama")
    q = torch.zeros(1, 4, 3, 16)
    k = torch.zeros(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match="attention mask or additive bias"):
        engine_attention(model.model.layers[0].self_attn, q, k, k, torch.zeros(1, 1, 3, 3))


def test_generate_refuses_output_attentions():
    with pytest.raises(NotImplementedError, match="output_attentions=True"):
        generate(tiny_model("llama"), output_attentions=True, return_dict_in_generate=True)


@pytest.mark.parametrize("family, inactive, plain", [
    ("mistral", {"sliding_window": 4096}, {"sliding_window": None}),  # never masks: 2048 positions
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}, {}),  # no sliding layer
])
def test_windows_that_are_not_applied_are_not_refused(family, inactive, plain):
    model, reference = tiny_model(family, **inactive), tiny_model(family, **plain)
    prompts = [torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 30)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    outs = [[o.token_ids for o in LLM(m, num_pages=64, **ZIPAGE).generate(prompts, params, use_tqdm=False)]
            for m in (model, reference)]
    assert outs[0] == outs[1]
    ids = torch.tensor([prompts[1]])
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, cache_implementation="zipage", cache_config=ZIPAGE)
    assert torch.equal(model.generate(ids, **kw), reference.generate(ids, **kw))


def test_final_logit_softcapping_alone_is_not_refused():
    """Gemma2 with full-attention layers and no attention softcapping: the engine's tokens are those
    of generate() with the zipage cache."""
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=16, **FULL, attn_logit_softcapping=None,
                                           final_logit_softcapping=30.0)).eval()
    prompt = torch.randint(3, 64, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    out = LLM(model, num_pages=32, **ZIPAGE).generate([prompt], PARAMS, use_tqdm=False)[0].token_ids
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None, cache_implementation="zipage", cache_config=ZIPAGE)
    assert out == ref[0, 20:].tolist()


@pytest.mark.parametrize("model_cls, config", [
    (Gemma2ForCausalLM, lambda: Gemma2Config(**TINY, head_dim=16, sliding_window=8, attn_logit_softcapping=None)),
    (Gemma2ForCausalLM, lambda: Gemma2Config(**TINY, head_dim=16, sliding_window=8, attn_logit_softcapping=1.0,
                                             query_pre_attn_scalar=4)),
    (Qwen2ForCausalLM, lambda: Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    (GptOssForCausalLM, lambda: GptOssConfig(**TINY, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                             sliding_window=8)),
])
def test_mixed_sliding_and_full_layers_sinks_and_softcapping_are_served(model_cls, config):
    """Sliding layers next to full ones, sink logits, logit softcapping: the engine's tokens are generate()'s with a
    DynamicCache (budget above the length), and so are those of generate() with the zipage cache."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = model_cls(config()).eval()
    prompt = torch.randint(3, 64, (14,), generator=torch.Generator().manual_seed(1)).tolist()
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = model.generate(torch.tensor([prompt]), past_key_values=DynamicCache(config=model.config), **kw)[0, 14:]
    big = dict(ZIPAGE, budget=64)
    out = LLM(model, num_pages=32, **big).generate([prompt], PARAMS, use_tqdm=False)[0].token_ids
    assert out == ref.tolist()
    mine = model.generate(torch.tensor([prompt]), cache_implementation="zipage", cache_config=big, **kw)[0, 14:]
    assert torch.equal(mine, ref)


def test_layers_of_other_head_shapes_are_refused_by_the_engine_by_name():
    """A config whose layers differ in KV heads or head dim (Gemma 4's full layers: dim 512 against 256) is refused
    by the engine naming the layers (it failed inside transformers' config with an error about zipage's reads),
    and values of another head dim than the keys (MiMo-V2) too (the cache keeps each shape: not refused there)."""
    from transformers import CONFIG_MAPPING

    from zipage.attention_checks import check_engine_config, check_model_config

    if "gemma4_text" in CONFIG_MAPPING:
        cfg = CONFIG_MAPPING["gemma4_text"](vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, sliding_window=8,
                                            layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        if hasattr(cfg, "per_layer_config"):
            with pytest.raises(ValueError, match=r"layers 0-1: 2 KV heads of dim \d+; layer 2: 2 KV heads of dim"):
                check_engine_config(cfg)
    if "mimo_v2_flash" in CONFIG_MAPPING:
        cfg = CONFIG_MAPPING["mimo_v2_flash"](vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2)
        cfg.head_dim, cfg.v_head_dim = 192, 128
        with pytest.raises(ValueError, match=r"v_head_dim=128, head_dim=192"):
            check_engine_config(cfg)

    class Fake:  # (what either names, whatever the transformers version)
        num_hidden_layers, num_attention_heads, head_dim, v_head_dim = 2, 4, 64, 32

    with pytest.raises(ValueError, match=r"v_head_dim=32, head_dim=64"):
        check_engine_config(Fake())
    check_model_config(Fake())  # (generate()'s cache stores values at their own width)
    Fake.v_head_dim = 64
    check_engine_config(Fake())
