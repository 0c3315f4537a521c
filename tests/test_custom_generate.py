"""The Hub custom_generate repo (integrations/hub/custom_generate/), loaded from its folder the way
transformers loads one from the Hub: its output is generate(cache_implementation="zipage")'s."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zipage
from conftest import tiny_model

REPO = Path(__file__).resolve().parents[1] / "integrations" / "hub" / "custom_generate"
PROMPT = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(1))


def _reference(model, inputs, **settings):
    return model.generate(inputs, cache_implementation="zipage", cache_config=settings, max_new_tokens=30,
                          do_sample=False, return_dict_in_generate=True)


def test_layout_is_what_transformers_loads():
    assert (REPO / "custom_generate" / "generate.py").is_file()
    assert (REPO / "custom_generate" / "requirements.txt").is_file()
    # the repo asks for the transformers versions zipage takes (pyproject.toml's range)
    requirements = (REPO / "custom_generate" / "requirements.txt").read_text().split()
    wanted = [line for line in requirements if "transformers" in line]
    pyproject = (REPO.parents[2] / "pyproject.toml").read_text()
    assert len(wanted) == 1 and f'"{wanted[0]}",' in pyproject, wanted
    readme = (REPO / "README.md").read_text()
    front = readme.split("---")[1]
    assert "custom_generate" in front and "library_name: transformers" in front
    for argument in ("budget", "page_size", "scorer", "buffer", "window", "zipage_config"):
        assert f"`{argument}`" in readme, argument


@pytest.mark.parametrize("settings", [dict(budget=16, page_size=4), dict(budget=12, page_size=4, window=4, scorer="snapkv")])
def test_output_equals_cache_implementation_zipage(settings):
    model = tiny_model("llama")
    out = model.generate(PROMPT, custom_generate=str(REPO), trust_remote_code=True, max_new_tokens=30,
                         do_sample=False, return_dict_in_generate=True, **settings)
    ref = _reference(model, PROMPT, **settings)
    assert torch.equal(out.sequences, ref.sequences)
    cache = out.past_key_values
    assert isinstance(cache, zipage.ZipageCache)
    assert cache.stats()["compressions"] >= 2  # the budget is small enough for compressions to run
    assert cache.zipage_config.budget == settings["budget"] and cache.zipage_config.scorer == settings.get("scorer", "zipage")
    # ... and differs from full KV there, so the comparison is not trivially true.
    plain = model.generate(PROMPT, max_new_tokens=30, do_sample=False)
    assert not torch.equal(plain, out.sequences)


def test_settings_as_one_config_and_sampling():
    model = tiny_model("llama")
    common = dict(max_new_tokens=20, do_sample=True, top_k=20)
    torch.manual_seed(5)
    out = model.generate(PROMPT, custom_generate=str(REPO), trust_remote_code=True,
                         zipage_config=zipage.ZipageConfig(budget=16, page_size=4), **common)
    torch.manual_seed(5)
    ref = model.generate(PROMPT, cache_implementation="zipage", cache_config={"budget": 16, "page_size": 4}, **common)
    assert torch.equal(out, ref)


def test_settings_from_a_generation_config_as_model_generate_reads_them():
    """zipage settings carried by a GenerationConfig (passed, or the model's own) are the ones used, as
    ``model.generate(generation_config=...)`` uses them: not the default budget."""
    import copy

    from transformers import GenerationConfig

    model = tiny_model("llama")
    config = GenerationConfig(max_new_tokens=30, do_sample=False, cache_implementation="zipage",
                              cache_config={"budget": 16, "page_size": 4})
    ref = model.generate(PROMPT, generation_config=copy.deepcopy(config), return_dict_in_generate=True)
    out = model.generate(PROMPT, generation_config=copy.deepcopy(config), return_dict_in_generate=True,
                         custom_generate=str(REPO), trust_remote_code=True)
    assert out.past_key_values.zipage_config.budget == 16 and out.past_key_values.stats()["compressions"] >= 2
    assert torch.equal(out.sequences, ref.sequences)
    model.generation_config.cache_implementation = "zipage"
    model.generation_config.cache_config = {"budget": 20, "page_size": 4}
    out = model.generate(PROMPT, max_new_tokens=30, do_sample=False, return_dict_in_generate=True,
                         custom_generate=str(REPO), trust_remote_code=True)
    assert out.past_key_values.zipage_config.budget == 20
    assert torch.equal(out.sequences, _reference(model, PROMPT, budget=20, page_size=4).sequences)
    # a keyword overrides the carried settings; a passed config that names no cache leaves the model's
    out = model.generate(PROMPT, max_new_tokens=30, do_sample=False, return_dict_in_generate=True,
                         custom_generate=str(REPO), trust_remote_code=True, budget=24)
    assert (out.past_key_values.zipage_config.budget, out.past_key_values.zipage_config.page_size) == (24, 4)
    out = model.generate(PROMPT, generation_config=GenerationConfig(max_new_tokens=30, do_sample=False),
                         return_dict_in_generate=True, custom_generate=str(REPO), trust_remote_code=True)
    assert out.past_key_values.zipage_config.budget == 20


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(budget=0), "budget"), (dict(page_size=12), "page_size"), (dict(scorer="nope"), "nope"),
     (dict(zipage_config={"budget": 16}, budget=32), "both"), (dict(zipage_config=3), "zipage_config")],
)
def test_bad_settings_are_named(kwargs, message):
    model = tiny_model("llama")
    with pytest.raises((ValueError, TypeError), match=message):
        model.generate(PROMPT, custom_generate=str(REPO), trust_remote_code=True, max_new_tokens=4, **kwargs)


def test_needs_trust_remote_code():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="trust_remote_code"):
        model.generate(PROMPT, custom_generate=str(REPO), max_new_tokens=4, budget=16)


def test_a_model_repo_that_carries_it_takes_the_inputs_positionally(tmp_path):
    """In a model repo loaded with trust_remote_code, transformers binds this function as ``model.generate``
    with ``model=`` as a keyword: ``model.generate(input_ids, ...)`` must read ``input_ids`` as the inputs (it
    was taken for the model: "got multiple values for argument 'model'")."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    shutil.copytree(REPO / "custom_generate", tmp_path / "custom_generate")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    settings = dict(budget=16, page_size=8, window=4)
    ref = _reference(model, PROMPT, **settings).sequences
    kw = dict(max_new_tokens=30, do_sample=False, **settings)
    assert torch.equal(loaded.generate(PROMPT, **kw), ref)
    assert torch.equal(loaded.generate(input_ids=PROMPT, **kw), ref)


def test_a_cache_of_the_caller_s_is_refused_by_name():
    """The repo builds its own ZipageCache: a cache passed beside it (``past_key_values=``, which transformers 5.24
    renamed ``cache=`` before the repo's function sees it) is refused, naming the argument."""
    from transformers import DynamicCache

    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"builds its own ZipageCache: do not pass (past_key_values|cache)"):
        model.generate(PROMPT, custom_generate=str(REPO), trust_remote_code=True, max_new_tokens=4,
                       past_key_values=DynamicCache(config=model.config), budget=16, page_size=4)
