"""Op probe: which kernel of a model's stack stops being batch-invariant, and at how many rows.

For the model's own shapes, dtype and device, each op is run on M rows at once and on
each of those rows alone (batch 1, as a solo run computes it); the op is batch-invariant
at M when every row's result is bit-identical (``torch.equal``) to its batch-1 result.
Every row is a probe row because a changed reduction order moves only some bf16 results
by one ulp: on the reference CPU a 576->1536 GEMM at 48 rows changed 2 of 48 rows, so a
single fixed probe row often misses the change (``probe_identical`` still reports row 0
alone). The inputs at M are the first M rows of one fixed random pool, in the model's
dtype, scaled to the RMS the real activations have at that point (measured once on a
short text with forward hooks).

Ops probed (see :func:`probe_ops`):

* ``linear``: every distinct ``nn.Linear`` shape of the model, its own forward on M
  decode-shaped rows ``(M, 1, in)``;
* ``linear-prefill``: the same module fed M tokens of one sequence ``(1, M, in)``, probe
  against each token alone (prefill-shaped vs decode-shaped; the probe is the last token);
* ``norm``: the model's final RMSNorm module on ``(M, 1, hidden)``;
* ``rotary``: the model's rotary module with M position ids, then the model's
  ``apply_rotary_pos_emb`` on q and k;
* ``attention``: torch ``scaled_dot_product_attention`` on one decode query per row over a
  K/V cache of ``kv_len`` positions, heads and GQA grouping as the model's sdpa path
  calls it (no mask: ``enable_gqa``; with a mask: the query heads folded onto their K/V
  head), without a mask, and with the padding mask a left-padded batch carries (row 0
  unpadded, the others padded at random; the mask is present as soon as one row is
  padded, as in ``generate``); each row against its solo call over its valid positions;
* ``attention-cache``: one row, its K/V left-padded by M - 1 extra masked positions
  (M = 1: no padding, no mask), against the unpadded solo call; and the same with the
  masked kernel on both sides (all-valid mask at M = 1), to separate "a mask is present"
  from "the cache is longer".
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ModelError, UsageError

DEFAULT_ROWS = (1, 2, 3, 4, 8, 16, 32, 48, 63, 64, 65, 96, 128, 256)
MAX_ROWS = 8192
CALIBRATION_TEXT = ("The quick brown fox jumps over the lazy dog. Write a short answer: how many "
                    "apples are left if you have ten and eat three?")


@dataclass
class OpPoint:
    rows: int
    identical: bool  # every one of the M rows equals its batch-1 result
    max_abs_diff: float  # over all M rows
    rows_differing: int = 0
    probe_identical: bool = True  # row 0 alone (the last token for prefill-shaped ops)


@dataclass
class OpResult:
    name: str
    kind: str  # linear, linear-prefill, norm, rotary, attention, attention-mask, attention-cache
    detail: str
    axis: str  # what M means for this op
    points: list[OpPoint] = field(default_factory=list)

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
    ops: list[OpResult]
    verdict: str = ""
    torch_threads: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)
    #: the powered per-op probe the ragged path plans with (mgaudit.decoding.invariance), as its summary
    limits: dict[str, Any] | None = None

    def op(self, name: str) -> OpResult:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)

    def by_kind(self, kind: str) -> list[OpResult]:
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


@torch.inference_mode()
def activation_scales(lm, text: str = CALIBRATION_TEXT) -> dict[str, tuple[float, float]]:
    """RMS of the input and output of every Linear and RMSNorm-like module on a short text."""
    model = lm.model
    ids = None
    try:
        ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"]
    except Exception:  # a tokenizer that cannot encode plain text: fall back to fixed ids
        ids = None
    if not ids or len(ids) < 4:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(model.config.vocab_size), (24,), generator=g).tolist()
    scales: dict[str, tuple[float, float]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__.endswith("RMSNorm"):
            def hook(m, args, out, name=name):
                scales[name] = (_rms(args[0]), _rms(out if torch.is_tensor(out) else out[0]))
            handles.append(mod.register_forward_hook(hook))
    try:
        model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return scales


# --------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------- the probe


def _point(m: int, batched: torch.Tensor, refs: torch.Tensor) -> OpPoint:
    """Row i of ``batched`` against row i computed alone (``refs[i]``), for the first m rows."""
    eq = [torch.equal(batched[i], refs[i]) for i in range(m)]
    diff = 0.0 if all(eq) else float((batched[:m].float() - refs[:m].float()).abs().max())
    return OpPoint(m, all(eq), diff, m - sum(eq), eq[0])


@dataclass
class _Ctx:
    """What every per-op probe needs: the model's parts, the row counts, seeded inputs and scales."""

    model: Any
    parts: ModelParts
    rows: list[int]
    mmax: int
    kv_len: int
    rnd: "_Rand"
    scales: dict[str, tuple[float, float]]
    dtype: torch.dtype
    device: torch.device
    note: Callable[[str], None]
    qpool: torch.Tensor | None = None
    kpool: torch.Tensor | None = None
    vpool: torch.Tensor | None = None
    ks: float = 1.0
    vs: float = 1.0

    @property
    def n_rep(self) -> int:
        return self.parts.n_heads // self.parts.n_kv_heads

    @property
    def scale(self) -> float:
        return float(getattr(self.parts.attn, "scaling", self.parts.head_dim ** -0.5))


