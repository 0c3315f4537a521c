"""benchmarks/scorer_comparison.py: the default-against-every-scorer check and its report, on
hand-made results (the runs themselves are the quality benchmark's, smoke-tested elsewhere)."""

from __future__ import annotations

import json

import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def sc():
    return load_bench("scorer_comparison")


def row(config, frac, top1, kl, ppl):
    return {"config": config, "budget_frac": frac, "budget": 64, "top1": top1, "kl": kl, "ppl_ratio": ppl}


TF = {"seq_len": 1024, "sequences": [{"problems": [0, 3]}], "rows": [
    row("zipage", "1/8", 0.90, 0.10, 1.10), row("zipage", "1/4", 0.95, 0.05, 1.05),
    row("snapkv", "1/8", 0.89, 0.09, 1.11), row("snapkv", "1/4", 0.94, 0.06, 1.06),
    row("rkv", "1/8", 0.90, 0.12, 1.12), row("rkv", "1/4", 0.96, 0.05, 1.04),
    row("zipage[recent=0]", "1/8", 0.99, 0.01, 1.01), row("zipage[recent=0]", "1/4", 0.99, 0.01, 1.01),
]}


def test_compare_default_names_every_scorer_that_beats_it(sc):
    checks = {(c["budget_frac"], c["metric"]): c for c in sc.compare_default(TF)}
    assert len(checks) == 6
    assert checks[("1/8", "top-1")]["ok"]  # a tie is at least as good; variants (name[...]) are not scorers
    assert checks[("1/8", "KL")]["beaten_by"] == ["snapkv"]
    assert checks[("1/8", "ppl ratio")]["ok"]
    assert checks[("1/4", "top-1")]["beaten_by"] == ["rkv"]
    assert checks[("1/4", "KL")]["ok"]
    assert checks[("1/4", "ppl ratio")]["beaten_by"] == ["rkv"] and checks[("1/4", "ppl ratio")]["best_other_value"] == 1.04


def test_report_states_the_misses(sc, tmp_path):
    res = {"model": "smollm2", "model_title": "SmolLM2-135M-Instruct", "dataset": "math_train", "default": "zipage",
           "command": "python benchmarks/scorer_comparison.py", "seconds": 1.0, "environment": {"threads": 2},
           "teacher_forced": TF}
    path = tmp_path / "smollm2_math_train.json"
    path.write_text(json.dumps(res))
    md = sc.report([path])
    assert "| **zipage** (default) |" in md
    assert "1/8 KL: snapkv" in md and "1/4 top-1: rkv" in md
    assert "| SmolLM2-135M-Instruct | MATH train solutions | 3 of 6 |" in md


def test_rows_take_scorer_knobs(sc):
    label, fields = sc.Q.parse_row("rkv[rkv_lambda=0.2,pooling=none]")
    assert label == "rkv[rkv_lambda=0.2,pooling=none]"
    assert fields == {"scorer": "rkv", "pooling": "none", "extra": {"rkv_lambda": 0.2}}
    with pytest.raises(ValueError, match="unknown ZipageConfig field.*rkv_lambda"):  # a knob of another scorer
        sc.Q.parse_row("snapkv[rkv_lambda=0.2]")
    with pytest.raises(ValueError, match="has the knobs"):
        sc.Q.parse_row("rkv[rkv_lamda=0.2]")


def test_candidates_are_shown_not_counted(sc):
    tf = {**TF, "rows": TF["rows"] + [row("zmix", "1/8", 0.99, 0.01, 1.01), row("zmix", "1/4", 0.99, 0.01, 1.01)]}
    library = {"zipage", "snapkv", "rkv"}
    checks = {(c["budget_frac"], c["metric"]): c for c in sc.compare_default(tf, "zipage", library)}
    assert checks[("1/8", "top-1")]["ok"] and checks[("1/8", "KL")]["beaten_by"] == ["snapkv"]
    assert sc.compare_default(tf)[0]["beaten_by"] == ["zmix"]  # without the library, any plain name counts
    # (cells, cells at least as good as every other scorer, cells at least as good as the default)
    assert sc.standing(tf, "rkv", "zipage", library) == (6, 4, 4)
    assert sc.standing(tf, "zipage", "zipage", library) == (6, 3, 6)
    assert sc.standing(tf, "zmix", "zipage", library) == (6, 6, 6)


