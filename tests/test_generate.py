"""model.generate(cache_implementation="zipage") against plain generate() and its own invariants."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, left_padded_batch, tiny_model
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import zipage

GREEDY = dict(do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_large_budget_is_token_identical(family, attn):
    model = tiny_model(family, attn=attn)
    ids, mask = left_padded_batch()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=40, **GREEDY)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=40,
        cache_implementation="zipage",
        cache_config={"budget": 64, "page_size": 8, "buffer": 8},
        **GREEDY,
    )
    assert torch.equal(ref, out)
    assert model.config._attn_implementation == attn  # the capture leaves the model as it found it


@pytest.mark.parametrize("scorer", zipage.list_scorers())
def test_small_budget_bounded_and_pages_freed(scorer):
    model = tiny_model("qwen3")
    ids, mask = left_padded_batch(lengths=(20, 9, 14))
    cache = zipage.ZipageCache(config=model.config, budget=32, page_size=8, buffer=8, scorer=scorer)
    seen_stored = []

    class Probe(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            seen_stored.append([cache.stored_length(i) for i in range(len(cache.layers))])
            seen_stored[-1].append(cache.stats()["capacity_tokens"])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    out = model.generate(
        ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=220,
        min_new_tokens=220,
        stopping_criteria=StoppingCriteriaList([Probe()]),
        **GREEDY,
    )
    assert out.shape == (3, 20 + 220)
    assert cache.get_seq_length() == 20 + 219  # the last token is sampled, never fed back
    per_step = torch.tensor(seen_stored)
    assert per_step[:, :-1].max().item() <= 32 + 8
    # storage: every row holds budget + buffer tokens at most (the prompt is shorter)
    assert per_step[:, -1].max().item() <= 32 + 8
    stats = cache.stats()
    assert stats["compressions"] == (20 + 219 - 40 + 7) // 8  # one every `buffer` tokens past budget + buffer
    assert stats["pages_in_use"] == 3 * -(-cache.stored_length() // 8)
    assert stats["kv_bytes_in_use"] * 4 < stats["kv_bytes_full"]
    assert stats["kv_bytes_in_use"] <= stats["kv_bytes_pool"] == stats["kv_bytes_peak"] == 40 * stats["kv_bytes_full"] // 239
    cache.reset()
    assert cache.stats()["kv_bytes_pool"] == 0 and all(layer.keys is None for layer in cache.layers)


def test_prompt_longer_than_budget_is_compressed_after_prefill():
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (2, 100), generator=torch.Generator().manual_seed(1))
    cache = zipage.ZipageCache(config=model.config, budget=24, page_size=8, buffer=8)
    model.generate(ids, past_key_values=cache, max_new_tokens=3, **GREEDY)
    assert cache.get_seq_length() == 102
    assert cache.stored_length() <= 32
    assert cache.stats()["peak_pages"] == 2 * -(-100 // 8)  # the prompt itself was stored in full once
    assert cache.stats()["capacity_tokens"] <= 32  # and its storage shrank after the compression


def test_padding_is_evicted_first_and_mask_stays_exact():
    """A row with less real text than the budget keeps all of it; padding never displaces real tokens."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch(lengths=(60, 5, 30))
    cache = zipage.ZipageCache(config=model.config, budget=16, page_size=4, buffer=4, scorer="random")
    model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2, **GREEDY)
    valid = cache.layers[0].valid
    # row 1: 5 prompt tokens + 1 generated token fed back = 6 real tokens, all kept, padding first
    n_real = valid.sum(dim=1).tolist()
    assert n_real[1] == 6
    assert n_real[0] == n_real[2] == cache.stored_length()
    assert not valid[1, : valid.shape[1] - 6].any() and valid[1, -6:].all()


def test_sampling_is_reproducible_and_budget_independent_when_large():
    model = tiny_model("mistral")
    ids, mask = left_padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0)
    torch.manual_seed(7)
    ref = model.generate(ids, **kw)
    torch.manual_seed(7)
    big = model.generate(ids, cache_implementation="zipage", cache_config={"budget": 64, "page_size": 8}, **kw)
    small_runs = []
    for _ in range(2):
        torch.manual_seed(7)
        small_runs.append(
            model.generate(ids, cache_implementation="zipage", cache_config={"budget": 16, "page_size": 4}, **kw)
        )
    assert torch.equal(ref, big)
    assert torch.equal(small_runs[0], small_runs[1])


def test_logits_processor_stopping_criteria_streamer_and_scores():
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch()

    class BanToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, 5] = float("-inf")
            return scores

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 25)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append("end")

    results = []
    for extra in ({}, {"cache_implementation": "zipage", "cache_config": {"budget": 16, "page_size": 4}}):
        streamer = Collect()
        out = model.generate(
            ids[:1],
            attention_mask=mask[:1],
            max_new_tokens=100,
            logits_processor=LogitsProcessorList([BanToken()]),
            stopping_criteria=StoppingCriteriaList([StopAt()]),
            streamer=streamer,
            return_dict_in_generate=True,
            output_scores=True,
            **GREEDY,
            **extra,
        )
        assert out.sequences.shape[1] == ids.shape[1] + 25
        assert (out.sequences[:, ids.shape[1] :] != 5).all()
        assert len(out.scores) == 25 and torch.isinf(out.scores[0][:, 5]).all()
        assert streamer.chunks[-1] == "end" and len(streamer.chunks) == 1 + 25 + 1
        results.append(out)
    with_zipage = results[1]
    assert isinstance(with_zipage.past_key_values, zipage.ZipageCache)
    assert with_zipage.past_key_values.stored_length() <= 20


def test_beam_search_matches_full_kv_with_large_budget():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    out = model.generate(ids, cache_implementation="zipage", cache_config={"budget": 64, "page_size": 8}, **kw)
    assert torch.equal(ref, out)
    small = model.generate(ids, cache_implementation="zipage", cache_config={"budget": 16, "page_size": 4}, **kw)
    assert small.shape == ref.shape


