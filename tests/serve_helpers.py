"""Servers for the serving tests: in a thread of this process, or ``zipage serve`` in a subprocess
(both on 127.0.0.1), and a /metrics reader."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx


@contextmanager
def thread_server(llm, config):
    """The app over ``llm`` under uvicorn in a thread, on a free port; yields ``(base_url, engine)``."""
    import uvicorn

    from zipage.serve import AsyncEngine, build_app

    engine = AsyncEngine(llm)
    server = uvicorn.Server(uvicorn.Config(build_app(engine, config), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(30)
        assert not engine.thread.is_alive(), "the engine loop outlived the app"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def subprocess_server(args: list[str], env: dict | None = None, timeout: float = 180):
    """``zipage serve ARGS --port P`` in a subprocess; yields ``(base_url, process)``. The process gets
    SIGTERM at the end (and SIGKILL if it does not stop)."""
    port = free_port()
    cmd = [sys.executable, "-m", "zipage", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    log = open(os.devnull, "w") if env is None or not env.get("ZIPAGE_TEST_LOG") else None
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT if log else None)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"zipage serve exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("zipage serve did not start in time")
            time.sleep(0.25)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not None:
            log.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(url: str) -> dict[str, float]:
    """/metrics as ``{name{labels}: value}`` and ``{name: sum over labels}``."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
            out[name + labels] = value
            out[name] = out.get(name, 0.0) + value
    return out


def wait_for(predicate, timeout: float = 30, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)
