"""``zipage serve --reasoning-parser``: a reasoning model's thinking apart from its answer in the chat endpoint.

The splitter against a regular-expression reference of each parser's rule, whole and fed in random pieces;
then the real server with the ``openai`` client over a tiny checkpoint whose tokenizer has ``<think>`` and
``</think>`` tokens (as Qwen3's and DeepSeek-R1's have): each answer's fields against the reference applied to
the text of the tokens the server returned, streamed and not."""

from __future__ import annotations

import random
import re

import pytest
from serve_helpers import thread_server

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from zipage import LLM  # noqa: E402
from zipage.serve import ServeConfig  # noqa: E402
from zipage.serve.reasoning import (  # noqa: E402
    PARSERS,
    ReasoningSplitter,
    prompt_leaves_thinking_open,
    tags_survive_decoding,
)
from zipage.serve.tiny import tiny_model, tiny_tokenizer  # noqa: E402

KEY = "test-key"
ENGINE = dict(budget=32, page_size=16, num_pages=256, max_num_seqs=16)


def reference(parser: str, text: str, prompt_open: bool = False) -> tuple[str | None, str | None]:
    """Each parser's rule on a whole output, written with regular expressions."""
    opened = re.match(r"\s*<think>", text)
    if opened:
        text = text[opened.end():]
    if not (opened or prompt_open or parser == "deepseek_r1"):
        return None, text  # no block: the output is its content, unchanged
    m = re.match(r"(.*?)</think>(.*)", text, re.S)
    if m is None:
        return text.strip() or None, None
    return m.group(1).strip() or None, m.group(2).lstrip() or None


@pytest.mark.parametrize("parser,prompt_open,text,want", [
    ("deepseek_r1", False, "<think>\nStep 1.\n</think>\n\nIt is 4.", ("Step 1.", "It is 4.")),
    ("deepseek_r1", False, "Step 1.\n</think>\n\nIt is 4.", ("Step 1.", "It is 4.")),
    ("deepseek_r1", False, "Still thinking when the length ran out", ("Still thinking when the length ran out", None)),
    ("qwen3", False, "<think>\nStep 1.\n</think>\n\nIt is 4.", ("Step 1.", "It is 4.")),
    ("qwen3", False, "It is 4.", (None, "It is 4.")),  # enable_thinking: false
    ("qwen3", False, "  It is 4.", (None, "  It is 4.")),  # no block: the text unchanged
    ("qwen3", True, "Step 1.</think>It is 4.", ("Step 1.", "It is 4.")),  # the template opened the block
    ("qwen3", False, "<think>a</think>b</think>c", ("a", "b</think>c")),  # only the first block counts
    ("qwen3", False, "<think>\n\n</think>\n\nIt is 4.", (None, "It is 4.")),
    ("qwen3", False, "", (None, "")),
    ("deepseek_r1", False, "<thi", ("<thi", None)),
])
def test_split_follows_each_parser_s_rule(parser, prompt_open, text, want):
    assert ReasoningSplitter.split(parser, text, prompt_open) == want
    assert reference(parser, text, prompt_open) == want


def test_fed_in_any_pieces_the_split_is_the_whole_text_s():
    """Tags, whitespace and text cut anywhere between the pieces a stream feeds: the pieces joined are the
    whole text's split, and both are the reference's."""
    rng = random.Random(0)
    atoms = ["<think>", "</think>", "<", "</", "<th", "think", ">", " ", "\n", "a", "b", "</thi", "nk>"]
    for trial in range(3000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        parser = rng.choice(PARSERS)
        prompt_open = rng.random() < 0.3
        whole = ReasoningSplitter.split(parser, text, prompt_open)
        assert whole == reference(parser, text, prompt_open), (parser, prompt_open, text)
        s = ReasoningSplitter(parser, prompt_open)
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1)))
        reasoning = content = ""
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            r, c = s.feed(text[a:b])
            reasoning, content = reasoning + r, content + c
        r, c = s.finish()
        reasoning, content = reasoning + r, content + c
        assert (reasoning or None) == whole[0], (parser, prompt_open, text, cuts)
        assert content == (whole[1] or ""), (parser, prompt_open, text, cuts)


def test_an_unknown_parser_is_refused_by_name():
    from zipage_cli import serve_parser

    with pytest.raises(ValueError, match="unknown reasoning parser 'deepseek'"):
        ReasoningSplitter("deepseek")
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ServeConfig(model_names=["m"], model_root="m", tokenizer=None, max_model_len=64, reasoning_parser="r1")
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--reasoning-parser", "r1"])
    choices = next(a.choices for a in serve_parser()._actions if a.dest == "reasoning_parser")
    assert tuple(choices) == PARSERS  # (the CLI lists them without importing the server)
    assert serve_parser().parse_args(["--reasoning-parser", "qwen3"]).reasoning_parser == "qwen3"


