"""The continuous-batching engine: ``LLM`` and ``SamplingParams``."""

from .llm import LLM
from .parallel import TensorParallelError
from .sampling import SamplingParams
from .sequence import RequestOutput

__all__ = ["LLM", "RequestOutput", "SamplingParams", "TensorParallelError"]