def test_runs_on_other_sequences_are_pooled(sc, tmp_path):
    def result(skip, top1, spans):
        tf = {"seq_len": 1024, "sequences": [{"problems": spans}], "rows": [
            {**row(c, "1/8", top1, 0.1, 1.1), "positions": 10, "per_sequence": [{"top1": top1, "kl": 0.1, "ppl_ratio": 1.1}]}
            for c in ("zipage", "snapkv")]}
        return {"model": "smollm2", "model_title": "SmolLM2-135M-Instruct", "dataset": "math500", "default": "zipage",
                "command": f"run {skip}", "seconds": 1.0, "environment": {"threads": 1}, "settings": {"skip": skip},
                "teacher_forced": tf}

    pooled = sc.pool([result(0, 0.9, [0, 3]), result(1, 0.8, [4, 7])])
    rows = pooled["teacher_forced"]["rows"]
    assert [r["config"] for r in rows] == ["zipage", "snapkv"]
    assert rows[0]["top1"] == pytest.approx(0.85) and rows[0]["positions"] == 20 and len(rows[0]["per_sequence"]) == 2
    assert len(pooled["teacher_forced"]["sequences"]) == 2 and pooled["seconds"] == 2.0
    with pytest.raises(ValueError, match="share sequences"):
        sc.pool([result(0, 0.9, [0, 3]), result(0, 0.9, [0, 3])])
    for skip, top1 in ((0, 0.9), (1, 0.8)):
        (tmp_path / f"r{skip}.json").write_text(json.dumps(result(skip, top1, [4 * skip, 4 * skip + 3])))
    md = sc.report(sorted(tmp_path.glob("*.json")))
    assert "2 sequences x 1024 tokens (problems 0-3, 4-7 of `math500`)" in md and "Command: `run 0` and `run 1`" in md


def test_second_sample_alone_and_pooled(sc, tmp_path):
    def result(top1_snapkv, spans):
        tf = {"seq_len": 1024, "sequences": [{"problems": spans}], "rows": [
            {**row(c, "1/8", t, 0.1, 1.1), "positions": 10, "per_sequence": [{"top1": t, "kl": 0.1, "ppl_ratio": 1.1}]}
            for c, t in (("zipage", 0.90), ("snapkv", top1_snapkv))]}
        return {"model": "smollm2", "model_title": "SmolLM2-135M-Instruct", "dataset": "math500", "default": "zipage",
                "command": "run", "seconds": 1.0, "environment": {"threads": 1}, "teacher_forced": tf}

    path = tmp_path / "smollm2_math500_skip1.json"
    path.write_text(json.dumps(result(0.92, [4, 7])))  # snapkv ahead on the second sample, behind on the pooled one
    lines = sc.second_sample([path], {("smollm2", "math500"): result(0.80, [0, 3])}, {"zipage", "snapkv"})
    assert lines[-1] == "| SmolLM2-135M-Instruct | MATH-500 solutions | zipage, snapkv | 2 of 3 | 3 of 3 | nowhere |"


