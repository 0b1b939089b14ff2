"""``diagnose ops``: which kernel of a model's stack stops being batch-invariant, and at how many rows.

A view over the invariance probe (:mod:`mgaudit.decoding.invariance`), at the row counts M asked
for, plus the attention facts the probe does not measure. Rows of the table:

* every op the probe measures (:func:`~mgaudit.decoding.invariance.measure_rows`): each distinct
  ``linear`` shape (decode-shaped: M rows, one per sequence), the ``norm``, the MLP ``act``, the
  ``rotary`` embedding, the ``embedding`` and the residual ``add``: at each M, at least
  :data:`~mgaudit.decoding.invariance.MIN_ELEMENTS` output elements of M-row applications
  (rows drawn from real decode activations and scaled random rows) compared with each row
  applied alone, bit for bit: the probe's power, at these M;
* ``linear-prefill``: the same linear module on M tokens of one sequence ``(1, M, in)``, each
  token against itself alone (prefill-shaped vs decode-shaped);
* ``attention``: torch ``scaled_dot_product_attention`` on one decode query per row over a K/V
  cache of ``kv_len`` positions, heads and GQA grouping as the model's sdpa path calls it (no
  mask: ``enable_gqa``; with a mask: the query heads folded onto their K/V head), without a mask,
  and with the padding mask a left-padded batch carries (row 0 unpadded, the others padded at
  random; the mask is present as soon as one row is padded, as in ``generate``); each row
  against its solo call over its valid positions;
* ``attention-cache``: one row, its K/V left-padded by M - 1 extra masked positions (M = 1: no
  padding, no mask), against the unpadded solo call; and the same with the masked kernel on both
  sides (all-valid mask at M = 1), to separate "a mask is present" from "the cache is longer".

Each cell is a :class:`~mgaudit.decoding.invariance.Point`. The powered per-op row limits the
ragged path plans with are attached by the runner (``OpsReport.limits``).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..decoding.invariance import Point, capture_activations, measure_rows
from ..decoding.kernels import apply_op, find_ops
from ..errors import ModelError, UsageError

DEFAULT_ROWS = (1, 2, 3, 4, 8, 16, 32, 48, 63, 64, 65, 96, 128, 256)
MAX_ROWS = 8192


@dataclass
class OpRow:
    """One row of the table: an op, what M means for it, and a point per row count."""

    name: str
    kind: str  # linear, norm, act, rotary, embedding, add, linear-prefill, attention, attention-mask, attention-cache
    detail: str
    axis: str  # what M means for this op
    points: list[Point] = field(default_factory=list)

    @property
    def first_diff(self) -> int | None:
        return next((p.rows for p in self.points if not p.identical), None)

    @property
    def invariant(self) -> bool:
        return all(p.identical for p in self.points)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "first_diff": self.first_diff, "invariant": self.invariant}


@dataclass
class OpsReport:
    model: str
    dtype: str
    device: str
    row_counts: list[int]
    kv_len: int
    seed: int
    ops: list[OpRow]
    verdict: str = ""
    torch_threads: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)
    #: the powered per-op probe the ragged path plans with (mgaudit.decoding.invariance), as its summary
    limits: dict[str, Any] | None = None

    def op(self, name: str) -> OpRow:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)

    def by_kind(self, kind: str) -> list[OpRow]:
        return [o for o in self.ops if o.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "dtype": self.dtype, "device": self.device,
            "row_counts": self.row_counts, "kv_len": self.kv_len, "seed": self.seed,
            "torch_threads": self.torch_threads,
            "ops": [o.to_dict() for o in self.ops], "verdict": self.verdict,
            "provenance": self.provenance, "limits": self.limits,
        }


def parse_rows(text: str) -> list[int]:
    """``"1,2,64"`` -> ``[1, 2, 64]`` (sorted, unique); UsageError on anything else."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise UsageError("`rows` is empty", hint="give comma-separated row counts, e.g. 1,2,63,64,128")
    rows = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            raise UsageError(f"`rows`: {p!r} is not a whole number",
                             hint="give comma-separated row counts, e.g. 1,2,63,64,128") from None
        if v < 1 or v > MAX_ROWS:
            raise UsageError(f"`rows`: {v} is out of range", hint=f"row counts must be between 1 and {MAX_ROWS}")
        rows.append(v)
    return sorted(set(rows))