def test_continue_generation_from_returned_cache():
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(3))
    full = model.generate(ids, max_new_tokens=20, **GREEDY)
    cache = zipage.ZipageCache(config=model.config, budget=64, page_size=8)
    first = model.generate(ids, past_key_values=cache, max_new_tokens=10, **GREEDY)
    second = model.generate(first, past_key_values=cache, max_new_tokens=10, **GREEDY)
    assert torch.equal(second, full)
    # the cache has seen all of ``second`` but its last token: an input no longer than that would be fed again
    # at positions the cache has passed (silently wrong tokens): refused
    for ids in (second[:, :-1], second[:, :5]):
        mask = torch.ones_like(ids)
        for kw in ({}, {"attention_mask": mask.index_fill(1, torch.tensor([0]), 0)}):  # (a mask of ones is dropped)
            with pytest.raises(ValueError, match=f"got {ids.shape[1]} tokens with a ZipageCache that has seen 29"):
                model.generate(ids, past_key_values=cache, max_new_tokens=3, **kw, **GREEDY)
    embeds = model.get_input_embeddings()(second[:, :5])  # (embeddings: their length, whatever the mask's)
    with pytest.raises(ValueError, match="got 5 tokens with a ZipageCache that has seen 29"):
        model.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, 40, dtype=torch.long), past_key_values=cache,
                       max_new_tokens=3, **GREEDY)
    assert torch.equal(model.generate(second, past_key_values=cache, max_new_tokens=5, **GREEDY),
                       model.generate(second, max_new_tokens=5, **GREEDY))


def _keep_every_query(monkeypatch):
    """The reference for the rule that drops queries no compression can need: keep them all."""
    monkeypatch.setattr(zipage.ZipageCache, "_queries_needed", lambda self, *args: self.scorer.needs_queries)


@pytest.mark.parametrize("first_new,second_new", [(10, 10), (5, 40), (30, 10)])
def test_continued_generation_compresses_as_one_call_would(monkeypatch, first_new, second_new):
    """A cache handed back to a second generate() that compresses (the first call's max_cache_len must not
    have dropped the queries its last steps left): the same tokens as one call of the same length, and as
    with every query kept."""
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(3))
    cfg = dict(budget=16, page_size=8, buffer=8)

    def run():
        cache = zipage.ZipageCache(config=model.config, **cfg)
        first = model.generate(ids, past_key_values=cache, max_new_tokens=first_new, **GREEDY)
        second = model.generate(first, past_key_values=cache, max_new_tokens=second_new, **GREEDY)
        assert cache.num_compressions > 0 and cache.stored_length() <= 24
        return second

    got = run()
    one = model.generate(ids, past_key_values=zipage.ZipageCache(config=model.config, **cfg),
                         max_new_tokens=first_new + second_new, **GREEDY)
    assert torch.equal(got, one)
    _keep_every_query(monkeypatch)
    assert torch.equal(got, run())


def test_a_continuation_that_adds_a_turn_compresses_with_the_last_call_s_queries(monkeypatch):
    """The second call's first step stores a new 12-token turn at once, so it may compress before any query
    of its own: it reads the first call's last queries (the same tokens as with every query kept)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(3))
    turn = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(4))
    cfg = dict(budget=16, page_size=8, buffer=8, window=4)

    def run():
        cache = zipage.ZipageCache(config=model.config, **cfg)
        first = model.generate(ids, past_key_values=cache, max_new_tokens=9, **GREEDY)  # 18 stored, past 16
        before = cache.num_compressions
        out = model.generate(torch.cat([first, turn], 1), past_key_values=cache, max_new_tokens=6, **GREEDY)
        assert cache.num_compressions > before
        return out

    got = run()
    _keep_every_query(monkeypatch)
    assert torch.equal(got, run())


class _StopAt(StoppingCriteria):
    """Stops every row once the sequence holds ``n`` tokens (an EOS without choosing a token)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.n, dtype=torch.bool)


def test_a_continuation_after_a_call_that_stopped_early_waits_for_its_own_queries(monkeypatch):
    """A call stopped early (an EOS past the budget, long before max_new_tokens) keeps no queries; a second call
    whose first step must compress waits one step and scores with its new turn's last ``window`` queries."""
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(3))
    turn = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(4))
    cache = zipage.ZipageCache(config=model.config, budget=16, page_size=8, buffer=8, window=4)
    first = model.generate(ids, past_key_values=cache, max_new_tokens=50,
                           stopping_criteria=StoppingCriteriaList([_StopAt(19)]), **GREEDY)
    assert first.shape[1] == 19 and cache.stored_length() == 18 and cache.num_compressions == 0
    seen, scored = [], []
    on_attention, compress = cache._on_attention, zipage.cache.ZipageLayer.compress

    def spy_attention(layer_idx, query, *args):
        if layer_idx == 0:
            seen.append(query.detach().clone())
        return on_attention(layer_idx, query, *args)

    def spy_compress(layer, slots, queries, **kwargs):
        if layer.layer_idx == 0:
            scored.append((len(seen), queries.clone()))
        return compress(layer, slots, queries, **kwargs)

    monkeypatch.setattr(cache, "_on_attention", spy_attention)
    monkeypatch.setattr(zipage.cache.ZipageLayer, "compress", spy_compress)
    out = model.generate(torch.cat([first, turn], 1), past_key_values=cache, max_new_tokens=6, **GREEDY)
    assert out.shape[1] == 19 + 12 + 6
    steps, queries = scored[0]
    assert steps == 1 and seen[0].shape[2] == 13  # (the turn and the first call's last token, in one step)
    torch.testing.assert_close(queries, seen[0][:, :, -4:])
    assert cache.stored_length() <= 16 + 8


