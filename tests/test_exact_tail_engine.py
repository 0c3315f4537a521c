"""Exact tails in the engine (``LLM(exact_tail=...)``): each query reads its last ``exact_tail`` tokens as the
model computed them, every older one through the 8-bit page codes.

Two independent references: ``generate(cache_implementation="zipage")`` with the same exact tails (tested
against a band-masked forward in ``test_exact_tail.py``), compressions included, and here the model's own
forward with an attention that rounds every key and value but, for query ``i``, those at positions
``>= exact_from[i]``: a prefill chunk starting at ``c`` reads its own tokens and the ``exact_tail - 1``
before it exactly, back to where its query slot began (after a prefix-cache hit, the first recomputed
token), and a decoding token its last ``exact_tail``."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_sliding_model
from test_engine import assert_pool_clean, prompts_of, reference
from test_exact_tail import exact_forward
from transformers import AttentionInterface

from zipage import LLM, SamplingParams
from zipage.engine.runner import ModelRunner

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def reference_logprobs(model, ids: list[int], exact_from: list[int], kv: str) -> torch.Tensor:
    """Log-softmax ``[T, V]`` of one forward of ``ids`` in which query ``i`` reads keys and values at positions
    ``j >= exact_from[i]`` exactly and older ones rounded through ``kv``'s page codes."""
    device = next(model.parameters()).device
    start = torch.tensor(exact_from, device=device).view(-1, 1)
    logits = exact_forward(model, torch.tensor([ids], device=device), kv, lambda i, j: j >= start)
    return torch.log_softmax(logits[0].float(), dim=-1)


