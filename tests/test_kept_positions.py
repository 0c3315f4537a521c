"""After several compressions, ``generate()`` and the engine against a reference that shares no code
with zipage (tests/reference_attention.py): one plain forward over the whole token stream in which
each query of each layer and KV head sees exactly the positions ``kept_positions`` reported while
that token went through the compressed cache. The logits must agree at every decoding step."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, left_padded_batch, tiny_model
from reference_attention import reference_logits
from transformers import LogitsProcessor, LogitsProcessorList

import zipage
from zipage import LLM, SamplingParams

CFG = dict(budget=24, page_size=8, buffer=8, window=4)  # a compression every 8 tokens
NEW = 40
TOL = 2e-5  # float32 on a CPU: the logits agree to ~5e-7 (they are of order 1)
CASES = [("llama", "zipage"), ("qwen2", "snapkv"), ("qwen3", "h2o"), ("mistral", "zipage")]


class RecordKept(LogitsProcessor):
    """After every forward of ``generate()``: the positions each layer kept, i.e. what it attended."""

    def __init__(self, cache: zipage.ZipageCache, layers: int) -> None:
        self.cache, self.layers, self.steps = cache, layers, []

    def __call__(self, input_ids, scores):
        self.steps.append([self.cache.kept_positions(layer).cpu() for layer in range(self.layers)])
        return scores


def generate_with_kept(model, ids, mask, cfg, new):
    """Greedy ``generate()`` through a ZipageCache: (tokens, raw logits [B, new, V], kept per step, cache)."""
    dev = next(model.parameters()).device
    cache = zipage.ZipageCache(config=model.config, **cfg)
    record = RecordKept(cache, model.config.num_hidden_layers)
    out = model.generate(ids.to(dev), attention_mask=mask.to(dev), past_key_values=cache, max_new_tokens=new,
                         do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                         return_dict_in_generate=True, logits_processor=LogitsProcessorList([record]))
    return out.sequences.cpu(), torch.stack(out.logits, dim=1).float().cpu(), record.steps, cache


def check_generate(model, cfg, new, atol, rtol):
    ids, mask = left_padded_batch(lengths=(40, 16, 30))
    B, W = ids.shape
    tokens, logits, steps, cache = generate_with_kept(model, ids, mask, cfg, new)
    assert cache.num_compressions >= 4
    real = torch.cat([mask.bool(), torch.ones(B, new - 1, dtype=torch.bool)], dim=1)
    # step i's forward ran the query at position W + i - 1 (step 0: the prompt)
    kept = [{W + i - 1: [layer[b] for layer in step] for i, step in enumerate(steps)} for b in range(B)]
    ref = reference_logits(model, tokens[:, : W + new - 1], real, kept)[:, W - 1 :]
    torch.testing.assert_close(logits, ref, atol=atol, rtol=rtol)
    # the check can see eviction: without the kept positions (full KV) the logits are far off
    full = reference_logits(model, tokens[:, : W + new - 1], real, [{}] * B)[:, W - 1 :]
    assert (full - logits).abs().max() > max(0.1, 5 * (ref - logits).abs().max())
    return steps, cache, W


def assert_well_formed(kept: torch.Tensor, stored: int, position: int) -> None:
    """``[..., H, stored]``: ascending per head, ending at the token just stored."""
    assert kept.dtype == torch.long and kept.shape[-1] == stored
    assert bool((kept[..., 1:] > kept[..., :-1]).all()) and bool((kept[..., -1] == position).all())


@pytest.mark.parametrize("family, scorer", CASES)
def test_generate_with_left_padding_matches_the_reference(family, scorer):
    model = tiny_model(family)
    steps, cache, W = check_generate(model, dict(CFG, scorer=scorer), NEW, atol=TOL, rtol=TOL)
    heads_differ = padding_kept = False
    for i, step in enumerate(steps):
        for layer in step:
            assert_well_formed(layer, layer.shape[-1], W + i - 1)
            heads_differ |= not torch.equal(layer[:, 0], layer[:, 1])
        # row 1 has 24 pads (positions 0..23) and 16 real tokens: the first compressions keep some pads
        padding_kept |= i > 0 and bool((step[0][1] < 24).any())
    assert heads_differ and padding_kept
    assert steps[-1][0].shape[-1] == cache.stored_length() <= CFG["budget"] + CFG["buffer"]


def test_cache_kept_positions_follow_reordered_rows_and_reset():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(lengths=(40, 16, 30))
    _, _, _, cache = generate_with_kept(model, ids, mask, dict(CFG, scorer="snapkv"), 20)
    before = [cache.kept_positions(layer) for layer in range(2)]
    order = torch.tensor([2, 0, 1])
    cache.reorder_cache(order)
    for layer in range(2):
        assert torch.equal(cache.kept_positions(layer), before[layer][order])
    with pytest.raises(IndexError, match="layer_idx=2"):
        cache.kept_positions(2)
    import numpy as np

    assert torch.equal(cache.kept_positions(np.int64(0)), cache.kept_positions(0))  # numpy / torch integers taken
    assert cache.stored_length(torch.tensor(0)) == cache.stored_length(0)
    for bad in (-1, 2, 1.0):
        with pytest.raises(IndexError, match="out of range"):
            cache.stored_length(bad)
    cache.reset()
    assert cache.kept_positions(0).shape == (0, 2, 0)


# ------------------------------------------------------------------------------ the engine
class EngineRecorder:
    """Steps an engine and records, for every sampled row of every forward, (request id, tokens computed,
    logits, kept positions per layer). The logits come from test-only wrappers around the runner's
    forwards; the kept positions are read once ``step()`` has booked the forward (its compressions ran
    before it), or are None when the request finished within that step."""

    def __init__(self, llm: LLM) -> None:
        self.llm, self.records, self.fresh = llm, [], []
        runner = llm.runner
        forward, decode_with_graph = runner.forward, runner.decode_with_graph
        runner.forward = lambda prefill, decode, feed=None: self._stash(
            list(prefill) + [(s, 1) for s in decode], forward(prefill, decode, feed))
        runner.decode_with_graph = lambda decode, feed=None: self._stash(
            [(s, 1) for s in decode], decode_with_graph(decode, feed))

    def _stash(self, scheduled, logits):
        if logits is not None:
            for (seq, n), row in zip(scheduled, logits):
                if seq.num_computed + n == seq.num_tokens:  # a whole prompt or decode token: sampled
                    self.fresh.append((seq, seq.num_computed + n, row.float().cpu()))
        return logits

    def step(self) -> None:
        self.llm.step()
        layers = self.llm.model.config.num_hidden_layers
        for seq, n, row in self.fresh:
            kept = None
            if not seq.finished:
                assert seq.num_computed == n
                kept = [self.llm.kept_positions(seq.request_id, layer).cpu() for layer in range(layers)]
            self.records.append((seq.request_id, n, row, kept))
        self.fresh = []


def shared_prefix_prompts(page: int, seed: int = 0) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 96, (4 * page,), generator=g).tolist()  # four full pages
    return shared + torch.randint(3, 96, (9,), generator=g).tolist(), shared + torch.randint(
        3, 96, (13,), generator=g).tolist()


def check_engine(model, cfg, new, atol, rtol, **engine):
    llm = LLM(model, enable_prefix_caching=True, **cfg, **engine)
    recorder = EngineRecorder(llm)
    into_fresh, compress = [], llm.runner.compress

    def record_destination(seqs, dst, first):
        into_fresh.append(dst is not None)
        return compress(seqs, dst, first)

    llm.runner.compress = record_destination
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    a, b = shared_prefix_prompts(cfg["page_size"])
    ids = [llm.add_request(a, params)]
    recorder.step()  # a's prompt pages are registered: b finds them
    ids.append(llm.add_request(b, params))
    while llm.has_unfinished():
        recorder.step()
    assert llm.stats()["prefix_cache_hits"] >= 4 and any(into_fresh)  # shared pages compacted into fresh ones
    for rid, prompt in zip(ids, (a, b)):
        seq = llm.requests[rid]
        assert seq.compressions >= 4 and len(seq.output_ids) == new
        tokens = prompt + seq.output_ids
        mine = [r for r in recorder.records if r[0] == rid]
        assert [n for _, n, _, _ in mine] == list(range(len(prompt), len(tokens)))
        logits = torch.stack([row for _, _, row, _ in mine])
        # greedy: each sampled token is the argmax of the logits recorded for it
        assert logits.argmax(-1).tolist() == seq.output_ids
        # the kept positions of the last forward are gone when the request finished within its step
        read = [i for i, (_, _, _, k) in enumerate(mine) if k is not None]
        assert read[: len(mine) - 1] == list(range(len(mine) - 1))
        for _, n, _, kept in mine[:-1]:
            for layer in kept:
                assert_well_formed(layer, layer.shape[-1], n - 1)
        kept = [{n - 1: k for _, n, _, k in mine if k is not None}]
        real = torch.ones(1, len(tokens) - 1, dtype=torch.bool)
        ref = reference_logits(model, torch.tensor([tokens[:-1]]), real, kept)[0, len(prompt) - 1 :][read]
        logits = logits[read]
        torch.testing.assert_close(logits, ref, atol=atol, rtol=rtol)
        full = reference_logits(model, torch.tensor([tokens[:-1]]), real, [{}])[0, len(prompt) - 1 :][read]
        assert (full - logits).abs().max() > max(0.1, 5 * (ref - logits).abs().max())
    return llm, ids


@pytest.mark.parametrize("family, scorer, async_scheduling", [
    ("llama", "zipage", True), ("qwen2", "h2o", False), ("qwen3", "snapkv", True), ("mistral", "zipage", False),
])
def test_engine_with_prefix_caching_matches_the_reference(family, scorer, async_scheduling):
    model = tiny_model(family)
    cfg = dict(CFG, scorer=scorer, num_pages=64)
    check_engine(model, cfg, NEW, atol=TOL, rtol=TOL, async_scheduling=async_scheduling)


def test_engine_kept_positions_errors_and_uncompressed_requests():
    model = tiny_model("llama")
    llm = LLM(model, **CFG, num_pages=64, async_compression=True)
    a, b = shared_prefix_prompts(8)
    ra = llm.add_request(a, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert llm.kept_positions(ra, 0).shape == (2, 0)  # waiting: nothing stored yet
    llm.step()
    assert torch.equal(llm.kept_positions(ra, 1), torch.arange(len(a)).expand(2, -1))  # not compressed yet
    with pytest.raises(IndexError, match="layer_idx=2"):
        llm.kept_positions(ra, 2)
    with pytest.raises(KeyError, match="nope"):
        llm.kept_positions("nope", 0)
    seen_compressing = False
    while llm.has_unfinished():
        llm.step()
        seq = llm.requests[ra]
        if seq.compressing:
            seen_compressing = True
            with pytest.raises(ValueError, match="being compressed"):
                llm.kept_positions(ra, 0)
    assert seen_compressing
    with pytest.raises(ValueError, match="finished"):
        llm.kept_positions(ra, 0)
    full = LLM(model, budget=None, page_size=8, num_pages=64)
    rb = full.add_request(b, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    full.step()
    full.step()
    assert torch.equal(full.kept_positions(rb, 0), torch.arange(len(b) + 1).expand(2, -1))


def test_maps_of_budgets_of_their_own_go_with_their_requests():
    """A request with a budget of its own keeps its positions in a map of its own width; the map goes when the
    request's query slot is given back (it stayed, one per slot, after every such request had ended)."""
    model = tiny_model("llama")
    llm = LLM(model, **CFG, num_pages=200, max_num_seqs=4)
    a, b = shared_prefix_prompts(8)
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, budget=budget) for budget in (16, 32, 40)]
    rids = [llm.add_request(p, sp) for p, sp in zip((a, b, a), params)]
    seen = 0
    while llm.has_unfinished():
        llm.step()
        seen = max(seen, len(llm.runner.kept.own))
        for rid in rids:
            seq = llm.requests[rid]
            if seq.compressions and not seq.finished and not seq.compressing:
                assert llm.kept_positions(rid, 0).shape == (2, seq.stored)
    assert seen == 3 and all(llm.requests[r].compressions for r in rids)
    assert llm.runner.kept.own == {}


# ------------------------------------------------------------------------------ bf16 on the GPU
GPU_CFG = dict(budget=48, page_size=16, buffer=16, window=8)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family, scorer", [("llama", "zipage"), ("qwen3", "snapkv")])
def test_bf16_on_cuda_generate_and_engine_match_the_reference(family, scorer):
    """The paged Triton decode (generate) and the engine's CUDA graphs, in bf16: looser tolerances."""
    model = tiny_model(family).to("cuda", torch.bfloat16)
    cfg = dict(GPU_CFG, scorer=scorer)
    check_generate(model, cfg, 80, atol=TOL_BF16, rtol=TOL_BF16)
    llm, _ = check_engine(model, dict(cfg, num_pages=64), 80, atol=TOL_BF16, rtol=TOL_BF16)
    assert llm.runner.graphs, "decode steps did not use CUDA graphs"


TOL_BF16 = 5e-2