@pytest.mark.parametrize("chunk", [4, 12, 20])
def test_chunked_prefill_keeps_the_queries_its_compressions_need(monkeypatch, chunk):
    """prefill_chunk_size stores several tokens a step, so a compression can come sooner than one token a step
    would bring it: the prompt's chunks keep the queries it scores with (the same tokens as with all kept)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 60), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=5, prefill_chunk_size=chunk, cache_implementation="zipage",
              cache_config=dict(budget=32, page_size=8, buffer=8), **GREEDY)
    got = model.generate(ids, **kw)
    _keep_every_query(monkeypatch)
    assert torch.equal(got, model.generate(ids, **kw))


def test_assisted_decoding_is_refused():
    model = tiny_model("llama")
    assistant = tiny_model("llama", seed=1)
    ids = torch.randint(3, 96, (1, 8))
    with pytest.raises(ValueError, match="assisted"):
        model.generate(ids, assistant_model=assistant, cache_implementation="zipage", max_new_tokens=4, **GREEDY)
    with pytest.raises(ValueError, match="assisted"):
        model.generate(ids, prompt_lookup_num_tokens=2, cache_implementation="zipage", max_new_tokens=4, **GREEDY)


def test_bad_cache_config_in_generate():
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 8))
    with pytest.raises(ValueError, match="budget"):
        model.generate(ids, cache_implementation="zipage", cache_config={"budget": 0}, max_new_tokens=2, **GREEDY)
    with pytest.raises(ValueError, match="bugdet"):
        model.generate(ids, cache_implementation="zipage", cache_config={"bugdet": 8}, max_new_tokens=2, **GREEDY)
    with pytest.raises(ValueError, match="both"):
        cache = zipage.ZipageCache(config=model.config)
        model.generate(ids, cache_implementation="zipage", past_key_values=cache, max_new_tokens=2, **GREEDY)


def test_crop_is_refused_clearly():
    model = tiny_model("llama")
    cache = zipage.ZipageCache(config=model.config, budget=16, page_size=4)
    with pytest.raises(NotImplementedError, match="evicted tokens cannot be restored"):
        cache.crop(-1)


def test_unsupported_transformers_version_is_a_clear_error(monkeypatch):
    from packaging.version import Version

    from zipage import hf

    expected = r"supports transformers >=5.17.0,<5.26.0; found 5.12.0\. .*pip install 'transformers>=5.17.0,<5.26.0'"
    with pytest.raises(RuntimeError, match=expected):
        hf.check_transformers_version(Version("5.12.0"))
    monkeypatch.setattr(hf, "transformers_version", lambda: Version("6.0.0"))
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="found"):
        model.generate(torch.randint(3, 96, (1, 8)), cache_implementation="zipage", max_new_tokens=2, **GREEDY)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_captured_window_queries_are_the_models_post_rope_queries(attn):
    """The capture hands the scorer exactly the queries the model attends with (here: Qwen3, q_norm + RoPE)."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    model = tiny_model("qwen3", attn=attn)
    attn_module = model.model.layers[1].self_attn
    seen = []
    handle = attn_module.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["hidden_states"], kwargs["position_embeddings"])),
        with_kwargs=True,
    )
    # budget + buffer = 24: the 18 tokens below are within a window of the first compression, so
    # the cache keeps their queries (further from a compression it keeps none).
    cache = zipage.ZipageCache(config=model.config, budget=16, page_size=8)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(ids, past_key_values=cache)
        for t in range(6):
            model(ids[:, t : t + 1], past_key_values=cache)
    handle.remove()
    queries = []
    for hidden, (cos, sin) in seen:
        B, T, _ = hidden.shape
        q = attn_module.q_norm(attn_module.q_proj(hidden).view(B, T, -1, attn_module.head_dim)).transpose(1, 2)
        queries.append(apply_rotary_pos_emb(q, q, cos, sin)[0])
    expected = torch.cat(queries, dim=2)[:, :, -16:]
    got = cache.layers[1].window_queries
    assert got.shape == expected.shape == (2, 4, 16, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert cache.layers[1].scaling == pytest.approx(16**-0.5)


def test_paged_decode_path_matches_dense_path(monkeypatch):
    """The CUDA decode path (attention straight from the pages) wired on the CPU with the reference op."""
    import zipage.cache as cache_mod

    model = tiny_model("llama")
    ids, mask = left_padded_batch(lengths=(20, 6, 13))
    kw = dict(attention_mask=mask, **GREEDY)
    ref = model.generate(ids, max_new_tokens=40, **kw)
    small_dense = model.generate(
        ids, max_new_tokens=60, cache_implementation="zipage", cache_config={"budget": 16, "page_size": 4}, **kw
    )
    calls = []
    real = cache_mod.paged_decode_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(cache_mod, "paged_decode_attention", spy)
    big = model.generate(
        ids, max_new_tokens=40, cache_implementation="zipage", cache_config={"budget": 64, "page_size": 8}, **kw
    )
    small = model.generate(
        ids, max_new_tokens=60, cache_implementation="zipage", cache_config={"budget": 16, "page_size": 4}, **kw
    )
    # Every decode step of both layers went through the pages, but for the big run's last 11: it stores 59
    # tokens at most (the 60th is never fed back), not a whole number of 16-token kernel pages, so past 48
    # its rows hold exactly 59 and those steps (tokens 49 to 59) attend densely from them.
    assert len(calls) == 2 * (40 - 1 - 11) + 2 * (60 - 1)
    assert torch.equal(big, ref)
    assert torch.equal(small, small_dense)


@pytest.mark.parametrize("stride", [1, 2, None])
def test_layer_stride_does_not_change_the_result(stride):
    """Compressing layers one by one, in pairs or all at once is the same computation."""
    model = tiny_model("qwen3", num_hidden_layers=3)
    ids, mask = left_padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=50, cache_implementation="zipage", **GREEDY)
    base = {"budget": 16, "page_size": 4, "buffer": 4}
    ref = model.generate(ids, cache_config={**base, "layer_stride": 3}, **kw)
    out = model.generate(ids, cache_config={**base, "layer_stride": stride}, **kw)
    assert torch.equal(ref, out)


