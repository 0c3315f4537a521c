"""Step outputs are views of append-only lists: they read as the list did at that step, forever."""

from __future__ import annotations

import json

import pytest

from zipage.engine.views import ListView


def test_a_view_is_a_snapshot_of_an_append_only_list():
    items = [5, 6, 7]
    view = ListView(items)
    items += [8, 9]
    assert len(view) == 3 and list(view) == [5, 6, 7] and view == [5, 6, 7] and view == (5, 6, 7)
    assert view != [5, 6, 7, 8] and view != [5, 6]
    assert view[-1] == 7 and view[1:] == [6, 7] and view[::-1] == [7, 6, 5] and view[:10] == [5, 6, 7]
    with pytest.raises(IndexError):
        view[3]
    assert view + [1] == [5, 6, 7, 1] and [1] + view == [1, 5, 6, 7]
    assert repr(view) == "[5, 6, 7]" and json.dumps(list(view)) == "[5, 6, 7]"
    assert ListView(items, 4) == [5, 6, 7, 8]


def test_step_outputs_keep_their_tokens_while_the_request_runs_on(llama):
    from zipage import LLM, SamplingParams

    llm = LLM(llama, budget=16, window=4, page_size=4, num_pages=64)  # compressions happen meanwhile
    rid = llm.add_request([1, 2, 3, 4], SamplingParams(max_tokens=40, ignore_eos=True))
    seen = []
    while llm.has_unfinished():
        for out in llm.step():
            if out.request_id == rid:
                seen.append((len(out.token_ids), list(out.token_ids), out))
    final = seen[-1][2]
    assert final.finished and type(final.token_ids) is list and type(final.prompt_token_ids) is list
    assert len(final.token_ids) == 40 and llm.stats()["compressions"] > 0
    for n, copy, out in seen:  # every earlier output still reads what it read at its step
        assert list(out.token_ids) == copy == final.token_ids[:n]