def _probe_linear(c: _Ctx) -> list[OpResult]:
    """Linear shapes: one module per distinct (in, out, bias), decode-shaped and prefill-shaped."""
    shapes: dict[tuple, list[str]] = {}
    modules: dict[tuple, Any] = {}
    for name, mod in c.model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            key = (mod.in_features, mod.out_features, mod.bias is not None)
            shapes.setdefault(key, []).append(name)
            modules.setdefault(key, (name, mod))
    ops = []
    for key, names in shapes.items():
        name, mod = modules[key]
        fin, fout, bias = key
        scale = c.scales.get(name, (1.0, 1.0))[0] or 1.0
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        label = f"{fin}->{fout}{' +bias' if bias else ''} ({'/'.join(short)})"
        c.note(f"linear {label}")
        pool = c.rnd.normal((c.mmax, fin), scale, salt=fin * 7 + fout)
        refs = torch.stack([mod(pool[i].view(1, 1, fin))[0, 0] for i in range(c.mmax)])
        res = OpResult(f"linear {label}", "linear", f"{len(names)} module(s), input RMS {scale:.3g}",
                       "rows: M decode tokens (M, 1, in), one per sequence")
        pre = OpResult(f"prefill {label}", "linear-prefill", "M tokens of one sequence vs each token alone",
                       "tokens: one sequence (1, M, in); probe = last token")
        for m in c.rows:
            res.points.append(_point(m, mod(pool[:m].view(m, 1, fin))[:, 0], refs))
            out = mod(pool[:m].view(1, m, fin))[0]
            pre.points.append(_point(m, out.flip(0), refs[:m].flip(0)))
        ops += [res, pre]
    return ops


def _probe_norm(c: _Ctx) -> list[OpResult]:
    """RMSNorm (the model's final norm module)."""
    norm = c.parts.norm
    if norm is None:
        return []
    c.note("norm")
    norm_name = next((n for n, mod in c.model.named_modules() if mod is norm), "norm")
    scale = c.scales.get(norm_name, (1.0, 1.0))[0] or 1.0
    h = c.parts.hidden
    pool = c.rnd.normal((c.mmax, h), scale, salt=1)
    refs = torch.stack([norm(pool[i].view(1, 1, h))[0, 0] for i in range(c.mmax)])
    res = OpResult(f"norm {type(norm).__name__}({h})", "norm", f"input RMS {scale:.3g}", "rows (M, 1, hidden)")
    for m in c.rows:
        res.points.append(_point(m, norm(pool[:m].view(m, 1, h))[:, 0], refs))
    return [res]