def test_layer_batches_follow_the_stride_and_the_softmax_scales():
    from zipage.compress import layer_batches

    cfg = zipage.ZipageConfig(budget=16, page_size=4, layer_stride=2)
    assert layer_batches(cfg, [0.25] * 5, 64, 100) == [(0, 2, 0.25), (2, 4, 0.25), (4, 5, 0.25)]
    # a batch ends where the scale changes; a layer whose attention was not seen takes head_dim ** -0.5
    assert layer_batches(cfg, [0.25, None, None, 0.5, 0.5], 64, 100) == [
        (0, 1, 0.25), (1, 3, 0.125), (3, 5, 0.5)]
    auto = cfg.replace(layer_stride=None, compress_scratch_bytes=300)  # as many as 300 bytes of keys allow
    assert layer_batches(auto, [0.1] * 7, 64, 100) == [(0, 3, 0.1), (3, 6, 0.1), (6, 7, 0.1)]
    assert layer_batches(auto, [0.1] * 2, 64, 10**9) == [(0, 1, 0.1), (1, 2, 0.1)]  # never fewer than one
    assert layer_batches(auto, [0.1] * 4, 64, 0) == [(0, 4, 0.1)]


def test_layers_with_their_own_softmax_scales_are_scored_with_them():
    """generate() and the engine take each layer's scale from its attention, and agree."""
    from test_engine import reference

    model = tiny_model("llama", num_hidden_layers=3)
    model.model.layers[1].self_attn.scaling = 0.3
    prompt = torch.randint(3, 96, (23,), generator=torch.Generator().manual_seed(4)).tolist()
    cfg = {"budget": 16, "page_size": 4, "buffer": 4}
    cache = zipage.ZipageCache(config=model.config, **cfg)
    ref = reference(model, prompt, 30, past_key_values=cache)
    assert cache.num_compressions > 0 and [lyr.scaling for lyr in cache.layers][1] == pytest.approx(0.3)
    llm = zipage.LLM(model, num_pages=64, **cfg)
    out = llm.generate([prompt], zipage.SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False)
    assert llm.runner.scaling[1] == pytest.approx(0.3) and llm.runner.scaling[0] == pytest.approx(16**-0.5)
    assert out[0].token_ids == ref


def test_gpu_attention_switches_refuse_bad_values_and_cudnn_comes_back(monkeypatch):
    """ZIPAGE_DENSE_CUDNN and ZIPAGE_GENERATE_ATTENTION name themselves when given a bad value; the
    capture's cuDNN-off call puts the backend setting back, also when the attention raises."""
    import zipage.cache as cache_mod
    import zipage.capture as capture_mod

    monkeypatch.setenv("ZIPAGE_DENSE_CUDNN", "yes")
    with pytest.raises(ValueError, match="ZIPAGE_DENSE_CUDNN='yes'"):
        cache_mod._avoid_cudnn()
    monkeypatch.setenv("ZIPAGE_DENSE_CUDNN", "1")
    assert cache_mod._avoid_cudnn() is False
    monkeypatch.delenv("ZIPAGE_DENSE_CUDNN")
    assert cache_mod._avoid_cudnn() is True
    config = tiny_model("qwen3").config
    cache = zipage.ZipageCache(config=config, budget=64)
    k = torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16)
    assert cache._dense_on_gpu(k) and not cache._dense_on_gpu(k.float())
    assert not zipage.ZipageCache(config=config, budget=64, kv_cache_dtype="fp8")._dense_on_gpu(k)
    monkeypatch.setenv("ZIPAGE_GENERATE_ATTENTION", "paged")
    assert not cache._dense_on_gpu(k)
    monkeypatch.setenv("ZIPAGE_GENERATE_ATTENTION", "always")
    with pytest.raises(ValueError, match="ZIPAGE_GENERATE_ATTENTION='always'"):
        cache._dense_on_gpu(k)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    seen = []

    def attention(module, q, k, v, mask, **kw):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        capture_mod._without_cudnn(attention, None, None, None, None, None, {})
    assert seen == [False] and torch.backends.cuda.cudnn_sdp_enabled() == before


def test_cudnn_switch_overlapping_threads_put_back_what_they_found():
    """Two threads inside the cuDNN-off call at once (their windows interleaved: A enters, B enters, A leaves,
    B leaves): cuDNN is off while either is inside and comes back on after both, not left off by B having
    found A's setting."""
    import threading

    import zipage.capture as capture_mod

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def attention_a(*a, **k):
        a_in.set()
        b_in.wait(5)
        seen["a"] = torch.backends.cuda.cudnn_sdp_enabled()

    def attention_b(*a, **k):
        b_in.set()
        a_out.wait(5)
        seen["b"] = torch.backends.cuda.cudnn_sdp_enabled()

    def run_a():
        capture_mod._without_cudnn(attention_a, None, None, None, None, None, {})
        a_out.set()

    try:
        ta = threading.Thread(target=run_a)
        ta.start()
        a_in.wait(5)
        tb = threading.Thread(target=capture_mod._without_cudnn, args=(attention_b, None, None, None, None, None, {}))
        tb.start()
        ta.join(10)
        tb.join(10)
        assert seen == {"a": False, "b": False}
        assert torch.backends.cuda.cudnn_sdp_enabled() is True
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def _force_dense_cudnn_off(monkeypatch):
    """Run the CUDA dense decode path's cuDNN switching on the CPU (the switch is a global flag either way)."""
    import zipage.cache as cache_mod

    begin = cache_mod.ZipageCache._begin_step

    def begin_step(self, batch, q, key_states):
        begin(self, batch, q, key_states)
        self.dense_without_cudnn = q == 1

    monkeypatch.setattr(cache_mod.ZipageCache, "_begin_step", begin_step)


def _generate_recording_cudnn(monkeypatch, model, ids, **kw):
    """generate() with zipage (budget 256) and with DynamicCache: whether cuDNN was on at each SDPA call of the
    zipage run, which layers its capture saw, and checks that both gave the same tokens and left cuDNN on."""
    import zipage.cache as cache_mod

    _force_dense_cudnn_off(monkeypatch)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, **kw)
    ref = model.generate(ids, **kw)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    during, captured = [], []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    real_on = cache_mod.ZipageCache._on_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: during.append(torch.backends.cuda.cudnn_sdp_enabled()) or real_sdpa(*a, **k))
    monkeypatch.setattr(cache_mod.ZipageCache, "_on_attention",
                        lambda self, i, *a: captured.append(i) or real_on(self, i, *a))
    try:
        cache = zipage.ZipageCache(config=model.config, budget=256)
        out = model.generate(ids, past_key_values=cache, **kw)
        assert torch.equal(out, ref)
        assert torch.backends.cuda.cudnn_sdp_enabled() is True and not cache.cudnn_hold.held
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    return during, captured


