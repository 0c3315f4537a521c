"""Oracle ceiling of per-head top-k eviction in the teacher-forced quality benchmark.

Same protocol as ``benchmarks/quality.py`` (SmolLM2-135M-Instruct fp32 on the CPU, 2,048-token
MATH-500 sequences, page 16, buffer 64, window 16, same budgets and scored positions), with extra
rows whose scorer knows the future: before the teacher-forced runs, the full-KV reference forward
of every sequence also records the post-RoPE query vectors of every position and layer. At a
compression that happens when ``pos`` tokens have been seen (so the next query is at ``pos``), an
``oracle`` row scores each stored key of layer ``l``, KV head ``h`` by the attention mass it gets
from the full-KV queries of positions ``pos .. pos+F-1`` (softmax over the keys stored at that
moment, i.e. the compressed run's own keys), reduced over the query heads of the GQA group by max
or sum. ``select_keep`` then applies exactly as for every other scorer (same k per KV head, the
last ``window`` tokens protected).

Rows: ``oracle{F}_{max|sum}[_qmax][_v]`` with F in 64 (until the next compression), 128, 256, 512,
``all`` (every remaining position); ``_qmax`` takes the largest weight any of those queries gives a
key instead of the sum, ``_v`` multiplies the score by the key's value norm. Non-oracle rows (cheap
signals to compare with): ``past{P}_{max|sum}[_d{7|9|5}][_avg]``: attention mass from the previous P
queries (or ``all``), causal, optionally decayed per 64 tokens and divided by the number of queries
that see each key; ``zipage_prompt``: the zipage scorer plus the current problem statement ranked
first (use it with ``sinks=4``, else the statement can push out the first tokens);
``zipage_nl`` / ``zipage_sep`` / ``zipage_sep2``: the zipage scorer plus +1 for newline /
separator tokens; ``zipage_tracked``: the zipage scorer unchanged;
``future{H}_p{P}[_mix][_max]``: expected attention of the future, causal: the last P queries (P = 0:
the cache's own window queries) re-placed by RoPE at the positions ``pos .. pos+H-1`` (every 32nd)
score the keys by the attention mass they would give them (``_mix``: plus the window score,
``_max``: max over the GQA group instead of the sum). Every row of this script logs what
its kept tokens are (window, first 4, current statement, current solution, earlier problems). Any
ZipageConfig field may be set in brackets as in quality.py (``window`` matters: it is the
protected tail; ``zipage_*`` rows pass the config to the zipage scorer). All other rows and options
are those of quality.py:

    python benchmarks/quality_oracle.py --no-gen --threads 2 --seqs 4 --budgets 1/8,1/4 \\
        --scorers zipage,snapkv,oracle64_max,oracle64_sum,oracle256_max,oracleall_max,oracleall_sum --out /tmp/q/oracle_main

Checks run on every call: the recomputed queries reproduce the attention output of layers 0 and 15
exactly; the cache's own window queries at the first compression match the captured queries of the
same positions; the positions each row tracks (by replaying ``select_keep``) match the keys the
cache holds at the next compression (layer 0). The ``command`` recorded in the output files reads
``quality.py`` (it is quality.py's main that runs).

The oracle scorers exist only inside this script (they are registered here, not in the library).
Only ``--decode chunk`` (the default) is supported.
"""

from __future__ import annotations

import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import quality as Q  # noqa: E402

from zipage.compress import select_keep  # noqa: E402
from zipage.scoring import Scorer, ScoreInputs, register_scorer  # noqa: E402


class _State:
    """What the scorers of this script read: the ids and captured queries of the current group of
    sequences (queries per layer ``[B, H_q, N, D]``), the cache being decoded (for the current
    position), and per layer the positions of the tokens each KV head kept at the last compression."""

    ids: torch.Tensor | None = None
    queries: list[torch.Tensor] | None = None
    cache = None
    calls = 0
    kept_pos: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (position at that compression, [B, H, k])
    kept_keys0: torch.Tensor | None = None  # layer 0's kept keys, checked at the next compression
    composition: dict[str, torch.Tensor] = {}  # category -> summed fraction of the kept tokens
    comp_count = 0