def _probe_rotary(c: _Ctx) -> list[OpResult]:
    """Rotary embedding: cos/sin for M position ids, then q/k rotated."""
    parts = c.parts
    if parts.rotary is None:
        return []
    c.note("rotary")
    d = parts.head_dim
    maxpos = int(getattr(c.model.config, "max_position_embeddings", 2048) or 2048)
    pos = torch.cat([torch.tensor([c.kv_len], device=c.device), c.rnd.ints(0, maxpos, (c.mmax - 1,), salt=30)])

    def rot(sl: slice) -> torch.Tensor:
        p = pos[sl].view(-1, 1)
        n = p.shape[0]
        cos, sin = parts.rotary(torch.zeros((n, 1, d), dtype=c.dtype, device=c.device), p)
        pieces = [cos.reshape(n, -1), sin.reshape(n, -1)]
        if parts.apply_rotary is not None:
            qe, ke = parts.apply_rotary(c.qpool[sl], c.kpool[sl, :, :1], cos, sin)
            pieces += [qe.reshape(n, -1), ke.reshape(n, -1)]
        return torch.cat([t.to(c.dtype) for t in pieces], dim=1)

    refs = torch.cat([rot(slice(i, i + 1)) for i in range(c.mmax)])
    res = OpResult(f"rotary {type(parts.rotary).__name__}", "rotary",
                   "cos/sin for M position ids" + (", q/k rotated" if parts.apply_rotary else ""),
                   "rows (M position ids)")
    for m in c.rows:
        res.points.append(_point(m, rot(slice(0, m)), refs))
    return [res]


def _probe_attention(c: _Ctx) -> list[OpResult]:
    """Attention, decode-shaped: one query per row over its K/V cache, unmasked and left-padded."""
    c.note("attention")
    hq, hk, d, kv_len = c.parts.n_heads, c.parts.n_kv_heads, c.parts.head_dim, c.kv_len
    q, k, v, scale, n_rep = c.qpool, c.kpool, c.vpool, c.scale, c.n_rep
    geo = f"{hq} heads / {hk} KV heads x {d}, K/V length {kv_len}, query length 1"
    refs = torch.cat([sdpa_like_model(q[i:i + 1], k[i:i + 1], v[i:i + 1], None, scale, n_rep)
                      for i in range(c.mmax)])
    plain = OpResult("attention sdpa, no mask", "attention", geo, "rows (M, heads, 1, head_dim)")
    for m in c.rows:
        plain.points.append(_point(m, sdpa_like_model(q[:m], k[:m], v[:m], None, scale, n_rep), refs))
    # Left-padded batch: row i's first pads[i] positions are padding; row 0 is unpadded.
    # Its solo reference attends to its valid positions only, without a mask.
    pads = torch.cat([torch.zeros(1, dtype=torch.long, device=c.device),
                      c.rnd.ints(0, kv_len - 1, (c.mmax - 1,), salt=43)])
    refs = torch.cat([sdpa_like_model(q[i:i + 1], k[i:i + 1, :, int(pads[i]):], v[i:i + 1, :, int(pads[i]):],
                                      None, scale, n_rep) for i in range(c.mmax)])
    masked = OpResult("attention sdpa, padding mask", "attention-mask",
                      geo + "; rows left-padded (row 0 not), mask present when any row is padded; "
                            "each row against its unpadded solo call",
                      "rows; probe row 0 unpadded")
    for m in c.rows:
        mask = None
        if bool((pads[:m] > 0).any()):
            mask = (torch.arange(kv_len, device=c.device)[None, :] >= pads[:m, None]).view(m, 1, 1, kv_len)
        masked.points.append(_point(m, sdpa_like_model(q[:m], k[:m], v[:m], mask, scale, n_rep), refs))
    return [plain, masked]


