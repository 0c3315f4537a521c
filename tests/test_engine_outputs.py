"""Output processing: min_tokens masks EOS and stop ids (as transformers does), stop strings are
found incrementally (linear decoding work) and exactly where the whole text has them."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from zipage import LLM, SamplingParams
from zipage.engine.outputs import IncrementalText


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


PROMPT = [5, 9, 17, 33, 41, 2, 8]


def hf_tokens(model, max_new, **kw):
    ids = torch.tensor([PROMPT])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         pad_token_id=0, **kw)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("as_stop_id", [False, True])
def test_min_tokens_masks_eos_and_stop_ids_like_transformers(model, as_stop_id):
    free = hf_tokens(model, 12)
    # make the token the model wants first an end token: without masking it is produced at once
    end = free[0]
    kw = dict(max_tokens=12, temperature=0, min_tokens=4)
    original = model.generation_config.eos_token_id
    if as_stop_id:  # the model's own EOS ends it too
        params, ends = SamplingParams(stop_token_ids=[end], **kw), [end, original]
    else:
        params, ends = SamplingParams(**kw), [end]
        model.generation_config.eos_token_id = end
    try:
        llm = LLM(model, budget=None, page_size=4, num_pages=32)
        got = llm.generate([PROMPT], params, use_tqdm=False)[0]
        ref = hf_tokens(model, 12, min_new_tokens=4, eos_token_id=ends)
    finally:
        model.generation_config.eos_token_id = original
    stops = [i for i, t in enumerate(ref) if t in ends]
    ref = ref[: stops[0] + 1] if stops else ref
    assert end not in got.token_ids[:4]
    assert got.token_ids == ref
    assert got.finish_reason == ("stop" if stops else "length")


class CountingTokenizer:
    """Token id t decodes to one letter; 0 is a special token (skipped). Counts decoding work."""

    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return "".join(chr(ord("a") + t % 26) for t in ids if not (skip_special_tokens and t == 0))


def test_incremental_text_matches_the_whole_decode():
    tok = CountingTokenizer()
    text = IncrementalText()
    ids = []
    for t in [3, 0, 7, 7, 1, 0, 0, 25, 4] * 50:
        ids.append(t)
        text.add(tok, ids)
    assert text.text() == tok.decode(ids)
    assert text.tail(5) == tok.decode(ids)[-5:] and text.tail(0) == ""


def test_stop_strings_are_checked_in_linear_work_and_found_across_tokens(model):
    tok = CountingTokenizer()
    llm = LLM(model, tok, budget=None, page_size=8, num_pages=64)
    free = llm.generate([PROMPT], SamplingParams(max_tokens=300, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    whole = tok.decode(free.token_ids)
    # a stop string that starts in one token and ends two tokens later, first seen late in the text
    for start in range(len(whole) - 3, 150, -1):
        stop = whole[start : start + 3]
        if whole.find(stop) == start:
            break
    else:
        pytest.skip("no late, first-seen 3-letter string in this output")
    tok.decoded = 0
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True, stop=[stop, "never-there"])
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.text == whole[:start]
    # it stopped at the token that completed the stop string, not later
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    assert stop in tok.decode(out.token_ids) and stop not in tok.decode(out.token_ids[:-1])
    # linear: a few tokens decoded per token, plus the one whole decode at the end (n^2/2 before)
    n = len(out.token_ids)
    assert tok.decoded <= 8 * n, (tok.decoded, n)