def test_dense_decode_holds_cudnn_off_from_the_first_to_the_last_layer(monkeypatch):
    """Dense decode steps that need no queries: only the first and the last layer go through the capture, every
    layer's SDPA runs with cuDNN off, the setting comes back after each forward, and the tokens are
    DynamicCache's (the budget is never reached)."""
    ids, mask = left_padded_batch(lengths=(12, 12))
    during, captured = _generate_recording_cudnn(monkeypatch, tiny_model("qwen3", num_hidden_layers=5), ids,
                                                 attention_mask=mask)
    decode = during[5:]  # after the prefill's five layers
    assert len(decode) == 5 * 11 and not any(decode)
    assert captured[:5] == list(range(5)) and captured[5:] == [0, 4] * 11


def test_dense_decode_with_sliding_layers_switches_cudnn_per_full_layer(monkeypatch):
    """A model with sliding-window layers (Gemma 3's pattern) keeps one switch per captured call: every full layer
    goes through the capture each decode step, the sliding layers between them run with the setting they found,
    and nothing is left held."""
    from conftest import tiny_sliding_model

    model = tiny_sliding_model("gemma3", layer_types=["full_attention", "sliding_attention", "full_attention",
                                                      "sliding_attention"])
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    during, captured = _generate_recording_cudnn(monkeypatch, model, ids)
    assert captured == [0, 2] * 12
    decode = during[4:]  # after the prefill's four layers (held across layer 1, it would read False there)
    assert decode == [False, True, False, True] * 11


@pytest.mark.parametrize("recover", ["next step", "reset", "collected"])
def test_dense_decode_gives_cudnn_back_after_a_layer_raises(monkeypatch, recover):
    """A forward that raises between the first and the last layer leaves cuDNN off only until the cache's next
    step, its reset or its collection; a raise inside a captured layer's attention gives it back at once."""
    import gc

    _force_dense_cudnn_off(monkeypatch)
    model = tiny_model("qwen3", num_hidden_layers=4)
    ids = torch.randint(3, 96, (1, 8))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {"n": 0, "raise_at": None}

    def sdpa(*a, **k):
        calls["n"] += 1
        if calls["n"] == calls["raise_at"]:
            raise RuntimeError("boom")
        return real_sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    def fresh_cache():
        cache = zipage.ZipageCache(config=model.config, budget=256)
        nxt = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)  # prefill: 4 SDPA calls
        model(input_ids=nxt, past_key_values=cache)  # a decode step: 4 calls
        return cache, nxt

    try:
        with torch.no_grad():
            cache, nxt = fresh_cache()
            calls["raise_at"] = calls["n"] + 1  # the first layer's (captured) attention
            with pytest.raises(RuntimeError, match="boom"):
                model(input_ids=nxt, past_key_values=cache)
            assert torch.backends.cuda.cudnn_sdp_enabled() is True and not cache.cudnn_hold.held
            calls["raise_at"] = None
            cache, nxt = fresh_cache()
            calls["raise_at"] = calls["n"] + 2  # a middle layer's (not captured) attention
            with pytest.raises(RuntimeError, match="boom"):
                model(input_ids=nxt, past_key_values=cache)
            assert torch.backends.cuda.cudnn_sdp_enabled() is False and cache.cudnn_hold.held
            calls["raise_at"] = None
            if recover == "next step":  # (the raise left the later layers a token behind layer 0)
                with pytest.raises(RuntimeError, match="out of step"):
                    model(input_ids=nxt, past_key_values=cache)
            elif recover == "reset":
                cache.reset()
            else:
                del cache
                gc.collect()
        assert torch.backends.cuda.cudnn_sdp_enabled() is True
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_dense_decode_steps_store_the_later_layers_by_the_lean_update(monkeypatch):
    """A decode step whose first layer's attention finds nothing else to do (no queries to keep, no mask, no pages)
    stores every later layer by ``_update_lean``: the tokens are DynamicCache's while nothing is evicted. Across
    compressions (budget 16) the steps in a compression's window keep their queries and take the general update
    for every layer, and the tokens equal those of a run with the lean update turned off."""
    import zipage.cache as cache_mod

    model = tiny_model("qwen3", num_hidden_layers=5)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    real = cache_mod.ZipageCache._update_lean
    lean = []

    def recording(self, layer, k, v):
        out = real(self, layer, k, v)
        lean.append((layer.layer_idx, out is not None))
        return out

    monkeypatch.setattr(cache_mod.ZipageCache, "_update_lean", recording)
    out = model.generate(ids, past_key_values=zipage.ZipageCache(config=model.config, budget=256), **kw)
    assert torch.equal(out, model.generate(ids, **kw))
    # every decode step reaches it in layers 1-4; it stores all but the steps that grow the rows (every 16 tokens)
    assert [i for i, _ in lean] == list(range(1, 5)) * 39
    grew = [ok for _, ok in lean[::4]].count(False)
    assert 1 <= grew <= 3 and all(ok == lean[s * 4][1] for s in range(39) for _, ok in lean[s * 4:s * 4 + 4])

    lean.clear()
    cfg = dict(budget=16, buffer=8, window=4)
    cache = zipage.ZipageCache(config=model.config, **cfg)
    out = model.generate(ids, past_key_values=cache, **kw)
    steps = [ok for _, ok in lean].count(True) // 4
    assert cache.num_compressions >= 3 and 10 < steps < 39
    monkeypatch.setattr(cache_mod.ZipageCache, "_update_lean", lambda self, layer, k, v: None)
    assert torch.equal(out, model.generate(ids, past_key_values=zipage.ZipageCache(config=model.config, **cfg), **kw))


