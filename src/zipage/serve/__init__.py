"""``zipage serve``: an OpenAI-compatible server over the engine (FastAPI + uvicorn, ``zipage[serve]``).

``build_app(AsyncEngine(llm), ServeConfig(...))`` is the app; ``server.serve`` runs it.
"""

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # (the CLI says the same before importing this)
    raise ImportError(f"zipage.serve needs the serve extra: pip install 'zipage[serve]' ({e})") from e

from .app import build_app
from .engine_client import AsyncEngine
from .generation import ServeConfig

__all__ = ["AsyncEngine", "ServeConfig", "build_app"]
