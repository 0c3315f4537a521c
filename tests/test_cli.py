"""The ``zipage`` command line: info, and the bench / eval subcommands that forward to the benchmark scripts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from zipage.cli import BENCHMARKS, main


def test_subcommands_are_listed(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "bench", "eval", "info"):
        assert command in out


def test_benchmarks_are_packaged():
    import zipage.bench.accuracy as accuracy
    import zipage.bench.quality as quality
    import zipage.bench.throughput as throughput

    assert callable(quality.main) and callable(throughput.main) and callable(accuracy.main)
    assert set(BENCHMARKS) == {"bench", "eval"}


@pytest.mark.parametrize("command, option", [("bench", "--kv-gib"), ("bench", "--max-tokens"), ("bench", "--dataset"),
                                             ("bench", "--ignore-eos"), ("eval", "--budgets"), ("eval", "--dataset"),
                                             ("eval", "--mode"), ("eval --mode fidelity", "--no-gen"),
                                             ("eval --mode fidelity", "--model"), ("demo", "--budget")])
def test_help_shows_the_script_options(command, option, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: zipage {command.split()[0]}" in out
    assert option in out


def test_bad_option_is_refused_by_the_script(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--no-such-option"])
    assert e.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_bench_without_cuda_says_so():
    with pytest.raises(SystemExit) as e:
        main(["bench", "--requests", "2", "--max-tokens", "8"])
    assert e.value.code not in (0, None)
    assert "CUDA" in str(e.value.code)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_bench_process_exits_nonzero_without_cuda():
    r = subprocess.run([sys.executable, "-m", "zipage.cli", "bench"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "CUDA" in r.stderr


def test_info_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CUDA available" in out and "scorers:" in out


@pytest.mark.parametrize("args, message", [
    (["--budgets", "2"], "must lie in (0, 1)"),
    (["--scorers", "foo"], "unknown scorer"),
    (["--scorers", "zipage[budgett=3]"], "unknown ZipageConfig field"),
    (["--gen-budgets", "x", "--no-tf"], "--gen-budgets"),
    (["--seqs", "0", "--no-gen"], "--seqs 0"),
    (["--replot", "/nonexistent/q.json"], "no such file"),
    (["--verify", "zipage", "--budgets", "1/4"], "--verify-budget"),
    (["--verify", "nope", "--budgets", "1/8", "--scorers", "zipage"], "not rows of this run"),
])
def test_eval_refuses_bad_arguments_before_loading_the_model(args, message, capsys, monkeypatch, tmp_path):
    import zipage.bench.quality as quality

    monkeypatch.setattr(quality, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        main(["eval", *args, "--out", str(tmp_path / "q")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_refuses_a_negative_index_and_takes_window_and_seed(capsys, monkeypatch):
    from zipage import demo

    with pytest.raises(SystemExit) as e:
        main(["demo", "--index", "-5"])
    assert e.value.code == 2
    assert "zipage demo: error: --index -5" in capsys.readouterr().err
    args = demo.build_parser().parse_args(["--budget", "8", "--window", "4", "--seed", "3"])
    assert (args.window, args.seed) == (4, 3)
    with pytest.raises(SystemExit) as e:  # a window larger than the budget names the option to change
        demo.main(["--budget", "8"])
    assert e.value.code == 2
    assert "window" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"]])
def test_help_imports_neither_torch_nor_the_library(argv):
    """``zipage --help`` and ``zipage serve --help`` answer without importing torch, transformers, the
    zipage package or the server's packages."""
    code = (f"import sys, zipage_cli\n"
            f"try:\n    zipage_cli.main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'zipage', 'fastapi', 'uvicorn') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"usage: zipage{' serve' if argv[0] == 'serve' else ''}" in r.stdout and r.stdout.strip().endswith("[]")
    if argv[0] == "serve":
        for flag in ("--served-model-name", "--api-key", "--max-num-seqs", "--enable-prefix-caching",
                     "--no-enable-prefix-caching", "--enforce-eager", "--budget", "--page-size", "--scorer",
                     "--max-budget", "--max-waiting", "--gpu-memory-utilization", "--num-pages", "--dtype",
                     "--allowed-origins", "--max-request-bytes"):
            assert flag in r.stdout, flag


def test_serve_refuses_bad_options_before_loading(capsys):
    from zipage_cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--budget", "0"])
    assert e.value.code == 2 and "--budget" in capsys.readouterr().err
    assert main(["serve", "--budget", "none", "--max-budget", "64"]) == 2
    assert "--max-budget" in capsys.readouterr().err


def test_python_dash_m_zipage_runs_the_command():  # (python -m zipage.cli: test_bench_process_exits_...)
    r = subprocess.run([sys.executable, "-m", "zipage", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: zipage" in r.stdout and "info" in r.stdout


@pytest.mark.parametrize("command", ["bench", "eval", "eval --mode fidelity"])
def test_every_benchmark_option_has_a_help_text_that_shows_its_default(command):
    import argparse

    from zipage_cli import HelpFormatter

    import zipage.bench.accuracy as accuracy
    import zipage.bench.quality as quality
    import zipage.bench.throughput as throughput

    parser = {"bench": throughput, "eval": accuracy, "eval --mode fidelity": quality}[command].build_parser()
    assert parser.formatter_class is HelpFormatter
    formatter = HelpFormatter(prog="zipage")
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert len(options) > 5
    for action in options:
        assert action.help, f"{action.option_strings} has no help text"
        shown = formatter._get_help_string(action)
        assert "default" in shown, f"{action.option_strings} does not show its default"
        if action.default not in (None, False):
            assert "%(default)s" in shown or str(action.default) in shown
