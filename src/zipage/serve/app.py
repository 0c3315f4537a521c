"""The FastAPI app: OpenAI's endpoints over one engine loop, plus health, version and metrics.

    app = build_app(AsyncEngine(llm), ServeConfig(model_names=["m"], ...))

The app starts the engine loop when it starts (lifespan) and stops it when it stops, aborting
what is still in flight. Every ``/v1`` route, ``/tokenize`` and ``/detokenize`` need the API key when one is set.
"""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from .. import __version__
from .chat import create_chat_completion
from .completions import create_completion
from .engine_client import AsyncEngine
from .errors import error_response, install
from .generation import ServeConfig, check_model
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, detokenize, tokenize


TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize"})  # (vLLM's, outside /v1; the key guards them too)


class APIKey:
    """Every ``/v1`` route (and ``/tokenize``, ``/detokenize``) needs ``Authorization: Bearer KEY`` when the server
    has a key (a plain ASGI middleware: FastAPI's ``@app.middleware`` would hide client disconnects from the
    handlers)."""

    def __init__(self, app, config: ServeConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send) -> None:
        key = self.config.api_key
        if key and scope["type"] == "http" and (scope["path"].startswith("/v1") or scope["path"] in TOKENIZER_PATHS):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.strip().partition(b" ")  # (the scheme is case-insensitive: RFC 9110)
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key.encode()):
                what = "Missing" if not given else "Incorrect"
                response = error_response(401, f"{what} API key: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """A generation request's body over ``config.max_request_bytes`` gets a 413: at once when its Content-Length
    says so, else as soon as the bytes read pass the limit (the body is read here, whole, before the endpoint,
    which would read it whole too). Bodies sent to other routes are never read: their 404 or 405 comes without."""

    READ = frozenset({"/v1/completions", "/v1/chat/completions", *TOKENIZER_PATHS})  # (the POST routes: those
    # that read a body)

    def __init__(self, app, config: ServeConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.READ:
            return await self.app(scope, receive, send)
        limit = self.config.max_request_bytes
        length = dict(scope["headers"]).get(b"content-length", b"")
        too_large = length.isdigit() and int(length) > limit
        first: list[dict] = []
        if not too_large:
            body, size = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":  # (the client went: the app hears it)
                    first.append(message)
                    break
                body.append(message.get("body", b""))
                size += len(body[-1])
                if size > limit:
                    too_large = True
                    break
                if not message.get("more_body", False):
                    first.append({"type": "http.request", "body": b"".join(body), "more_body": False})
                    break
        if too_large:
            response = error_response(413, f"the request body is larger than this server's limit of {limit} bytes "
                                           "(--max-request-bytes)", code="request_too_large")
            return await response(scope, receive, send)

        async def replay():
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)


async def rendered(result: Any) -> Any:
    """A whole (non-streamed) answer as JSON by pydantic's own serializer: ``n`` samples of thousands of tokens
    with log-probabilities make tens of megabytes, which FastAPI's generic encoding took seconds over on the
    event loop, holding every stream meanwhile (31.6 MB: ~16 s against ~0.4 s; a worker thread would not free
    the loop, the serializer holds the GIL). Each choice is serialized on its own, with the loop given back
    between two, so other requests' streams wait for one choice at most (8 choices of 4,000 tokens with 20 top
    log-probabilities, 31.5 MB: the loop's longest hold 0.35 s whole, 0.044 s a choice at a time). Non-finite
    numbers become null, as in the streams."""
    if not isinstance(result, BaseModel):
        return result  # (a stream)
    choices = getattr(result, "choices", None)
    if not isinstance(choices, list) or len(choices) < 2:
        return Response(result.model_dump_json(), media_type="application/json")
    parts = []
    for choice in choices:
        parts.append(choice.model_dump_json())
        await asyncio.sleep(0)  # (the loop serves others between two choices)
    head = result.model_copy(update={"choices": []}).model_dump_json()
    empty = '"choices":[]'  # (a key: the same text inside a string value has its quotes escaped)
    at = head.index(empty)
    body = "".join((head[:at], '"choices":[', ",".join(parts), "]", head[at + len(empty):]))
    del parts  # (not held while the response encodes the body)
    return Response(body, media_type="application/json")


def build_app(engine: AsyncEngine, args: ServeConfig) -> FastAPI:
    """An app serving ``engine`` (whose loop it starts and stops) as ``args.model_names``."""
    if engine.metrics is None:
        engine.metrics = ServerMetrics(lambda: engine.stats, args.model_names[0])
    metrics: ServerMetrics = engine.metrics

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if not engine.thread.is_alive() and engine.dead is None:
            engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="zipage", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.config = args
    install(app)

    app.add_middleware(BodyLimit, config=args)  # (after the key check: a stranger's body is not read)
    app.add_middleware(APIKey, config=args)
    if args.allowed_origins:  # (added last, so it runs first: a preflight is answered before the key is asked for)
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(args.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.get("/health")
    async def health() -> Response:
        if engine.dead is not None or not engine.thread.is_alive():
            return error_response(503, f"the engine is not running: {engine.dead or 'not started'}")
        if engine.failing is not None:
            return error_response(503, f"the engine is not healthy: {engine.failing}")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=args.model_root, max_model_len=args.max_model_len)
                               for name in args.model_names])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        check_model(args, model_id)
        return ModelCard(id=model_id, root=args.model_root, max_model_len=args.max_model_len)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await rendered(await create_completion(req, raw, engine, args))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        return await rendered(await create_chat_completion(req, raw, engine, args))

    @app.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest, raw: Request) -> TokenizeResponse:
        return await tokenize(req, raw, args)

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest, raw: Request) -> DetokenizeResponse:
        return await detokenize(req, raw, args)

    return app