# --------------------------------------------------------------------------- model parts


@dataclass
class ModelParts:
    layers: Any  # the ModuleList of decoder layers
    norm: Any
    rotary: Any
    attn: Any  # first layer's self_attn
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    apply_rotary: Callable | None


def model_parts(model) -> ModelParts:
    """Decoder layers, final norm, rotary module and head geometry of a Llama-like model."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None) or getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or len(layers) == 0 or not all(hasattr(l, "self_attn") and hasattr(l, "mlp") for l in layers):
        raise ModelError(f"{type(model).__name__}: no decoder layers with self_attn and mlp found",
                         hint="diagnose supports Llama-like decoder models (model.model.layers[i].self_attn/.mlp)")
    norm = getattr(base, "norm", None)
    rotary = getattr(base, "rotary_emb", None)
    cfg = model.config
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    attn = layers[0].self_attn
    apply_rotary = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    return ModelParts(layers, norm, rotary, attn, n_heads, n_kv, head_dim, int(cfg.hidden_size), apply_rotary)


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


class _Rand:
    """Seeded random tensors, drawn on the CPU (reproducible across devices) then moved."""

    def __init__(self, seed: int, dtype, device):
        self.seed, self.dtype, self.device = seed, dtype, device

    def normal(self, shape, scale: float, salt: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + salt)
        return (torch.randn(shape, generator=g) * scale).to(self.dtype).to(self.device)

    def ints(self, low: int, high: int, shape, salt: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + salt)
        return torch.randint(low, high, shape, generator=g).to(self.device)


def sdpa_like_model(q, k, v, mask, scale: float | None, n_rep: int):
    """One decode query per row, ``q (B, H, 1, D)``, ``k/v (B, KV, L, D)``, GQA the way the
    model's sdpa path calls torch: ``enable_gqa`` without a mask; with a mask the query
    heads are folded onto their K/V head as ``(B, KV, n_rep, D)``. Returns ``(B, H, 1, D)``."""
    if n_rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is None:
        try:
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        except TypeError:  # torch < 2.5
            return F.scaled_dot_product_attention(q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1),
                                                  scale=scale)
    b, h, _, d = q.shape
    out = F.scaled_dot_product_attention(q.reshape(b, h // n_rep, n_rep, d), k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, 1, d)


# --------------------------------------------------------------------------- the view


AXES = {
    "linear": "rows: M decode tokens, one per sequence",
    "norm": "rows (M, hidden)", "act": "rows (M, width)", "rotary": "rows (M position ids)",
    "embedding": "rows (M token ids)", "add": "rows (M, hidden)",
}


def _op_rows(model, rows: list[int], seed: int, note: Callable[[str], None]) -> list[OpRow]:
    """The probe's measurement at ``rows``, one table row per op (what the model runs: batched)."""
    note("ops the probe measures")
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    out = []
    ops = {o.key: o for o in find_ops(model)}
    for res in measure_rows(model, rows, seed=seed):
        op = ops.get(res.key)
        mods = sorted({names.get(id(m), "?") for m in op.modules}) if op is not None and op.kind != "add" else []
        detail = f"{res.modules} module(s)" + (f": {'/'.join(mods)}" if mods else "") + (
            f"; not probed: {res.error}" if res.error else "")
        points = res.layouts[0].points if res.layouts[0].points is not None else []
        out.append(OpRow(res.key, res.kind, detail, AXES.get(res.kind, "rows"), points))
    return out


