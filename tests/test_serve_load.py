"""A load test of ``zipage serve`` on 127.0.0.1: 1,200 streaming requests from 100 concurrent clients,
with random lengths, budgets, samplers and disconnects, against a tiny model in a subprocess.

Every request that was not abandoned ends with exactly its tokens (all of them count max_tokens,
with ignore_eos; a sample is checked token by token against the same request run alone on an
offline engine); every page is back in the pool at the end; the server's memory after the load
is close to what it was after a warm-up; SIGTERM with streams in flight ends them and the server.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal

import pytest
from serve_helpers import metrics, subprocess_server, wait_for

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from zipage import LLM, SamplingParams  # noqa: E402
from zipage.serve.tiny import save_tiny  # noqa: E402

CLIENTS = 100
REQUESTS = 1200
WARMUP = 200
BUDGETS = [None, 16, 24, 48, "server"]  # "server": the server's own (32)
SERVER = ["--budget", "32", "--page-size", "16", "--num-pages", "640", "--max-num-seqs", "128",
          "--max-num-batched-tokens", "2048"]
ENGINE = dict(budget=32, page_size=16, num_pages=640, max_num_seqs=128, max_num_batched_tokens=2048)


def make_requests(n: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        body: dict = {"model": "tiny", "max_tokens": rnd.randint(4, 24), "ignore_eos": True, "stream": True,
                      "return_token_ids": True}
        kind = rnd.random()
        if kind < 0.2:
            body["messages"] = [{"role": "user", "content": "".join(rnd.choice("abcdefgh ") for _ in
                                                                     range(rnd.randint(1, 40)))}]
        elif kind < 0.6:
            body["prompt"] = [rnd.randrange(0, 256) for _ in range(rnd.randint(1, 60))]
        else:
            body["prompt"] = "".join(rnd.choice("lorem ipsum dolor sit amet ") for _ in range(rnd.randint(1, 60)))
        budget = rnd.choice(BUDGETS)
        if budget != "server":
            body["budget"] = budget
        if rnd.random() < 0.3:
            body["temperature"], body["seed"] = 0.8, rnd.randrange(1 << 30)
        else:
            body["temperature"] = 0
        if rnd.random() < 0.1:
            body["stream_options"] = {"include_usage": True}
        out.append({"id": i, "body": body, "drop_after": rnd.randint(1, 6) if rnd.random() < 0.12 else None})
    return out


async def one(client: httpx.AsyncClient, url: str, req: dict) -> dict:
    body = req["body"]
    path = "chat/completions" if "messages" in body else "completions"
    tokens, finish, chunks = [], None, 0
    async with client.stream("POST", f"{url}/v1/{path}", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            chunks += 1
            for choice in chunk["choices"]:
                tokens += choice.get("token_ids") or []
                finish = choice.get("finish_reason") or finish
            if req["drop_after"] is not None and chunks >= req["drop_after"]:
                return {**req, "tokens": tokens, "finish": "dropped"}
    return {**req, "tokens": tokens, "finish": finish}


async def load(url: str, requests: list[dict]) -> list[dict]:
    todo = list(requests)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            while todo:
                results.append(await one(client, url, todo.pop()))

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return results


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def idle(url: str) -> bool:
    m = metrics(url)
    return m["zipage:num_requests_running"] == 0 and m["zipage:num_requests_waiting"] == 0


@pytest.mark.slow
def test_a_thousand_streams_from_a_hundred_clients(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    with subprocess_server([str(folder), "--served-model-name", "tiny", *SERVER]) as (url, proc):
        warm = asyncio.run(load(url, make_requests(WARMUP, seed=1)))
        assert wait_for(lambda: idle(url), timeout=60)
        rss_warm = rss(proc.pid)
        results = asyncio.run(load(url, make_requests(REQUESTS, seed=2)))
        assert wait_for(lambda: idle(url), timeout=60)
        rss_end = rss(proc.pid)
        m = metrics(url)
        # SIGTERM with streams in flight: they end, and so does the server
        long = [{"id": -1, "drop_after": None, "body": {"model": "tiny", "prompt": "x", "max_tokens": 4000,
                                                          "ignore_eos": True, "stream": True, "budget": None}}]

        async def interrupted() -> list[dict]:
            task = asyncio.create_task(load(url, long * 8))
            await asyncio.sleep(2.0)
            proc.send_signal(signal.SIGTERM)
            return await task

        aborted = asyncio.run(interrupted())
        assert proc.wait(60) in (0, -signal.SIGTERM)  # (uvicorn re-raises the signal once it has shut down)
    # every request the client did not abandon got exactly max_tokens tokens
    done = [r for r in warm + results if r["finish"] != "dropped"]
    dropped = len(warm) + len(results) - len(done)
    assert len(warm) + len(results) == WARMUP + REQUESTS and dropped > 50
    for r in done:
        assert r["finish"] == "length" and len(r["tokens"]) == r["body"]["max_tokens"], r
    assert all(r["finish"] == "abort" for r in aborted) and len(aborted) == 8
    # pages: all back; compressions happened; the disconnected ones were cancelled
    assert m["zipage:kv_pages_used"] == 0 and m["zipage:kv_pages_free"] == 640
    assert m["zipage:compressions_total"] > 0 and m["zipage:evicted_tokens_total"] > 0
    assert m['zipage:request_success_total{finished_reason="cancelled",model_name="tiny"}'] > 0
    assert m["zipage:generation_tokens_total"] >= sum(r["body"]["max_tokens"] for r in done)
    # memory: flat after the warm-up (a generous bound: allocator noise, not a leak per request)
    assert rss_end - rss_warm < 96 * 2**20, (rss_warm, rss_end)
    # a sample, token by token, against the same request run alone offline
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    llm = LLM(model, tok, **ENGINE)
    for r in random.Random(3).sample(done, 40):
        body = r["body"]
        if "messages" in body:
            prompt = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)["input_ids"]
        elif isinstance(body["prompt"], str):
            prompt = tok(body["prompt"])["input_ids"]
        else:
            prompt = body["prompt"]
        extra = {"budget": body["budget"]} if "budget" in body else {}
        params = SamplingParams(max_tokens=body["max_tokens"], temperature=body["temperature"],
                                seed=body.get("seed"), ignore_eos=True, **extra)
        assert llm.generate([prompt], params, use_tqdm=False)[0].token_ids == r["tokens"], body
