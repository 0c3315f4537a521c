"""LLM("path") loading: a missing local path is named as such, not reported as a bad Hub repo id."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from zipage.engine.loading import load_model, looks_like_path


@pytest.mark.parametrize("name", ["/missing/path", "./nope", "../nope", "~/zipage-missing-model", "a/b/c",
                                  "models\\qwen", "C:/models/qwen", "dir/", Path("relative-missing")])
def test_a_missing_path_says_it_does_not_exist(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(name)
    with pytest.raises(FileNotFoundError) as err:
        load_model(name)
    assert "does not exist" in str(err.value) and repr(str(name)) in str(err.value)


@pytest.mark.parametrize("name", ["gpt2", "Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct", "org_1/model.v2"])
def test_hub_repo_ids_are_not_paths(name):
    assert not looks_like_path(name)


def test_a_local_folder_loads_and_a_file_is_refused(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer = object()  # given: none is loaded
    loaded, tok = load_model(str(tmp_path / "ckpt"), dtype=torch.float32, tokenizer=tokenizer)
    assert tok is tokenizer
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # no Hub kernels swapped in (transformers 5.25's default): the engine fuses the stock modules' code
    assert getattr(loaded, "use_kernels", False) is False
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_model(str(tmp_path / "ckpt" / "config.json"))
