"""Serving benchmark (the shape of vLLM's benchmark_serving): Poisson arrivals at several request
rates against an OpenAI-compatible server, reporting throughput, time to first token (TTFT) and
inter-token latency (ITL) p50 / p99, and the highest rate each system sustains.

Against a server that is already running:

    python benchmarks/serving.py --url http://127.0.0.1:8000 --rates 0.5 1 2 --output-len 1024

Or the benchmark starts the servers itself, one system after the other on the same model and the
same KV memory: zipage (``--budget``, 2048) and the same server in full-KV mode (``--budget none``):

    python benchmarks/serving.py --model qwen3-8b --kv-gib 24 --rates 0.05 0.1 0.2 0.4 --output-len 16384
    python benchmarks/serving.py --model tiny --rates 2 4 --duration 5 --output-len 16    # CPU smoke run
    python benchmarks/serving.py --combine a.json b.json --out all.json    # one report from several runs

``qwen3-8b`` / ``qwen3-0.6b`` are random-weight models with the real configs' shapes, built on the
GPU directly; ``tiny`` is a 2-layer random model with a byte-level tokenizer, on the CPU.
Requests are reasoning-shaped: short prompts (``--input-len``, token ids) and long forced outputs
(``--output-len``, EOS ignored). Each rate sends Poisson arrivals for ``--duration`` seconds and
stops measuring ``--drain`` seconds later; requests still running then are cancelled (the client
disconnects) and count in the tokens they produced. A system sustains a rate when the p99 ITL
stays under ``--itl-slo-ms`` (100 ms) and at least 95% of the requests that arrived got their
first token before the end (it keeps up with the arrivals). Writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

try:  # as a script (python benchmarks/serving.py) or as a module (zipage.bench.serving)
    from serving_report import combine, finish
except ImportError:
    from .serving_report import combine, finish

KEEP_UP = 0.95  # share of the arrived requests that must have started for a rate to count as sustained


# ----------------------------------------------------------------------------- the client
@dataclass
class Result:
    sent: float
    prompt_tokens: int
    first: float | None = None
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


async def run_rate(url: str, model: str, rate: float, duration: float, drain: float, output_len: int,
                   input_len: tuple[int, int], vocab: int, seed: int) -> dict:
    """Poisson arrivals at ``rate`` for ``duration`` seconds; metrics over the tokens received by
    ``duration + drain``."""
    import httpx

    rnd = random.Random(seed)
    arrivals, t = [], 0.0
    while True:
        t += rnd.expovariate(rate)
        if t > duration:
            break
        arrivals.append(t)
    prompts = prompts_for(len(arrivals), input_len, vocab, seed + 1)
    results = [Result(0.0, len(p)) for p in prompts]
    limits = httpx.Limits(max_connections=len(arrivals) + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for at, prompt, result in zip(arrivals, prompts, results):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            result.sent = time.perf_counter()
            tasks.append(asyncio.create_task(one_request(client, url, model, prompt, output_len, result)))
        end = start + duration + drain
        pending = [t for t in tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, end - time.perf_counter()))
        stop = time.perf_counter()
        for task in tasks:
            task.cancel()  # still running: the client goes away (the server cancels them)
        await asyncio.gather(*tasks, return_exceptions=True)
    return summarize(rate, results, start, stop)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summarize(rate: float, results: list[Result], start: float, stop: float) -> dict:
    wall = stop - start
    ttft = [r.first - r.sent for r in results if r.first is not None]
    itl = []
    for r in results:
        times = [t for t in r.times if t <= stop]
        itl += [b - a for a, b in zip(times, times[1:])]
    tokens = sum(len([t for t in r.times if t <= stop]) for r in results)
    started = sum(r.first is not None for r in results)
    ms = lambda x: None if x is None else round(1000 * x, 2)  # noqa: E731
    return dict(
        rate=rate, requests=len(results), started=started, finished=sum(r.finished for r in results),
        errors=sum(r.error is not None for r in results), wall_s=round(wall, 2), output_tokens=tokens,
        throughput_tok_s=round(tokens / wall, 1), request_throughput=round(sum(r.finished for r in results) / wall, 4),
        ttft_p50_ms=ms(pct(ttft, 50)), ttft_p99_ms=ms(pct(ttft, 99)),
        itl_p50_ms=ms(pct(itl, 50)), itl_p99_ms=ms(pct(itl, 99)),
        itl_mean_ms=ms(statistics.fmean(itl)) if itl else None,
        first_error=next((r.error for r in results if r.error), None),
    )


def sustains(row: dict, slo_ms: float) -> bool:
    return (row["itl_p99_ms"] is not None and row["itl_p99_ms"] < slo_ms and row["errors"] == 0
            and row["started"] >= KEEP_UP * row["requests"])


def sweep(url: str, model: str, args, vocab: int) -> list[dict]:
    rows = []
    for i, rate in enumerate(args.rates):
        row = asyncio.run(run_rate(url, model, rate, args.duration, args.drain, args.output_len,
                                   tuple(args.input_len), vocab, args.seed + i))
        row["sustained"] = sustains(row, args.itl_slo_ms)
        rows.append(row)
        print(f"  rate {rate:g}/s: {row['requests']} requests ({row['started']} started, {row['finished']} finished), "
              f"{row['throughput_tok_s']:.0f} tok/s, TTFT p50/p99 {row['ttft_p50_ms']}/{row['ttft_p99_ms']} ms, "
              f"ITL p50/p99 {row['itl_p50_ms']}/{row['itl_p99_ms']} ms{'' if row['sustained'] else '  (not sustained)'}",
              flush=True)
    return rows


# ----------------------------------------------------------------------------- servers it starts
class IdTokenizer:
    """Random weights write no language: token t decodes to one character, prompts are token ids."""

    chat_template = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(0x3400 + t % 0x4000) for t in ids)

    def __call__(self, text: str) -> dict:
        return {"input_ids": [(ord(c) - 0x3400) % 0x4000 for c in text]}


def serve_random(args) -> int:
    """Server mode (run by the benchmark in a subprocess): a random-weight model built on the GPU."""
    import torch

    try:  # as a script (python benchmarks/serving.py) or as a module (zipage.bench.serving)
        from engine_run import build
        from throughput import kv_pages
    except ImportError:
        from .engine_run import build
        from .throughput import kv_pages
    from zipage import LLM, ZipageConfig, get_scorer
    from zipage.serve import ServeConfig
    from zipage.serve.server import serve

    model = build(args.serve_random)
    budget = None if args.budget == "none" else int(args.budget)
    cfg = ZipageConfig(budget=budget, page_size=args.page_size) if budget is not None else None
    stateful = cfg is not None and get_scorer(cfg.scorer, cfg).stateful
    num_pages = kv_pages(model, args.kv_gib, args.page_size, stateful)
    llm = LLM(model, IdTokenizer(), budget=budget, page_size=args.page_size, num_pages=num_pages,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    print(f"serving random {args.serve_random}: budget {budget}, {num_pages} pages, {llm.stats()['max_concurrency']} "
          f"requests at the budget, {torch.cuda.get_device_name()}", flush=True)
    config = ServeConfig(model_names=[args.serve_random], model_root=args.serve_random, tokenizer=llm.tokenizer,
                         max_model_len=llm.max_model_len)
    serve(llm, config, "127.0.0.1", args.port, log_level="warning")
    return 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, budget: str, folder: Path | None) -> tuple[subprocess.Popen, str, str]:
    """``(process, url, model name)`` of a server for one system, once it answers /health."""
    import httpx

    port = free_port()
    if args.model == "tiny":
        cmd = [sys.executable, "-m", "zipage", "serve", str(folder), "--served-model-name", "tiny",
               "--port", str(port), "--budget", budget, "--page-size", str(args.page_size),
               "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        if args.num_pages:
            cmd += ["--num-pages", str(args.num_pages)]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--serve-random", args.model, "--budget", budget,
               "--kv-gib", str(args.kv_gib), "--page-size", str(args.page_size), "--port", str(port),
               "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    proc = subprocess.Popen(cmd, stdout=None if args.verbose else subprocess.DEVNULL,
                            stderr=None if args.verbose else subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                name = httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
                return proc, url, name
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start in time")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def warm_up(url: str, name: str, args, vocab: int) -> None:
    """One short request first: kernel compilation and CUDA-graph capture stay out of the timing."""
    asyncio.run(run_rate(url, name, 1000.0, 0.002, 600, min(args.output_len, 64), tuple(args.input_len), vocab, 7))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="benchmark a running server (else --model starts them)")
    ap.add_argument("--model", default="tiny", choices=["tiny", "qwen3-8b", "qwen3-0.6b"])
    ap.add_argument("--systems", nargs="+", default=["zipage", "full"], choices=["zipage", "full"],
                    help="servers to start: zipage (--budget) and the same server with --budget none")
    ap.add_argument("--budget", default="2048", help="zipage's budget (or 'none' in --serve-random)")
    ap.add_argument("--kv-gib", type=float, default=24.0, help="KV memory of every system (GPU models)")
    ap.add_argument("--num-pages", type=int, default=None, help="KV pages (tiny model; default: sized by the server)")
    ap.add_argument("--page-size", type=int, default=None, help="(default: 256; 16 for tiny)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals per rate")
    ap.add_argument("--drain", type=float, default=60.0, help="seconds measured after the last arrival")
    ap.add_argument("--input-len", type=int, nargs=2, default=[100, 300], metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, default=16384, help="forced output tokens (EOS ignored)")
    ap.add_argument("--itl-slo-ms", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=None, help="JSON (default: benchmarks/results/serving_<model>.json)")
    ap.add_argument("--plot", default=None, help="PNG (default: next to --out)")
    ap.add_argument("--verbose", action="store_true", help="show the servers' logs")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON", help="merge the reports of several runs")
    ap.add_argument("--serve-random", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=8000, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.page_size is None:
        args.page_size = 16 if args.model == "tiny" and not args.serve_random else 256
    if args.serve_random:
        return serve_random(args)
    if args.combine:
        out = Path(args.out or "benchmarks/results/serving.json")
        finish(combine(args.combine), out, Path(args.plot) if args.plot else None)
        return 0
    if args.model == "tiny" and args.budget == "2048":
        args.budget = "32"  # (a budget the tiny model's short outputs go past)
    out = Path(args.out or f"benchmarks/results/serving_{args.model}.json")
    report = dict(model=args.model, input_len=args.input_len, output_len=args.output_len, rates=args.rates,
                  duration_s=args.duration, drain_s=args.drain, itl_slo_ms=args.itl_slo_ms, kv_gib=args.kv_gib,
                  budget=args.budget, page_size=args.page_size, systems={})
    vocab = 256 if args.model == "tiny" else 151_000
    with tempfile.TemporaryDirectory() as tmp:
        folder = None
        if args.url is None and args.model == "tiny":
            from zipage.serve.tiny import save_tiny

            folder = save_tiny(Path(tmp) / "tiny")
        targets = [("server", None)] if args.url else [(s, args.budget if s == "zipage" else "none")
                                                         for s in args.systems]
        for system, budget in targets:
            proc = None
            if args.url:
                url, name = args.url, None
            else:
                print(f"{system}: starting the server (budget {budget})", flush=True)
                proc, url, name = start_server(args, budget, folder)
            try:
                if name is None:
                    import httpx

                    name = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
                warm_up(url, name, args, vocab)
                report["systems"][system] = sweep(url, name, args, vocab)
            finally:
                if proc is not None:
                    stop_server(proc)
    finish(report, out, Path(args.plot) if args.plot else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
