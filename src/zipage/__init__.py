"""zipage: Compressed PagedAttention for LLM reasoning, for Hugging Face transformers.

``import zipage`` makes ``model.generate(..., cache_implementation="zipage")`` available.
"""

from .cache import ZipageCache, ZipageLayer
from .config import ZipageConfig
from .engine import LLM, RequestOutput, SamplingParams, TensorParallelError
from .hf import register as _register_generate_hook
from .memory import OutOfPagesError, PagePool
from .scoring import Scorer, ScoreInputs, get_scorer, list_scorers, register_scorer

__version__ = "0.1.0.dev0"

_register_generate_hook()

__all__ = [
    "LLM",
    "RequestOutput",
    "SamplingParams",
    "TensorParallelError",
    "OutOfPagesError",
    "PagePool",
    "ScoreInputs",
    "Scorer",
    "ZipageCache",
    "ZipageConfig",
    "ZipageLayer",
    "__version__",
    "get_scorer",
    "list_scorers",
    "register_scorer",
]
