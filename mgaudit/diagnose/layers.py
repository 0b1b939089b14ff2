"""Layer divergence locator and K/V drift: solo vs batched, teacher-forced, in lockstep.

Both run the same prompt twice, step by step: alone (batch 1, free-running greedy, as
``generate`` would) and as one row of a left-padded batch whose other rows are filler
prompts. The batched row is fed the solo tokens (teacher forcing), so both sides see
the same inputs and any difference comes from batching alone. The fillers feed their
own argmax.

Steps: ``-1`` is the prefill forward (its argmax is generated token 0); decode step
``s >= 0`` feeds generated token ``s`` and its argmax is token ``s + 1``. So the
``step`` of a trace row written by ``mgaudit scan`` (the index of the generated token)
is this step + 1.

* :func:`locate_divergence` hooks every decoder layer and its ``self_attn`` and ``mlp``
  and reports, per step, the first (layer, block) whose output for the target row is not
  bit-identical to solo, with the max |difference| per layer.
* :func:`kv_drift` compares, after every step and for every layer, the solo K/V cache
  with the batched row's K/V on its valid positions, finds the first argmax flip and fits
  the slope of the deepest layer's K difference over the steps up to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .ops import model_parts
from ..decoding.loop import greedy, padded_prefill
from ..errors import UsageError

BLOCKS = ("attention", "mlp", "layer")  # order inside a decoder layer; "layer" = its output


@dataclass
class _View:
    """What one lockstep step exposes to the consumers."""

    step: int
    solo_logits: torch.Tensor  # (vocab,)
    batch_logits: torch.Tensor  # (vocab,) of the target row
    solo_store: dict
    batch_store: dict
    solo_cache: Any
    batch_cache: Any
    pad: int


class _Hooks:
    """Forward hooks on each decoder layer, its self_attn and mlp: keep the target row's output."""

    def __init__(self, layers, enabled: bool):
        self.store: dict | None = None
        self.select = None
        self.handles = []
        if not enabled:
            return
        for i, layer in enumerate(layers):
            for block, mod in (("attention", layer.self_attn), ("mlp", layer.mlp), ("layer", layer)):
                self.handles.append(mod.register_forward_hook(self._hook(i, block)))

    def _hook(self, i: int, block: str):
        def f(mod, args, out):
            if self.store is None:
                return
            t = out[0] if isinstance(out, (tuple, list)) else out
            self.store[(i, block)] = self.select(t).detach().clone()
        return f

    def capture(self, store: dict | None, select) -> None:
        self.store, self.select = store, select

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def resolve_row(prompt_ids: Sequence[int], batch_prompt_ids: Sequence[Sequence[int]], row: int | None) -> int:
    if not batch_prompt_ids:
        raise UsageError("the batch is empty", hint="give the prompts of the batch, the target one included")
    if row is None:
        matches = [i for i, p in enumerate(batch_prompt_ids) if list(p) == list(prompt_ids)]
        if not matches:
            raise UsageError("the target prompt is not one of the batch's prompts",
                             hint="put it into batch_prompt_ids or pass row=")
        return matches[0]
    if not 0 <= row < len(batch_prompt_ids) or list(batch_prompt_ids[row]) != list(prompt_ids):
        raise UsageError(f"row {row} of the batch does not hold the target prompt")
    return row


