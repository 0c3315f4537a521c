"""The demo Space (integrations/space/): its decoding against generate(), and the app end to end in a
real browser (Debian's chromium driven by Playwright, headless, against the app on 127.0.0.1)."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest
import torch

import zipage
from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "integrations" / "space"
sys.path.insert(0, str(SPACE))

import sidebyside  # noqa: E402
from sidebyside import Settings, kept_mask, side_by_side  # noqa: E402

PROMPT = torch.randint(3, 96, (20,), generator=torch.Generator().manual_seed(1)).tolist()


def _run(settings: Settings, model=None):
    model = model or tiny_model("llama")
    for snap in side_by_side(model, None, PROMPT, settings):
        pass
    assert snap.finished
    return model, snap


def test_greedy_side_by_side_is_generate():
    """Step-locked greedy decoding gives what generate() gives, with and without zipage."""
    settings = Settings(budget=16, page_size=4, max_new_tokens=40)
    model, snap = _run(settings)
    inputs = torch.tensor([PROMPT])
    common = dict(max_new_tokens=40, do_sample=False, pad_token_id=0)
    full = model.generate(inputs, **common)[0, len(PROMPT):].tolist()
    compressed = model.generate(
        inputs, **common, cache_implementation="zipage", cache_config=dict(budget=16, page_size=4)
    )[0, len(PROMPT):].tolist()
    assert snap.full.ids == full
    assert snap.zipage.ids == compressed
    assert snap.full.ids != snap.zipage.ids  # the budget is small enough to change the answer
    # Memory: full KV grows by one token's KV per step; zipage never holds more than budget + buffer
    # tokens' pages once the prompt is compressed, and every compression is recorded.
    per_token = snap.full.kv_bytes[1] - snap.full.kv_bytes[0]
    assert per_token > 0
    assert all(b - a == per_token for a, b in zip(snap.full.kv_bytes, snap.full.kv_bytes[1:]))
    page_bytes = per_token * 4
    cap_pages = -(-settings.zipage_config().capacity // 4)
    assert max(snap.zipage.kv_bytes[1:]) <= cap_pages * page_bytes
    stats = snap.stats()
    assert stats["compressions"] == len(snap.zipage.compressions_at) >= 2
    assert snap.zipage.compressions_at[0] == 1  # the prompt is compressed at the first decode step
    assert stats["first_difference"] == sidebyside.common_prefix_length(full, compressed)
    assert 0 < stats["memory_saved"] < 1
    # the memory zipage's storage takes (its rows at their capacity), not only its stored tokens, against what
    # the full cache measured after as many tokens
    held = snap.zipage.cache.stats()["capacity_tokens"] * per_token
    assert snap.zipage.kv_bytes[-1] == held > snap.zipage.cache.stats()["tokens_stored"] * per_token
    assert stats["memory_saved"] == pytest.approx(1 - held / snap.full.kv_bytes[len(snap.zipage.kv_bytes) - 1])


def test_each_step_may_run_on_another_thread():
    """A UI serving the generator (Gradio) may take each step on another worker thread: the run still
    finishes, with the tokens of a run on one thread (no step left outside inference mode)."""
    import threading

    settings = Settings(budget=16, page_size=4, max_new_tokens=20)
    model, one = _run(settings)
    steps = side_by_side(model, None, PROMPT, settings)
    snaps, errors = [], []

    def step():
        try:
            snaps.append(next(steps))
        except StopIteration:
            snaps.append(None)
        except Exception as e:  # (reported below)
            errors.append(e)

    while not errors and (not snaps or snaps[-1] is not None):
        worker = threading.Thread(target=step)
        worker.start()
        worker.join()
    assert not errors, errors
    last = snaps[-2]
    assert last.finished and last.full.ids == one.full.ids and last.zipage.ids == one.zipage.ids


def test_shaded_tokens_show_characters_split_over_tokens_and_word_spaces():
    """Each shaded token shows what it adds to the text: an emoji split over byte tokens shows whole (not as
    "\ufffd" pieces), and SentencePiece words keep their spaces."""
    import html as html_lib

    from test_engine_requests import metaspace_tokenizer
    from views import tokens_html

    from zipage.serve.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = tok("a \U0001f37d b")["input_ids"]
    page = html_lib.unescape(tokens_html(tok, ids[:2], ids[2:], torch.ones(len(ids))))
    assert "\ufffd" not in page and "\U0001f37d" in page
    tok = metaspace_tokenizer(64)
    page = tokens_html(tok, [5, 9], [7, 3], torch.ones(4))
    spans = re.findall(r">([^<]*)</span>", page)
    assert spans == ["w5", " w9", " w7", " w3"]


def test_sampling_draws_both_runs_from_one_seed():
    """With a budget that evicts nothing, sampled answers are identical (same seed, same logits),
    and a different seed gives a different answer."""
    settings = Settings(budget=256, page_size=4, max_new_tokens=30, sample=True, temperature=1.0, top_p=0.9, seed=3)
    model, snap = _run(settings)
    assert snap.stats()["compressions"] == 0
    assert snap.full.ids == snap.zipage.ids and snap.first_difference is None
    _, other = _run(Settings(**{**settings.__dict__, "seed": 4}), model)
    assert other.full.ids != snap.full.ids


@pytest.mark.parametrize(
    "change, message",
    [({"budget": 0}, "budget"), ({"page_size": 12}, "page_size"), ({"max_new_tokens": 0}, "max new tokens"),
     ({"scorer": "nope"}, "nope"), ({"sample": True, "top_p": 0.0}, "top_p"), ({"seed": 2**70}, "seed"),
     ({"seed": -1}, "seed")],
)
def test_bad_settings_name_the_problem(change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Settings(**change).check()


def test_kept_mask_matches_the_cache():
    settings = Settings(budget=16, page_size=4, max_new_tokens=25)
    model, snap = _run(settings)
    cache = snap.zipage.cache
    if not hasattr(cache, "kept_positions"):
        pytest.skip("this zipage has no ZipageCache.kept_positions yet")
    mask = kept_mask(cache)
    seen, stored = cache.get_seq_length(), cache.stored_length()
    assert mask.shape == (model.config.num_hidden_layers, model.config.num_key_value_heads, seen)
    assert (mask.sum(-1) == stored).all()  # every head keeps the same number of tokens
    assert mask[..., seen - settings.zipage_config().window :].all()  # the observation window is kept
    assert not mask.all()  # something was evicted


def test_examples_are_the_real_problems():
    """The app's one-click examples are verbatim GSM8K / MATH-500 problems."""
    pytest.importorskip("gradio")
    from zipage.models import math_problems

    import app

    splits = {"GSM8K test": "gsm8k", "MATH-500": "math500"}
    for label, text in app.EXAMPLES.items():
        name, index = label.rsplit(" #", 1)
        assert math_problems(splits[name], int(index) + 1)[int(index)]["problem"] == text