def _prefill_rows(model, rows: list[int], real: dict[str, torch.Tensor], rnd: "_Rand") -> list[OpRow]:
    """Each linear shape fed M tokens of one sequence ``(1, M, in)``, each token against itself alone."""
    out = []
    mmax = rows[-1]
    for op in find_ops(model):
        if op.kind != "linear":
            continue
        module = op.modules[0]
        fin = module.in_features
        captured = real.get(op.key)
        scale = _rms(captured) if captured is not None and len(captured) else 1.0
        pool = rnd.normal((mmax, fin), scale, salt=fin * 7 + module.out_features)
        refs = torch.cat([apply_op(op, module, pool[i:i + 1]) for i in range(mmax)])
        row = OpRow(f"prefill {op.key.split(' ', 1)[1]}", "linear-prefill",
                    "M tokens of one sequence vs each token alone", "tokens: one sequence (1, M, in)")
        for m in rows:
            got = module(pool[:m].view(1, m, fin))[0]
            point = Point(m)
            point.add(got, refs[:m])
            point.row0_identical = torch.equal(got[m - 1], refs[m - 1])  # the last token
            row.points.append(point)
        out.append(row)
    return out


def _point(m: int, batched: torch.Tensor, refs: torch.Tensor) -> Point:
    """Row i of ``batched`` against row i computed alone (``refs[i]``), for the first m rows."""
    point = Point(m)
    point.add(batched[:m], refs[:m])
    point.row0_identical = torch.equal(batched[0], refs[0])
    return point


@dataclass
class _Ctx:
    """What the attention rows need: the model's parts, the row counts, seeded q/k/v pools."""

    parts: ModelParts
    rows: list[int]
    kv_len: int
    rnd: "_Rand"
    device: torch.device
    qpool: torch.Tensor
    kpool: torch.Tensor
    vpool: torch.Tensor
    ks: float
    vs: float

    @property
    def mmax(self) -> int:
        return self.rows[-1]

    @property
    def n_rep(self) -> int:
        return self.parts.n_heads // self.parts.n_kv_heads

    @property
    def scale(self) -> float:
        return float(getattr(self.parts.attn, "scaling", self.parts.head_dim ** -0.5))


def _attention_ctx(model, parts: ModelParts, rows: list[int], kv_len: int, rnd: "_Rand",
                   real: dict[str, torch.Tensor]) -> _Ctx:
    """Seeded q/k/v pools scaled to the RMS the model's q/k/v projections give on the captured
    decode activations (1.0 where the model has no such projection)."""
    scales = []
    for p in "qkv":
        proj = getattr(parts.attn, f"{p}_proj", None)
        key = next((o.key for o in find_ops(model) if any(m is proj for m in o.modules)), None)
        x = real.get(key) if key is not None else None
        scales.append(_rms(proj(x)) or 1.0 if x is not None and len(x) else 1.0)
    qs, ks, vs = scales
    mmax = rows[-1]
    return _Ctx(parts, rows, kv_len, rnd, next(model.parameters()).device,
                rnd.normal((mmax, parts.n_heads, 1, parts.head_dim), qs, 40),
                rnd.normal((mmax, parts.n_kv_heads, kv_len, parts.head_dim), ks, 41),
                rnd.normal((mmax, parts.n_kv_heads, kv_len, parts.head_dim), vs, 42), ks, vs)