@torch.inference_mode()
def _lockstep(lm, prompt_ids, batch_prompt_ids, row: int, max_new_tokens: int, hooks: bool) -> Iterator[_View]:
    """Solo and batched decoding advanced alternately (two consumers of the one loop); the batched
    row is fed the solo tokens, the fillers their own argmax."""
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompt_ids:
        raise UsageError("the target prompt has no tokens")
    model = lm.model
    parts = model_parts(model)
    pad_id = lm.pad_token_id
    pad = max(len(p) for p in batch_prompt_ids) - len(prompt_ids)
    bsz = len(batch_prompt_ids)
    cap = _Hooks(parts.layers, hooks)
    try:
        s_store: dict = {}
        b_store: dict = {}
        cap.capture(s_store, lambda t: t[0])
        s_logits, s_cache, s_pos, s_adv = padded_prefill(model, [prompt_ids], pad_id)
        cap.capture(b_store, lambda t: t[row, pad:])
        b_logits, b_cache, b_pos, b_adv = padded_prefill(model, batch_prompt_ids, pad_id)
        cap.capture(None, None)
        solo = greedy(s_logits, s_cache, s_pos, s_adv, eos_ids=lm.eos_token_ids, pad_id=pad_id,
                      budgets=[max_new_tokens])
        batch = greedy(b_logits, b_cache, b_pos, b_adv, eos_ids=(), pad_id=pad_id, budgets=[max_new_tokens] * bsz,
                       stop_at_eos=False)
        s = next(solo)
        b = next(batch)
        while True:
            yield _View(s.index - 1, s.logits[0], b.logits[row], s_store, b_store, s_cache, b_cache, pad)
            b.chosen[row] = s.chosen[0]  # teacher forcing: the batched row takes the solo token
            s_store, b_store = {}, {}
            cap.capture(s_store, lambda t: t[0, -1:])
            s = next(solo, None)
            if s is None:
                break
            cap.capture(b_store, lambda t: t[row, -1:])
            b = next(batch)
            cap.capture(None, None)
    finally:
        cap.close()


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    if a.shape != b.shape:
        raise RuntimeError(f"solo and batched shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    same = torch.equal(a, b)
    return same, (0.0 if same else float((a.float() - b.float()).abs().max()))


# --------------------------------------------------------------------------- locator


@dataclass
class StepDivergence:
    step: int  # -1 = prefill
    identical: bool  # every layer and block bit-identical to solo
    first_layer: int | None
    first_block: str | None  # attention, mlp or layer
    attention_max_abs_diff: list[float]
    mlp_max_abs_diff: list[float]
    layer_max_abs_diff: list[float]
    logits_max_abs_diff: float
    solo_argmax: int
    batched_argmax: int

    @property
    def flipped(self) -> bool:
        return self.solo_argmax != self.batched_argmax

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flipped": self.flipped}


@dataclass
class LocateReport:
    prompt_id: str | None
    prompt_len: int
    batch_size: int
    row: int
    pad_len: int
    batch_lengths: list[int]
    n_layers: int
    prefill_rows: int  # rows of the batched prefill's GEMMs (batch x padded width)
    solo_prefill_rows: int
    padded: bool  # some row of the batch is padded (the batch carries a mask)
    steps: list[StepDivergence] = field(default_factory=list)
    verdict: str = ""
    torch_threads: int = 0

    @property
    def first_divergent_step(self) -> int | None:
        return next((s.step for s in self.steps if not s.identical), None)

    @property
    def first_flip_step(self) -> int | None:
        return next((s.step for s in self.steps if s.flipped), None)

    @property
    def diverged(self) -> bool:
        return self.first_divergent_step is not None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "steps"}
        d["steps"] = [s.to_dict() for s in self.steps]
        d.update(first_divergent_step=self.first_divergent_step, first_flip_step=self.first_flip_step,
                 diverged=self.diverged)
        return d


def locate_divergence(lm, prompt_ids: Sequence[int], batch_prompt_ids: Sequence[Sequence[int]],
                      max_new_tokens: int = 32, row: int | None = None, prompt_id: str | None = None
                      ) -> LocateReport:
    """Where inside the stack the batched row first stops being bit-identical to solo.

    ``batch_prompt_ids``: every prompt of the batch, the target one included (at ``row``,
    or the first entry equal to ``prompt_ids``).
    """
    row = resolve_row(prompt_ids, batch_prompt_ids, row)
    lengths = [len(p) for p in batch_prompt_ids]
    width = max(lengths)
    n_layers = len(model_parts(lm.model).layers)
    rep = LocateReport(prompt_id, len(prompt_ids), len(batch_prompt_ids), row, width - len(prompt_ids), lengths,
                       n_layers, len(lengths) * width, len(prompt_ids), any(n < width for n in lengths),
                       torch_threads=torch.get_num_threads())
    for v in _lockstep(lm, prompt_ids, batch_prompt_ids, row, max_new_tokens, hooks=True):
        diffs = {}
        first = None
        for i in range(n_layers):
            for block in BLOCKS:
                same, d = _diff(v.solo_store[(i, block)], v.batch_store[(i, block)])
                diffs[(i, block)] = d
                if not same and first is None:
                    first = (i, block)
        _, dl = _diff(v.solo_logits, v.batch_logits)
        rep.steps.append(StepDivergence(
            step=v.step, identical=first is None,
            first_layer=None if first is None else first[0], first_block=None if first is None else first[1],
            attention_max_abs_diff=[diffs[(i, "attention")] for i in range(n_layers)],
            mlp_max_abs_diff=[diffs[(i, "mlp")] for i in range(n_layers)],
            layer_max_abs_diff=[diffs[(i, "layer")] for i in range(n_layers)],
            logits_max_abs_diff=dl, solo_argmax=int(torch.argmax(v.solo_logits)),
            batched_argmax=int(torch.argmax(v.batch_logits)),
        ))
    rep.verdict = locate_verdict(rep)
    return rep


def _where(layer: int | None, block: str | None) -> str:
    if layer is None:
        return "-"
    return f"layer {layer} " + ({"attention": "attention", "mlp": "MLP"}.get(block, "output"))


