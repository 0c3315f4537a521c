"""A CPU-only install has no triton (it is not a base dependency): zipage still imports and runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import tiny_model
from test_engine import reference

TESTS = Path(__file__).resolve().parent
CFG = {"budget": 16, "page_size": 4, "buffer": 4}
PROMPT = [5, 9, 14, 3, 22, 31, 8, 40, 17, 6, 11, 25, 33, 4, 19, 27, 12, 9, 50, 61]

SCRIPT = f"""
import json, sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as on an install without it
sys.path.insert(0, {str(TESTS)!r})
from conftest import tiny_model
from test_engine import reference
import zipage
from zipage.kernels._triton import HAS_TRITON

model = tiny_model("llama")
generated = reference(model, {PROMPT!r}, 30, cache_implementation="zipage", cache_config={CFG!r})
llm = zipage.LLM(model, num_pages=64, **{CFG!r})
params = zipage.SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
engine = llm.generate([{PROMPT!r}], params, use_tqdm=False)[0].token_ids
print(json.dumps(dict(has_triton=HAS_TRITON, generate=generated, engine=engine,
                      compressions=llm.stats()["compressions"])))
"""


def test_generate_and_the_engine_run_without_triton():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["has_triton"] is False and out["compressions"] > 0
    model = tiny_model("llama")  # the same tokens as here, where triton may be installed
    assert out["generate"] == reference(model, PROMPT, 30, cache_implementation="zipage", cache_config=CFG)
    assert out["engine"] == out["generate"]
