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


def test_attention_code_of_the_model_s_own_gets_a_note_naming_it():
    """Falcon's attention is its own code: its forward fails inside it (the engine builds no mask); the error
    says why."""
    model = build(T.FalconConfig, num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2, alibi=False)
    with pytest.raises(Exception) as info:
        engine_tokens(model)
    assert any("does not go through transformers' AttentionInterface" in n for n in getattr(info.value,
                                                                                            "__notes__", []))


def test_a_model_the_engine_serves_still_matches_transformers():
    model = build(T.LlamaConfig, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False)[0, len(PROMPT):].tolist()
    assert engine_tokens(model) == ref
