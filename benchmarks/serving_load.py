"""The serving benchmark's client: Poisson arrivals in stages, each request streamed and timed token by
token, the server's /metrics sampled on the side, and one row of figures per stage.

A *stage* is a request rate held for a number of seconds. Stages run back to back in one arrival
stream (a staircase: each stage starts from the load the previous one left, so it nears the steady
state sooner than a run from empty), or one per run with a drain between (``benchmarks/serving.py``
decides). A stage's figures: output tokens and inter-token gaps that fall inside its window, and the
time to first token of the requests that arrived in it.

A stage is *sustained* when its p99 inter-token latency is under the SLO, no request failed, and at
least ``KEEP_UP`` of its arrivals got their first token within ``ttft_slo_s`` (a queue that does not
build up). A staircase stops after the first stage that is not sustained.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

KEEP_UP = 0.95  # share of a stage's arrivals that must start within the TTFT limit


@dataclass
class Result:
    sent: float
    prompt_tokens: int
    stage: int = 0
    first: float | None = None
    done: float | None = None
    times: list[float] = field(default_factory=list)  # arrival of each token
    finished: bool = False
    error: str | None = None


async def one_request(client, url: str, model: str, prompt: list[int], output_len: int, result: Result) -> None:
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0,
            "stream": True, "return_token_ids": True}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"{r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    result.finished = True
                    result.done = time.perf_counter()
                    break
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                n = sum(len(c.get("token_ids") or []) for c in chunk.get("choices", []))
                if n and result.first is None:
                    result.first = now
                result.times += [now] * n
    except (httpx.HTTPError, asyncio.CancelledError) as e:
        if not isinstance(e, asyncio.CancelledError):
            result.error = repr(e)


def prompts_for(n: int, input_len: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(0, vocab) for _ in range(rnd.randint(*input_len))] for _ in range(n)]


def arrivals_for(stages: list[tuple[float, float]], seed: int) -> list[tuple[float, int]]:
    """``(time, stage)`` of Poisson arrivals: stage k holds ``rate_k`` for ``seconds_k``, back to back."""
    rnd = random.Random(seed)
    out, begin = [], 0.0
    for k, (rate, seconds) in enumerate(stages):
        t = begin
        while True:
            t += rnd.expovariate(rate)
            if t > begin + seconds:
                break
            out.append((t, k))
        begin += seconds
    return out


# ----------------------------------------------------------------------------- the server's own view
GAUGES = {"zipage:num_requests_running": "running", "zipage:num_requests_waiting": "waiting",
          "zipage:kv_cache_usage_perc": "kv_usage", "zipage:num_preemptions_total": "preemptions"}


async def poll_metrics(client, url: str, start: float, every: float, samples: list[list[float]]) -> None:
    """``[t, running, waiting, kv_usage, preemptions]`` from /metrics every ``every`` seconds (a server
    without /metrics gives an empty timeline)."""
    while True:
        try:
            r = await client.get(f"{url}/metrics", timeout=5)
            values = {}
            for line in r.text.splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in GAUGES:
                    values[GAUGES[name]] = float(line.rsplit(" ", 1)[1])
            if values:
                samples.append([round(time.perf_counter() - start, 2)]
                               + [values.get(k) for k in ("running", "waiting", "kv_usage", "preemptions")])
        except Exception:  # noqa: BLE001 (a missed sample is not a failed run)
            pass
        await asyncio.sleep(every)


# ----------------------------------------------------------------------------- figures
def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summarize(rate: float, results: list[Result], w0: float, w1: float, now: float, ttft_slo_s: float,
              samples: list[list[float]], start: float) -> dict:
    """One stage's row: ``results`` arrived in it, ``[w0, w1)`` is its window, ``now`` when it is judged."""
    everyone = results
    wall = w1 - w0
    ttft = [r.first - r.sent for r in everyone if r.first is not None]
    waited = [(r.first if r.first is not None else now) - r.sent for r in everyone]
    in_time = sum(w <= ttft_slo_s for w in waited)
    ms = lambda x: None if x is None else round(1000 * x, 2)  # noqa: E731
    window = [s for s in samples if w0 - start <= s[0] < w1 - start]

    def mean(i: int) -> float | None:
        values = [s[i] for s in window if s[i] is not None]
        return round(statistics.fmean(values), 2) if values else None

    return dict(
        rate=rate, requests=len(everyone), started=sum(r.first is not None for r in everyone),
        started_in_time=in_time, finished=sum(r.finished for r in everyone),
        errors=sum(r.error is not None for r in everyone), wall_s=round(wall, 2),
        first_error=next((r.error for r in everyone if r.error), None),
        ttft_p50_ms=ms(pct(ttft, 50)), ttft_p99_ms=ms(pct(ttft, 99)),
        mean_running=mean(1), mean_waiting=mean(2), max_waiting=max((s[2] for s in window if s[2] is not None),
                                                                    default=None),
        _window=(w0, w1),
    )


