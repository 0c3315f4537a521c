"""``zipage.LLM``: the continuous-batching engine, offline and online.

    llm = zipage.LLM(model, tokenizer, budget=2048)
    outs = llm.generate(["Prove that ..."], zipage.SamplingParams(max_tokens=8192))

    rid = llm.add_request("Solve ...", SamplingParams(max_tokens=512))
    for tokens in llm.stream(rid): ...
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import numbers
import threading
import time
import weakref
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import check_model_config
from ..config import ZipageConfig
from ..memory.block_manager import BlockManager
from ..scoring import get_scorer
from .runner import Feed, ModelRunner
from .sampling import SamplingParams, sample_tensor
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence

_ENGINE_FIELDS = {
    "enable_prefix_caching", "enforce_eager", "async_compression", "async_scheduling", "max_num_seqs", "max_num_batched_tokens",
    "gpu_memory_utilization", "num_pages", "max_model_len", "dtype", "device", "fuse_ops",
}


@dataclass
class _Inflight:
    """A step's sampled tokens on their way to the host."""

    seqs: list[Sequence]
    feed: Feed  # the tokens on the device, for the next step's inputs
    host: torch.Tensor  # their copy on the host (pinned), valid once ``event`` completed
    event: Any  # torch.cuda.Event, or None on a CPU