def _attention_rows(c: _Ctx) -> list[OpRow]:
    """Attention, decode-shaped: one query per row over its K/V cache, unmasked and left-padded."""
    hq, hk, d, kv_len = c.parts.n_heads, c.parts.n_kv_heads, c.parts.head_dim, c.kv_len
    q, k, v, scale, n_rep = c.qpool, c.kpool, c.vpool, c.scale, c.n_rep
    geo = f"{hq} heads / {hk} KV heads x {d}, K/V length {kv_len}, query length 1"
    refs = torch.cat([sdpa_like_model(q[i:i + 1], k[i:i + 1], v[i:i + 1], None, scale, n_rep)
                      for i in range(c.mmax)])
    plain = OpRow("attention sdpa, no mask", "attention", geo, "rows (M, heads, 1, head_dim)")
    for m in c.rows:
        plain.points.append(_point(m, sdpa_like_model(q[:m], k[:m], v[:m], None, scale, n_rep), refs))
    # Left-padded batch: row i's first pads[i] positions are padding; row 0 is unpadded.
    # Its solo reference attends to its valid positions only, without a mask.
    pads = torch.cat([torch.zeros(1, dtype=torch.long, device=c.device),
                      c.rnd.ints(0, kv_len - 1, (c.mmax - 1,), salt=43)])
    refs = torch.cat([sdpa_like_model(q[i:i + 1], k[i:i + 1, :, int(pads[i]):], v[i:i + 1, :, int(pads[i]):],
                                      None, scale, n_rep) for i in range(c.mmax)])
    masked = OpRow("attention sdpa, padding mask", "attention-mask",
                   geo + "; rows left-padded (row 0 not), mask present when any row is padded; "
                         "each row against its unpadded solo call",
                   "rows; row 0 unpadded")
    for m in c.rows:
        mask = None
        if bool((pads[:m] > 0).any()):
            mask = (torch.arange(kv_len, device=c.device)[None, :] >= pads[:m, None]).view(m, 1, 1, kv_len)
        masked.points.append(_point(m, sdpa_like_model(q[:m], k[:m], v[:m], mask, scale, n_rep), refs))
    return [plain, masked]


def _attention_cache_rows(c: _Ctx) -> list[OpRow]:
    """Attention at different cache lengths: same query and K/V prefix, K/V left-padded."""
    hk, d, kv_len, scale, n_rep = c.parts.n_kv_heads, c.parts.head_dim, c.kv_len, c.scale, c.n_rep
    q0, k0, v0 = c.qpool[:1], c.kpool[:1], c.vpool[:1]
    ref = sdpa_like_model(q0, k0, v0, None, scale, n_rep)
    ones = torch.ones((1, 1, 1, kv_len), dtype=torch.bool, device=c.device)
    ref_masked = sdpa_like_model(q0, k0, v0, ones, scale, n_rep)
    solo = OpRow("attention cache +(M-1) padded", "attention-cache",
                 f"one row; K/V ({kv_len} positions) left-padded by M-1 masked positions vs unpadded, no mask",
                 "masked padding positions = M - 1")
    same_path = OpRow("attention cache +(M-1) padded, mask both", "attention-cache",
                      "as above, but the unpadded reference also carries an all-valid mask",
                      "masked padding positions = M - 1")
    for m in c.rows:
        pad = m - 1
        kp = torch.cat([c.rnd.normal((1, hk, pad, d), c.ks, 60 + m), k0], dim=2)
        vp = torch.cat([c.rnd.normal((1, hk, pad, d), c.vs, 61 + m), v0], dim=2)
        mask = (torch.arange(kv_len + pad, device=c.device) >= pad).view(1, 1, 1, kv_len + pad)
        out_masked = sdpa_like_model(q0, kp, vp, mask, scale, n_rep)
        out = sdpa_like_model(q0, kp, vp, None, scale, n_rep) if pad == 0 else out_masked
        solo.points.append(_point(1, out, ref))
        solo.points[-1].rows = m
        same_path.points.append(_point(1, out_masked, ref_masked))
        same_path.points[-1].rows = m
    return [solo, same_path]


@torch.inference_mode()
def probe_ops(lm, row_counts: Sequence[int] = DEFAULT_ROWS, seed: int = 0, kv_len: int = 48,
              progress: Callable[[str], None] | None = None) -> OpsReport:
    """The invariance probe's view of ``lm``'s stack at every M in ``row_counts`` (see the module
    doc), with the prefill-shaped and attention rows; ``identical`` means every compared row is
    bit-identical to that row alone."""
    rows = sorted(set(int(r) for r in row_counts))
    if not rows or rows[0] < 1:
        raise UsageError("`rows` must be whole numbers of at least 1")
    if kv_len < 2:
        raise UsageError(f"`kv_len` must be at least 2, got {kv_len}")
    model = lm.model
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    parts = model_parts(model)
    note = progress or (lambda msg: None)
    rnd = _Rand(seed, dtype, device)
    real = capture_activations(model, seed=seed)
    ops = _op_rows(model, rows, seed, note)
    note("linear, prefill-shaped")
    ops += _prefill_rows(model, rows, real, rnd)
    c = _attention_ctx(model, parts, rows, kv_len, rnd, real)
    note("attention")
    ops += _attention_rows(c)
    note("attention cache length")
    ops += _attention_cache_rows(c)
    report = OpsReport(model=lm.name, dtype=str(dtype).replace("torch.", ""), device=str(device),
                       row_counts=rows, kv_len=kv_len, seed=seed, ops=ops, torch_threads=torch.get_num_threads())
    report.verdict = ops_verdict(report)
    impl = getattr(model.config, "_attn_implementation", None)
    if impl and impl != "sdpa":
        report.verdict += (f" Note: this model runs {impl!r} attention; the attention rows measure torch sdpa "
                           "as the sdpa path would call it.")
    return report