def test_budget_share_candidate_switches_per_sequence():
    """benchmarks/scorer_candidates.py's ``zbudget``: a sequence whose budget is at least
    ``pooling_all_from`` of its stored tokens gets the pooled window attention at every compression,
    the others the default scorer's unpooled one; below the share it reads ``early_window`` queries."""
    import torch

    from zipage import ZipageConfig
    from zipage.kernels import pool_scores, window_scores
    from zipage.scoring import get_scorer
    from zipage.scoring.base import ScoreInputs
    from zipage.scoring.zipage import _recent_first

    from zipage.scoring import _REGISTRY

    saved = dict(_REGISTRY)
    try:  # the candidates register themselves; the library's registry is put back after
        load_bench("scorer_candidates")
        _check_zbudget(torch, ZipageConfig, pool_scores, window_scores, get_scorer, ScoreInputs, _recent_first)
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def _check_zbudget(torch, ZipageConfig, pool_scores, window_scores, get_scorer, ScoreInputs, _recent_first):
    torch.manual_seed(0)
    B, H, G, S, D, w = 2, 2, 2, 40, 8, 4
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :10] = False  # row 1 stores 30 tokens: 24 / 30 = 0.8; row 0: 24 / 40 = 0.6
    x = ScoreInputs(keys=torch.randn(B, H, S, D), values=None, queries=torch.randn(B, H * G, w, D), key_mask=mask,
                    query_mask=torch.ones(B, w, dtype=torch.bool), scaling=D**-0.5, page_size=8, first=False)
    cfg = ZipageConfig(budget=24, page_size=8, window=w, recent=0,
                       extra={"pooling_all_from": 0.75, "early_window": 2})
    got, _ = get_scorer("zbudget", cfg)(x)
    full = window_scores(x.queries, x.keys, mask, x.query_mask, x.scaling, "mean", "mean")
    narrow = window_scores(x.queries[:, :, -2:], x.keys, mask, x.query_mask[:, -2:], x.scaling, "mean", "mean")
    torch.testing.assert_close(got[1], _recent_first(pool_scores(full, 5, "max"), 0)[1])  # large share: pooled
    torch.testing.assert_close(got[0], narrow[0])  # small share: unpooled, the last 2 queries
    with pytest.raises(ValueError, match="pooling_all_from"):
        get_scorer("zbudget", ZipageConfig(budget=24, page_size=8))(x)