def locate_verdict(rep: LocateReport) -> str:
    shape = (f"batch {rep.batch_size}, row {rep.row}, left padding {rep.pad_len}, "
             f"{'padded (mask present)' if rep.padded else 'equal lengths (no padding)'}")
    if not rep.diverged:
        return (f"no divergence: the batched row is bit-identical to solo at every layer, block and step "
                f"({len(rep.steps)} steps incl. prefill; {shape}; batched prefill GEMMs {rep.prefill_rows} rows "
                f"vs {rep.solo_prefill_rows} solo).")
    parts = []
    pre = rep.steps[0]
    if pre.identical:
        parts.append(f"prefill (step -1) bit-identical ({rep.prefill_rows} vs {rep.solo_prefill_rows} GEMM rows)")
    else:
        why = [f"batched prefill: {rep.prefill_rows} GEMM rows vs {rep.solo_prefill_rows} solo"]
        if rep.padded:
            why.append("padding mask present")
        parts.append(f"prefill (step -1) first differs at {_where(pre.first_layer, pre.first_block)} "
                     f"({'; '.join(why)}); last layer max |diff| {pre.layer_max_abs_diff[-1]:.3g}")
    dec = rep.steps[1:]
    bad = [s for s in dec if not s.identical]
    if dec:
        if bad:
            counts: dict[str, int] = {}
            for s in bad:
                key = _where(s.first_layer, s.first_block)
                counts[key] = counts.get(key, 0) + 1
            top = ", ".join(f"{k} on {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])[:3])
            parts.append(f"decode: {len(bad)} of {len(dec)} steps differ, first at step {bad[0].step}; "
                         f"first divergent block: {top}")
        else:
            parts.append(f"decode: all {len(dec)} steps bit-identical")
    flips = [s.step for s in rep.steps if s.flipped]
    parts.append(f"argmax flips at step(s) {', '.join(map(str, flips[:8]))}" if flips
                 else "no argmax flip")
    return "; ".join(parts) + f" ({shape})."


# --------------------------------------------------------------------------- K/V drift


def _cache_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]  # older transformers


def _absmax(t: torch.Tensor) -> float:
    return float(t.float().abs().max()) if t.numel() else 0.0


@dataclass
class KvDriftResult:
    prompt_id: str | None
    prompt_len: int
    batch_size: int
    row: int
    pad_len: int
    n_layers: int
    steps: list[int] = field(default_factory=list)  # -1 = after prefill
    k_max_abs_diff: list[list[float]] = field(default_factory=list)  # [step][layer], over valid positions
    v_max_abs_diff: list[list[float]] = field(default_factory=list)
    k_rel: list[list[float]] = field(default_factory=list)  # / max |solo K| of that layer
    v_rel: list[list[float]] = field(default_factory=list)
    k_new_max_abs_diff: list[list[float]] = field(default_factory=list)  # the positions written at that step
    v_new_max_abs_diff: list[list[float]] = field(default_factory=list)
    flips: list[bool] = field(default_factory=list)  # batched argmax != solo argmax at that step
    solo_argmax: list[int] = field(default_factory=list)
    batched_argmax: list[int] = field(default_factory=list)
    flipped_at_step: int | None = None
    slope: float | None = None  # deepest layer's K max |diff| per token, steps -1..flip
    slope_new: float | None = None  # the same for the newest K column, decode steps 0..flip
    trend: str | None = None  # grows, stays flat, shrinks
    window: list[int] = field(default_factory=list)
    verdict: str = ""

    def records(self) -> list[dict[str, Any]]:
        out = []
        for i, s in enumerate(self.steps):
            for layer in range(self.n_layers):
                out.append({
                    "prompt_id": self.prompt_id or "", "step": s, "layer": layer,
                    "k_max_abs_diff": self.k_max_abs_diff[i][layer], "v_max_abs_diff": self.v_max_abs_diff[i][layer],
                    "k_rel": self.k_rel[i][layer], "v_rel": self.v_rel[i][layer],
                    "flipped_at_step": self.flipped_at_step,
                    "k_new_max_abs_diff": self.k_new_max_abs_diff[i][layer],
                    "v_new_max_abs_diff": self.v_new_max_abs_diff[i][layer],
                    "flip": self.flips[i], "batch_size": self.batch_size, "row": self.row,
                    "pad_len": self.pad_len, "prompt_len": self.prompt_len,
                })
        return out

    def leading_up(self, n: int = 8) -> list[int]:
        """Indexes into ``steps`` of the last ``n`` steps up to the first flip (all steps when none)."""
        end = len(self.steps) if self.flipped_at_step is None else self.steps.index(self.flipped_at_step) + 1
        return list(range(max(0, end - n), end))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fit(x: list[float], y: list[float]) -> float | None:
    if len(x) < 2 or len(set(x)) < 2:
        return None
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    dx = xa - xa.mean()
    return float((dx * (ya - ya.mean())).sum() / (dx * dx).sum())  # least squares; exactly 0 for constant y