def test_compressions_share_one_validity_record_where_no_mask_was_seen(monkeypatch):
    """Where no attention mask ever reached the capture (no padding), every layer shares one validity record after
    each compression, decided on the host (no device compare, which would wait for a GPU), so that the decode steps
    after it take the lean update; with left padding the records are compared as before. Tokens: the same as with
    records never shared."""
    import zipage.cache as cache_mod

    model = tiny_model("qwen3", num_hidden_layers=4)
    kw = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    cfg = dict(budget=16, buffer=8, window=4)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    real_equal = torch.equal
    compared = []
    monkeypatch.setattr(torch, "equal", lambda a, b: compared.append(a.dtype) or real_equal(a, b))
    cache = zipage.ZipageCache(config=model.config, **cfg)
    out = model.generate(ids, past_key_values=cache, **kw)
    assert cache.all_real and cache.num_compressions >= 3 and torch.bool not in compared
    assert len({id(layer.valid) for layer in cache.full}) == 1

    padded, mask = left_padded_batch(lengths=(12, 7))
    cache = zipage.ZipageCache(config=model.config, **cfg)
    model.generate(padded, attention_mask=mask, past_key_values=cache, **kw)
    assert not cache.all_real and torch.bool in compared

    # records never shared: the mask flag off and every compare false (each layer then extends its own record)
    monkeypatch.setattr(torch, "equal", lambda a, b: a.dtype != torch.bool and real_equal(a, b))
    monkeypatch.setattr(cache_mod.ZipageCache, "all_real", property(lambda self: False, lambda self, v: None),
                        raising=False)
    cache = zipage.ZipageCache(config=model.config, **cfg)
    again = model.generate(ids, past_key_values=cache, **kw)
    assert len({id(layer.valid) for layer in cache.full}) == 4 and real_equal(out, again)


def test_a_capture_armed_in_one_thread_survives_another_thread_s_capture():
    """Two threads arm the capture on one model's config: B's wrapper running first must not put the model's
    attention name back under A, whose attention then would not reach its cache (A enters, B runs, A runs)."""
    import threading

    import zipage.capture as capture_mod

    model = tiny_model("llama")
    config = model.config
    original = config._attn_implementation
    a_armed, b_done = threading.Event(), threading.Event()
    seen = {}

    def run_a():
        capture_mod.arm("cache a", 0, config)
        a_armed.set()
        b_done.wait(5)
        seen["a"] = config._attn_implementation  # what A's attention lookup finds
        capture_mod.disarm()

    def run_b():
        a_armed.wait(5)
        capture_mod.arm("cache b", 0, config)
        capture_mod.disarm()  # (as its wrapper does once its attention ran)
        seen["b"] = config._attn_implementation
        b_done.set()

    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["a"].startswith(capture_mod.PREFIX) and seen["b"].startswith(capture_mod.PREFIX)
    assert config._attn_implementation == original


def test_generate_in_two_threads_on_one_model():
    """generate() with compressions in two threads at once on the same model: each thread's tokens are those of
    a run alone, and the model's attention name is its own afterwards."""
    import threading

    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = left_padded_batch(lengths=(40, 25, 33))
    kw = dict(attention_mask=mask, max_new_tokens=40, cache_implementation="zipage",
              cache_config={"budget": 16, "page_size": 4, "buffer": 4}, **GREEDY)
    want = model.generate(ids, **kw)
    results, errors = [], []

    def work():
        try:
            for _ in range(2):
                results.append(model.generate(ids, **kw))
        except Exception as error:  # (reported below: a thread's exception would otherwise vanish)
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 4 and all(torch.equal(r, want) for r in results)
    assert model.config._attn_implementation == "sdpa"


def test_an_update_that_raises_leaves_no_capture_armed():
    """An update that raised after arming its layer's capture (an out-of-memory in its store, an interrupt) puts
    the model's attention name back: the next forward in this thread, with any cache, never routes a layer's
    attention to the failed cache."""
    import zipage.capture as capture_mod

    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    base = model.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY)
    cache = zipage.ZipageCache(config=model.config, budget=64, page_size=4)
    update, calls, routed = cache._update_layer, [], []

    def failing_update(*a, **kw):
        out = update(*a, **kw)
        calls.append(1)
        if len(calls) == 5:  # (its capture is armed by now)
            raise MemoryError("injected after the update armed its capture")
        return out

    cache._update_layer = failing_update
    on_attention = cache._on_attention
    cache._on_attention = lambda *a, **kw: (routed.append(1), on_attention(*a, **kw))[1]
    with pytest.raises(MemoryError, match="injected"):
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5, **GREEDY)
    assert capture_mod.pending_layer(cache) is None
    assert not model.config._attn_implementation.startswith(capture_mod.PREFIX)
    routed.clear()
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY), base)
    assert routed == []


def test_gpt2_upcast_attention_is_the_path_it_takes_without_zipage():
    """GPT-2 with ``reorder_and_upcast_attn`` takes its float32-logit path only while its attention name reads
    "eager"; under the capture's name it used to get the plain eager function (bf16 logits 0.02 apart and
    different greedy tokens). With nothing evicted the logits are DynamicCache's, bit for bit, and the path runs
    on every step."""
    import transformers as T

    cfg = T.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=256, reorder_and_upcast_attn=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)  # (sharp logits: the two paths' roundings show)
    model = model.to(torch.bfloat16)
    ids, mask = left_padded_batch(lengths=(12, 7, 10), vocab=96)
    attn, calls = model.transformer.h[0].attn, []
    upcast = attn._upcast_and_reordered_attn
    attn._upcast_and_reordered_attn = lambda *a, **kw: (calls.append(1), upcast(*a, **kw))[1]
    kw = dict(attention_mask=mask, max_new_tokens=30, return_dict_in_generate=True, output_logits=True, **GREEDY)
    ref = model.generate(ids, **kw)
    assert len(calls) == 30
    calls.clear()
    out = model.generate(ids, **kw, cache_implementation="zipage")
    assert len(calls) == 30
    assert torch.equal(torch.stack(out.logits), torch.stack(ref.logits))
    assert torch.equal(out.sequences, ref.sequences)
    calls.clear()  # compressed: still the model's own path
    model.generate(ids, attention_mask=mask, max_new_tokens=30, cache_implementation="zipage",
                   cache_config={"budget": 16, "page_size": 4, "buffer": 4, "window": 4}, **GREEDY)
    assert len(calls) == 30