def think_tokenizer(special: bool = False):
    tok = tiny_tokenizer()
    if special:
        tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    else:
        tok.add_tokens(["<think>", "</think>"])  # (as Qwen3's: added tokens, not special ones)
    return tok


def test_the_prompt_s_open_block_and_the_tags_decoding_are_read_from_the_tokenizer():
    tok = think_tokenizer()
    ids = tok.encode("<|im_start|>assistant\n<think>\n")
    assert prompt_leaves_thinking_open(tok, ids)
    assert not prompt_leaves_thinking_open(tok, tok.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n"))
    assert not prompt_leaves_thinking_open(tok, tok.encode("<|im_start|>assistant\n"))
    # a user's question about the tag is text, not an open block
    asked = tok.encode("<|im_start|>user\nWhat does <think> do?<|im_end|>\n<|im_start|>assistant\n")
    assert not prompt_leaves_thinking_open(tok, asked)
    # an assistant message continued after a long thought it opened: open, however long
    thought = "<think>\n" + "Let me see. " * 40
    continued = tok.encode("<|im_start|>assistant\n" + thought)
    assert prompt_leaves_thinking_open(tok, continued, continued=thought)
    assert not prompt_leaves_thinking_open(tok, continued, continued=thought + "</think> 4")
    # a continued message that mentions the tag rather than starting with it opens nothing, even at its end;
    # nor does a continued message not the assistant's ("": chat.py's value for one)
    assert not prompt_leaves_thinking_open(tok, continued, continued="The <think> tag marks")
    ends = tok.encode("<|im_start|>assistant\nThe tag is <think>")
    assert prompt_leaves_thinking_open(tok, ends) and not prompt_leaves_thinking_open(tok, ends, "The tag is <think>")
    assert not prompt_leaves_thinking_open(tok, tok.encode("<|im_start|>user\nComplete: <think>"), "")
    assert tags_survive_decoding(tok)
    assert not tags_survive_decoding(think_tokenizer(special=True))  # (skip_special_tokens drops them)


@pytest.fixture(scope="module")
def checkpoint():
    tok = think_tokenizer()
    return tiny_model(len(tok), seed=1), tok


def serve(checkpoint, parser):
    model, tok = checkpoint
    llm = LLM(model, tok, **ENGINE)
    config = ServeConfig(model_names=["tiny"], model_root="tiny", tokenizer=tok, max_model_len=llm.max_model_len,
                         api_key=KEY, reasoning_parser=parser)
    return thread_server(llm, config)


def ask(client, tok, messages, seed, stream=False, **extra):
    """A sampled answer over a few tokens, ``</think>`` among them and likely; with its tokens' ids."""
    allowed = [tok.convert_tokens_to_ids(t) for t in ("a", "b", "Ġ", "Ċ", "</think>")]
    return client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=24, temperature=1.0, seed=seed, stream=stream,
        extra_body={"allowed_token_ids": allowed, "ignore_eos": True, "return_token_ids": True, **extra})


def streamed(chunks):
    reasoning = content = ""
    other = []
    ids = []
    for ch in chunks:
        for c in ch.choices:
            d = c.delta
            extra = d.model_extra or {}
            assert extra.get("reasoning") == extra.get("reasoning_content")
            reasoning += extra.get("reasoning") or ""
            content += d.content or ""
            ids += (c.model_extra or {}).get("token_ids") or []
            other.append(c.finish_reason)
    return reasoning or None, content or None, ids


@pytest.mark.parametrize("parser", PARSERS)
def test_the_server_splits_thinking_from_content_as_the_reference_does(checkpoint, parser):
    """Sampled answers (seeds 0-5) with ``</think>`` in the middle, at the end or missing: the message's
    reasoning and content are the reference's split of the text of the tokens it returned, its reasoning_content
    the same as reasoning, and the stream gives the same fields piece by piece."""
    _, tok = checkpoint
    messages = [{"role": "user", "content": "2 + 2?"}]
    seen_close = 0
    with serve(checkpoint, parser) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        for seed in range(6):
            r = ask(client, tok, messages, seed)
            msg = r.choices[0].message
            ids = r.choices[0].model_extra["token_ids"]
            text = tok.decode(ids, skip_special_tokens=True)
            seen_close += "</think>" in text
            want = reference(parser, text)
            assert (msg.model_extra.get("reasoning"), msg.content) == want, (seed, text)
            assert msg.model_extra.get("reasoning_content") == msg.model_extra.get("reasoning")
            reasoning, content, stream_ids = streamed(ask(client, tok, messages, seed, stream=True))
            assert stream_ids == ids
            assert (reasoning, content) == want, (seed, text)
    assert seen_close >= 3  # (the seeds do close the block: the test reads a real split)