def trend_of(slope: float | None, x: list[float], y: list[float]) -> str | None:
    """grows / shrinks when the fitted rise over the window is at least 25 % of its mean level."""
    if slope is None:
        return None
    rise = slope * (max(x) - min(x))
    level = float(np.mean(np.abs(y)))
    if level == 0.0 and rise == 0.0:
        return "stays flat"
    if rise >= 0.25 * level:
        return "grows"
    if rise <= -0.25 * level:
        return "shrinks"
    return "stays flat"


def kv_drift(lm, prompt_ids: Sequence[int], batch_prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64,
             row: int | None = None, prompt_id: str | None = None) -> KvDriftResult:
    """Solo vs batched K/V caches after every step, per layer; first flip and the drift slope."""
    row = resolve_row(prompt_ids, batch_prompt_ids, row)
    n_layers = len(model_parts(lm.model).layers)
    width = max(len(p) for p in batch_prompt_ids)
    res = KvDriftResult(prompt_id, len(prompt_ids), len(batch_prompt_ids), row, width - len(prompt_ids), n_layers)
    for v in _lockstep(lm, prompt_ids, batch_prompt_ids, row, max_new_tokens, hooks=False):
        new = len(prompt_ids) if v.step < 0 else 1
        rows = {name: [] for name in ("k", "v", "kr", "vr", "kn", "vn")}
        for layer in range(n_layers):
            sk, sv = _cache_kv(v.solo_cache, layer)
            bk, bv = _cache_kv(v.batch_cache, layer)
            sk, sv = sk[0], sv[0]
            bk, bv = bk[row, :, v.pad:], bv[row, :, v.pad:]
            _, dk = _diff(sk, bk)
            _, dv = _diff(sv, bv)
            mk, mv = _absmax(sk), _absmax(sv)
            rows["k"].append(dk)
            rows["v"].append(dv)
            rows["kr"].append(dk / mk if mk else 0.0)
            rows["vr"].append(dv / mv if mv else 0.0)
            rows["kn"].append(_diff(sk[:, -new:], bk[:, -new:])[1])
            rows["vn"].append(_diff(sv[:, -new:], bv[:, -new:])[1])
        res.steps.append(v.step)
        res.k_max_abs_diff.append(rows["k"])
        res.v_max_abs_diff.append(rows["v"])
        res.k_rel.append(rows["kr"])
        res.v_rel.append(rows["vr"])
        res.k_new_max_abs_diff.append(rows["kn"])
        res.v_new_max_abs_diff.append(rows["vn"])
        sa, ba = int(torch.argmax(v.solo_logits)), int(torch.argmax(v.batch_logits))
        res.solo_argmax.append(sa)
        res.batched_argmax.append(ba)
        res.flips.append(sa != ba)
        if sa != ba and res.flipped_at_step is None:
            res.flipped_at_step = v.step
    idx = res.leading_up(n=len(res.steps))
    res.window = [res.steps[i] for i in idx]
    deep = n_layers - 1
    x = [float(res.steps[i]) for i in idx]
    y = [res.k_max_abs_diff[i][deep] for i in idx]
    res.slope = _fit(x, y)
    res.trend = trend_of(res.slope, x, y)
    dec = [i for i in idx if res.steps[i] >= 0]
    res.slope_new = _fit([float(res.steps[i]) for i in dec], [res.k_new_max_abs_diff[i][deep] for i in dec])
    res.verdict = kv_verdict(res)
    return res


def kv_verdict(res: KvDriftResult) -> str:
    deep = res.n_layers - 1
    if not res.steps:
        return "no steps run."
    last = res.k_max_abs_diff[-1][deep] if res.flipped_at_step is None else \
        res.k_max_abs_diff[res.steps.index(res.flipped_at_step)][deep]
    slope = "n/a (fewer than 2 steps)" if res.slope is None else f"{res.slope:.3g} per token"
    new = "" if res.slope_new is None else f"; newest K column's diff slope {res.slope_new:.3g} per token"
    if res.flipped_at_step is None:
        return (f"no argmax flip in {len(res.steps)} steps; layer {deep} K max |diff| "
                f"{res.trend or 'n/a'} (slope {slope}), {last:.3g} at the end{new}.")
    return (f"first flip at step {res.flipped_at_step}; before it the layer {deep} K perturbation "
            f"{res.trend or 'n/a'} (slope {slope} over steps {res.window[0]}..{res.window[-1]}), "
            f"max |diff| {res.k_max_abs_diff[0][deep]:.3g} after prefill -> {last:.3g} at the flip{new}.")