def test_an_attention_function_registered_again_is_the_one_called():
    """A custom attention function registered again under its name after a zipage call: the next zipage call
    runs the new one, as a plain call does (the old one was kept, cached by name)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    calls = []

    def named(tag):
        return lambda *a, **kw: (calls.append(tag), sdpa_attention_forward(*a, **kw))[1]

    AttentionInterface.register("zipage_test_custom", named("A"))
    AttentionMaskInterface.register("zipage_test_custom", sdpa_mask)
    model = tiny_model("llama")
    model.set_attn_implementation("zipage_test_custom")
    ids, mask = left_padded_batch()
    base = model.generate(ids, attention_mask=mask, max_new_tokens=3, **GREEDY)
    model.generate(ids, attention_mask=mask, max_new_tokens=3, cache_implementation="zipage", **GREEDY)
    assert set(calls) == {"A"}
    AttentionInterface.register("zipage_test_custom", named("B"))
    calls.clear()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, cache_implementation="zipage", **GREEDY)
    assert set(calls) == {"B"} and torch.equal(out, base)


def test_a_generation_config_with_a_zipage_config_saves_and_reloads(tmp_path):
    """A ``GenerationConfig`` whose ``cache_config`` is a ``ZipageConfig`` is saved with its fields (transformers
    wrote null for it: a reloaded generate() quietly ran budget 2048) and generates as before once reloaded."""
    from transformers import GenerationConfig

    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    cfg = GenerationConfig(cache_implementation="zipage", max_new_tokens=40, do_sample=False, pad_token_id=0,
                           cache_config=zipage.ZipageConfig(budget=16, page_size=8, window=4))
    cfg.save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert zipage.ZipageConfig.from_dict(loaded.cache_config) == cfg.cache_config
    kwargs = dict(attention_mask=mask, return_dict_in_generate=True)
    a = model.generate(ids, generation_config=cfg, **kwargs)
    b = model.generate(ids, generation_config=loaded, **kwargs)
    assert torch.equal(a.sequences, b.sequences) and a.past_key_values.stats()["compressions"] > 0
    assert b.past_key_values.zipage_config.budget == 16


def test_use_cache_false_runs_without_a_cache_as_transformers_does():
    """A model whose generation_config selects zipage, called with use_cache=False: no cache, as transformers does
    for any cache_implementation (it raised)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=4, use_cache=False, **GREEDY)
    model.generation_config.cache_implementation = "zipage"
    with pytest.warns(UserWarning, match="'zipage' has no effect with use_cache=False") as caught:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, use_cache=False, **GREEDY)
    assert caught[0].filename == __file__  # (the caller's line, through whatever wraps generate())
    assert torch.equal(plain, out)
    # a cache given with use_cache=False would be fed the whole sequence at every step: refused by name
    model.generation_config.cache_implementation = None
    cache = zipage.ZipageCache(config=model.config, zipage_config=zipage.ZipageConfig(budget=16, page_size=4))
    with pytest.raises(ValueError, match="ZipageCache with use_cache=False"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, use_cache=False, past_key_values=cache, **GREEDY)


def test_a_deep_copy_of_the_cache_goes_on_as_the_original_outside_generate():
    """A copy reads the model config object the original reads (the queries are captured through it): a forward
    loop of its own gives the original's tokens, compressions included (a copied config lost the queries)."""
    import copy

    model = tiny_model("llama")
    cache = zipage.ZipageCache(config=model.config, budget=16, page_size=8, window=4)
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(5))
    model.generate(ids, past_key_values=cache, max_new_tokens=8, eos_token_id=None, **GREEDY)
    twin = copy.deepcopy(cache)
    assert twin.model_config is cache.model_config and twin.full[0].keys is not cache.full[0].keys
    model_copy, cache_copy = copy.deepcopy((model, cache))  # copied together: the copy reads the copy's config
    assert cache_copy.model_config is model_copy.config and model_copy.config is not model.config
    runs = []
    for c in (cache, twin):
        seen, x, tokens = c.get_seq_length(), torch.tensor([[7]]), []
        with torch.no_grad():
            for _ in range(12):
                logits = model(input_ids=x, past_key_values=c, position_ids=torch.tensor([[seen]])).logits
                seen += 1
                x = logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(x))
        runs.append((tokens, c.num_compressions))
    assert runs[0] == runs[1] and runs[0][1] > 1


def test_early_initialization_gives_the_same_tokens_and_a_mismatch_is_named():
    """``Cache.early_initialization`` (transformers' export recipes): layers made for the model's batch size and
    dtype give the tokens the cache gives when it makes them itself; made for another batch size or dtype, the
    first step says which (index_copy_ and SDPA failed with messages naming neither)."""
    if not hasattr(zipage.ZipageCache, "early_initialization"):
        pytest.skip("this transformers has no Cache.early_initialization")
    model = tiny_model("llama")
    ids = torch.tensor([[5, 9, 14, 3, 7, 11, 2, 8, 6, 4]])
    kv = model.config.num_key_value_heads
    dim = model.config.hidden_size // model.config.num_attention_heads
    fields = dict(budget=16, page_size=4, buffer=4, window=2)

    def run(cache):
        return model.generate(ids, past_key_values=cache, max_new_tokens=30, min_new_tokens=30, **GREEDY)

    want = run(zipage.ZipageCache(config=model.config, **fields))
    cache = zipage.ZipageCache(config=model.config, **fields)
    cache.early_initialization(1, kv, dim, torch.float32, torch.device("cpu"))
    assert torch.equal(run(cache), want)
    step = f"but the model's first step gives batch size 1, {kv} KV heads of dim {dim}, torch.float32 on cpu"
    for batch, heads, size, dtype, words in (
            (3, kv, dim, torch.float32, f"batch size 3, {kv} KV heads of dim {dim}, torch.float32 on cpu, {step}"),
            (1, kv, dim, torch.float16, f"batch size 1, {kv} KV heads of dim {dim}, torch.float16 on cpu, {step}"),
            (1, kv * 2, dim, torch.float32, f"batch size 1, {kv * 2} KV heads of dim {dim}, torch.float32 on cpu"),
            (1, kv, dim * 2, torch.float32, f"batch size 1, {kv} KV heads of dim {dim * 2}, torch.float32 on cpu")):
        cache = zipage.ZipageCache(config=model.config, **fields)
        cache.early_initialization(batch, heads, size, dtype, torch.device("cpu"))
        with pytest.raises(ValueError, match=words):
            run(cache)


