"""Tensor parallelism on two GPUs (NCCL): the CPU file's equivalences with CUDA graphs, asynchronous
compression and NCCL. Needs two CUDA GPUs: ``NCCL_NVLS_ENABLE=0 pytest -m gpu tests/test_tensor_parallel_gpu.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_model
from test_engine import prompts_of

from zipage import LLM, SamplingParams
from zipage.engine.parallel import TensorParallelError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

SETTINGS = dict(budget=16, page_size=8, buffer=8, window=4, num_pages=128, max_num_seqs=4, enable_prefix_caching=True)


@pytest.mark.parametrize("enforce_eager", [False, True])
@pytest.mark.parametrize("async_compression", [False, True])
def test_two_gpus_give_the_tokens_of_one(enforce_eager, async_compression):
    shared = prompts_of((20,), seed=7)[0]
    prompts = prompts_of((30,), seed=2) + prompts_of((9, 14, 3, 6, 11), seed=1, prefix=shared)
    params = [SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, logprobs=2)] * 4 + \
        [SamplingParams(max_tokens=48, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)] * 2
    kw = dict(SETTINGS, enforce_eager=enforce_eager, async_compression=async_compression)
    one = LLM(tiny_model("qwen3").cuda(), **kw).generate(prompts, params, use_tqdm=False)
    with LLM(tiny_model("qwen3").cuda(), tensor_parallel_size=2, **kw) as two_llm:
        two = two_llm.generate(prompts, params, use_tqdm=False)
        stats = two_llm.stats()
        assert stats["free_pages"] == stats["total_pages"] and stats["compressions"] > 0
        assert two_llm.use_graphs == (not enforce_eager)
    assert [o.token_ids for o in one] == [o.token_ids for o in two]
    for a, b in zip(one[:4], two[:4]):
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-3)


def test_more_ranks_than_gpus_is_refused():
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"needs {n + 1} GPUs from cuda:0, but only {n} GPUs are present"):
        LLM(tiny_model("qwen3", num_attention_heads=8 * (n + 1), num_key_value_heads=n + 1, head_dim=16,
                       intermediate_size=32 * (n + 1)).cuda(), num_pages=8, tensor_parallel_size=n + 1)


def test_a_failing_gpu_rank_stops_the_engine_without_waiting_for_the_timeout():
    llm = LLM(tiny_model("qwen3").cuda(), tensor_parallel_size=2, tensor_parallel_timeout=60, **SETTINGS)
    llm.ranks.send(("no such message",))
    with pytest.raises(TensorParallelError, match="rank 1 exited"):
        llm.generate([prompts_of((12,), seed=6)[0]], SamplingParams(max_tokens=8), use_tqdm=False)
    llm.close()
