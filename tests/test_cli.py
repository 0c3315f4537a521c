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
    import zipage.bench.quality as quality
    import zipage.bench.throughput as throughput

    assert callable(quality.main) and callable(throughput.main)
    assert set(BENCHMARKS) == {"bench", "eval"}


@pytest.mark.parametrize("command, option", [("bench", "--kv-gib"), ("bench", "--max-tokens"),
                                             ("eval", "--budgets"), ("eval", "--no-gen")])
def test_help_shows_the_script_options(command, option, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: zipage {command}" in out
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