def test_space_front_matter():
    """README.md's front matter is what Hugging Face reads to build the Space."""
    yaml = pytest.importorskip("yaml")
    meta = yaml.safe_load((SPACE / "README.md").read_text().split("---")[1])
    for key in ("title", "emoji", "sdk", "sdk_version", "app_file", "license", "models", "tags"):
        assert meta.get(key), key
    assert meta["sdk"] == "gradio" and (SPACE / meta["app_file"]).is_file()
    assert len(meta["short_description"]) <= 60
    gradio = pytest.importorskip("gradio")
    assert meta["sdk_version"].split(".")[0] == gradio.__version__.split(".")[0]  # the major the app is written for
    assert (SPACE / "requirements.txt").read_text().count("zipage") >= 1


def test_zero_gpu_decorates_the_generating_function(monkeypatch):
    """With the ``spaces`` package importable (ZeroGPU), compare() runs under spaces.GPU; without it,
    undecorated."""
    pytest.importorskip("gradio")
    decorated = []

    def gpu(duration=None):
        def wrap(fn):
            decorated.append(fn.__name__)
            fn.zero_gpu = duration
            return fn
        return wrap

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    monkeypatch.delitem(sys.modules, "app", raising=False)
    on_zero_gpu = importlib.import_module("app")
    assert decorated == ["compare"] and on_zero_gpu.compare.zero_gpu
    monkeypatch.delitem(sys.modules, "spaces")
    monkeypatch.delitem(sys.modules, "app")
    plain = importlib.import_module("app")
    assert not hasattr(plain.compare, "zero_gpu")