def _tiny_run(sc, monkeypatch):
    """scorer_comparison.py's run on a tiny random Llama and random token sequences (one per text and
    seed: the run's own code from the sequences on, no model or text package needed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048))
    model.eval()

    def sequences(tok, count, length, split="math500"):
        g = torch.Generator().manual_seed(len(split))
        return (torch.randint(3, 96, (count, length), generator=g),
                [{"problems": [i, i], "unique_id_first": None} for i in range(count)])

    def load(name, threads):
        if threads:
            torch.set_num_threads(threads)
        return model, None

    monkeypatch.setattr(sc, "load", load)
    monkeypatch.setattr(sc.Q, "build_sequences", sequences)


def test_positions_recompute_the_reported_aggregates(sc, tmp_path, monkeypatch):
    """--positions saves every scored position's values; the run's top-1, KL and perplexity ratio
    recomputed from them are exactly the reported ones; --significance reads them."""
    import torch

    _tiny_run(sc, monkeypatch)
    pos = tmp_path / "pos.pt"
    common = ["--model", "smollm2", "--seq-len", "256", "--seqs", "2", "--budgets", "1/4,1/2", "--buffer", "32",
              "--only", "zipage,snapkv,streaming", "--threads", "1"]
    assert sc.main(common + ["--out", str(tmp_path / "with"), "--positions", str(pos)]) == 0
    data = sc.load_positions(pos)
    assert set(data["datasets"]) == {"math_train", "math500"} and data["seq_len"] == 256
    for dataset in ("math_train", "math500"):
        res = json.loads((tmp_path / "with" / f"smollm2_{dataset}.json").read_text())
        assert "positions" in res["settings"] and "seed" not in res["settings"]
        part = data["datasets"][dataset]
        assert part["sequences"] == res["teacher_forced"]["sequences"]
        for r in res["teacher_forced"]["rows"]:
            entry = part["rows"][r["config"]][r["budget_frac"]]
            assert entry["start"] == r["budget"] + 32 and entry["kl"].shape == (2, 256 - 1 - entry["start"])
            assert entry["top1"].dtype == torch.bool
            got = sc.position_aggregates(entry)
            for key in ("positions", "top1", "kl", "ppl_ratio", "per_sequence"):
                assert got[key] == r[key], (dataset, r["config"], r["budget_frac"], key)
    # without --positions: the same numbers, and the settings of before (no analysis options)
    assert sc.main(common + ["--out", str(tmp_path / "without")]) == 0
    for dataset in ("math_train", "math500"):
        a = json.loads((tmp_path / "with" / f"smollm2_{dataset}.json").read_text())
        b = json.loads((tmp_path / "without" / f"smollm2_{dataset}.json").read_text())
        assert not set(b["settings"]) & {"positions", "significance", "significance_out", "resamples", "block",
                                         "seed", "default"}
        strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
        assert strip(a["teacher_forced"]["rows"]) == strip(b["teacher_forced"]["rows"])

    stem = tmp_path / "sig"
    assert sc.main(["--significance", str(pos), "--significance-out", str(stem), "--resamples", "2000"]) == 0
    cells = json.loads(stem.with_suffix(".json").read_text())["cells"]
    assert len(cells) == 2 * 2 * 2 * 3  # texts x budgets x other rows x metrics
    assert cells == json.loads(json.dumps(sc.significance([pos], resamples=2000)))  # deterministic
    res = json.loads((tmp_path / "with" / "smollm2_math500.json").read_text())
    by = {(r["config"], r["budget_frac"]): r for r in res["teacher_forced"]["rows"]}
    for c in cells:
        if c["dataset"] == "math500":
            sign = 1 if c["key"] == "top1" else -1
            assert c["diff"] == pytest.approx(sign * (by[(c["other"], c["budget_frac"])][c["key"]]
                                                      - by[("zipage", c["budget_frac"])][c["key"]]), abs=1e-12)
        assert c["ci_low"] <= c["ci_high"]
    assert "| model | text |" in stem.with_suffix(".md").read_text()


def test_significance_verdicts_on_made_up_positions(sc, tmp_path):
    """A row identical to the default is never significant; one better at every position is; the
    interval comes from the paired bootstrap (a shared offset cancels)."""
    import torch

    g = torch.Generator().manual_seed(0)
    s, n = 2, 640
    full = -torch.rand(s, n, generator=g) * 3
    noise = torch.rand(s, n, generator=g)

    def entry(top1_p, kl_scale, gap):
        return {"start": 100, "top1": noise < top1_p, "kl": (noise * kl_scale).float(),
                "logp_comp": (full - gap - noise * 0.1).float(), "logp_full": full}

    d = entry(0.8, 0.10, 0.05)
    rows = {"zipage": {"1/4": d}, "same": {"1/4": {k: (v.clone() if torch.is_tensor(v) else v) for k, v in d.items()}},
            "better": {"1/4": entry(0.9, 0.05, 0.01)}, "worse": {"1/4": entry(0.7, 0.20, 0.10)}}
    path = tmp_path / "made_up.pt"
    torch.save({"format": "zipage scorer positions v1", "model": "smollm2", "model_title": "m", "seq_len": n + 101,
                "datasets": {"math500": {"sequences": [{}, {}], "rows": rows}}}, path)
    cells = {(c["other"], c["key"]): c for c in sc.significance([path], resamples=2000)}
    for key in ("top1", "kl", "ppl_ratio"):
        assert cells[("same", key)]["verdict"] == "not significant" and cells[("same", key)]["diff"] == 0
        assert cells[("better", key)]["verdict"] == "other significantly better" and cells[("better", key)]["ci_low"] > 0
        assert cells[("worse", key)]["verdict"] == "default significantly better"
    assert cells[("better", "top1")]["diff"] == pytest.approx(0.1, abs=0.03)
    md = sc.significance_markdown(list(cells.values()))
    assert "| m | MATH-500 solutions | same, better, worse | 3 of 3 | 1/4 top-1: better (+" in md


def test_significance_summary_counts_cells_and_the_corrected_level():
    """The report's significance section: a marginal win is significant at 95% but not after a
    Bonferroni correction over the comparisons; a wide margin survives it and fails the claim."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "scorer_comparison_summary", Path(__file__).resolve().parents[1] / "benchmarks" / "scorer_comparison.py")
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)

    def cell(diff, low, high, verdict, budget="1/4"):
        return dict(model_title="M", dataset="math500", budget_frac=budget, metric="KL", other="snapkv", diff=diff,
                    ci_low=low, ci_high=high, verdict=verdict, level=0.95)

    filler = [cell(-0.01, -0.02, -0.001, "default significantly better", "1/16") for _ in range(98)]
    marginal = sc.significance_summary([cell(0.0083, 0.0001, 0.0196, "other significantly better")] + filler)
    text = "\n".join(marginal)
    assert "| M | MATH-500 solutions | 1 of 12 | 1 of 12 |" in text and text.count("| 0 |") == 1
    assert "holds on these data" in text
    wide = sc.significance_summary([cell(0.05, 0.04, 0.06, "other significantly better")] + filler)
    assert "fails in 1 cell(s)" in "\n".join(wide)
