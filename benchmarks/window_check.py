"""Sanity check before a scorer comparison on a model with sliding-window layers (Gemma 3 270M).

The comparison's numbers mean something only if the cache itself is right on that model, past the
sliding window. On one ``--seq-len`` sequence of MATH train text, fed in ``buffer``-token chunks:

1. full KV (``DynamicCache``) against the one-forward reference: the numerical floor (top-1 ~100%);
2. a ``ZipageCache`` whose budget is never reached (nothing evicted): must match as closely;
3. a compressing ``ZipageCache`` (``--budget``): after every chunk, every sliding layer holds
   exactly the pages of its window (slot 0 is the page of the first key the chunk's first query
   sees, and nothing more than the window, the chunk and one partial page is stored), and the
   layers before the first full layer store the very keys a ``DynamicCache`` keeps.

    python benchmarks/window_check.py --model gemma3 --seq-len 1024 --threads 1
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import quality as Q  # noqa: E402
import scorer_comparison as SC  # noqa: E402


def _summary(tracker: Q.Tracker, start: int, end: int) -> dict[str, float]:
    s = tracker.summary(start, end)
    return {k: s[k] for k in ("positions", "top1", "kl", "ppl_ratio")}


@torch.inference_mode()
def check(model, ids: torch.Tensor, budget: int, buffer: int, page_size: int) -> dict:
    import zipage
    from transformers import DynamicCache

    from zipage.kernels import gather_kv, slot_indices

    cfg = model.config.get_text_config(decoder=True)
    types = list(getattr(cfg, "layer_types", None) or [])
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding:
        raise SystemExit("this model has no sliding-window layers: nothing to check")
    W, N = cfg.sliding_window, ids.shape[1]
    if N <= W + budget + buffer:
        raise SystemExit(f"--seq-len {N} must exceed the window {W} plus budget and buffer to test sliding")
    ref = Q.reference(model, ids)
    zcfg = zipage.ZipageConfig(budget=budget, page_size=page_size, buffer=buffer, window=16)
    first = zcfg.capacity
    out: dict = {"window": W, "layer_types": types, "seq_len": N, "budget": budget, "scored_from": first}

    ctrl = Q.Tracker(ids, ref)
    Q.run_full_chunked(model, ids, ctrl, first, buffer)
    out["full_kv_dynamic_cache"] = _summary(ctrl, first, N - 1)
    keep_all = Q.Tracker(ids, ref)
    cache = zipage.ZipageCache(config=model.config, budget=N, page_size=page_size)
    Q.run_full_chunked(model, ids, keep_all, first, buffer, cache)
    out["zipage_no_eviction"] = {**_summary(keep_all, first, N - 1), "compressions": cache.num_compressions}

    cache, dyn = Q.prefill(model, ids, zcfg, first), DynamicCache(config=model.config)
    model(input_ids=ids[:, :first], **{Q.CACHE: dyn}, use_cache=True, logits_to_keep=1)
    before_full = types.index("full_attention") if "full_attention" in types else len(types)
    tracker, pos, worst, most = Q.Tracker(ids, ref), first, 0.0, 0
    pages = cache.window_pages
    while pos < N - 1:
        end = min(pos + buffer, N - 1)
        tracker.update(model(input_ids=ids[:, pos:end], **{Q.CACHE: cache}, use_cache=True).logits, pos, end)
        model(input_ids=ids[:, pos:end], **{Q.CACHE: dyn}, use_cache=True, logits_to_keep=1)
        for i in sliding:
            layer = cache.layers[i]
            if layer.seen != end or pages.offset != pages.offset_for(pos) or layer.stored() != end - pages.offset:
                raise AssertionError(f"layer {i} after positions ..{end}: seen {layer.seen}, offset {pages.offset} "
                                     f"(expected {pages.offset_for(pos)}), stored {layer.stored()}")
            if layer.stored() > W - 1 + (end - pos) + page_size - 1:
                raise AssertionError(f"layer {i} stores {layer.stored()} tokens, more than its window needs")
            most = max(most, layer.stored())
        for i in range(before_full):  # same inputs up to here: the same kept keys as DynamicCache's window
            layer = cache.layers[i]
            keys = gather_kv(pages.k_pool[layer.index], slot_indices(pages.table, 0, layer.stored(), page_size))
            theirs = dyn.layers[i].keys.transpose(1, 2)
            n = min(W - 1, keys.shape[1], theirs.shape[1])
            worst = max(worst, (keys[:, -n:] - theirs[:, -n:]).abs().max().item())
        pos = end
    out["zipage_compressing"] = {**_summary(tracker, first, N - 1), "compressions": cache.num_compressions,
                                 "full_layer_stored": cache.stored_length(), "sliding_layer_stored_max": most,
                                 "max_abs_key_diff_vs_dynamic_cache_before_first_full_layer": worst}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3", choices=sorted(SC.MODELS))
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--buffer", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/window_check_MODEL.json)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model, tok = SC.load(args.model, args.threads)
    ids, info = Q.build_sequences(tok, 1, args.seq_len, "math_train")
    result = {"model": SC.MODELS[args.model], "sequence": info[0],
              **check(model, ids, args.budget, args.buffer, args.page_size),
              "command": "python benchmarks/window_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "seconds": time.perf_counter() - t0}
    path = pathlib.Path(args.out) if args.out else SC.RESULTS / f"window_check_{args.model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "layer_types"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