def _probe_attention_cache(c: _Ctx) -> list[OpResult]:
    """Attention at different cache lengths: same query and K/V prefix, K/V left-padded."""
    c.note("attention cache length")
    hk, d, kv_len, scale, n_rep = c.parts.n_kv_heads, c.parts.head_dim, c.kv_len, c.scale, c.n_rep
    q0, k0, v0 = c.qpool[:1], c.kpool[:1], c.vpool[:1]
    ref = sdpa_like_model(q0, k0, v0, None, scale, n_rep)
    ones = torch.ones((1, 1, 1, kv_len), dtype=torch.bool, device=c.device)
    ref_masked = sdpa_like_model(q0, k0, v0, ones, scale, n_rep)
    solo = OpResult("attention cache +(M-1) padded", "attention-cache",
                    f"one row; K/V ({kv_len} positions) left-padded by M-1 masked positions vs unpadded, no mask",
                    "masked padding positions = M - 1")
    same_path = OpResult("attention cache +(M-1) padded, mask both", "attention-cache",
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


#: The per-op probes, in report order. Each takes the shared context and returns its results.
PROBES: tuple[tuple[str, Callable[[_Ctx], list[OpResult]]], ...] = (
    ("linear", _probe_linear),
    ("norm", _probe_norm),
    ("rotary", _probe_rotary),
    ("attention", _probe_attention),
    ("attention cache length", _probe_attention_cache),
)


@torch.inference_mode()
def probe_ops(lm, row_counts: Sequence[int] = DEFAULT_ROWS, seed: int = 0, kv_len: int = 48,
              progress: Callable[[str], None] | None = None) -> OpsReport:
    """Probe each op of ``lm``'s stack for batch invariance at every M in ``row_counts``.

    Every row is a probe row: the inputs at M are the first M rows of one fixed pool, and
    each of the M results is compared with that row computed alone (batch 1, the way a
    solo run computes it). ``identical`` means all M rows are bit-identical;
    ``probe_identical`` is the verdict for row 0 alone (the last token for the
    prefill-shaped ops). The ops are the entries of :data:`PROBES`.
    """
    rows = sorted(set(int(r) for r in row_counts))
    if not rows or rows[0] < 1:
        raise UsageError("row counts must be whole numbers of at least 1")
    if kv_len < 2:
        raise UsageError(f"kv_len must be at least 2, got {kv_len}")
    model = lm.model
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    parts = model_parts(model)
    c = _Ctx(model, parts, rows, rows[-1], kv_len, _Rand(seed, dtype, device), activation_scales(lm), dtype,
             device, progress or (lambda msg: None))
    # the attention-shaped inputs (rotary and attention probes); each draw has its own seed (salt)
    attn_name = next((n for n, mod in model.named_modules() if mod is parts.attn), "")
    qs, c.ks, c.vs = (c.scales.get(f"{attn_name}.{p}_proj", (1.0, 1.0))[1] or 1.0 for p in "qkv")
    c.qpool = c.rnd.normal((c.mmax, parts.n_heads, 1, parts.head_dim), qs, 40)
    c.kpool = c.rnd.normal((c.mmax, parts.n_kv_heads, kv_len, parts.head_dim), c.ks, 41)
    c.vpool = c.rnd.normal((c.mmax, parts.n_kv_heads, kv_len, parts.head_dim), c.vs, 42)
    ops = [result for _, probe_fn in PROBES for result in probe_fn(c)]
    report = OpsReport(model=lm.name, dtype=str(dtype).replace("torch.", ""), device=str(device),
                       row_counts=rows, kv_len=kv_len, seed=seed, ops=ops, torch_threads=torch.get_num_threads())
    report.verdict = ops_verdict(report)
    impl = getattr(model.config, "_attn_implementation", None)
    if impl and impl != "sdpa":
        report.verdict += (f" Note: this model runs {impl!r} attention; the attention rows probe torch sdpa "
                           "as the sdpa path would call it.")
    return report


# --------------------------------------------------------------------------- verdict


def _below(rows: list[int], first: int) -> int | None:
    below = [r for r in rows if r < first]
    return below[-1] if below else None


def _group_phrase(label: str, group: list[OpResult], rows: list[int], unit: str = "rows") -> str:
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


def _single_phrase(label: str, op: OpResult, rows: list[int], changes: str, unit: str = "rows") -> str:
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
    for o in report.by_kind("norm"):
        parts.append(_single_phrase("RMSNorm", o, rows, "changes"))
    for o in report.by_kind("rotary"):
        parts.append(_single_phrase("rotary", o, rows, "changes"))
    for o in report.by_kind("attention"):
        parts.append(_single_phrase("attention without mask", o, rows, "changes"))
    for o in report.by_kind("attention-mask"):
        if o.invariant:
            parts.append(f"attention with a padding mask: bit-identical at every tested M up to {rows[-1]} rows")
        else:
            worst = max(p.max_abs_diff for p in o.points)
            first = o.first_diff
            unpadded = ("the unpadded row stays bit-identical, the padded rows differ from their solo result"
                        if all(p.probe_identical for p in o.points)
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
