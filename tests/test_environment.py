"""The ``ZIPAGE_*`` environment variables: every one the library reads is checked where an engine or a cache is
built (a bad value refused by name on any machine), a misspelt one is warned about, and the guide's table
lists exactly the variables the library knows."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from zipage.environment import ELSEWHERE, VARIABLES, check_environment

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "ZIPAGE_ALLOW_LONG_MAX_MODEL_LEN": ["", "0", "1"],
    "ZIPAGE_FRESH_PREFILL": ["", "0", "1", " 1 "],
    "ZIPAGE_PREFILL_KERNEL": ["v1", "v2", "v2:m64n64w4s3-tma"],
    "ZIPAGE_FP8_DECODE": ["", "num_warps=4"],
    "ZIPAGE_DIM_MAJOR_VALUES": ["", "0", "1"],
    "ZIPAGE_STORE_LAUNCH": ["", "heads=2,split=1,warps=4"],
    "ZIPAGE_FP8_SCALE_STEPS": ["", "1", "64"],
    "ZIPAGE_FP8_QUERY_WEIGHTS": ["0", "1", "calibrated"],
    "ZIPAGE_INT8_ROTATION": ["0", "1"],
    "ZIPAGE_FP8_ROTATION": ["0", "1"],
    "ZIPAGE_EXACT_TAIL_KERNEL": ["triton", "torch"],
    "ZIPAGE_GENERATE_ATTENTION": ["auto", "paged", "dense"],
    "ZIPAGE_DENSE_CUDNN": ["0", "1"],
    "ZIPAGE_DISABLE_TRITON": ["", "0", "1"],
    "ZIPAGE_CACHE": ["/tmp/anything"],
    "ZIPAGE_API_KEY": ["any key"],
}
BAD = {
    "ZIPAGE_ALLOW_LONG_MAX_MODEL_LEN": "yes",
    "ZIPAGE_FRESH_PREFILL": "true",
    "ZIPAGE_PREFILL_KERNEL": "v2:m64",
    "ZIPAGE_FP8_DECODE": "warps=4",
    "ZIPAGE_DIM_MAJOR_VALUES": "2",
    "ZIPAGE_STORE_LAUNCH": "lanes=2",
    "ZIPAGE_FP8_SCALE_STEPS": "65",
    "ZIPAGE_FP8_QUERY_WEIGHTS": "on",
    "ZIPAGE_INT8_ROTATION": "yes",
    "ZIPAGE_FP8_ROTATION": "",
    "ZIPAGE_EXACT_TAIL_KERNEL": "cuda",
    "ZIPAGE_GENERATE_ATTENTION": "bogus",
    "ZIPAGE_DENSE_CUDNN": "2",
    "ZIPAGE_DISABLE_TRITON": "true",
}


def test_every_variable_has_good_and_bad_cases():
    assert set(GOOD) == set(VARIABLES)
    assert set(BAD) == set(VARIABLES) - {"ZIPAGE_CACHE", "ZIPAGE_API_KEY"}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_values_the_guide_lists_pass(name):
    for value in GOOD[name]:
        check_environment({name: value})


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_refused_by_name(name):
    with pytest.raises(ValueError, match=re.escape(name)):
        check_environment({name: BAD[name]})


def test_a_misspelt_name_is_warned_about_with_the_nearest_one():
    with pytest.warns(UserWarning, match="ZIPAGE_FRESH_PREFIL .*did you mean ZIPAGE_FRESH_PREFILL"):
        check_environment({"ZIPAGE_FRESH_PREFIL": "1", "PATH": "/bin"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_environment({name: "x" for name in ELSEWHERE})  # (read by tests, benchmarks, the Space)


def test_engine_and_cache_refuse_a_bad_value_before_their_path_runs(monkeypatch):
    """A prefill kernel's choice is read only on a GPU prefill: on a CPU it used to pass unseen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from zipage import LLM, ZipageCache

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    monkeypatch.setenv("ZIPAGE_PREFILL_KERNEL", "bogus")
    with pytest.raises(ValueError, match="ZIPAGE_PREFILL_KERNEL"):
        LLM(model, budget=32, page_size=16, num_pages=8)
    with pytest.raises(ValueError, match="ZIPAGE_PREFILL_KERNEL"):
        ZipageCache(config=config, budget=32)
    monkeypatch.setenv("ZIPAGE_PREFILL_KERNEL", "v2")
    monkeypatch.setenv("ZIPAGE_DISABLE_TRITON", "true")
    with pytest.raises(ValueError, match="ZIPAGE_DISABLE_TRITON"):
        LLM(model, budget=32, page_size=16, num_pages=8)


def test_the_guide_s_table_lists_the_variables_the_library_reads():
    text = (ROOT / "docs" / "guide" / "engine.md").read_text()
    table = text.split("## Environment variables", 1)[1]
    rows = set(re.findall(r"^\| `(ZIPAGE_[A-Z0-9_]+)`(?:, `(ZIPAGE_[A-Z0-9_]+)`)?", table, re.M))
    listed = {name for row in rows for name in row if name}
    assert listed == set(VARIABLES)
    read = set()
    for folder in ("src", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            source = path.read_text()
            read |= set(re.findall(r"environ\.get\(\s*\"(ZIPAGE_[A-Z0-9_]+)\"", source))
            read |= set(re.findall(r"environment\.value\(\s*\"(ZIPAGE_[A-Z0-9_]+)\"", source))
    read |= {"ZIPAGE_INT8_ROTATION", "ZIPAGE_FP8_ROTATION", "ZIPAGE_CACHE"}  # (names built from parts, a constant)
    assert read == set(VARIABLES)
