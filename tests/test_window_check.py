"""benchmarks/window_check.py, the sliding-window sanity check run before a scorer comparison on a
model with sliding layers, on a tiny random Gemma 3 (the real one: the benchmark itself)."""

from __future__ import annotations

import pytest
import torch
from conftest import SLIDING_WINDOW, load_bench, tiny_sliding_model

@pytest.fixture(scope="module")
def wc():
    return load_bench("window_check")


def test_sliding_layers_keep_their_window_and_match_full_kv(wc):
    model = tiny_sliding_model("gemma3")
    ids = torch.randint(3, 96, (2, 96), generator=torch.Generator().manual_seed(0))
    out = wc.check(model, ids, budget=16, buffer=16, page_size=4)
    assert out["window"] == SLIDING_WINDOW and out["scored_from"] == 32
    for key in ("full_kv_dynamic_cache", "zipage_no_eviction"):
        assert out[key]["positions"] == 2 * (96 - 1 - 32)
        assert out[key]["top1"] == 1.0 and out[key]["kl"] < 1e-6
    assert out["zipage_no_eviction"]["compressions"] == 0
    run = out["zipage_compressing"]
    assert run["compressions"] == 4 and run["full_layer_stored"] <= 16 + 16
    assert SLIDING_WINDOW - 1 <= run["sliding_layer_stored_max"] <= SLIDING_WINDOW - 1 + 16 + 3
    assert run["max_abs_key_diff_vs_dynamic_cache_before_first_full_layer"] < 1e-5


def test_a_model_without_sliding_layers_is_refused(wc):
    model = tiny_sliding_model("gemma3", layer_types=["full_attention"] * 4)
    with pytest.raises(SystemExit, match="no sliding-window layers"):
        wc.check(model, torch.ones(1, 64, dtype=torch.long), budget=16, buffer=16, page_size=4)