def exact_from(prompt_len: int, total: int, tail: int, chunk: int, ring_from: int = 0) -> list[int]:
    """Where each position's exact keys start: prompt chunks of ``chunk`` tokens from ``ring_from``, then one
    token a step; the ``ring_from`` tokens before come from the prefix cache, where a prompt prefilled in one
    chunk left them (reading one another exactly)."""
    starts = [ring_from + (i - ring_from) // chunk * chunk for i in range(ring_from, prompt_len)]
    return [0] * ring_from + [max(ring_from, s - tail + 1) for s in starts] + [
        max(ring_from, i - tail + 1) for i in range(prompt_len, total)]


def engine_logprobs(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
    return [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in outs]


def assert_logprobs_match(model, prompt, got, kv, rule):
    tokens, logprobs = got
    ids = prompt + tokens
    want = reference_logprobs(model, ids, rule, kv)[len(prompt) - 1:-1]
    assert tokens == want.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(logprobs), want.gather(1, torch.tensor(tokens)[:, None])[:, 0],
                               atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kv, tail, chunk", [("fp8", 5, 64), ("fp8", 3, 4), ("int8", 4, 6), ("fp8", 1, 64)])
def test_engine_logprobs_follow_the_exact_tail_rule(kv, tail, chunk):
    """No eviction: every sampled token's log-probability is the band reference's, whole prompts in one
    chunk and prompts in chunks (each reading the ``tail - 1`` tokens before it exactly)."""
    model = tiny_model("qwen3")
    prompts = prompts_of((13, 9), seed=3)
    llm = LLM(model, budget=64, page_size=4, window=8, num_pages=128, kv_cache_dtype=kv, exact_tail=tail,
              max_num_seqs=1, max_num_batched_tokens=chunk)
    plain = LLM(model, budget=64, page_size=4, window=8, num_pages=128, kv_cache_dtype=kv, max_num_seqs=1,
                max_num_batched_tokens=chunk)
    for prompt, got, without in zip(prompts, engine_logprobs(llm, prompts), engine_logprobs(plain, prompts)):
        rule = exact_from(len(prompt), len(prompt) + 20, tail, chunk)
        assert_logprobs_match(model, prompt, got, kv, rule)
        # (the test can tell: pages read whole give other log-probabilities)
        if tail > 1:
            assert max(abs(a - b) for a, b in zip(got[1], without[1])) > 1e-3
    assert_pool_clean(llm)


def test_a_prefix_cache_hit_reads_exactly_from_its_first_recomputed_token():
    """A prompt whose first pages come from the prefix cache: its slot's ring holds nothing before the first
    recomputed token (the last ``max(window, exact_tail)`` prompt tokens, whole pages), so reads from there."""
    kv, tail = "fp8", 5
    model = tiny_model("qwen3")
    shared = prompts_of((13,), seed=7)[0]
    a, b = prompts_of((5, 6), seed=2, prefix=shared)
    llm = LLM(model, budget=64, page_size=4, window=4, num_pages=128, kv_cache_dtype=kv, exact_tail=tail,
              max_num_seqs=1)
    engine_logprobs(llm, [a])
    got = engine_logprobs(llm, [b])[0]
    assert llm.stats()["prefix_cache_hits"] > 0
    ring_from = (len(b) - tail) // 4 * 4  # the pages before the last `tail` tokens (window 4 < tail)
    assert ring_from == 12
    assert_logprobs_match(model, b, got, kv, exact_from(len(b), len(b) + 20, tail, 64, ring_from))
    with pytest.raises(AssertionError):  # (the test can tell where the ring begins)
        assert_logprobs_match(model, b, got, kv, exact_from(len(b), len(b) + 20, tail, 64))


@pytest.mark.parametrize("scorer, kv, window, tail", [("zipage", "fp8", 6, 5), ("snapkv", "fp8", 6, 5),
                                                      ("zipage", "int8", 6, 5), ("zipage", "fp8-rotated", 6, 5),
                                                      ("knorm", "fp8", 2, 9), ("snapkv", "int8", 2, 9), ("keydiff", "fp8", 2, 9)])
def test_compressing_engine_with_exact_tails_matches_generate(scorer, kv, window, tail, monkeypatch):
    """Compressions included: the engine's tokens are generate()'s with the same exact tails (whole prompts
    in one chunk, no prefix cache: where both read the same tokens exactly), and differ from pages read whole."""
    if kv == "fp8-rotated":
        monkeypatch.setenv("ZIPAGE_FP8_ROTATION", "1")
        kv = "fp8"
    model = tiny_model("qwen3")
    prompts = prompts_of((12, 30, 7, 21), seed=1)
    fields = dict(budget=16, page_size=4, buffer=4, window=window, scorer=scorer, kv_cache_dtype=kv,
                  exact_tail=tail)  # (a tail longer than the window + 1: compressions keep it, kept_last)
    llm = LLM(model, num_pages=128, max_num_seqs=3, enable_prefix_caching=False, **fields)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.stats()["compressions"] > 0
    plain = {**fields, "exact_tail": 0}
    differs = 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference(model, prompt, 24, cache_implementation="zipage", cache_config=fields)
        differs += _logits(model, prompt, out.token_ids, fields) != _logits(model, prompt, out.token_ids, plain)
    assert differs  # (the tails change what the model predicts: read whole from the pages, it would differ)
    assert_pool_clean(llm)


def _logits(model, prompt: list[int], tokens: list[int], cache_config: dict) -> list[float]:
    """generate()'s greedy logits for ``prompt`` (its first ``len(tokens)`` steps) with ``cache_config``: where
    the tokens of two caches agree, their logits still tell them apart."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=len(tokens), do_sample=False, pad_token_id=0,
                         eos_token_id=None, cache_implementation="zipage", cache_config=cache_config,
                         output_scores=True, return_dict_in_generate=True)
    return torch.stack(out.scores).flatten().tolist()


@pytest.mark.parametrize("family", ["gpt_oss", "gemma3"])
def test_exact_tails_with_sinks_and_sliding_layers_match_generate(family):
    """Learned sinks join the merged softmax once; sliding-window layers (16-bit pools) read every token as it
    is already."""
    model = tiny_sliding_model(family)
    prompts = prompts_of((12, 25), seed=5)
    fields = dict(budget=12, page_size=4, buffer=4, window=4, kv_cache_dtype="fp8", exact_tail=4)
    llm = LLM(model, num_pages=64, max_num_seqs=2, enable_prefix_caching=False, **fields)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.stats()["compressions"] > 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference(model, prompt, 24, cache_implementation="zipage", cache_config=fields)
    assert_pool_clean(llm)


@pytest.mark.parametrize("caching", [True, False])
def test_exact_tails_survive_preemption_and_samples_of_one_prompt(caching):
    """Short of pages (with the prefix cache: preemptions for the fresh pages of shared prompts' first
    compressions, recomputed prompts) and ``n`` samples of one prompt: nothing lost, every sample gets its
    tokens. Without the prefix cache greedy samples are equal; with it a later sample reads its prompt's cached
    pages through their codes (the exact values are gone), so it may differ slightly."""
    model = tiny_model("qwen3")
    prompts = prompts_of((2, 3, 3, 12, 6), seed=2, prefix=prompts_of((8,), seed=10)[0])
    for async_compression in (True, False):
        llm = LLM(model, budget=16, page_size=4, buffer=4, window=4, num_pages=12, max_num_seqs=4,
                  max_num_batched_tokens=4, kv_cache_dtype="fp8", exact_tail=5, enable_prefix_caching=caching,
                  async_compression=async_compression)
        outs = llm.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, n=2), use_tqdm=False)
        assert llm.stats()["compressions"] > 0 and (llm.stats()["preemptions"] > 0) == caching
        assert all(len(c.token_ids) == 30 for o in outs for c in o.outputs)
        if not caching:
            assert all(c.token_ids == o.outputs[0].token_ids for o in outs for c in o.outputs)
        assert_pool_clean(llm)


def test_the_exact_tails_ring_is_counted_in_the_slot_bytes():
    model = tiny_model("qwen3")
    cfg = model.config
    plain = ModelRunner.bytes_per_slot(cfg, 8, torch.float32, 16)
    with_tail = ModelRunner.bytes_per_slot(cfg, 8, torch.float32, 16, exact_tail=5)
    heads, dim = cfg.num_key_value_heads, cfg.head_dim
    assert with_tail - plain == cfg.num_hidden_layers * 5 * heads * dim * 2 * 4
    llm = LLM(model, budget=16, page_size=4, window=8, num_pages=16, kv_cache_dtype="fp8", exact_tail=5)
    r = llm.runner
    assert r.exact_k.shape == (cfg.num_hidden_layers, (r.num_slots + 1) * 5, 1, heads, dim)
    assert llm.stats()["exact_tail_bytes"] == 2 * r.exact_k.numel() * 4


def test_the_engine_refuses_an_exact_tail_it_cannot_keep():
    with pytest.raises(ValueError, match="budget=16"):
        LLM(tiny_model("qwen3"), budget=16, page_size=4, window=4, num_pages=16, kv_cache_dtype="fp8", exact_tail=18)
    llm = LLM(tiny_model("qwen3"), budget=16, page_size=4, window=4, num_pages=16, kv_cache_dtype="fp8",
              exact_tail=9)
    with pytest.raises(ValueError, match="exact_tail - 1 \\+ sinks = 8"):  # a request's own budget below the tail
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, budget=7), use_tqdm=False)
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, budget=8), use_tqdm=False)[0].token_ids
    with pytest.raises(ValueError, match="8-bit pages"):
        LLM(tiny_model("qwen3"), budget=16, page_size=4, window=4, num_pages=16, exact_tail=4)
    with pytest.raises(ValueError, match="exact_tail=65\\) is longer than max_model_len=64"):  # full KV: any length
        LLM(tiny_model("qwen3"), budget=None, page_size=4, num_pages=16, kv_cache_dtype="int8", exact_tail=65,
            max_model_len=64)
    r = LLM(tiny_model("qwen3"), budget=None, page_size=4, num_pages=16, kv_cache_dtype="int8", exact_tail=64,
            max_model_len=64).runner
    assert r.exact_k.shape[1] == 64 * (r.num_slots + 1)  # (a ring per query slot, and the scratch ring)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_exact_tails_on_cuda_with_graphs_match_eager_and_generate(kv):
    """The CUDA-graph decode (ring rows and counts in static buffers, padding rows in the scratch ring) gives
    the eager forward's tokens, and both generate()'s, in float32 (bf16 is checked by the quality benchmark)."""
    model = tiny_model("qwen3").cuda()
    prompts = prompts_of((12, 30, 7, 21, 40), seed=1)
    fields = dict(budget=16, page_size=4, buffer=4, window=6, kv_cache_dtype=kv, exact_tail=5)
    outs = {}
    for eager in (False, True):
        llm = LLM(model, num_pages=256, max_num_seqs=3, enable_prefix_caching=False, enforce_eager=eager, **fields)
        outs[eager] = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        assert llm.use_graphs != eager
        assert_pool_clean(llm)
    assert outs[False] == outs[True]
    for prompt, tokens in zip(prompts, outs[False]):
        assert tokens == reference(model, prompt, 24, cache_implementation="zipage", cache_config=fields)


def test_zipage_serve_builds_its_engine_with_exact_tails():
    pytest.importorskip("fastapi")
    from zipage.serve.server import engine_from_args
    from zipage_cli import serve_parser

    args = serve_parser().parse_args(["--kv-cache-dtype", "fp8", "--exact-tail", "4", "--budget", "32", "--page-size",
                                      "4", "--num-pages", "64", "--max-num-seqs", "2"])
    llm = engine_from_args(tiny_model("qwen3"), None, args)
    assert llm.zipage_config.exact_tail == 4 and llm.stats()["exact_tail_bytes"] > 0


def test_prefill_chunks_one_at_a_time_past_the_scratch_limit(monkeypatch):
    """Where the dequantized pages of a step's chunks together would pass the scratch limit, each chunk is
    prefilled alone: the same log-probabilities (chunks with tokens before them included)."""
    import zipage.engine.runner as runner

    model = tiny_model("qwen3")
    prompts = prompts_of((13, 9, 17), seed=3)
    kw = dict(budget=64, page_size=4, window=8, num_pages=128, kv_cache_dtype="fp8", exact_tail=5, max_num_seqs=3,
              max_num_batched_tokens=12)
    want = engine_logprobs(LLM(model, **kw), prompts)
    calls = []
    dequantize = runner.dequantize_pages
    monkeypatch.setattr(runner, "dequantize_pages", lambda *a: calls.append(a[4].shape) or dequantize(*a))
    monkeypatch.setattr(runner, "DEQUANTIZE_LIMIT_BYTES", 0)
    got = engine_logprobs(LLM(model, **kw), prompts)
    assert {rows for rows, _ in calls} == {1} and len(calls) > len(model.model.layers) * 3
    assert len({width for _, width in calls}) > 1  # (each chunk's own pages, not the widest chunk's)
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-5)


@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("sinks, softcap, tail", [(False, None, 5), (True, None, 5), (False, 3.0, 5), (True, 2.0, 5),
                                                  (True, None, 70)])
def test_exact_tail_merge_is_one_softmax_over_the_pages_and_the_ring(triton, sinks, softcap, tail):
    """The merge of a paged part (output and log-sum-exp) with a ring's valid rows, against one softmax over
    both key sets (sink logits in the denominator, every logit capped): the reference and the Triton kernel
    (its interpreter on a CPU); 3 query heads per KV head and a 24-wide head (neither a power of two), rows
    with an empty paged part, counts 1..tail, positions before the ring wrapped; a tail of 70 rows takes the
    kernel two tiles. The kernel never reads a ring row it does not attend to (here NaN)."""
    from zipage.kernels.exact_tail import exact_tail_merge_reference, exact_tail_merge_triton, exact_tail_rows

    if triton and torch.cuda.is_available():
        pytest.skip("interpreter case")
    g = torch.Generator().manual_seed(2)
    B, H, G, D, slots = 5, 2, 3, 24, 4
    q = torch.randn(B, H * G, D, generator=g)
    ring_k, ring_v = (torch.randn((slots + 1) * tail, H, D, generator=g) for _ in range(2))
    first = torch.tensor([0, 1, 2, 3, 4]) * tail
    pos = torch.tensor([2, 9, 0, 13, 4]) * (tail // 5)
    count = torch.tensor([3, 5, 1, 2, 5]) * (tail // 5)
    paged = [torch.randn(n, H, D, generator=g) for n in (4, 7, 0, 3, 0)]
    paged_v = [torch.randn(n, H, D, generator=g) for n in (4, 7, 0, 3, 0)]
    sink = torch.randn(H * G, generator=g) if sinks else None
    cap = (lambda x: softcap * torch.tanh(x / softcap)) if softcap else (lambda x: x)
    rows, valid = exact_tail_rows(first, pos, count, tail)
    assert valid.sum(1).tolist() == count.tolist()
    out, lse, want = torch.zeros_like(q), torch.full((B, H * G), float("-inf")), torch.zeros_like(q)
    for b in range(B):
        keys = torch.cat([paged[b], ring_k[rows[b][valid[b]]]]).repeat_interleave(G, dim=1)  # [n, Hq, D]
        values = torch.cat([paged_v[b], ring_v[rows[b][valid[b]]]]).repeat_interleave(G, dim=1)
        logits = cap(torch.einsum("hd,nhd->hn", q[b], keys) * 0.3)
        if sinks:
            logits = torch.cat([logits, sink[:, None]], dim=1)
        p = torch.softmax(logits, dim=1)[:, :len(keys)]
        want[b] = torch.einsum("hn,nhd->hd", p, values)
        n = len(paged[b])
        if n:  # the paged part alone, as the paged kernel returns it (no sinks)
            part = cap(torch.einsum("hd,nhd->hn", q[b], keys[:n]) * 0.3)
            lse[b] = torch.logsumexp(part, dim=1)
            out[b] = torch.einsum("hn,nhd->hd", torch.softmax(part, dim=1), values[:n])
    if triton:
        for b in range(B):
            ring_k[rows[b][~valid[b]]] = ring_v[rows[b][~valid[b]]] = float("nan")
    merge = exact_tail_merge_triton if triton else exact_tail_merge_reference
    got = merge(q, out, lse, ring_k, ring_v, first, pos, count, tail, 0.3, softcap, sink)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_full_kv_engine_with_exact_tails_follows_the_rule(kv):
    """``budget=None`` with exact tails (any length: nothing is evicted): the band reference's log-probabilities,
    prompts in chunks included."""
    model = tiny_model("llama")
    prompts = prompts_of((13, 9), seed=3)
    tail, chunk = 20, 6
    llm = LLM(model, budget=None, page_size=4, num_pages=64, kv_cache_dtype=kv, exact_tail=tail, max_num_seqs=1,
              max_num_batched_tokens=chunk)
    assert llm.stats()["exact_tail_bytes"] > 0
    for prompt, got in zip(prompts, engine_logprobs(llm, prompts)):
        assert_logprobs_match(model, prompt, got, kv, exact_from(len(prompt), len(prompt) + 20, tail, chunk))
    assert_pool_clean(llm)


@pytest.mark.parametrize("kw, words", [(dict(exact_tail=4), "8-bit pages"), (dict(exact_tail=-1, kv_cache_dtype="fp8"),
                                                                            "exact_tail=-1"),
                                       (dict(exact_tail=4, window=4, kv_cache_dtype="fp8"), "compression settings")])
def test_a_full_kv_engine_checks_its_exact_tail(kw, words):
    with pytest.raises(ValueError, match=words):
        LLM(tiny_model("llama"), budget=None, page_size=4, num_pages=16, **kw)


class _EagerGraph:
    """A stand-in for a captured CUDA graph on a CPU: ``replay`` runs the same forward over the same static
    buffers and writes the same output tensor."""

    def __init__(self, run):
        self.run = run
        self.logits = run().clone()

    def replay(self):
        self.logits.copy_(self.run())


def eager_graphs(llm: LLM) -> None:
    """Make ``llm`` take its CUDA-graph decode path on a CPU: static buffers, padded batches, graphs replayed
    eagerly (``_EagerGraph``)."""
    r = llm.runner

    def capture(max_batch, table_width):
        r.graphs = {}
        for b in r._graph_buffers(max_batch, table_width):
            graph = _EagerGraph(r._graph_call(b, table_width))
            r.graphs[b] = (graph, graph.logits)

    r.capture_graphs = capture
    llm.core.use_graphs = True


@pytest.mark.parametrize("kw", [dict(budget=16, buffer=4, window=6, exact_tail=5),
                                dict(budget=None, exact_tail=9),
                                dict(budget=16, buffer=4, window=6)])
def test_the_graph_decode_path_gives_the_eager_tokens(kw):
    """The decode path the CUDA graphs capture (static buffers: ids, positions, slots, rings, lengths, tables,
    exact-tail rows and counts; batches padded with scratch rows), replayed eagerly on a CPU: the eager
    forward's tokens and log-probabilities, compressions and exact tails included."""
    model = tiny_model("qwen3")
    prompts = prompts_of((12, 30, 7, 21, 3), seed=1)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    runs = []
    for graphs in (False, True):
        llm = LLM(model, page_size=4, num_pages=128, max_num_seqs=5, kv_cache_dtype="fp8", **kw)
        if graphs:
            eager_graphs(llm)
        runs.append(llm.generate(prompts, params, use_tqdm=False))
        assert bool(llm.runner.graphs) == graphs and (kw["budget"] is None or llm.stats()["compressions"] > 0)
        assert_pool_clean(llm)
    assert set(llm.runner.graphs) == {1, 2, 4, 5}  # (batches of 3: one padding row)
    for a, b in zip(*runs):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == pytest.approx([y.logprob for y in b.logprobs], abs=1e-5)


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_the_ring_holds_the_keys_and_values_as_the_model_computed_them(kv, monkeypatch):
    """bf16, rotated pages (INT8; FP8 with ZIPAGE_FP8_ROTATION=1): the ring keeps each token's key and value
    bit for bit as the model's attention received them, not a rounding of their rotation."""
    from zipage.engine import runner

    monkeypatch.setenv("ZIPAGE_FP8_ROTATION", "1")
    model = tiny_model("qwen3").to(torch.bfloat16)
    seen = {}

    def recording(module, query, key, value, *args, **kwargs):
        if module.layer_idx == 0 and runner._context.meta.num_prefill_tokens == 0:
            pos = int(runner._context.meta.decode_pos[0])
            seen[pos] = (key[0, :, 0].clone(), value[0, :, 0].clone())
        return runner.engine_attention(module, query, key, value, *args, **kwargs)

    llm = LLM(model, budget=32, page_size=4, window=4, num_pages=64, kv_cache_dtype=kv, exact_tail=4, max_num_seqs=1)
    assert llm.runner.rotation is not None
    AttentionInterface.register(runner.ATTENTION_NAME, recording)  # (after the engine registered its own)
    try:
        llm.generate([prompts_of((9,), seed=1)[0]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                     use_tqdm=False)
    finally:
        AttentionInterface.register(runner.ATTENTION_NAME, runner.engine_attention)
    r, slot = llm.runner, 0
    assert len(seen) == 5
    for pos in list(seen)[-4:]:  # (the ring's rows still hold the last 4)
        row = slot * 4 + pos % 4
        assert torch.equal(r.exact_k[0, row, 0], seen[pos][0]) and torch.equal(r.exact_v[0, row, 0], seen[pos][1])


@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("sinks, softcap", [(False, None), (True, 2.5)])
def test_exact_merge_over_masked_tails_is_one_softmax(triton, sinks, softcap):
    """generate()'s layout: keys and values ``[B, H_kv, n, D]`` with a validity mask (padding), merged with a
    paged part: one softmax over both sets, against dense math; a row with nothing valid anywhere gives zeros."""
    from zipage.kernels.exact_tail import exact_merge_reference, exact_merge_triton

    if triton and torch.cuda.is_available():
        pytest.skip("interpreter case")
    g = torch.Generator().manual_seed(5)
    B, H, G, D, n = 4, 2, 3, 24, 6
    q = torch.randn(B, H * G, D, generator=g)
    keys, values = (torch.randn(B, H, n, D, generator=g) for _ in range(2))
    valid = torch.rand(B, n, generator=g) > 0.4
    valid[0] = True
    valid[3] = False  # (row 3: nothing in its tail, nor in its pages)
    paged = [torch.randn(m, H, D, generator=g) for m in (5, 0, 3, 0)]
    paged_v = [torch.randn(m, H, D, generator=g) for m in (5, 0, 3, 0)]
    sink = torch.randn(H * G, generator=g) if sinks else None
    cap = (lambda x: softcap * torch.tanh(x / softcap)) if softcap else (lambda x: x)
    out, lse, want = torch.zeros_like(q), torch.full((B, H * G), float("-inf")), torch.zeros_like(q)
    for b in range(B):
        ks = torch.cat([paged[b], keys[b].transpose(0, 1)[valid[b]]]).repeat_interleave(G, dim=1)
        vs = torch.cat([paged_v[b], values[b].transpose(0, 1)[valid[b]]]).repeat_interleave(G, dim=1)
        logits = cap(torch.einsum("hd,nhd->hn", q[b], ks) * 0.3)
        if sinks:
            logits = torch.cat([logits, sink[:, None]], dim=1)
        if len(ks):
            want[b] = torch.einsum("hn,nhd->hd", torch.softmax(logits, dim=1)[:, :len(ks)], vs)
        m = len(paged[b])
        if m:
            part = cap(torch.einsum("hd,nhd->hn", q[b], ks[:m]) * 0.3)
            lse[b] = torch.logsumexp(part, dim=1)
            out[b] = torch.einsum("hn,nhd->hd", torch.softmax(part, dim=1), vs[:m])
    merge = exact_merge_triton if triton else exact_merge_reference
    got = merge(q, out, lse, keys, values, valid, 0.3, softcap, sink)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_merge_kernels_match_their_references(dtype):
    """The compiled kernels (rings of 16, 32 and 100 rows (two tiles) and masked tails; sinks, softcap, 4 query
    heads per KV head, head dim 128) against the PyTorch references on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(3)
    B, H, G, D = 37, 8, 4, 128
    kw = dict(device="cuda", generator=g)
    for tail in (16, 32, 100):
        _compare_compiled_merges(B, H, G, D, tail, dtype, g, kw)


def _compare_compiled_merges(B, H, G, D, tail, dtype, g, kw):
    from zipage.kernels.exact_tail import (exact_merge_reference, exact_merge_triton, exact_tail_merge_reference,
                                           exact_tail_merge_triton)

    q = torch.randn(B, H * G, D, **kw).to(dtype)
    out = torch.randn(B, H * G, D, **kw).to(dtype)
    lse = torch.randn(B, H * G, **kw) * 3
    lse[::5] = float("-inf")  # (rows whose paged part is empty)
    ring_k, ring_v = (torch.randn((B + 1) * tail, H, D, **kw).to(dtype) for _ in range(2))
    first = torch.arange(B, device="cuda") * tail
    pos = torch.randint(0, 3000, (B,), device="cuda", generator=g)
    count = torch.randint(1, tail + 1, (B,), device="cuda", generator=g).minimum(pos + 1)
    sinks = torch.randn(H * G, **kw)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for softcap, s in ((None, None), (20.0, sinks)):
        args = (q, out, lse, ring_k, ring_v, first, pos, count, tail, 0.088, softcap, s)
        torch.testing.assert_close(exact_tail_merge_triton(*args), exact_tail_merge_reference(*args), **tol)
        keys, values = (torch.randn(B, H, tail - 1, D, **kw).to(dtype) for _ in range(2))
        valid = torch.rand(B, tail - 1, device="cuda", generator=g) > 0.3
        args = (q, out, lse, keys, values, valid, 0.088, softcap, s)
        torch.testing.assert_close(exact_merge_triton(*args), exact_merge_reference(*args), **tol)
