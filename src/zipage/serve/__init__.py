"""``zipage serve``: an OpenAI-compatible server over the engine (FastAPI + uvicorn, ``zipage[serve]``).

``build_app(AsyncEngine(llm), ServeConfig(...))`` is the app; ``server.serve`` runs it.
"""

from .app import build_app
from .engine_client import AsyncEngine
from .generation import ServeConfig

__all__ = ["AsyncEngine", "ServeConfig", "build_app"]
