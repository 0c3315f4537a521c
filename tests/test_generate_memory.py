"""generate() with zipage never allocates more than with DynamicCache, and far less past the budget.

Memory is the peak of tensor storage allocated inside ``generate()`` (``StoragePeak``: every op's new
outputs, released when freed), so the numbers are exact and the same on every run, unlike timings.
"""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, tiny_model

from zipage.bench.storage_peak import StoragePeak

PROMPT = 24
ZIPAGE = dict(cache_implementation="zipage", cache_config={"budget": 64, "page_size": 8, "buffer": 8})


def _peak(model, ids, mask, new_tokens: int, **extra) -> tuple[int, torch.Tensor]:
    with torch.inference_mode(), StoragePeak() as mem:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, **extra)
    return mem.peak, out


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=4)


def test_storage_peak_counts_allocations_not_views():
    with StoragePeak() as mem:
        a = torch.zeros(1000)  # 4000 bytes
        b = torch.cat([a, a])  # 8000 more
        del a
        a = b[10:].view(-1)  # a view: nothing new
        b.add_(1)  # in place: nothing new
    assert mem.peak == 12000 and mem.current == 8000


@pytest.mark.parametrize("new_tokens", [1, 9, 30, 41])  # PROMPT + new_tokens stays within budget + buffer
def test_never_more_than_dynamic_cache_before_the_budget(model, new_tokens):
    ids, mask = left_padded_batch(lengths=(PROMPT, 17, 20))
    full, ref = _peak(model, ids, mask, new_tokens)
    zipage, out = _peak(model, ids, mask, new_tokens, **ZIPAGE)
    assert torch.equal(ref, out)  # nothing evicted: the same tokens
    # What zipage holds that a DynamicCache does not: a byte per stored token and row, which tokens
    # are padding (every layer shares it until a compression), and the step's slot ids (int64 per
    # new token and row, shared by every layer).
    record = ids.shape[0] * (PROMPT + new_tokens) + ids.shape[0] * PROMPT * 8
    assert zipage <= full + record, f"zipage {zipage} B against DynamicCache {full} B"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("new_tokens", [90, 106])  # stores PROMPT + new_tokens - 1 = 16 k + 1 tokens
def test_never_more_than_dynamic_cache_on_cuda(model, new_tokens):
    """The paged kernels read rows as 16-token pages; where the run ends one token into a page, rows
    still take exactly the tokens the run will store (not 15 more in every layer), so past the
    prompt the peak does not grow beyond DynamicCache's. The prompt's step on the GPU may allocate a
    few kernel buffers more than DynamicCache's: what it adds is measured on a one-token run and
    allowed, no more."""
    import zipage

    cuda = model.to("cuda")
    ids, mask = (t.cuda() for t in left_padded_batch(lengths=(PROMPT, 17, 20)))
    fields = {"budget": 256, "page_size": 8, "buffer": 8}  # the run's end, not the budget, sets the limit
    try:
        prompt_extra = max(0, _peak(cuda, ids, mask, 1, cache_implementation="zipage", cache_config=fields)[0]
                           - _peak(cuda, ids, mask, 1)[0])
        full, ref = _peak(cuda, ids, mask, new_tokens)
        cache = zipage.ZipageCache(config=cuda.config, **fields)
        zipage_peak, out = _peak(cuda, ids, mask, new_tokens, past_key_values=cache)
    finally:
        cuda.to("cpu")
    assert torch.equal(ref, out)
    # What the run stores at most (its last token is never fed back), not rounded up to a page.
    assert cache.stats()["capacity_tokens"] == PROMPT + new_tokens - 1
    c = model.config  # one token in every layer and row: keys and values in float32
    per_token = 2 * c.num_hidden_layers * ids.shape[0] * c.num_key_value_heads * c.head_dim * 4
    # As on the CPU, plus the page table and slot ids of the paged steps (int32 / int64 per page and token).
    record = ids.shape[0] * (PROMPT + new_tokens) * 9 + ids.shape[0] * PROMPT * 8
    assert prompt_extra < 15 * per_token  # (else the check below could not see a page rounded up)
    assert zipage_peak <= full + record + prompt_extra, (
        f"zipage {zipage_peak} B against DynamicCache {full} B (the prompt's step: {prompt_extra} B more)")


