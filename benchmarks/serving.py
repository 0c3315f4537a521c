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
disconnects) and count in the tokens they produced. With ``--staircase`` the rates run back to
back in one arrival stream, each measured over its own window, and the run stops after the first
rate not sustained: each rate starts from the load the previous one left, so long requests near
their steady state in one call. A system sustains a rate when the p99 ITL stays under
``--itl-slo-ms`` (100 ms), no request fails, and at least 95% of the rate's arrivals get their
first token within ``--ttft-slo-s`` (10 s; it keeps up with the arrivals, its queue does not
grow). Writes JSON and a plot (and, for a staircase, the server's running and waiting requests
over time from its /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # as a script (python benchmarks/serving.py) or as a module (zipage.bench.serving)
    from serving_load import Result, one_request, prompts_for, run_stages
    from serving_report import combine, finish
except ImportError:
    from .serving_load import Result, one_request, prompts_for, run_stages
    from .serving_report import combine, finish

# ----------------------------------------------------------------------------- the load
def sweep(url: str, model: str, args, vocab: int, deadline: float | None) -> tuple[list[dict], list[list[float]]]:
    """Rows (one per rate) and the /metrics timeline (staircase only)."""
    common = dict(drain=args.drain, output_len=args.output_len, input_len=tuple(args.input_len), vocab=vocab,
                  itl_slo_ms=args.itl_slo_ms, ttft_slo_s=args.ttft_slo_s, log=lambda m: print(m, flush=True))
    if args.staircase:
        return asyncio.run(run_stages(url, model, [(r, args.duration) for r in args.rates], seed=args.seed,
                                      stop_on_failure=True, deadline=deadline, **common))
    rows = []
    for i, rate in enumerate(args.rates):
        got, _ = asyncio.run(run_stages(url, model, [(rate, args.duration)], seed=args.seed + i,
                                        stop_on_failure=False, extend_last=True, **common))
        rows += got
    return rows, []


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
    """Two requests first, long enough for a compression: kernel compilation and CUDA-graph capture stay
    out of the timing."""
    import httpx

    length = min(args.output_len, 64 if args.model == "tiny" else 2400)
    prompts = prompts_for(2, tuple(args.input_len), vocab, seed=7)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(None)) as client:
            results = [Result(time.perf_counter(), len(p)) for p in prompts]
            await asyncio.gather(*(one_request(client, url, name, p, length, r) for p, r in zip(prompts, results)))
            errors = [r.error for r in results if r.error]
            if errors:
                raise RuntimeError(f"the warm-up failed: {errors[0]}")

    asyncio.run(run())


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
    ap.add_argument("--ttft-slo-s", type=float, default=10.0,
                    help="a rate is kept up when 95%% of its arrivals start within this (a queue that does not grow)")
    ap.add_argument("--staircase", action="store_true",
                    help="the rates back to back in one arrival stream, stopping after the first not sustained")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds for the whole run: stages that would end later are not run (staircase)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=None, help="JSON (default: benchmarks/results/serving_<model>.json)")
    ap.add_argument("--plot", default=None, help="PNG (default: next to --out)")
    ap.add_argument("--verbose", action="store_true", help="show the servers' logs")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON", help="merge the reports of several runs")
    ap.add_argument("--serve-random", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=8000, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    began = time.perf_counter()
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
                  duration_s=args.duration, drain_s=args.drain, itl_slo_ms=args.itl_slo_ms,
                  ttft_slo_s=args.ttft_slo_s, mode="staircase" if args.staircase else "separate", timeline={},
                  kv_gib=None if args.model == "tiny" else args.kv_gib,
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
                deadline = None if args.time_limit is None else began + args.time_limit - 30.0  # (shutdown)
                rows, timeline = sweep(url, name, args, vocab, deadline)
                report["systems"][system] = rows
                if timeline:
                    report["timeline"][system] = timeline
            finally:
                if proc is not None:
                    stop_server(proc)
    finish(report, out, Path(args.plot) if args.plot else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