def test_qwen3_thinks_inside_a_block_the_prompt_opens_and_not_otherwise(checkpoint):
    """With the qwen3 parser an answer that opens no block is content, unless the prompt left one open (here an
    assistant turn ``<think>`` continued, as templates that end the prompt with ``<think>`` do)."""
    _, tok = checkpoint
    plain = [{"role": "user", "content": "2 + 2?"}]
    opened = plain + [{"role": "assistant", "content": "<think>"}]
    with serve(checkpoint, "qwen3") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        for seed in range(3):
            r = ask(client, tok, opened, seed, add_generation_prompt=False, continue_final_message=True)
            text = tok.decode(r.choices[0].model_extra["token_ids"], skip_special_tokens=True)
            assert not text.lstrip().startswith("<think>")
            msg = r.choices[0].message
            assert (msg.model_extra.get("reasoning"), msg.content) == reference("qwen3", text, prompt_open=True)
            assert msg.model_extra.get("reasoning") is not None
            r = ask(client, tok, plain, seed)
            text = tok.decode(r.choices[0].model_extra["token_ids"], skip_special_tokens=True)
            msg = r.choices[0].message
            assert (msg.model_extra.get("reasoning"), msg.content) == (None, text)


def test_without_a_parser_the_tags_stay_in_the_content(checkpoint):
    _, tok = checkpoint
    with serve(checkpoint, None) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        r = ask(client, tok, [{"role": "user", "content": "2 + 2?"}], 0)
        text = tok.decode(r.choices[0].model_extra["token_ids"], skip_special_tokens=True)
        assert "</think>" in text and r.choices[0].message.content == text
        assert r.choices[0].message.model_extra.get("reasoning") is None
        reasoning, content, _ = streamed(ask(client, tok, [{"role": "user", "content": "2 + 2?"}], 0, stream=True))
        assert (reasoning, content) == (None, text)


def test_a_user_s_think_tag_does_not_open_a_block(checkpoint):
    """A question that mentions <think> (the prompt holds the tag, the template opened no block): the answer is
    content under the qwen3 parser, not thinking with no content."""
    _, tok = checkpoint
    messages = [{"role": "user", "content": "What does the <think> tag do?"}]
    with serve(checkpoint, "qwen3") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        r = ask(client, tok, messages, 0)
    text = tok.decode(r.choices[0].model_extra["token_ids"], skip_special_tokens=True)
    msg = r.choices[0].message
    assert (msg.model_extra.get("reasoning"), msg.content) == (None, text)


def test_an_earlier_answer_s_thinking_reaches_the_template(checkpoint):
    """An assistant message sent back with the reasoning_content (or reasoning) the server gave it: the chat
    template gets it (Qwen3's renders it), as vLLM passes it."""
    model, tok = checkpoint
    tok = think_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}:{% if m.reasoning_content %}<think>"
                         "{{ m.reasoning_content }}</think>{% endif %}{% if m.reasoning %}[{{ m.reasoning }}]"
                         "{% endif %}{{ m['content'] }}\n{% endfor %}")
    llm = LLM(model, tok, **ENGINE)
    config = ServeConfig(model_names=["tiny"], model_root="tiny", tokenizer=tok, max_model_len=llm.max_model_len,
                         api_key=KEY, reasoning_parser="qwen3")
    messages = [{"role": "user", "content": "2+2?", "reasoning_content": "not an answer's"},
                {"role": "assistant", "content": "4", "reasoning_content": "adding"},
                {"role": "assistant", "content": "5", "reasoning": "again"}]
    with thread_server(llm, config) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1,
                                           extra_body={"return_token_ids": True})
    want = tok.encode("user:2+2?\nassistant:<think>adding</think>[adding]4\n"
                      "assistant:<think>again</think>[again]5\n", add_special_tokens=False)
    assert r.model_extra["prompt_token_ids"] == want


def test_a_continued_user_message_opens_no_block(checkpoint):
    """continue_final_message on a user message holding <think>: that is the user's text, not the answer's block."""
    _, tok = checkpoint
    messages = [{"role": "user", "content": "<think> what?"}]
    with serve(checkpoint, "qwen3") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        r = ask(client, tok, messages, 0, add_generation_prompt=False, continue_final_message=True)
    text = tok.decode(r.choices[0].model_extra["token_ids"], skip_special_tokens=True)
    assert (r.choices[0].message.model_extra.get("reasoning"), r.choices[0].message.content) == (None, text)
