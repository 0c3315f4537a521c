"""Models outside plain decoder-only text transformers: served token for token as transformers' own run, or
refused with an error that names why, in generate() and in the engine; never wrong tokens in silence."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import zipage

V = 256
GREEDY = zipage.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _decoder(kind: str):
    """A decoder of an encoder-decoder family used alone (``...ForCausalLM``), tiny, random weights."""
    torch.manual_seed(0)
    dec = dict(vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=512,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if kind == "whisper":
        cfg = T.AutoConfig.for_model("whisper", vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=20,
                                     max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=1, tie_word_embeddings=False)
        model = T.WhisperForCausalLM._from_config(cfg)
    else:
        model = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(kind, decoder_start_token_id=0, **dec))
    model = model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in (19, 11)]


def _transformers(model, prompts):
    return [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
            for p in prompts]


@pytest.mark.parametrize("kind", ["bart", "marian"])
def test_the_engine_refuses_a_decoder_that_makes_its_own_positions(kind):
    """Bart's and Marian's decoders take their positions from the input's order, not ``position_ids``: packed
    into the engine's one row, a decoded token sat at position 0 and a second prompt after the first (wrong
    tokens, silently). The engine refuses them; generate() serves them token for token."""
    model = _decoder(kind)
    with pytest.raises(NotImplementedError, match="ignores the position_ids"):
        zipage.LLM(model, None, budget=None, page_size=16)
    model.train()  # (dropout on: two forwards differ by chance; the engine puts the model in eval before probing)
    with pytest.raises(NotImplementedError, match="ignores the position_ids"):
        zipage.LLM(model, None, budget=None, page_size=16)
    assert not model.training
    prompts = _prompts()
    want = _transformers(model, prompts)
    got = [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, cache_implementation="zipage",
                          cache_config={"budget": 256, "page_size": 16})[0, len(p):].tolist() for p in prompts]
    assert got == want


def test_the_engine_serves_a_model_that_gives_every_row_s_logits():
    """WhisperForCausalLM takes no ``logits_to_keep`` and returns logits for every row; the engine read the first
    rows as the last ones (the first prompt token's logits were sampled). It now picks the rows it asked for."""
    model = _decoder("whisper")
    prompts = _prompts()
    llm = zipage.LLM(model, None, budget=None, page_size=16)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == _transformers(model, prompts)


def _refused_by_both(model, words: str) -> None:
    """generate(cache_implementation="zipage") and zipage.LLM both refuse ``model`` with ``words``."""
    ids = torch.tensor([list(range(10, 31))])
    with pytest.raises(ValueError, match=words):
        model.generate(ids, max_new_tokens=4, cache_implementation="zipage", cache_config={"budget": 16})
    with pytest.raises(ValueError, match=words):
        zipage.LLM(model, None, budget=None, page_size=16)


def test_an_encoder_decoder_whose_decoder_config_says_nothing_of_it_is_refused():
    """T5Gemma's text config is its decoder's, which is not marked encoder-decoder: the model's own config is."""
    tt = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    cfg = T.AutoConfig.for_model("t5gemma", encoder=dict(tt, model_type="t5gemma_module"),
                                 decoder=dict(tt, model_type="t5gemma_module"), vocab_size=V)
    model = T.T5GemmaForConditionalGeneration._from_config(cfg).eval()
    _refused_by_both(model, "decoder-only models; T5GemmaConfig is an encoder-decoder")


def test_cross_attention_layers_are_refused_by_name():
    """Mllama's cross-attention layers put an image's keys and values in the cache (and store none at text-only
    steps): generate() failed with zipage's own bookkeeping errors, at once with an image, at the first
    compression without one."""
    cfg = T.AutoConfig.for_model(
        "mllama", image_token_index=250,
        text_config=dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         cross_attention_layers=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1,
                           attention_heads=2, image_size=28, patch_size=14, vision_output_dim=64,
                           intermediate_layers_indices=[0], max_num_tiles=1, supported_aspect_ratios=[[1, 1]]))
    model = T.MllamaForConditionalGeneration._from_config(cfg).eval()
    _refused_by_both(model, "cross-attention layers")


def test_a_model_without_attention_layers_is_refused_as_such():
    cfg = T.AutoConfig.for_model("mamba", vocab_size=V, hidden_size=32, num_hidden_layers=2, state_size=4)
    model = T.MambaForCausalLM._from_config(cfg).eval()
    with pytest.raises(ValueError, match="state-space or recurrent model"):
        zipage.LLM(model, None, budget=None, page_size=16)


def test_the_position_probe_waits_for_another_engine_s_forward_on_the_model():
    """An engine on this model stepping in another thread switches the model's attention to the engine's for the
    length of its forward; the probe of a second engine built meanwhile takes its turn instead of running into
    it (it would have failed, and refused a model it serves)."""
    import threading
    import time

    from conftest import tiny_model

    from zipage.engine.runner import ATTENTION_NAME, _config_lock

    model = tiny_model("llama")
    cfg = model.config.get_text_config(decoder=True)
    holding, done = threading.Event(), threading.Event()

    def stepping():  # (what an engine's forward does with the model's config, held a while)
        with _config_lock(cfg):
            original = cfg._attn_implementation
            cfg._attn_implementation_internal = ATTENTION_NAME
            holding.set()
            time.sleep(0.5)
            cfg._attn_implementation_internal = original
        done.set()

    t = threading.Thread(target=stepping)
    t.start()
    holding.wait(10)
    llm = zipage.LLM(model, None, budget=None, page_size=16, num_pages=16)
    assert done.is_set()  # (it waited for the other forward)
    t.join()
    assert llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_the_position_probe_gives_up_with_why_where_the_turn_never_comes(monkeypatch):
    """Built from inside an engine forward on the same model (a forward hook, say), the probe's turn would never
    come: it says so after PROBE_WAIT_S instead of hanging; the config's lock goes with its config."""
    import gc
    import threading

    from conftest import tiny_model

    from zipage.engine import llm as llm_mod
    from zipage.engine.runner import _config_lock, _config_locks

    monkeypatch.setattr(llm_mod, "PROBE_WAIT_S", 0.2)
    model = tiny_model("llama")
    cfg = model.config.get_text_config(decoder=True)
    held, release = threading.Event(), threading.Event()

    def holding(c):
        with _config_lock(c):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holding, args=(cfg,))
    t.start()
    held.wait(10)
    try:
        with pytest.raises(RuntimeError, match="did not end in 0.2 s"):
            zipage.LLM(model, None, budget=None, page_size=16, num_pages=16)
    finally:
        release.set()
        t.join()
    key = id(cfg)
    assert key in _config_locks
    del model, cfg
    gc.collect()
    assert key not in _config_locks


def test_a_probe_that_runs_out_of_memory_says_so(monkeypatch):
    """Memory short during the probe's forward is no verdict on the model: the error is the memory's."""
    from conftest import tiny_model

    model = tiny_model("llama")

    def short(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(model, "forward", short)
    with pytest.raises(torch.OutOfMemoryError):
        zipage.LLM(model, None, budget=None, page_size=16, num_pages=16)