def window_figures(row: dict, all_results: list[Result]) -> dict:
    """Tokens, throughput and inter-token gaps inside the row's window, over every request."""
    w0, w1 = row.pop("_window")
    itl, tokens, done = [], 0, 0
    for r in all_results:
        ts = r.times
        tokens += sum(w0 <= t < w1 for t in ts)
        itl += [b - a for a, b in zip(ts, ts[1:]) if w0 <= b < w1]
        done += r.done is not None and w0 <= r.done < w1
    wall = w1 - w0
    ms = lambda x: None if x is None else round(1000 * x, 2)  # noqa: E731
    row.update(output_tokens=tokens, throughput_tok_s=round(tokens / wall, 1),
               request_throughput=round(done / wall, 4), itl_p50_ms=ms(pct(itl, 50)), itl_p99_ms=ms(pct(itl, 99)),
               itl_mean_ms=ms(statistics.fmean(itl)) if itl else None)
    return row


def sustains(row: dict, slo_ms: float) -> bool:
    return (row["itl_p99_ms"] is not None and row["itl_p99_ms"] < slo_ms and row["errors"] == 0
            and row["started_in_time"] >= KEEP_UP * row["requests"])


# ----------------------------------------------------------------------------- a run
async def run_stages(url: str, model: str, stages: list[tuple[float, float]], *, drain: float, output_len: int,
                     input_len: tuple[int, int], vocab: int, seed: int, itl_slo_ms: float, ttft_slo_s: float,
                     stop_on_failure: bool, deadline: float | None = None, extend_last: bool = False,
                     log=print) -> tuple[list[dict], list[list[float]]]:
    """Send the stages' arrivals; judge each stage ``ttft_slo_s`` after it ends (the last one ``drain``
    seconds after, at least as long); ``(rows, timeline)``. With ``extend_last`` the last stage's window
    runs on to its judgement (a single rate measured through its drain). Requests still running at
    the end are cancelled (the client goes away)."""
    import httpx

    drain = max(drain, ttft_slo_s)
    schedule = arrivals_for(stages, seed)
    prompts = prompts_for(len(schedule), input_len, vocab, seed + 1)
    results: list[Result] = []
    rows: list[dict] = []
    samples: list[list[float]] = []
    ends = [sum(s for _, s in stages[:k + 1]) for k in range(len(stages))]
    limits = httpx.Limits(max_connections=len(schedule) + 16, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        start = time.perf_counter()
        poller = asyncio.create_task(poll_metrics(client, url, start, 2.0, samples))
        tasks: list[asyncio.Task] = []
        judged, last_stage = 0, len(stages) - 1
        failed = False

        def judge(k: int, now: float) -> bool:
            mine = [r for r in results if r.stage == k]
            w1 = start + ends[k] + (drain if extend_last and k == last_stage else 0.0)
            if extend_last and k == last_stage and tasks and all(t.done() for t in tasks):
                # every request ended before the drain did: the window closes at the last token, not after
                # the idle rest of the drain (which would dilute the throughput)
                w1 = min(w1, max(max(r.times, default=r.sent) for r in results) + 1e-6)
            row = summarize(stages[k][0], mine, start + ends[k] - stages[k][1], min(w1, now), now, ttft_slo_s,
                            samples, start)
            row = window_figures(row, results)
            row["sustained"] = sustains(row, itl_slo_ms)
            rows.append(row)
            log(f"  rate {row['rate']:g}/s: {row['requests']} requests ({row['started']} started, "
                f"{row['started_in_time']} within {ttft_slo_s:g} s), {row['throughput_tok_s']:.0f} tok/s, "
                f"TTFT p50/p99 {row['ttft_p50_ms']}/{row['ttft_p99_ms']} ms, ITL p50/p99 {row['itl_p50_ms']}/"
                f"{row['itl_p99_ms']} ms, running {row['mean_running']}, waiting max {row['max_waiting']}"
                f"{'' if row['sustained'] else '  (not sustained)'}")
            return row["sustained"]

        async def judge_due(until: float) -> bool:
            """Judge every stage due by ``until`` (seconds from start); False once one fails."""
            nonlocal judged
            while judged < len(stages) and ends[judged] + (ttft_slo_s if judged < last_stage else drain) <= until:
                ok = judge(judged, time.perf_counter())
                judged += 1
                if not ok and stop_on_failure:
                    return False
            return True

        for (at, k), prompt in zip(schedule, prompts):
            if deadline is not None and start + ends[k] + ttft_slo_s > deadline:
                log(f"  rate {stages[k][0]:g}/s and later: not run (the time limit)")
                last_stage = k - 1
                break
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if not await judge_due(time.perf_counter() - start):
                failed = True
                break
            result = Result(time.perf_counter(), len(prompt), stage=k)
            results.append(result)
            tasks.append(asyncio.create_task(one_request(client, url, model, prompt, output_len, result)))
        if not failed and last_stage >= 0:
            end = start + ends[last_stage] + drain
            while judged <= last_stage:
                due = start + ends[judged] + (ttft_slo_s if judged < last_stage else drain)
                now = time.perf_counter()
                if (extend_last and judged == last_stage and now >= start + ends[judged]
                        and all(t.done() for t in tasks)):  # nothing left to drain
                    judge(judged, now)
                    judged += 1
                    break
                await asyncio.sleep(max(0.0, min(due, end, now + 0.5) - now))
                if not await judge_due(time.perf_counter() - start + 1e-6):
                    break
        poller.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(poller, *tasks, return_exceptions=True)
    return rows, samples