def test_forwards_with_autograd_on_continue_a_cache_generate_filled():
    """After generate() (no_grad), the model called with autograd on over the same ZipageCache: it raised (an
    in-place store into rows whose views were made under no_grad); now the cache stores outside the graph and
    attention reads detached copies: the tokens are those of the same steps under no_grad, and the logits
    backpropagate to the weights (but through the cached keys and values)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    caches = [zipage.ZipageCache(config=model.config, budget=16, page_size=4) for _ in range(2)]
    outs = [model.generate(ids, past_key_values=c, max_new_tokens=30, **GREEDY) for c in caches]
    tokens = []
    for cache, out, grad in zip(caches, outs, (True, False)):
        tok, seen = out[:, -1:], []
        with torch.set_grad_enabled(grad):
            for _ in range(20):
                logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits
                assert logits.requires_grad == grad
                tok = logits[:, -1].argmax(-1, keepdim=True)
                seen.append(tok)
        tokens.append(torch.cat(seen, 1))
        if grad:
            logits.sum().backward()
            assert model.lm_head.weight.grad is not None
    assert torch.equal(tokens[0], tokens[1])
    assert caches[0].stats()["compressions"] == caches[1].stats()["compressions"] > 2
    # a fresh cache over 30 steps with autograd on, compressing: one backward over all of them (the rows the
    # attention of a step read are not changed under it by the next step's store)
    model.zero_grad(set_to_none=True)
    cache, x, total = zipage.ZipageCache(config=model.config, budget=16, page_size=4), ids, 0
    for _ in range(30):
        logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits
        total, x = total + logits.sum(), logits[:, -1].argmax(-1, keepdim=True)
    total.backward()
    assert cache.stats()["compressions"] > 2
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.k_proj.weight.grad is None  # (documented: not through the cache)


@pytest.mark.parametrize("version,names,name", [
    ("5.17.0", None, "past_key_values"), ("5.23.0", None, "past_key_values"), ("5.24.0", None, "cache"),
    ("5.25.0", None, "cache"), ("5.23.0", ["past_key_values", "cache_params", "state"], "past_key_values"),
    ("5.25.0", ["cache", "state", "mems"], "cache"),
    # a development build of 5.24 from before the rename: its list, not its version, decides
    ("5.24.0.dev0", ["past_key_values", "cache_params"], "past_key_values"),
    ("5.24.0", ["something_else"], "cache")])
def test_the_cache_goes_under_the_name_the_installed_transformers_gives_it(version, names, name):
    """transformers 5.24 renamed generate()'s model kwarg past_key_values to cache: the hook reads the user's
    cache and writes its own under that name (on the installed version, the returned output carries it)."""
    from packaging.version import Version
    from transformers.generation import utils as generation_utils

    from zipage import hf

    assert hf.cache_kwarg_for(Version(version), names) == name
    installed = getattr(generation_utils, "ALL_CACHE_NAMES", None)
    if installed:
        assert hf.cache_kwarg() == installed[0]


def test_generate_returns_the_cache_under_the_installed_name():
    from zipage import hf

    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(3))
    out = model.generate(ids, max_new_tokens=4, cache_implementation="zipage", cache_config={"budget": 64},
                         return_dict_in_generate=True, **GREEDY)
    assert isinstance(getattr(out, hf.cache_kwarg()), zipage.ZipageCache)


def _phi3_longrope(switch: int = 32):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     original_max_position_embeddings=switch, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
                                   "long_factor": [1.0, 3, 9, 27, 81, 243, 729, 2187]})
    return Phi3ForCausalLM(cfg).eval()


def test_phi3_longrope_switch_restarts_the_zipage_cache_instead_of_replacing_it():
    """Phi-3 (and PhiMoE, Phi-4-multimodal) drop the cache when the sequence passes
    original_max_position_embeddings, to recompute it with LongRoPE's long factors; generate() then went on
    with a DynamicCache it made, uncompressed. The ZipageCache restarts from the whole sequence instead: with
    nothing evicted the tokens are DynamicCache's; evicting, it stays within its budget to the end (and a
    cache the caller passed is the one that goes on)."""
    from zipage import hf

    model = _phi3_longrope()
    prompt = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=60, min_new_tokens=60, return_dict_in_generate=True, **GREEDY)
    full = model.generate(prompt, **kw)
    big = model.generate(prompt, cache_implementation="zipage", cache_config={"budget": 512}, **kw)
    assert torch.equal(big.sequences, full.sequences)
    # what transformers itself keeps after the switch: the whole sequence recomputed (79 tokens); transformers
    # 5.17's Phi-3 feeds only the last token to the new cache at each step after it, and zipage follows it there
    seen = getattr(full, hf.cache_kwarg()).get_seq_length()
    cache = getattr(big, hf.cache_kwarg())
    assert isinstance(cache, zipage.ZipageCache) and cache.get_seq_length() == seen
    small = dict(budget=16, page_size=4, buffer=4, window=4)
    out = model.generate(prompt, cache_implementation="zipage", cache_config=small, **kw)
    cache = getattr(out, hf.cache_kwarg())
    assert isinstance(cache, zipage.ZipageCache) and cache.get_seq_length() == seen
    mine = zipage.ZipageCache(model.config, zipage.ZipageConfig(**small))
    out2 = model.generate(prompt, **{hf.cache_kwarg(): mine}, **kw)
    assert getattr(out2, hf.cache_kwarg()) is mine and mine.get_seq_length() == seen
    assert torch.equal(out2.sequences, out.sequences)
    if seen == 79:  # (a whole recompute: compressed to the budget again)
        assert cache.stored_length() <= 16 + 4 and cache.stats()["compressions"] > 0 and mine.stored_length() <= 20
