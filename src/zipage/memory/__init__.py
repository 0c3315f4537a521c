"""Where KV lives: page pools (ids and reference counts) and prefix caching."""

from .block_manager import BlockManager, page_hash
from .pool import OutOfPagesError, PagePool

__all__ = ["BlockManager", "OutOfPagesError", "PagePool", "page_hash"]