def test_plan_capacity_never_rounds_past_the_runs_end():
    from zipage.memory.rows import plan_capacity

    # Growth: need plus slack, rounded up to the page, capped at the limit (rounded up, or exact).
    assert plan_capacity(0, 40, 1000, layers=4, granule=16) == 64
    assert plan_capacity(64, 700, 712, layers=28, granule=16) == 720
    assert plan_capacity(64, 700, 712, layers=28, granule=16, exact=True) == 704  # the last whole page that fits
    assert plan_capacity(704, 705, 712, layers=28, granule=16, exact=True) == 712  # past it: exactly the end
    assert plan_capacity(712, 711, 712, layers=28, granule=16, exact=True) == 712  # holds: no regrowth
    assert plan_capacity(64, 65, 712, layers=28, granule=16, exact=True) == 96  # short of the end: whole pages


def test_far_less_than_dynamic_cache_and_flat_past_the_budget(model):
    ids, mask = left_padded_batch(lengths=(PROMPT, 17, 20))
    full = {n: _peak(model, ids, mask, n)[0] for n in (200, 400)}
    zipage = {n: _peak(model, ids, mask, n, **ZIPAGE)[0] for n in (200, 400)}
    # budget + buffer = 72 stored tokens, however long the run: zipage's peak stays where it was
    # (what still grows is generate()'s own token ids and mask), a DynamicCache's grows with the KV.
    assert zipage[400] <= 1.05 * zipage[200] and full[400] > 1.8 * full[200]
    assert zipage[200] < 0.75 * full[200] and zipage[400] < 0.4 * full[400], (zipage, full)


@pytest.mark.parametrize("max_cache_len", [60, 34, None])
def test_queries_are_kept_only_within_a_window_of_a_compression(model, max_cache_len):
    """A layer's last ``window`` queries weigh ``window * H_q / H_kv`` tokens of KV: the cache keeps them only
    for the steps whose queries a compression may read. With the run's length known (generate()), one token a
    step after the prompt: the window before the next compression (at 40 stored here), and the run's last
    ``window`` steps, which a later call continuing the cache may compress after at once; with no length (a
    caller's own loop, whose next step may be of any size), every step past ``budget - window``."""
    import zipage

    cache = zipage.ZipageCache(config=model.config, budget=32, page_size=8, max_cache_len=max_cache_len)
    ids = torch.randint(3, 96, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        model(ids[:, :12], past_key_values=cache)
        for t in range(12, 30):
            model(ids[:, t : t + 1], past_key_values=cache)
            kept = cache.layers[0].window_queries
            if max_cache_len is None or t + 1 > max_cache_len - 16:
                expected = t + 1 > 32 - 16
            else:
                expected = t + 1 > 40 - 16 and (t + 1) + (40 - (t + 1)) + 1 <= max_cache_len
            assert (kept is not None) == expected, t


def test_a_stale_length_bound_does_not_resize_every_step(monkeypatch):
    """A generate() call's bound on the tokens it feeds stays on a cache the caller keeps: a loop of forwards after
    it (or a conversation continued with only its new tokens and a full mask) passed the bound, and every step
    then resized every layer's rows to exactly what it needed (a copy of the whole cache a step). Past the
    bound, rows grow geometrically as they do with no bound; the tokens are the same."""
    import zipage.cache as cache_mod
    from zipage import ZipageCache, ZipageConfig

    resizes = []
    resize = cache_mod.ZipageLayer.resize
    monkeypatch.setattr(cache_mod.ZipageLayer, "resize", lambda self, cap: (resizes.append(cap), resize(self, cap))[1])
    model = tiny_model("llama")
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    ids = torch.randint(3, 96, (1, 200), generator=torch.Generator().manual_seed(0))
    tokens = {}
    for after_generate in (True, False):
        cache = ZipageCache(config=model.config, zipage_config=ZipageConfig(budget=4096, page_size=16))
        with torch.no_grad():
            if after_generate:
                tok = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)[:, -1:]
            else:
                out = model.generate(ids, max_new_tokens=5, do_sample=False)
                tok = out[:, -1:]
                cache = ZipageCache(config=model.config, zipage_config=ZipageConfig(budget=4096, page_size=16))
                model(out[:, :-1], past_key_values=cache)
            resizes.clear()
            steps = []
            for _ in range(100):
                tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
                steps.append(tok.item())
        tokens[after_generate] = steps
        assert len(resizes) <= 2 * len(cache.layers), (after_generate, len(resizes))
    assert tokens[True] == tokens[False]