# --------------------------------------------------------------------------- the app in a browser
def _browser():
    """(sync_playwright, chromium path), or skip (fail on CI) when either is missing."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = [n for n, ok in (("Debian's chromium", chromium), ("playwright", sync_playwright)) if not ok]
    if missing:
        reason = f"the browser test needs {' and '.join(missing)} (apt-get install chromium; pip install playwright)"
        if os.environ.get("CI"):
            pytest.fail(reason + ": .ci/run installs them")
        pytest.skip(reason)
    pytest.importorskip("gradio")
    return sync_playwright, chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def space_app(tmp_path):
    """The real app as a subprocess on 127.0.0.1 (killed at the end): its URL."""
    port = _free_port()
    env = {
        **os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    }
    env.pop("TRITON_INTERPRET", None)
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, str(SPACE / "app.py")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{(tmp_path / 'app.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer within 120 s:\n{(tmp_path / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def _set(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Tab")


@pytest.mark.slow
def test_space_in_a_browser(space_app, tmp_path):
    """Load the page, submit a prompt, see both answers, the plot, the heat map and the shaded tokens
    arrive; then a bad budget shows an error message in the page, not a stack trace."""
    sync_playwright, chromium = _browser()
    from playwright.sync_api import expect

    shots = Path(os.environ.get("ZIPAGE_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    tokens = os.environ.get("ZIPAGE_SPACE_MAX_NEW_TOKENS", "32")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(space_app)
            page.locator("#generate").wait_for()
            page.get_by_text("GSM8K test #3").click()  # one click fills the prompt
            expect(page.locator("#prompt textarea")).to_have_value(re.compile("James decides to run 3 sprints"))
            _set(page, "budget", "48")
            _set(page, "max-new-tokens", tokens)
            page.locator("#generate").click()

            # Streamed: the zipage answer shows text before the run ends (the heat map comes last).
            page.wait_for_function(
                "() => document.querySelector('#zipage-answer textarea').value.length > 0", timeout=120_000)
            page.locator("#heatmap img").wait_for(timeout=180_000)
            full = page.locator("#full-answer textarea").input_value()
            compressed = page.locator("#zipage-answer textarea").input_value()
            assert full.strip() and compressed.strip()
            for plot in ("#memory-plot img", "#heatmap img"):
                src = page.locator(plot).get_attribute("src")
                assert src and src.startswith("data:image/png"), plot
                assert page.locator(plot).evaluate("img => img.naturalWidth") > 100, plot
            stats = page.locator("#stats").inner_text()
            compressions = int(re.search(r"compressions\s+(\d+)", stats).group(1))
            assert compressions >= 1, stats
            assert "memory saved" in stats and "answers first differ" in stats
            kept = page.locator("#kept-tokens")
            if hasattr(zipage.ZipageCache, "kept_positions"):
                shaded = kept.locator("span[title$='of heads keep this token']")
                assert shaded.count() > 50
                assert "James" in kept.inner_text()
            else:  # an older zipage: the app says so instead of shading
                assert "not available" in kept.inner_text()
            page.screenshot(path=str(shots / "space.png"), full_page=True)

            _set(page, "budget", "0")
            page.locator("#generate").click()
            error = page.locator("[data-testid=toast-text]", has_text="ZipageConfig.budget=0 is invalid")
            error.first.wait_for(timeout=30_000)  # shown in the page, as gradio shows errors
            page.wait_for_timeout(500)  # let the toast finish sliding in before the screenshot
            assert error.first.is_visible()
            page.screenshot(path=str(shots / "space_error.png"))
            assert "Traceback" not in page.content()

            # Stop: a long run ends at once and its answers stop growing; the page then runs again.
            _set(page, "budget", "48")
            _set(page, "max-new-tokens", "1024")
            page.locator("#generate").click()
            page.locator("#heatmap img").wait_for(state="detached", timeout=60_000)  # (this run's panels cleared)
            page.wait_for_function(
                "() => document.querySelector('#full-answer textarea').value.length > 0", timeout=120_000)
            page.locator("#stop").click()
            page.wait_for_timeout(3_000)
            stopped = page.locator("#full-answer textarea").input_value()
            page.wait_for_timeout(3_000)
            assert page.locator("#full-answer textarea").input_value() == stopped
            assert page.locator("#heatmap img").count() == 0  # (the run never reached its end)
            _set(page, "max-new-tokens", "8")
            page.locator("#generate").click()
            page.locator("#heatmap img").wait_for(timeout=180_000)
        finally:
            browser.close()


def test_prepare_writes_a_space_folder_that_installs_from_its_own_wheel(tmp_path):
    """``integrations/space/prepare.py``: the app's files, a zipage wheel built from the checkout, and a
    requirements.txt that names the wheel instead of ``zipage`` (not on PyPI yet); front matter's app_file there."""
    import importlib.util
    import zipfile

    spec = importlib.util.spec_from_file_location("space_prepare", SPACE / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    out = tmp_path / "space"
    wheel = prepare.prepare(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["app.py", "sidebyside.py", "views.py", "README.md",
                                                            "requirements.txt", wheel.name])
    reqs = [line for line in (out / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert f"./{wheel.name}" in reqs and "zipage" not in reqs
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "zipage/__init__.py" in names and any(n.startswith("zipage/kernels/") for n in names)
    assert "app_file: app.py" in (out / "README.md").read_text()


def test_number_boxes_name_a_decimal_instead_of_rounding_it():
    """The budget and seed boxes hold what was typed (no ``precision=0`` rounding before the check): a decimal is
    named, not run as its nearest integer."""
    gr = pytest.importorskip("gradio")
    import app

    for name, value in (("budget", 48.7), ("seed", 1.5)):
        with pytest.raises(gr.Error, match=f"{name} must be a whole number"):
            app._whole(value, name)
    assert app._whole(48.0, "budget") == 48
    boxes = {b.elem_id: b for b in app.demo.blocks.values() if isinstance(b, gr.Number)}
    assert {"budget", "seed"} <= set(boxes) and all(boxes[k].precision is None for k in ("budget", "seed"))
