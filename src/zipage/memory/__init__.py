"""Where KV lives: the page pool (ids and reference counts)."""

from .pool import OutOfPagesError, PagePool

__all__ = ["OutOfPagesError", "PagePool"]