STATE = _State()
DELIMITERS = torch.tensor([33348, 37500, 42, 198, 1116])  # "Problem", "Solution", ":", "\n", "\n\n"


def problem_spans(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of each sequence: the index of the "Problem: ... Solution: ..." text it belongs
    to and whether it lies in the problem statement (before "Solution:"); ``[B, N]`` each."""
    problem_id, solution_id, colon_id = 33348, 37500, 42  # SmolLM2 tokens "Problem", "Solution", ":"
    B, N = ids.shape
    index = torch.zeros(B, N, dtype=torch.long)
    statement = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        row = ids[b].tolist()
        cur, in_statement = -1, False
        for p, t in enumerate(row):
            nxt = row[p + 1] if p + 1 < N else None
            if t == problem_id and nxt == colon_id and (p == 0 or row[p - 1] == 1116):  # after "\n\n"
                cur, in_statement = cur + 1, True
            elif t == solution_id and nxt == colon_id and in_statement:
                in_statement = False
            index[b, p], statement[b, p] = max(cur, 0), in_statement
    return index, statement


class TrackedScorer(Scorer):
    """A scorer of this script: knows the current position and the positions of the stored keys of
    every (row, KV head), by replaying ``select_keep`` on its own scores (checked against the keys
    the cache holds at the next compression)."""

    needs_values = True
    needs_queries = False

    def positions(self, x: ScoreInputs, pos: int) -> torch.Tensor:
        B, H, S = x.keys.shape[:3]
        prev = STATE.kept_pos.get(x.layer_idx)
        if prev is None:
            if S != pos:
                raise RuntimeError(f"first compression with {S} stored tokens at position {pos}")
            return torch.arange(S).expand(B, H, S)
        prev_pos, kept = prev
        new = torch.arange(prev_pos, pos).expand(B, H, pos - prev_pos)
        if kept.shape[2] + new.shape[2] != S:
            raise RuntimeError(f"position tracking lost: {kept.shape[2]} kept + {new.shape[2]} new != {S} stored")
        return torch.cat([kept, new], dim=2)

    def raw_score(self, x: ScoreInputs, pos: int, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, x: ScoreInputs) -> torch.Tensor:
        if STATE.queries is None or STATE.cache is None:
            raise RuntimeError("this scorer runs only inside quality_oracle.py's teacher-forced runs")
        if x.layer_idx < 0:
            raise RuntimeError("tracked scorers need one layer per compression call (layer_stride=1)")
        cfg = STATE.cache.zipage_config
        pos = STATE.cache.layers[0].seen  # tokens seen; compression runs before this step's tokens arrive
        if x.layer_idx == 0 and STATE.kept_keys0 is not None:
            k = STATE.kept_keys0.shape[2]
            if not torch.equal(x.keys[:, :, :k], STATE.kept_keys0):
                raise RuntimeError("the replayed select_keep does not match the cache's compaction")
        positions = self.positions(x, pos)
        scores = self.raw_score(x, pos, positions).float()
        keep = select_keep(scores, x.key_mask, cfg.budget, cfg.window, cfg.sinks)
        kept = positions.gather(2, keep)
        STATE.kept_pos[x.layer_idx] = (pos, kept)
        if x.layer_idx == 0:
            STATE.kept_keys0 = x.keys.gather(2, keep[..., None].expand(-1, -1, -1, x.keys.shape[-1])).clone()
        self.record(kept, pos, cfg.window)
        STATE.calls += 1
        return scores

    @staticmethod
    def record(kept: torch.Tensor, pos: int, window: int) -> None:
        """Add what the kept tokens are: the window, the first 4 tokens, then by the text they belong
        to (current problem statement, current solution, earlier problems); and, across those, the
        share of delimiter tokens ("Problem", "Solution", ":", newlines)."""
        index, statement = STATE.spans
        B = kept.shape[0]
        flat = kept.reshape(B, -1)
        cur = index[:, pos - 1][:, None, None]
        ki = index.gather(1, flat).view_as(kept)
        ks = statement.gather(1, flat).view_as(kept)
        tok = STATE.ids.gather(1, flat).view_as(kept)
        win = kept >= pos - window
        first = ~win & (kept < 4)
        rest = ~win & ~first
        cats = {
            "window": win,
            "first 4": first,
            "current statement": rest & (ki == cur) & ks,
            "current solution": rest & (ki == cur) & ~ks,
            "earlier problems": rest & (ki < cur),
            "delimiters (any)": ~win & torch.isin(tok, DELIMITERS),
        }
        for name, m in cats.items():
            STATE.composition[name] = STATE.composition.get(name, 0.0) + m.float().mean().item()
        STATE.comp_count += 1


def _attention_mass(q: torch.Tensor, x: ScoreInputs, visible: torch.Tensor | None, group: str,
                    query_reduce: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mass each stored key gets from queries ``q`` ``[B, Hq, F, D]`` (softmax over the stored keys,
    ``visible`` ``[B, Hkv, F, S]`` masks keys a query cannot see), reduced over the queries (sum or
    max; ``weights`` ``[F]`` scale each query) and over the GQA group (max or sum)."""
    B, Hkv, S, D = x.keys.shape
    Fq = q.shape[2]
    g = q.shape[1] // Hkv
    logits = torch.einsum("bhgfd,bhsd->bhgfs", q.to(x.keys.dtype).reshape(B, Hkv, g, Fq, D), x.keys).float()
    logits = logits * x.scaling
    mask = x.key_mask[:, None, None, None, :]
    if visible is not None:
        mask = mask & visible[:, :, None]
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    if weights is not None:
        probs = probs * weights[:, None]
    mass = probs.sum(dim=3) if query_reduce == "sum" else probs.amax(dim=3)  # [B, Hkv, g, S]
    return mass.amax(dim=2) if group == "max" else mass.sum(dim=2)


class OracleScorer(TrackedScorer):
    """Attention mass from the next ``future`` full-KV queries (None: every remaining one)."""

    future: int | None = 64
    group: str = "max"
    query_reduce: str = "sum"  # "sum": attention mass; "max": the largest weight any future query gives
    value_weight: bool = False  # multiply by the value norm (size of the contribution, not just the weight)

    def raw_score(self, x: ScoreInputs, pos: int, positions: torch.Tensor) -> torch.Tensor:
        allq = STATE.queries[x.layer_idx]  # [B, Hq, N, D]
        N = allq.shape[2]
        end = N if self.future is None else min(pos + self.future, N)
        if not pos < end:
            raise RuntimeError(f"oracle: no future query after position {pos}")
        if allq.shape[0] != x.keys.shape[0]:
            raise RuntimeError(f"oracle: {allq.shape[0]} captured sequences, {x.keys.shape[0]} in the cache")
        score = _attention_mass(allq[:, :, pos:end], x, None, self.group, self.query_reduce)
        if self.value_weight:
            score = score * x.values.float().norm(dim=-1)
        return score


class PastScorer(TrackedScorer):
    """Not an oracle: attention mass from the ``past`` previous queries (None: all), causal (a query
    sees the stored keys at or before its position), each weighted ``decay ** (age / 64)``. The
    queries are the full-KV run's (an engine would keep its own, slightly different ones)."""

    past: int | None = 256
    group: str = "max"
    decay: float = 1.0
    per_query: bool = False  # divide by the number of those queries that see the key (no bias to old keys)

    def raw_score(self, x: ScoreInputs, pos: int, positions: torch.Tensor) -> torch.Tensor:
        allq = STATE.queries[x.layer_idx]
        start = 0 if self.past is None else max(pos - self.past, 0)
        qpos = torch.arange(start, pos)
        visible = positions[:, :, None, :] <= qpos[None, None, :, None]  # [B, Hkv, F, S]
        w = None if self.decay == 1.0 else self.decay ** ((pos - 1 - qpos).float() / 64.0)
        mass = _attention_mass(allq[:, :, start:pos], x, visible, self.group, "sum", w)
        if self.per_query:
            ww = torch.ones(len(qpos)) if w is None else w
            mass = mass / (visible.float() * ww[:, None]).sum(dim=2).clamp_min(1e-6)
        return mass


def _rotate_by(q: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rotate post-RoPE queries ``q`` ``[..., D]`` further by ``offsets`` positions (broadcast over
    the leading dims): RoPE rotations of one pair commute, so this is the query re-placed at
    ``position + offset``."""
    ang = offsets.to(torch.float32)[..., None] * STATE.inv_freq  # [..., D/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    half = q.shape[-1] // 2
    rot = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
    return q * cos + rot * sin


class FutureScorer(TrackedScorer):
    """Not an oracle: expected attention of the future. The last ``past`` queries (the cache's own
    window queries for ``past=0``, else the full-KV run's) are re-placed at future positions
    ``pos + j`` for ``j`` in ``0, step, ..., horizon - step`` (their content as a sample of the
    future queries' content; RoPE moves them), and each stored key is scored by the attention mass
    those re-placed queries give it (softmax over the stored keys). ``mix`` adds ``mix`` times the
    zipage scorer's window score (both are masses summed over queries; each is normalised to a
    mean-over-queries first). The zipage recency floor applies."""

    needs_queries = True
    past: int = 0
    horizon: int = 256
    step: int = 32
    mix: float = 0.0
    group: str = "sum"

    def raw_score(self, x: ScoreInputs, pos: int, positions: torch.Tensor) -> torch.Tensor:
        from zipage.scoring.zipage import _recent_first

        if self.past == 0:
            q = x.queries  # [B, Hq, w, D], positions pos-w .. pos-1
            qpos = torch.arange(pos - q.shape[2], pos)
        else:
            q = STATE.queries[x.layer_idx][:, :, max(pos - self.past, 0):pos]
            qpos = torch.arange(max(pos - self.past, 0), pos)
        js = torch.arange(0, self.horizon, self.step)
        offsets = (pos + js[:, None] - qpos[None, :]).reshape(-1)  # [J * P]
        qq = q.to(torch.float32)[:, :, None].expand(-1, -1, len(js), -1, -1).reshape(q.shape[0], q.shape[1], -1, q.shape[-1])
        qq = _rotate_by(qq, offsets)
        mass = _attention_mass(qq, x, None, self.group, "sum") / qq.shape[2]
        if self.mix:
            win = _attention_mass(x.queries.float(), x, (positions[:, :, None, :] <= torch.arange(pos - x.queries.shape[2], pos)[None, None, :, None]), self.group, "sum")
            mass = mass + self.mix * win / x.queries.shape[2]
        cfg = STATE.cache.zipage_config
        return _recent_first(mass, cfg.recent_kept)


class ZipagePlusScorer(TrackedScorer):
    """Not an oracle: the zipage scorer (this row's config), plus a bonus for some tokens.

    ``protect="statement"``: the tokens of the current problem statement go above every other token
    (a stand-in for "keep the request's prompt"; here the prompt of the text being read is its
    statement). ``protect=(token ids)``: those tokens (separators) get +1, above every ordinary
    token (window attention is at most 1) and below the recency floor of the zipage scorer."""

    needs_queries = True
    protect: str | tuple = "statement"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        from zipage.scoring import get_scorer

        self.inner = get_scorer("zipage", self.config.replace(scorer="zipage"))
        if self.inner.stateful:
            raise ValueError("zipage_plus rows need a stateless zipage config (use_global=False)")

    def raw_score(self, x: ScoreInputs, pos: int, positions: torch.Tensor) -> torch.Tensor:
        scores = self.inner(x)[0]
        B = positions.shape[0]
        if self.protect != "statement":
            tok = STATE.ids.gather(1, positions.reshape(B, -1)).view_as(positions)
            return torch.where(torch.isin(tok, torch.tensor(self.protect)), scores + 1.0, scores)
        index, statement = STATE.spans
        cur = index[:, pos - 1][:, None, None]
        ki = index.gather(1, positions.reshape(B, -1)).view_as(positions)
        ks = statement.gather(1, positions.reshape(B, -1)).view_as(positions)
        bonus = (ki == cur) & ks
        return torch.where(bonus, scores + 1e4, scores)


class ZipageTracked(ZipagePlusScorer):
    """The zipage scorer unchanged, only tracked (for the composition of what it keeps)."""

    def raw_score(self, x: ScoreInputs, pos: int, positions: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[0]


def _register() -> list[str]:
    names = []

    def add(name: str, base: type, **attrs) -> None:
        register_scorer(type(f"Scorer_{name}", (base,), {"name": name, **attrs}))
        names.append(name)

    for fut in (64, 128, 256, 512, None):
        for red in ("max", "sum"):
            for qred in ("sum", "max"):
                for vw in (False, True):
                    name = f"oracle{'all' if fut is None else fut}_{red}" + ("_qmax" if qred == "max" else "") + ("_v" if vw else "")
                    add(name, OracleScorer, future=fut, group=red, query_reduce=qred, value_weight=vw)
    for past in (64, 256, 512, 1024, None):
        for red in ("max", "sum"):
            for decay in (1.0, 0.9, 0.7, 0.5):
                for avg in (False, True):
                    name = f"past{'all' if past is None else past}_{red}" + ("" if decay == 1.0 else f"_d{int(decay * 10)}")
                    add(name + ("_avg" if avg else ""), PastScorer, past=past, group=red, decay=decay, per_query=avg)
    for past in (0, 64, 256):
        for hor in (64, 256, 512, 1024):
            for mix in (0.0, 1.0):
                for red in ("sum", "max"):
                    name = f"future{hor}_p{past}" + ("_mix" if mix else "") + ("" if red == "sum" else "_max")
                    add(name, FutureScorer, past=past, horizon=hor, mix=mix, group=red)
    add("zipage_prompt", ZipagePlusScorer)
    add("zipage_nl", ZipagePlusScorer, protect=(198, 1116))  # "\n", "\n\n"
    add("zipage_sep", ZipagePlusScorer, protect=(198, 1116, 42, 30, 33348, 37500))  # + ":", ".", "Problem", "Solution"
    add("zipage_sep2", ZipagePlusScorer, protect=(198, 1116, 42, 30, 33348, 37500, 20))  # + "$"
    add("zipage_tracked", ZipageTracked)
    return names


ORACLE_NAMES = _register()


# ----------------------------------------------------------------------------- query capture
def _rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb


class QueryCapture:
    """Forward hooks on every attention module: recompute q (and, for the check, k and v) from the
    module's own projections and rotary embedding, exactly as its forward does."""

    def __init__(self, model, check_layers=(0, 15)) -> None:
        self.attn = [layer.self_attn for layer in model.model.layers]
        self.per_layer: list[list[torch.Tensor]] = [[] for _ in self.attn]
        self.check_layers = set(check_layers)
        self.checks: list[tuple[int, float, float]] = []
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []

    def __enter__(self):
        rope = _rotary()
        for i, mod in enumerate(self.attn):

            def pre(module, args, kwargs, i=i):
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                cos, sin = kwargs["position_embeddings"]
                shape = (*h.shape[:-1], -1, module.head_dim)
                q = module.q_proj(h).view(shape).transpose(1, 2)
                k = module.k_proj(h).view(shape).transpose(1, 2)
                q, k = rope(q, k, cos, sin)
                self.per_layer[i].append(q.detach().clone())
                if i in self.check_layers and not any(c[0] == i for c in self.checks):
                    v = module.v_proj(h).view(shape).transpose(1, 2)
                    self._kv[i] = (k.detach(), v.detach())

            def post(module, args, kwargs, output, i=i):
                if i not in self._kv:
                    return
                k, v = self._kv.pop(i)
                q = self.per_layer[i][-1]
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=module.scaling)
                o = module.o_proj(o.transpose(1, 2).reshape(*q.shape[:1], q.shape[2], -1))
                got = output[0] if isinstance(output, tuple) else output
                diff = (o - got).abs().max().item()
                self.checks.append((i, diff, got.abs().max().item()))

            self.handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            self.handles.append(mod.register_forward_hook(post, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def queries(self) -> list[torch.Tensor]:
        return [torch.cat(parts, dim=0) for parts in self.per_layer]  # per layer [B, Hq, N, D]


_orig_reference = Q.reference
_orig_run_chunked = Q.run_chunked


def reference_with_queries(model, ids: torch.Tensor) -> Q.Reference:
    """quality.reference, plus the post-RoPE queries of every position (kept in STATE)."""
    STATE.queries = None
    with QueryCapture(model) as cap:
        ref = _orig_reference(model, ids)
    STATE.queries = cap.queries()
    STATE.ids = ids.clone()
    STATE.inv_freq = model.model.rotary_emb.inv_freq.float().clone()
    STATE.spans = problem_spans(ids)
    for layer, diff, scale in cap.checks:
        Q.log(f"oracle capture check, layer {layer}: recomputed attention output vs the model's, max |diff| "
              f"{diff:.2e} (max |out| {scale:.2e})")
        if diff > 1e-3 * max(scale, 1.0):
            raise RuntimeError(f"query capture does not reproduce layer {layer}'s attention (diff {diff})")
    q0 = STATE.queries[0]
    if q0.shape[0] != ids.shape[0] or q0.shape[2] != ids.shape[1]:
        raise RuntimeError(f"captured queries {tuple(q0.shape)} do not match ids {tuple(ids.shape)}")
    return ref


_checked_window = set()
COMPOSITION: dict = {}


def run_chunked_with_oracle(model, ids, zcfg, tracker, cache):
    """quality.run_chunked; for oracle rows the cache compresses one layer per call and the scorer
    sees the cache (its current position). Once per budget, the cache's own captured window queries
    are compared with the captured full-KV queries of the same positions (alignment check)."""
    first = zcfg.budget + zcfg.buffer
    if first not in _checked_window and STATE.queries is not None:
        worst = 0.0
        for li, layer in enumerate(cache.layers):
            wq = layer.window_queries
            ref = STATE.queries[li][:, :, first - wq.shape[2] : first]
            worst = max(worst, (wq - ref).abs().max().item())
        Q.log(f"oracle alignment check (B={zcfg.budget}): cache window queries vs captured queries at positions "
              f"{first - cache.layers[0].window_queries.shape[2]}..{first - 1}, max |diff| {worst:.2e}")
        if worst > 1e-2:
            raise RuntimeError("captured queries are not aligned with the cache's positions")
        _checked_window.add(first)
    tracked = isinstance(cache.scorer, TrackedScorer)
    if tracked:
        cache.zipage_config = cache.zipage_config.replace(layer_stride=1)
        STATE.cache, STATE.calls = cache, 0
        STATE.kept_pos, STATE.kept_keys0, STATE.composition, STATE.comp_count = {}, None, {}, 0
    try:
        meta = _orig_run_chunked(model, ids, zcfg, tracker, cache)
    finally:
        STATE.cache = None
    if tracked:
        expect = meta["compressions"] * len(cache.layers)
        if STATE.calls != expect:
            raise RuntimeError(f"{cache.scorer.name} scored {STATE.calls} layer compressions, expected {expect}")
        comp = {k: v / STATE.comp_count for k, v in STATE.composition.items()}
        COMPOSITION.setdefault((cache.scorer.name, zcfg.budget), []).append(comp)
        Q.log(f"  {cache.scorer.name} B={zcfg.budget}: kept tokens: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in comp.items()))
    return meta


Q.reference = reference_with_queries
Q.run_chunked = run_chunked_with_oracle


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--decode" in argv and argv[argv.index("--decode") + 1] != "chunk":
        raise SystemExit("quality_oracle.py supports --decode chunk only")
    if "--verify" in argv:
        raise SystemExit("quality_oracle.py does not support --verify")
    sys.argv = [str(pathlib.Path(__file__).resolve())] + argv
    return Q.main(argv)


if __name__ == "__main__":
    sys.exit(main())