class LLM:
    """A continuous-batching engine with Compressed PagedAttention.

    Args:
        model: a loaded transformers causal LM, or a local path to one.
        tokenizer: a tokenizer (loaded from ``model`` when it is a path); needed for string
            prompts, ``text`` outputs and ``stop`` strings.
        budget: tokens kept per sequence after a compression; ``None`` runs a plain full-KV paged
            engine (the baseline). Other ``ZipageConfig`` fields (``page_size``, ``buffer``,
            ``window``, ``scorer``, ...) are accepted as keyword arguments too.
        enable_prefix_caching: share full prompt pages between requests with the same prefix.
        enforce_eager: no CUDA graphs. Otherwise (on CUDA) decode-only steps replay a CUDA graph of
            the whole forward, captured for a ladder of batch sizes at the first decode step.
        async_compression: compress on a side CUDA stream while the other requests decode; the
            requests being compressed sit out the steps until their compression event completes.
            On a CPU the same bookkeeping runs with compressions that complete at once.
        max_num_seqs: most sequences running at once (the budget may lower it further).
        max_num_batched_tokens: most tokens in one step (chunked prefill).
        gpu_memory_utilization: share of the GPU memory the model + pools may take (CUDA).
        num_pages: explicit pool size in pages (required on a CPU).
        max_model_len: longest logical length (default: the model's max_position_embeddings).
        fuse_ops: on CUDA, run the model's RMSNorm modules and its rotary embedding through fused
            Triton kernels (one kernel per norm, one per rotated tensor) inside the engine's forwards.
            It also merges each attention's q/k/v projections and each SiLU-gated MLP's gate/up
            projections into one GEMM (the weights become row slices of one tensor, in place: same
            values, no extra memory) and fuses the SiLU gate. Only what the kernels reproduce on a
            probe is swapped, and the modules' own forwards are back outside the engine's steps.
        async_scheduling: keep each step's sampled tokens on the device, feed them straight into
            the next step and read them on the host while that step runs (the scheduling and the
            bookkeeping then overlap the GPU). Outputs and stops arrive one step late; a request
            stopped by a token runs one extra step whose token is dropped. Tokens are the same
            either way.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, budget: int | None = 2048,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False, async_compression: bool = False,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, gpu_memory_utilization: float = 0.9,
                 num_pages: int | None = None, max_model_len: int | None = None, dtype: Any = None,
                 device: Any = None, fuse_ops: bool = True, async_scheduling: bool = True,
                 **zipage_fields: Any) -> None:
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype or "auto", device_map=device)
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LLM({name}={value!r}) is invalid: expected an int >= 1")
        if max_model_len is not None and (not isinstance(max_model_len, numbers.Integral)
                                          or isinstance(max_model_len, bool) or max_model_len < 1):
            raise ValueError(f"LLM(max_model_len={max_model_len!r}) is invalid: "
                             "expected an int >= 1, or None for the model's")
        config = model.config.get_text_config(decoder=True)
        check_model_config(config)
        self.model = model.eval()
        self.tokenizer = tokenizer
        page_size = zipage_fields.get("page_size", ZipageConfig.page_size)
        if budget is None:
            unknown = set(zipage_fields) - {"page_size"}
            if unknown:
                raise ValueError(f"budget=None (full KV) takes no compression settings, got {sorted(unknown)}")
            self.zipage_config = None
            scorer = None
        else:
            self.zipage_config = ZipageConfig.from_dict({"budget": budget, **zipage_fields})
            scorer = get_scorer(self.zipage_config.scorer, self.zipage_config)
        self.max_model_len = (int(max_model_len) if max_model_len is not None
                              else getattr(config, "max_position_embeddings", None) or 1 << 30)
        device = next(model.parameters()).device
        stateful = scorer is not None and scorer.stateful
        if num_pages is None:
            if device.type != "cuda":
                raise ValueError("on a CPU give the pool size explicitly: LLM(..., num_pages=N)")
            num_pages = self._pages_from_memory(config, page_size, stateful, max_num_seqs, gpu_memory_utilization)
        self.blocks = BlockManager(num_pages, page_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.zipage_config, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, num_pages, page_size, self.zipage_config, scorer,
                                  self.scheduler.max_concurrency, fuse_ops=fuse_ops)
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if eos is not None else getattr(config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.use_graphs = not enforce_eager and device.type == "cuda"
        self.async_compression = bool(async_compression) and self.zipage_config is not None
        self.side_stream = torch.cuda.Stream(device) if self.async_compression and device.type == "cuda" else None
        self.pending: list[tuple[Any, list[tuple[list[Sequence], dict | None]]]] = []
        self.async_scheduling = bool(async_scheduling)
        self.inflight: _Inflight | None = None  # the last step's tokens, not yet on the host
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.generated_tokens = 0
        # One step at a time, whichever thread (agenerate's workers) or event loop drives the engine.
        self._step_lock = threading.RLock()
        self._to_cancel: list[Sequence] = []  # cancellations waiting for the step in progress to end
        # the outputs of the step in progress, as they come; those of a step that raised stay for the next
        self._undelivered: list[RequestOutput] = []
        self._async_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> asyncio.Lock

    def _pages_from_memory(self, config, page_size, stateful, max_num_seqs, utilization) -> int:
        free, total = torch.cuda.mem_get_info()
        used_elsewhere = total - free
        available = total * utilization - used_elsewhere - 512 * 2**20  # activations headroom
        page_bytes = ModelRunner.bytes_per_page(config, page_size, self.model.dtype, stateful)
        if self.zipage_config is not None:
            available -= ModelRunner.bytes_per_slot(config, self.zipage_config.window, self.model.dtype,
                                                    self.zipage_config.budget) * max_num_seqs
        if available < page_bytes:
            raise RuntimeError(f"no GPU memory left for the KV pool (gpu_memory_utilization={utilization})")
        return int(available // page_bytes)

    # ----------------------------------------------------------------------------- requests
    def _tokenize(self, prompt: Any, chat: bool) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer: LLM(model, tokenizer) or pass token ids")
            if chat:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            else:
                ids = self.tokenizer(prompt)["input_ids"]
            return [int(t) for t in ids], prompt
        if _is_array(prompt):  # a torch tensor or a numpy array of token ids
            if prompt.ndim != 1:
                raise TypeError(f"a tensor prompt must be 1-D token ids, got prompt of shape {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)):
            for i, t in enumerate(prompt):
                if not _is_token(t):
                    raise TypeError(f"prompt token ids must be ints, got prompt[{i}]={t!r} ({type(t).__name__})")
            return [int(t) for t in prompt], None
        raise TypeError(f"a prompt is a string or a list of token ids, "
                        f"got prompt={prompt!r:.80} ({type(prompt).__name__})")

    def add_request(self, prompt: Any, params: SamplingParams | None = None, request_id: str | None = None,
                    chat: bool = False) -> str:
        """Queue a request (string or token ids); returns its id. Bad requests raise here and
        leave every request in flight untouched."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got request_id={request_id!r} ({type(request_id).__name__})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        ids, text = self._tokenize(prompt, chat)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.get_text_config(decoder=True).vocab_size
        outside = [t for t in ids if not 0 <= t < vocab]
        if outside:
            raise ValueError(f"prompt token ids must lie in 0..{vocab - 1}, got {outside[0]} "
                             f"at position {ids.index(outside[0])}")
        outside = [t for t in params.stop_token_ids if t >= vocab]
        if outside:
            raise ValueError(f"SamplingParams.stop_token_ids={params.stop_token_ids!r} is invalid: "
                             f"token id {outside[0]} is outside the vocabulary 0..{vocab - 1}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {self.max_model_len}")
        page = self.blocks.page_size
        if self.zipage_config is None:
            peak = -(-min(len(ids) + params.max_tokens, self.max_model_len) // page)
        else:
            peak = max(-(-(len(ids) + 1) // page), -(-self.zipage_config.capacity // page))
        if peak > self.blocks.num_pages:
            raise ValueError(
                f"this request needs up to {peak} pages of {page} tokens but the KV pool has "
                f"{self.blocks.num_pages}: shorten it, lower max_tokens or give the engine more pages"
            )
        rid = request_id
        while rid is None or (request_id is None and rid in self.requests):
            rid = str(next(self._ids))  # an automatic id never takes one the caller chose (or one still known)
        if rid in self.requests and not self.requests[rid].finished:
            raise ValueError(f"request id {rid!r} is already in flight")
        seq = Sequence(request_id=rid, prompt_token_ids=ids, params=params, prompt=text, arrival=next(self._arrivals))
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        self.requests[rid] = seq
        self.scheduler.add(seq)
        return rid

    def cancel(self, request_id: str) -> None:
        """Stop a request now; its pages go back to the pool. While another thread is inside
        ``step()`` (``agenerate``'s workers) it is stopped as soon as that step returns."""
        self._cancel(self._get(request_id))

    def _cancel(self, seq: Sequence) -> None:
        self._to_cancel.append(seq)
        self._apply_cancels()

    def _apply_cancels(self) -> None:
        """Carry out the queued cancellations unless another thread is stepping (it does them when
        it is done: every full release of the step lock is followed by this call)."""
        while self._to_cancel and self._step_lock.acquire(blocking=False):
            try:
                while self._to_cancel:
                    seq = self._to_cancel.pop(0)
                    if seq.compressing:  # its pages are still being read and written on the side stream
                        seq.cancel_requested = True
                    elif not seq.finished:
                        self.scheduler.finish(seq, "cancelled")
            finally:
                self._step_lock.release()

    def _forget(self, seq: Sequence) -> None:
        """Drop a request handed back to its caller (never a newer request that took its id)."""
        if self.requests.get(seq.request_id) is seq:
            del self.requests[seq.request_id]

    def _get(self, request_id: str) -> Sequence:
        if request_id not in self.requests:
            raise KeyError(f"unknown request id {request_id!r}")
        return self.requests[request_id]

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self.pending or self._to_cancel)

    # ----------------------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the requests that got new tokens or finished.

        With ``async_scheduling`` the tokens a step samples stay on the device and feed the next
        step directly; the host reads them while the GPU runs that next step, so scheduling and
        bookkeeping overlap the GPU's work. Outputs therefore arrive one step late, and a request
        stopped by a token (EOS, a stop id or string) has run one more step, whose token is dropped.

        A request stopped while its (asynchronous) compression is in flight is reported finished
        by the step that collects that compression. Steps never overlap: a call made while another
        thread is inside ``step()`` waits for it.

        A step that raises (the model, the sampler, an interrupt) leaves the engine consistent: the
        forward and the sampling are undone (every request scheduled by that step is where it was
        before it, its pages kept), so the next ``step()`` goes on and produces the same tokens; a
        request whose state cannot be restored (its compression failed half-way, its tokens were
        lost with the device) is finished with reason ``"error"`` and its pages are freed. Outputs
        the failed step had already produced are returned by the next step."""
        with self._step_lock:
            changed = self._undelivered
            self._step(changed)
            self._undelivered = []
        self._apply_cancels()
        return changed

    def _step(self, changed: list[RequestOutput]) -> None:
        """One step; its outputs go to ``changed`` (``self._undelivered``) as they come."""
        changed += self._collect_compressions(block=False)
        plan = self.scheduler.schedule()
        try:
            if self.inflight is not None and any(s.pending for s, _ in plan.prefill):
                # a request preempted and readmitted at once: its prompt must be complete on the host
                flight, self.inflight = self.inflight, None
                self._resolve(flight, changed)
                self._drop_finished(plan)
            if plan.compress:
                if self.async_compression:
                    self._start_compressions(plan)
                else:
                    self._compress(plan)
        finally:  # destination pages of compressions that never ran (the step failed first): back
            for pages in plan.fresh_pages.values():
                self.blocks.release(pages)
            plan.fresh_pages.clear()
        if plan.empty:
            if self.inflight is not None:
                flight, self.inflight = self.inflight, None
                self._resolve(flight, changed)
            elif self.pending:  # nothing else to run: wait for a compression to land
                changed += self._collect_compressions(block=True)
            return
        scheduled = [s for s, _ in plan.prefill] + plan.decode
        # What the forward and the sampling advance, to undo them if either raises (host values only).
        saved = [(s.num_computed, s.stored, s.pending, s.last_pending) for s in scheduled]
        previous = self.inflight
        committed = False
        try:
            feed = previous.feed if previous is not None else None
            logits = None
            if self.use_graphs and not plan.prefill:
                if not self.runner.graphs:
                    self._capture()
                logits = self.runner.decode_with_graph(plan.decode, feed)
            if logits is None:
                logits = self.runner.forward(plan.prefill, plan.decode, feed)
            rows, seqs = [], []
            for i, seq in enumerate(scheduled):
                if seq.num_computed == seq.num_tokens:  # a whole prompt (or decode token) went through
                    rows.append(i)
                    seqs.append(seq)
            self.inflight = self._launch_sampling(logits, rows, seqs) if seqs else None
            committed = True
        except BaseException:
            if not committed:
                # Undo the step: the KV it wrote lies past each sequence's stored length (rewritten
                # before it is read), its query-ring rows are rewritten before a compression reads
                # them, and the tokens of ``previous`` are still on the device to be fed again.
                self.inflight = previous
                for seq, (computed, stored, pending, last) in zip(scheduled, saved):
                    seq.num_computed, seq.stored, seq.pending, seq.last_pending = computed, stored, pending, last
            raise
        for seq in scheduled:  # (only once committed: a page registered is shared, never rewritten)
            self.scheduler.register_prefix(seq)
        launched = self.inflight
        if not self.async_scheduling:
            self.inflight = None
        try:
            if previous is not None:  # the previous step's tokens: the GPU is busy with this one meanwhile
                self._resolve(previous, changed)
        finally:
            if not self.async_scheduling and launched is not None:
                self._resolve(launched, changed)

    def _launch_sampling(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> _Inflight:
        """Sample on the device and start copying the tokens to the host; the tokens stay pending."""
        if len(rows) < logits.shape[0]:
            logits = logits[torch.tensor(rows, device=logits.device)]
        tokens = sample_tensor(logits, [s.params for s in seqs], [s.generator for s in seqs])
        host, event = tokens, None
        if tokens.device.type == "cuda":
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        for seq in seqs:
            seq.pending += 1
            if (len(seq.output_ids) + seq.pending >= seq.params.max_tokens
                    or seq.num_tokens >= self.max_model_len):
                seq.last_pending = True  # that token ends it whatever its value: schedule it no more
        return _Inflight(seqs, Feed(tokens, {id(s): i for i, s in enumerate(seqs)}), host, event)

    def _resolve(self, flight: _Inflight, changed: list[RequestOutput]) -> None:
        """Wait for a step's tokens on the host and book them (stop checks included). Every token
        of the flight is accounted for even when something raises: a request whose token cannot be
        read or booked is finished with reason "error"; the first exception is raised at the end."""
        try:
            if flight.event is not None:
                flight.event.synchronize()
            tokens = flight.host.tolist()
        except BaseException:  # the tokens are lost: their requests cannot go on
            for seq in flight.seqs:
                seq.pending -= 1
                self._fail(seq)
            raise
        error = None
        for seq, token in zip(flight.seqs, tokens):
            seq.pending -= 1
            if seq.finished or seq.finish_requested is not None or seq.cancel_requested:
                continue  # stopped earlier (cancelled, or by an earlier token): this token is dropped
            try:
                self._append(seq, token)
                changed.append(seq.output())
            except BaseException as e:  # (e.g. the tokenizer's decode): this request only
                error = error if error is not None else e
                self._fail(seq)
        if error is not None:
            raise error

    def _fail(self, seq: Sequence) -> None:
        """Finish a request a failure left in an unknown state (reason "error"; its pages freed); its
        output goes with the step's."""
        if seq.finished or seq.cancel_requested or seq.finish_requested is not None:
            return  # finishing anyway
        if seq.compressing:  # its pages are still being read and written on the side stream
            seq.finish_requested = "error"
            return
        self.scheduler.finish(seq, "error")
        self._undelivered.append(seq.output())

    def _abort_compressions(self, failed, skipped) -> None:
        """Compressions that raised (``failed`` groups: pages possibly compacted half-way, the sequences
        are finished with reason "error") or never ran (``skipped``: planned again by a later step)."""
        for groups, fail in ((failed, True), (skipped, False)):
            for seqs, _, fresh in groups:
                for seq in seqs:
                    seq.compressing = False
                    if fresh is not None and fresh[id(seq)] is not seq.pages:
                        self.blocks.release(fresh[id(seq)])  # not handed to the sequence yet
                    if fail:
                        self._fail(seq)

    def _drop_finished(self, plan) -> None:
        """Take requests that finished while the plan was made out of it (their fresh pages back)."""
        for seq in [s for s in plan.compress if s.finished]:
            plan.compress.remove(seq)
            self.blocks.release(plan.fresh_pages.pop(id(seq), []))
        plan.decode = [s for s in plan.decode if not s.finished]
        plan.prefill = [(s, n) for s, n in plan.prefill if not s.finished]

    def _capture(self) -> None:
        page = self.blocks.page_size
        if self.zipage_config is not None:
            width = -(-(self.zipage_config.capacity + 1) // page)
        else:
            width = -(-self.max_model_len // page)
        self.runner.capture_graphs(self.scheduler.max_concurrency, width)

    def _groups(self, plan) -> list[tuple[list[Sequence], bool, dict | None]]:
        """Sequences compressed together: same stored length, same first-ness, same destination kind."""
        groups: dict[tuple, list[Sequence]] = {}
        for seq in plan.compress:
            key = (seq.stored, seq.compressions == 0, id(seq) in plan.fresh_pages)
            groups.setdefault(key, []).append(seq)
        return [(seqs, first, {id(s): plan.fresh_pages[id(s)] for s in seqs} if fresh else None)
                for (_, first, fresh), seqs in groups.items()]

    def _compress(self, plan) -> None:
        groups = self._groups(plan)
        plan.fresh_pages.clear()  # (now held by ``groups``)
        for k, (seqs, first, fresh) in enumerate(groups):
            try:
                self.runner.compress(seqs, [fresh[id(s)] for s in seqs] if fresh else None, first)
                self._compressed(seqs, fresh)
            except BaseException:
                self._abort_compressions(groups[k : k + 1], groups[k + 1 :])
                raise

    def _start_compressions(self, plan) -> None:
        """Launch the plan's compressions on the side stream; their sequences sit out until they land."""
        groups = self._groups(plan)
        plan.fresh_pages.clear()  # (now held by ``groups``)
        for seqs, _, _ in groups:
            for seq in seqs:
                seq.compressing = True
        plan.decode = [s for s in plan.decode if not s.compressing]
        event, launched = None, 0
        side = self.side_stream
        try:
            if side is not None:
                side.wait_stream(torch.cuda.current_stream())  # their last tokens are written
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for seqs, first, fresh in groups:
                    self.runner.compress(seqs, [fresh[id(s)] for s in seqs] if fresh else None, first)
                    launched += 1
                if side is not None:
                    event = torch.cuda.Event()
                    event.record(side)
        except BaseException:
            self._abort_compressions(groups[launched : launched + 1], groups[launched + 1 :])
            if self.side_stream is not None:
                try:  # pages just freed are reused on the main stream only after the side stream's work
                    torch.cuda.current_stream().wait_stream(self.side_stream)
                    event = torch.cuda.Event()
                    event.record(self.side_stream)
                except BaseException:  # (a dead device): the launched ones cannot be trusted either
                    self._abort_compressions(groups[:launched], [])
                    launched = 0
            if launched:  # the groups launched before the failure land as usual
                self.pending.append((event, [(seqs, fresh) for seqs, _, fresh in groups[:launched]]))
            raise
        self.pending.append((event, [(seqs, fresh) for seqs, _, fresh in groups]))

    def _collect_compressions(self, block: bool) -> list[RequestOutput]:
        """Book the compressions whose event completed (or all of them, with ``block``); returns the
        outputs of the requests that could only finish now (stopped or cancelled meanwhile)."""
        still, finished = [], []
        for event, groups in self.pending:
            if event is not None and not event.query():
                if not block:
                    still.append((event, groups))
                    continue
                event.synchronize()
            for seqs, fresh in groups:
                for seq in seqs:
                    seq.compressing = False
                self._compressed(seqs, fresh)
                for seq in seqs:
                    if seq.finished:
                        continue
                    if seq.cancel_requested:
                        self.scheduler.finish(seq, "cancelled")
                    elif seq.finish_requested is not None:
                        self.scheduler.finish(seq, seq.finish_requested)
                    else:
                        continue
                    finished.append(seq.output())
            if event is not None:  # the main stream must see the compacted pages before using them
                torch.cuda.current_stream().wait_event(event)
        self.pending = still
        return finished

    def _compressed(self, seqs: list[Sequence], fresh: dict | None) -> None:
        """Page bookkeeping once a compression has landed."""
        budget = self.zipage_config.budget
        keep_pages = self.scheduler.pages_for(budget + 1)
        for seq in seqs:
            if fresh is not None:
                self.blocks.release(seq.pages)
                seq.pages = fresh[id(seq)]
            else:  # compacted in place (the scheduler already forgot those pages' hashes)
                self.blocks.release(seq.pages[keep_pages:])
                del seq.pages[keep_pages:]
            seq.stored = budget
            seq.compressions += 1
            seq.cached_pages = 0
        self.scheduler.compressions += len(seqs)

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        self.generated_tokens += 1
        p = seq.params
        n = len(seq.output_ids)
        reason = None
        if n >= p.min_tokens and ((token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids):
            reason = "stop"
        if self.tokenizer is not None and (p.stop or reason or n >= p.max_tokens):
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            if p.stop and n >= p.min_tokens:
                hits = [i for i in (seq.text.find(s) for s in p.stop) if i >= 0]
                if hits:
                    seq.text = seq.text[: min(hits)]
                    reason = "stop"
        if reason is None and (n >= p.max_tokens or len(seq.prompt_token_ids) + n >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if self.tokenizer is not None and seq.text is None:
                seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            if seq.compressing:  # its pages are still being read and written on the side stream
                seq.finish_requested = reason
            else:
                self.scheduler.finish(seq, reason)

    # ----------------------------------------------------------------------------- front ends
    def generate(self, prompts: Any, params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, chat: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; one output per prompt, in order. A prompt is a string,
        a list of token ids or a 1-D tensor / array of them; a 2-D one is a batch of prompts."""
        if isinstance(prompts, str) or (_is_array(prompts) and prompts.ndim <= 1) or (
            isinstance(prompts, (list, tuple)) and prompts and _is_token(prompts[0])
        ):
            prompts = [prompts]
        else:
            try:
                prompts = list(prompts)
            except TypeError:
                raise TypeError(f"generate() takes a prompt or a list of prompts, got prompts={prompts!r:.80} "
                                f"({type(prompts).__name__})") from None
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
            plist = list(params)
        else:
            plist = [params] * len(prompts)
        seqs: list[Sequence] = []
        bar = None
        try:
            for prompt, p in zip(prompts, plist):
                seqs.append(self.requests[self.add_request(prompt, p, chat=chat)])
            if use_tqdm:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(seqs), desc="zipage", unit="req", dynamic_ncols=True)
            start, start_tokens = time.perf_counter(), self.generated_tokens
            pending = {s.request_id for s in seqs if not s.finished}
            while pending:
                for out in self.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        if bar is not None:
                            bar.update(1)
                if pending and not self.has_unfinished():
                    pending -= {s.request_id for s in seqs if s.finished}  # e.g. cancelled by another thread
                    if pending:
                        raise RuntimeError(f"requests {sorted(pending)} were lost")  # never expected
                if bar is not None:
                    rate = (self.generated_tokens - start_tokens) / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        except BaseException:  # a bad prompt, an interrupt, a failing step: leave nothing behind
            for seq in seqs:
                self._cancel(seq)
                self._forget(seq)
            self._drop_abandoned()
            raise
        finally:
            if bar is not None:
                bar.close()
        outs = [seq.output() for seq in seqs]
        for seq in seqs:
            self._forget(seq)
        return outs

    def _drop_abandoned(self) -> None:
        """After a failed ``generate()``: let go at once of what only its cancelled requests still hold
        (a token flight of finished requests, compressions of cancelled ones, outputs of forgotten
        ones) rather than at the next step. Skipped while another thread is stepping."""
        if not self._step_lock.acquire(blocking=False):
            return
        try:
            flight = self.inflight
            if flight is not None and all(s.finished for s in flight.seqs):
                self.inflight = None  # their tokens are dropped anyway: nothing to wait for
                for seq in flight.seqs:
                    seq.pending -= 1
            if self.pending and all(s.cancel_requested for _, groups in self.pending
                                    for seqs, _ in groups for s in seqs):
                self._collect_compressions(block=True)
            self._undelivered = [o for o in self._undelivered if o.request_id in self.requests]
        except Exception:  # (a dead device): the next step deals with it; the original error goes up
            pass
        finally:
            self._step_lock.release()

    def stream(self, request_id: str) -> Iterator[list[int]]:
        """New token ids of one request as they come, driving the engine (other requests advance too)."""
        seq = self._get(request_id)
        while True:
            if seq.streamed < len(seq.output_ids):
                new = seq.output_ids[seq.streamed :]
                seq.streamed = len(seq.output_ids)
                yield new
            if seq.finished:
                return
            self.step()

    def output(self, request_id: str) -> RequestOutput:
        return self._get(request_id).output()

    async def agenerate(self, prompt: Any, params: SamplingParams | None = None, chat: bool = False) -> RequestOutput:
        """Await one request; steps run in a worker thread so the event loop stays free. Several
        concurrent ``agenerate`` calls share the engine (one step at a time), from one event loop
        or several in turn. A cancelled call cancels its request (its pages go back to the pool
        once the step in progress, if any, returns)."""
        rid = self.add_request(prompt, params, chat=chat)
        seq = self.requests[rid]
        try:
            lock = self._loop_lock()
            while not seq.finished:
                async with lock:  # one worker thread at a time per loop; ``_step_lock`` orders the rest
                    if not seq.finished:
                        await asyncio.to_thread(self._step_for, seq)
                await asyncio.sleep(0)
            return seq.output()
        except BaseException:  # cancelled (client gone, timeout) or failed: the request goes too
            self._cancel(seq)
            raise
        finally:
            self._forget(seq)

    def _loop_lock(self) -> asyncio.Lock:
        """The running event loop's lock (an asyncio.Lock is bound to the loop it first waited in)."""
        loop = asyncio.get_running_loop()
        lock = self._async_locks.get(loop)
        if lock is None:
            lock = self._async_locks[loop] = asyncio.Lock()
        return lock

    def _step_for(self, seq: Sequence) -> None:
        """A worker thread's step, unless ``seq`` finished meanwhile. Holding the step lock while
        it runs, a step abandoned by a cancelled ``agenerate`` still blocks the next one."""
        with self._step_lock:
            if not seq.finished:
                self.step()
        self._apply_cancels()

    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "free_pages": self.blocks.num_free,
            "total_pages": self.blocks.num_pages,
            "page_size": self.blocks.page_size,
            "max_concurrency": s.max_concurrency,
            "preemptions": s.preemptions,
            "compressions": s.compressions,
            "prefix_cache_hits": self.blocks.hits,
            "generated_tokens": self.generated_tokens,
        }

    def kept_positions(self, request_id: str, layer_idx: int) -> torch.Tensor:
        """Which logical positions (prompt tokens first, then outputs) request ``request_id`` keeps in layer
        ``layer_idx``: ``[kv_heads, stored]`` int64 on the engine's device, per KV head in slot order.
        Available between steps while the request waits or runs; a finished request (its pages are gone),
        or one whose asynchronous compression is in flight, raises ValueError."""
        return self.runner.kept_positions(self._get(request_id), layer_idx)


def _is_array(x: Any) -> bool:
    """A torch tensor or a numpy array (numpy is not imported for the check)."""
    return isinstance(x, torch.Tensor) or (hasattr(x, "ndim") and hasattr(x, "shape") and hasattr(x, "tolist")
                                          and hasattr(x, "dtype"))


def _is_token(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