# --------------------------------------------------------------------------- verdict


def _below(rows: list[int], first: int) -> int | None:
    below = [r for r in rows if r < first]
    return below[-1] if below else None


def _group_phrase(label: str, group: list[OpRow], rows: list[int], unit: str = "rows") -> str:
    if not group:
        return ""
    diff = [o for o in group if not o.invariant]
    if not diff:
        return f"{label}: bit-identical at every tested M up to {rows[-1]} {unit} ({len(group)} shape(s))"
    first = min(o.first_diff for o in diff)
    at_first = [o.name.split(" ", 1)[1] for o in diff if o.first_diff == first]
    names = ", ".join(at_first[:3]) + (f" and {len(at_first) - 3} more" if len(at_first) > 3 else "")
    ok = _below(rows, first)
    head = (f"{label}: identical at every tested M <= {ok} {unit}, change from M = {first}" if ok
            else f"{label}: change from M = {first} {unit}")
    worst = max(p.max_abs_diff for o in diff for p in o.points)
    return (f"{head} ({len(at_first)} of {len(group)} shapes at {first}: {names}; "
            f"{len(diff)} of {len(group)} differ at some M <= {rows[-1]}; max |diff| {worst:.3g})")


def _single_phrase(label: str, op: OpRow, rows: list[int], changes: str, unit: str = "rows") -> str:
    if op.invariant:
        return f"{label}: bit-identical at every tested M up to {rows[-1]} {unit}"
    return (f"{label}: {changes} from M = {op.first_diff} {unit} "
            f"(max |diff| {max(p.max_abs_diff for p in op.points):.3g})")


def ops_verdict(report: OpsReport) -> str:
    rows = report.row_counts
    parts = [
        _group_phrase("linear layers", report.by_kind("linear"), rows),
        _group_phrase("prefill-shaped linear", report.by_kind("linear-prefill"), rows, unit="tokens"),
    ]
    for kind in ("norm", "act", "rotary", "embedding", "add"):
        for o in report.by_kind(kind):
            parts.append(_single_phrase(o.name, o, rows, "changes"))
    for o in report.by_kind("attention"):
        parts.append(_single_phrase("attention without mask", o, rows, "changes"))
    for o in report.by_kind("attention-mask"):
        if o.invariant:
            parts.append(f"attention with a padding mask: bit-identical at every tested M up to {rows[-1]} rows")
        else:
            worst = max(p.max_abs_diff for p in o.points)
            first = o.first_diff
            unpadded = ("the unpadded row stays bit-identical, the padded rows differ from their solo result"
                        if all(p.row0_identical for p in o.points)
                        else "even the unpadded row differs")
            parts.append(f"attention changes when a padding mask is present (from M = {first} rows, "
                         f"max |diff| {worst:.3g}; {unpadded})")
    cache = report.by_kind("attention-cache")
    if len(cache) == 2:
        a, b = cache
        if a.invariant:
            parts.append("a longer, masked K/V cache gives the same attention output")
        else:
            why = ("the masked kernel itself differs from the unmasked one" if b.invariant
                   else f"the longer cache matters even with a mask on both sides, from +{b.first_diff - 1}")
            parts.append(f"padding the K/V cache with masked positions changes attention "
                         f"(from +{a.first_diff - 1} positions; {why})")
    return "; ".join(p for p in parts if p) + "."
