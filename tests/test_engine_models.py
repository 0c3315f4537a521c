"""Models the engine cannot page are refused with an error that names why, never served wrong: two attentions a
layer (differential attention), key/value heads repeated before attention, attention code of the model's own."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import zipage

PROMPT = list(range(10, 27))


def build(config_cls, **kw):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=256, hidden_size=64, num_hidden_layers=2, max_position_embeddings=512, **kw)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def falcon_has_its_own_attention() -> bool:
    """Falcon's attention is its own code up to transformers 5.24; from 5.25 it goes through the
    ``AttentionInterface`` like Llama's."""
    import inspect

    from transformers.models.falcon import modeling_falcon

    return "ALL_ATTENTION_FUNCTIONS" not in inspect.getsource(modeling_falcon)


def xglm(**kw):
    """XGLM: attention code of its own in every transformers version zipage supports (eager only)."""
    torch.manual_seed(0)
    cfg = T.XGLMConfig(vocab_size=256, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
                       max_position_embeddings=512, pad_token_id=0, **kw)
    cfg._attn_implementation = "eager"
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def engine_tokens(model):
    llm = zipage.LLM(model, None, budget=None, page_size=16, device="cpu")
    params = zipage.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    return list(llm.generate([PROMPT], params, use_tqdm=False)[0].token_ids)


def test_two_attention_calls_a_layer_are_refused():
    """DiffLlama calls attention twice a layer with two value sets: the second call stored over the first's
    keys and values, and the engine's tokens differed from transformers' (no error)."""
    model = build(T.DiffLlamaConfig, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(NotImplementedError, match="layer 0 called attention twice in one forward"):
        engine_tokens(model)


def test_key_value_heads_repeated_before_attention_are_refused():
    """JetMoe repeats its KV heads before attention: a shape error deep in the store before."""
    model = build(T.JetMoeConfig, intermediate_size=128, num_key_value_heads=2, kv_channels=16,
                  num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(NotImplementedError, match=r"gave keys \(4, 16\).*config gives \(2, 16\)"):
        engine_tokens(model)


@pytest.mark.parametrize("arch", ["xglm", "falcon"])
def test_attention_code_of_the_model_s_own_gets_a_note_naming_it(arch):
    """XGLM's attention (and Falcon's up to transformers 5.24) is its own code: refused naming the layers (XGLM),
    or its forward fails inside it (the engine builds no mask) and a note says why (Falcon). Falcon's through the
    AttentionInterface (transformers 5.25) is served, equal to transformers' tokens."""
    if arch == "xglm":
        model = xglm()
    else:
        model = build(T.FalconConfig, num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2,
                      alibi=False)
    if arch == "falcon" and not falcon_has_its_own_attention():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False)[0, len(PROMPT):].tolist()
        assert engine_tokens(model) == ref
        return
    with pytest.raises(Exception) as info:
        engine_tokens(model)
    said = [str(info.value), *getattr(info.value, "__notes__", [])]  # (the error itself, or a note on it)
    assert any("does not go through transformers' AttentionInterface" in n for n in said)


def test_a_model_the_engine_serves_still_matches_transformers():
    model = build(T.LlamaConfig, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False)[0, len(PROMPT):].tolist()
    assert engine_tokens(model) == ref


@pytest.mark.parametrize("new_arch", [True, False])
def test_generate_on_a_model_that_picks_its_attention_by_name_matches_dynamic_cache(new_arch):
    """Falcon picks its attention code by comparing the config's attention name with "sdpa": arming the query
    capture renamed it, so its prompt step took the eager branch with SDPA's boolean mask as a bias (wrong
    tokens from the second on, no error). Query-free scorers now leave the name alone; others say why (up to
    transformers 5.24: from 5.25 Falcon's attention goes through the AttentionInterface, and every scorer runs)."""
    torch.manual_seed(0)
    cfg = T.FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=False,
                         new_decoder_architecture=new_arch, num_kv_heads=2, max_position_embeddings=512,
                         pad_token_id=0)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    ref = model.generate(ids, **kw)
    out = model.generate(ids, **kw, cache_implementation="zipage",
                         cache_config={"budget": 512, "page_size": 16, "scorer": "streaming"})
    assert torch.equal(out, ref)
    if not falcon_has_its_own_attention():  # (transformers 5.25: the capture serves it; nothing is renamed)
        out = model.generate(ids, **kw, cache_implementation="zipage", cache_config={"budget": 512, "page_size": 16})
        assert torch.equal(out, ref)
        return
    with pytest.raises(RuntimeError, match="could not capture the queries of layer 0"):
        model.generate(ids, **{**kw, "max_new_tokens": 40}, cache_implementation="zipage",
                       cache_config={"budget": 16, "page_size": 4})
