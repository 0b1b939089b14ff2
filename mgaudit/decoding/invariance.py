"""Per-op batch invariance of the ops a batched decode step shares between rows:
a probe with stated power, a per-op execution plan, and the mode that applies it.

Greedy decoding of a batch is identical to solo decoding only if every row of
every op computes what it would compute alone. On the ragged path (solo prefill,
per-row unpadded attention) the ops that see several rows at once are the linear
layers (every distinct weight shape, ``lm_head`` included), the norms, the MLP
activation, the rotary embedding, the embedding and the residual adds. Their CPU
and GPU kernels may change the reduction order with the row count M, and they
do so differently on different machines: on an AMD EPYC (AVX512-BF16, no AMX)
bf16 ``down_proj`` (576x1536) differs from the one-row result from M = 2 in about
1 of 10^4 elements, while on an Intel Xeon with AMX every shape is invariant below
64 rows.

:func:`probe` measures, for each op and each way of running it (``layout``), the
largest M up to ``up_to`` such that every row of an M-row application equals
that row applied alone, bit for bit, for every M' <= M. For each M it compares
at least :data:`MIN_ELEMENTS` output elements (so a difference in 1 of 10^4
elements is missed with probability below 1 %), drawn from real activations
captured at that op in a short decode of the model and from scaled random rows.
Layouts tried for a linear layer: ``batched`` (one GEMM) and ``colmajor`` (one
GEMM on the column-major copy of the input, which the CPU kernels route through
another path). The result is cached per (model, dtype, device, CPU or GPU,
torch version, threads).

:func:`plan_for` turns a probe into a per-op plan for a batch size: run batched
where the limit allows, else in the layout with the highest limit, in chunks of
that many rows. :func:`decode_kernels` applies a plan to the model's modules
inside a ``with`` block (decode steps only: the solo prefill must stay what
``generate`` runs) and restores them in ``finally``.

The batch-invariant contract (``fixed_rows``): every linear layer of a decode
step runs at one fixed row count R, padded with zero rows, solo included, so a
row's result does not depend on the batch. :func:`probe` also checks that a
row's result in an R-row product does not depend on its position or on the
other rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .ragged import BUCKET as ATTENTION_BUCKET, SHARE_SPAN as ATTENTION_SPAN

#: Per-element difference rate the probe is sized to catch (1 in 10^4) ...
TARGET_RATE = 1e-4
#: ... with at most this probability of missing it at a given row count.
MISS_PROBABILITY = 0.01
#: Elements compared per (op, layout, M): (1 - 1e-4) ** n < 0.01.
MIN_ELEMENTS = math.ceil(math.log(MISS_PROBABILITY) / math.log1p(-TARGET_RATE))
MIN_DRAWS = 3
PROBE_FORMAT = "mgaudit.probe"
PROBE_VERSION = 7
LAYOUTS = ("batched", "colmajor")
#: Row count of the batch-invariant contract's fixed-size GEMMs.
FIXED_ROWS = 16


# --------------------------------------------------------------------------- ops


@dataclass
class Op:
    """One distinct op of the decode step: a key, its kind and one module that runs it."""

    key: str
    kind: str  # linear | norm | act | rotary | embedding | add
    modules: list = field(default_factory=list)
    width: int = 0  # input features per row (for random draws)


def _norm_like(module) -> bool:
    name = type(module).__name__
    return isinstance(module, torch.nn.LayerNorm) or name.endswith("RMSNorm") or name.endswith("LayerNorm")


_ops_of: "weakref.WeakKeyDictionary[Any, list[Op]]" = weakref.WeakKeyDictionary()


def find_ops(model) -> list[Op]:
    """Every distinct op a decode step applies to all rows at once, with the modules that run it
    (found once per model: :func:`decode_kernels` asks on every decode step)."""
    found = _ops_of.get(model)
    if found is None:
        found = _ops_of[model] = _scan_ops(model)
    return found


def _scan_ops(model) -> list[Op]:
    ops: dict[str, Op] = {}

    def add(key, kind, module, width):
        op = ops.setdefault(key, Op(key, kind, [], width))
        op.modules.append(module)

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_f, in_f = module.weight.shape
            bias = "+bias" if module.bias is not None else ""
            add(f"linear {out_f}x{in_f}{bias}", "linear", module, in_f)
        elif isinstance(module, torch.nn.Embedding):
            add(f"embedding {module.num_embeddings}x{module.embedding_dim}", "embedding", module,
                module.num_embeddings)
        elif _norm_like(module) and not list(module.children()):
            w = getattr(module, "weight", None)
            width = int(w.shape[-1]) if w is not None else 0
            add(f"norm {type(module).__name__} {width}", "norm", module, width)
        elif name.endswith("act_fn") or name.endswith(".act"):
            add(f"act {type(module).__name__}", "act", module, 0)
        elif name.endswith("rotary_emb"):
            add(f"rotary {type(module).__name__}", "rotary", module, 0)
    return list(ops.values())


def _apply(op: Op, module, x: torch.Tensor, layout: str = "batched") -> torch.Tensor:
    """Run ``op`` on rows ``x`` (one row per leading index); returns one output row per input row."""
    if op.kind == "linear":
        if layout == "colmajor" and len(x) > 1:
            x = x.t().contiguous().t()
        return F.linear(x, module.weight, module.bias)
    if op.kind == "embedding":
        return module(x)
    if op.kind == "rotary":
        cos, sin = module(x[:, None, :1].float().to(_dtype_of(module)), x.long())
        return torch.cat([cos.reshape(len(x), -1), sin.reshape(len(x), -1)], dim=-1)
    if op.kind == "add":
        half = x.shape[-1] // 2
        return x[:, :half] + x[:, half:]
    return module(x[:, None, :]).reshape(len(x), -1)


def _dtype_of(module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    for b in module.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.float32


# --------------------------------------------------------------------------- inputs


class _Pool:
    """Rows to probe an op with: real decode activations first, then scaled random rows."""

    def __init__(self, real: torch.Tensor | None, gen: torch.Generator):
        self.real = real
        self.gen = gen

    def rows(self, op: Op, n: int, device, dtype) -> torch.Tensor:
        if op.kind in ("embedding",):
            return torch.randint(0, op.width, (n,), generator=self.gen).to(device)
        if op.kind == "rotary":
            return torch.randint(0, 4096, (n, 1), generator=self.gen).to(device)
        real = self.real
        out = []
        if real is not None and len(real):
            idx = torch.randint(0, len(real), (n,), generator=self.gen)
            out.append(real[idx])
            scale = real.float().pow(2).mean().sqrt().item() or 1.0
        else:
            scale = 1.0
        width = real.shape[-1] if real is not None else op.width
        factors = torch.exp(torch.randn(n, 1, generator=self.gen))  # log-normal spread of row scales
        rnd = (torch.randn(n, width, generator=self.gen) * factors * scale).to(device=device, dtype=dtype)
        out.append(rnd)
        rows = torch.cat([o.to(device=device, dtype=dtype) for o in out])
        perm = torch.randperm(len(rows), generator=self.gen)[:n].to(rows.device)
        return rows[perm]


@torch.inference_mode()
def capture_activations(model, steps: int = 8, prompt_len: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs seen by each op during ``steps`` single-token decode steps of a short greedy run."""
    from .loop import greedy, padded_prefill

    ops = find_ops(model)
    by_module = {id(m): op for op in ops for m in op.modules}
    seen: dict[str, list[torch.Tensor]] = {op.key: [] for op in ops}
    recording = {"on": False}

    def hook(module, args):
        if recording["on"] and args and torch.is_tensor(args[0]):
            op = by_module[id(module)]
            if op.kind in ("linear", "norm", "act"):
                seen[op.key].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

    handles = [m.register_forward_pre_hook(hook) for op in ops for m in op.modules]
    try:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(model.device)
        logits, cache, positions, advance = padded_prefill(model, ids.tolist(), pad_id=0)
        for _ in greedy(logits, cache, positions, advance, eos_ids=(), pad_id=0, budgets=[steps + 1]):
            recording["on"] = True  # from the first decode forward on
    finally:
        for h in handles:
            h.remove()
    out = {}
    for k, v in seen.items():
        if v:  # one op key may see several widths (MoE experts and shared experts): keep the commonest
            widths = [t.shape[-1] for t in v]
            w = max(set(widths), key=widths.count)
            out[k] = torch.cat([t for t in v if t.shape[-1] == w])
    return out


# --------------------------------------------------------------------------- probe


@dataclass
class LayoutResult:
    layout: str
    limit: int  # largest M (<= up_to) with every M' in 2..M identical to one-row results
    first_failure: int | None = None  # smallest M where a row differed
    differing: int = 0  # differing elements at that M
    elements: int = 0  # output elements compared in all
    draws: int = 0


@dataclass
class OpResult:
    key: str
    kind: str
    modules: int
    layouts: list[LayoutResult]
    fixed_rows_ok: bool | None = None  # contract batch-invariant: position/companion independence at R rows
    fixed_rows_elements: int = 0
    error: str | None = None  # the op could not be run on its own here (not probed; runs as the model does)

    def best(self) -> LayoutResult:
        return max(self.layouts, key=lambda r: (r.limit, -LAYOUTS.index(r.layout)))

    def limit(self) -> int:
        return self.best().limit


@dataclass
class ProbeReport:
    up_to: int
    ops: list[OpResult]
    fingerprint: dict[str, Any]
    seconds: float
    min_elements: int = MIN_ELEMENTS
    target_rate: float = TARGET_RATE
    miss_probability: float = MISS_PROBABILITY
    fixed_rows: int = FIXED_ROWS
    #: batch-invariant attention: whether rows padded to the bucket may share one call (see probe_attention)
    attention: dict[str, Any] | None = None
    #: batch-invariant prefill: whether prompts may share one pack (see mgaudit.decoding.packed.check_sharing)
    prefill: dict[str, Any] | None = None
    cached: bool = False

    def op(self, key: str) -> OpResult:
        return next(o for o in self.ops if o.key == key)

    def limited(self, batch_size: int) -> list[OpResult]:
        """Ops that cannot run one batched product of ``batch_size`` rows."""
        return [o for o in self.ops if o.layouts[0].limit < batch_size]

    def to_json(self) -> dict[str, Any]:
        return {"format": PROBE_FORMAT, "version": PROBE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ProbeReport":
        ops = [OpResult(**{**o, "layouts": [LayoutResult(**x) for x in o["layouts"]]}) for o in data["ops"]]
        fields = {k: v for k, v in data.items() if k not in ("format", "version", "ops")}
        return cls(ops=ops, **fields)

    def summary(self) -> dict[str, Any]:
        """The evidence in a small dict: per-op limits and what was compared."""
        return {
            "up_to": self.up_to,
            "min_elements_per_row_count": self.min_elements,
            "detects": f"a difference in 1 of {round(1 / self.target_rate)} elements with probability "
                       f">= {1 - self.miss_probability:.0%} per row count",
            "ops": {o.key: {r.layout: r.limit for r in o.layouts} for o in self.ops},
            "limited": {o.key: {"first_failure": o.layouts[0].first_failure, "best": o.best().layout,
                                "limit": o.limit()} for o in self.limited(self.up_to)},
            "not_probed": {o.key: o.error for o in self.ops if o.error},
            "fixed_rows": self.fixed_rows,
            "fixed_rows_ok": all(o.fixed_rows_ok is not False for o in self.ops),
            "attention": self.attention,
            "prefill": self.prefill,
            "seconds": round(self.seconds, 2),
            "cached": self.cached,
        }


def machine_fingerprint(model) -> dict[str, Any]:
    """What the kernels' behaviour depends on: model weights, dtype, device, CPU/GPU, torch, threads."""
    p = next(model.parameters())
    dev = p.device
    fp: dict[str, Any] = {
        "model": type(model).__name__,  # the weights digest below identifies the model (not its path)
        "weights": _weights_digest(model),
        "dtype": str(p.dtype).replace("torch.", ""),
        "device": dev.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        fp["gpu"] = torch.cuda.get_device_name(dev)
    else:
        fp.update(cpu_identity())
    return fp


def cpu_identity() -> dict[str, Any]:
    """CPU model name and the flags that select bf16 kernels (from /proc/cpuinfo where present)."""
    model_name, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and model_name in ("", platform.machine(), platform.processor()):
                    model_name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    keep = sorted(f for f in flags if f.startswith(("amx", "avx512", "avx2", "fma", "avx_vnni")))
    return {"cpu": model_name, "cpu_flags": keep, "amx": any(f.startswith("amx") for f in keep)}


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items())[:4]:
        h.update(name.encode())
        flat = t.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes()
        h.update(flat)
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}  # no local paths
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _cache_path(fp: dict[str, Any]) -> Path:
    from ..models import cache_root

    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "probes" / f"probe-{digest}.json"


def _load_cached(fp: dict[str, Any], up_to: int) -> ProbeReport | None:
    path = _cache_path(fp)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("format") != PROBE_FORMAT or data.get("version") != PROBE_VERSION or data.get("fingerprint") != fp:
        return None
    if data.get("up_to", 0) < up_to:
        return None
    rep = ProbeReport.from_json(data)
    rep.cached = True
    return rep


def _store(rep: ProbeReport) -> None:
    from ..formats.files import atomic_write_json

    try:
        atomic_write_json(_cache_path(rep.fingerprint), rep.to_json())
    except OSError:
        pass  # a cache that cannot be written only costs time


def _draws_for(m: int, out_per_row: int) -> int:
    return max(MIN_DRAWS, math.ceil(MIN_ELEMENTS / (m * max(out_per_row, 1))))


@torch.inference_mode()
def probe_op(op: Op, pool: _Pool, up_to: int, layouts=LAYOUTS, fixed_rows: int | None = FIXED_ROWS,
             device=None, dtype=None) -> OpResult:
    """Row invariance of one op for M = 2..up_to in each layout, and its fixed-row-count check."""
    module = op.modules[0]
    device = device or next(iter(module.parameters()), torch.empty(0)).device
    dtype = dtype or _dtype_of(module)
    layouts = layouts if op.kind == "linear" else ("batched",)
    # One-row results for a shared pool of rows: every M-row product below is checked against them.
    n_pool = max(2 * up_to, 64)
    x = pool.rows(op, n_pool, device, dtype)
    solo = torch.cat([_apply(op, module, x[i:i + 1]) for i in range(n_pool)])
    out_per_row = solo.shape[-1]
    gen = pool.gen
    results = []
    for layout in layouts:
        res = LayoutResult(layout, up_to)
        for m in range(2, up_to + 1):
            bad = 0
            for _ in range(_draws_for(m, out_per_row)):
                idx = torch.randperm(n_pool, generator=gen)[:m].to(x.device)
                got = _apply(op, module, x[idx], layout)
                bad += int((got != solo[idx]).sum())
                res.elements += got.numel()
                res.draws += 1
            if bad:
                res.limit, res.first_failure, res.differing = m - 1, m, bad
                break
        results.append(res)
    result = OpResult(op.key, op.kind, len(op.modules), results)
    if fixed_rows and op.kind == "linear":
        result.fixed_rows_ok, result.fixed_rows_elements = _fixed_rows_check(op, module, x, fixed_rows, gen)
    return result


def _fixed_rows_check(op, module, x, rows: int, gen) -> tuple[bool, int]:
    """A row at position 0 of an R-row product padded with zeros (the solo run under the contract)
    against the same row at random positions among random other rows."""
    n = len(x)
    zeros = torch.zeros((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    refs: dict[int, torch.Tensor] = {}

    def ref(i: int) -> torch.Tensor:
        if i not in refs:
            z = zeros.clone()
            z[0] = x[i]
            refs[i] = _apply(op, module, z)[0]
        return refs[i]

    elements = 0
    for _ in range(_draws_for(rows, module.weight.shape[0])):
        idx = torch.randperm(n, generator=gen)[:rows].tolist()
        got = _apply(op, module, x[idx])
        elements += got.numel()
        if not torch.equal(got, torch.stack([ref(i) for i in idx])):
            return False, elements
    return True, elements


def probe(model, up_to: int, *, seed: int = 0, use_cache: bool = True,
          on_op: Callable[[OpResult], None] | None = None) -> ProbeReport:
    """Probe every op of a decode step for row invariance up to ``up_to`` rows (cached)."""
    up_to = max(int(up_to), 2)
    fp = machine_fingerprint(model)
    if use_cache:
        hit = _load_cached(fp, up_to)
        if hit is not None:
            return hit
    t0 = time.perf_counter()
    real = capture_activations(model, seed=seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    results = []
    for op in find_ops(model):
        try:
            res = probe_op(op, _Pool(real.get(op.key), gen), up_to)
        except (TypeError, RuntimeError, ValueError, IndexError) as exc:
            if op.kind == "linear":
                raise
            # e.g. a rotary module whose forward needs model-specific arguments
            res = OpResult(op.key, op.kind, len(op.modules), [LayoutResult("batched", up_to)],
                           error=f"{type(exc).__name__}: {exc}"[:200])
        results.append(res)
        if on_op:
            on_op(res)
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else None
    norm_rows = next((v for k, v in real.items() if k.startswith("norm")), None)
    if hidden and norm_rows is not None:
        add_op = Op("add residual", "add", [None], 2 * hidden)
        both = torch.cat([norm_rows, norm_rows.flip(0)], dim=-1)
        res = probe_op(add_op, _Pool(both, gen), up_to, device=norm_rows.device, dtype=norm_rows.dtype)
        results.append(res)
        if on_op:
            on_op(res)
    from .packed import check_sharing

    attention = probe_attention(model, up_to, gen)
    prefill = check_sharing(model, FIXED_ROWS, seed=seed)
    rep = ProbeReport(up_to, results, fp, time.perf_counter() - t0, attention=attention, prefill=prefill)
    if use_cache:
        _store(rep)
    return rep


#: Rows the attention check compares with the row alone (on an AMD EPYC, two threads made about 1
#: row in 1,000 differ: the check must see thousands to catch that).
ATTENTION_ROWS = 4096


@torch.inference_mode()
def probe_attention(model, up_to: int, gen: torch.Generator) -> dict[str, Any] | None:
    """Whether the batch-invariant attention may run a batch's rows in one call.

    Under that contract a row attends over its K/V left-padded with zero columns to a multiple of
    :data:`ATTENTION_BUCKET` and masked, so its result depends on its own length only. A shared call
    pads every row to the longest row's multiple: the check draws groups of 2..``up_to`` rows of
    random lengths up to :data:`ATTENTION_SPAN` and compares every row of the shared call with the
    row alone, bit for bit, :data:`ATTENTION_ROWS` rows in all. None where the contract's attention
    is per row.
    """
    from .ragged import bucket_mask, bucketed_attention, bucketed_sdpa

    if bucketed_attention(model) is None:
        return None
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    scale = next((m.scaling for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "layer_idx")),
                 dim ** -0.5)
    p = next(model.parameters())
    dev, dtype = p.device, p.dtype
    bucket, span = ATTENTION_BUCKET, ATTENTION_SPAN

    def attend(rows, w):
        k = torch.zeros((len(rows), kv_heads, w, dim), dtype=dtype, device=dev)
        v = torch.zeros_like(k)
        for i, (n, _, rk, rv) in enumerate(rows):
            k[i, :, w - n:], v[i, :, w - n:] = rk, rv
        mask = bucket_mask(w, [r[0] for r in rows], dev)
        return bucketed_sdpa(torch.stack([r[1] for r in rows]), k, v, mask, scale, heads // kv_heads)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dev, dtype)

    t0 = time.perf_counter()
    compared = draws = 0
    first_failure = None
    while compared < ATTENTION_ROWS and first_failure is None:
        g = 2 + draws % max(up_to - 1, 1)
        lengths = torch.randint(1, span + 1, (g,), generator=gen).tolist()
        w = max(-(-n // bucket) * bucket for n in lengths)
        rows = [(n, rand(heads, 1, dim, std=2.0), rand(kv_heads, n, dim, std=2.0), rand(kv_heads, n, dim))
                for n in lengths]
        got = attend(rows, w)
        draws += 1
        for i, r in enumerate(rows):
            compared += 1
            if not torch.equal(got[i], attend([r], -(-r[0] // bucket) * bucket)[0]):
                first_failure = {"rows": g, "padded_to": w, "row_length": r[0]}
                break
    return {"ok": first_failure is None, "bucket": bucket, "span": span, "draws": draws, "rows_compared": compared,
            "elements": compared * heads * dim, "first_failure": first_failure,
            "seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------- plans


@dataclass
class OpPlan:
    key: str
    layout: str = "batched"
    chunk: int | None = None  # rows per product; None = all rows at once
    fixed_rows: int | None = None  # contract batch-invariant: pad every product to this many rows

    def describe(self) -> str:
        if self.fixed_rows:
            return f"{self.layout}, {self.fixed_rows} rows padded"
        return self.layout + (f", chunks of {self.chunk}" if self.chunk else "")


@dataclass
class Plan:
    """How each op runs in a decode step; ``lowered`` records changes made during a run."""

    ops: dict[str, OpPlan] = field(default_factory=dict)
    lowered: list[dict[str, Any]] = field(default_factory=list)
    #: batch-invariant attention: rows share one call up to this padded length (0: one call per row)
    attention_span: int = 0
    #: batch-invariant prefill: prompts share one pack (False: one pack per prompt)
    prefill_shared: bool = False

    def special(self) -> dict[str, OpPlan]:
        return {k: p for k, p in self.ops.items() if p.layout != "batched" or p.chunk or p.fixed_rows}

    def describe(self) -> dict[str, str]:
        out = {k: p.describe() for k, p in self.special().items()}
        if self.attention_span:
            out["attention"] = f"rows padded to a multiple of {ATTENTION_BUCKET}, one call up to {self.attention_span}"
        if self.prefill_shared:
            out["prefill"] = "prompts packed together, fixed-size GEMM chunks"
        return out

    def lower(self, key: str, rows: int, reason: str) -> OpPlan:
        """Run ``key`` in chunks of at most ``rows`` rows from now on."""
        p = self.ops.setdefault(key, OpPlan(key))
        before = p.describe()
        p.chunk = max(1, rows)
        p.fixed_rows = None
        self.lowered.append({"op": key, "from": before, "to": p.describe(), "reason": reason})
        return p


def plan_for(report: ProbeReport | None, batch_size: int, *, max_rows: int | None = None,
             contract: str = "solo", model=None) -> Plan:
    """The cheapest per-op plan the probe supports for ``batch_size`` rows.

    ``max_rows`` forces every linear layer into chunks of that many rows (an override).
    ``contract="batch-invariant"`` runs every linear layer at :data:`FIXED_ROWS` rows.
    Ops come from ``report``, or from ``model`` where no report is given.
    """
    plan = Plan()
    if contract == "batch-invariant" and report is not None and report.attention and report.attention.get("ok"):
        plan.attention_span = report.attention["span"]
    if contract == "batch-invariant" and report is not None and report.prefill and report.prefill.get("ok"):
        plan.prefill_shared = True
    ops = [(o.key, o.kind) for o in report.ops] if report is not None else \
        [(o.key, o.kind) for o in find_ops(model)] if model is not None else []
    for key, kind in ops:
        if kind == "linear" and contract == "batch-invariant":
            rows = report.fixed_rows if report is not None else FIXED_ROWS
            plan.ops[key] = OpPlan(key, fixed_rows=rows)
        elif kind == "linear" and max_rows is not None:
            # at most max_rows rows per product, in a layout the probe found invariant that far
            rows = min(max_rows, batch_size)
            chunk = max_rows if max_rows < batch_size else None
            layout = "batched"
            if report is not None:
                o = report.op(key)
                ok = [r for r in o.layouts if r.limit >= rows]
                best = ok[0] if ok else o.best()
                layout = best.layout
                if not ok:
                    chunk = max(best.limit, 1)
            plan.ops[key] = OpPlan(key, layout, chunk=chunk)
        elif report is not None:
            o = report.op(key)
            ok = [r for r in o.layouts if r.limit >= batch_size]
            if ok:
                plan.ops[key] = OpPlan(key, ok[0].layout)
            else:
                best = o.best()
                plan.ops[key] = OpPlan(key, best.layout, chunk=max(best.limit, 1))
    return plan


def fixed_rows_of(plan: Plan) -> int:
    """The fixed row count of a batch-invariant plan's linear layers."""
    return next((p.fixed_rows for p in plan.ops.values() if p.fixed_rows), FIXED_ROWS)


def fixed_rows_plan(model, rows: int = FIXED_ROWS) -> Plan:
    """The batch-invariant contract's kernels: every linear layer at ``rows`` rows, zero-padded."""
    return Plan({o.key: OpPlan(o.key, fixed_rows=rows) for o in find_ops(model) if o.kind == "linear"})


# --------------------------------------------------------------------------- execution


def _rows_forward(op: Op, module, p: OpPlan, original):
    """A forward for ``module`` that runs its rows as ``p`` says (split along the leading dims)."""

    def run_rows(flat: torch.Tensor) -> torch.Tensor:
        if op.kind == "linear":
            if p.fixed_rows:
                outs = []
                for part in flat.split(p.fixed_rows):
                    n = len(part)
                    if n < p.fixed_rows:
                        part = torch.cat([part, part.new_zeros((p.fixed_rows - n,) + tuple(part.shape[1:]))])
                    outs.append(_apply(op, module, part, p.layout)[:n])
                return outs[0] if len(outs) == 1 else torch.cat(outs)
            if p.chunk and len(flat) > p.chunk:
                return torch.cat([_apply(op, module, c, p.layout) for c in flat.split(p.chunk)])
            return _apply(op, module, flat, p.layout)
        if p.chunk and len(flat) > p.chunk:
            return torch.cat([original(c) for c in flat.split(p.chunk)])
        return original(flat)

    def forward(*args, **kwargs):
        x = args[0]
        if op.kind == "linear":
            flat = x.reshape(-1, x.shape[-1])
            return run_rows(flat).reshape(*x.shape[:-1], -1)
        if op.kind in ("norm", "act"):
            if not p.chunk or x.shape[0] <= p.chunk:
                return original(*args, **kwargs)
            return torch.cat([original(c, *args[1:], **kwargs) for c in x.split(p.chunk)])
        if op.kind == "rotary" and p.chunk and len(args) > 1 and x.shape[0] > p.chunk:
            pos = args[1]
            parts = [original(xc, pc) for xc, pc in zip(x.split(p.chunk), pos.split(p.chunk))]
            return tuple(torch.cat(t) for t in zip(*parts))
        if op.kind == "embedding" and p.chunk and x.shape[0] > p.chunk:
            return torch.cat([original(c) for c in x.split(p.chunk)])
        return original(*args, **kwargs)

    return forward


@contextlib.contextmanager
def decode_kernels(model, plan: Plan) -> Iterator[None]:
    """Within the block, every op of ``plan`` that is not plain batched runs as planned.

    Use it around decode steps only. The modules' own forwards are restored in ``finally``.
    """
    special = plan.special()
    patched = []
    try:
        if special:
            for op in find_ops(model):
                p = special.get(op.key)
                if p is None:
                    continue
                for module in op.modules:
                    if module is None:
                        continue
                    module.forward = _rows_forward(op, module, p, module.forward)
                    patched.append(module)
        yield
    finally:
        for module in patched:
            try:
                del module.forward  # back to the class's forward
            except AttributeError:
                pass


@contextlib.contextmanager
def row_chunked_linears(model, max_rows: int) -> Iterator[None]:
    """Within the block, every Linear computes at most ``max_rows`` rows per GEMM."""
    with decode_kernels(model, plan_for(None, max_rows + 1, max_rows=max_rows, model=model)):
        yield


@torch.inference_mode()
def localize(model, plan: Plan, step: Callable[[], Any]) -> tuple[str, int] | None:
    """Replay one batched decode ``step`` with every planned op recorded, and find the first op
    whose rows differ from the same rows run alone. Returns (op key, rows it ran) or None."""
    ops = find_ops(model)
    by_module = {id(m): op for op in ops for m in op.modules if m is not None}
    calls: list[tuple[Op, Any, torch.Tensor, torch.Tensor]] = []

    def hook(module, args, output):
        op = by_module.get(id(module))
        if op is not None and op.kind in ("linear", "norm", "act") and torch.is_tensor(output):
            calls.append((op, module, args[0].detach().clone(), output.detach().clone()))

    handles = [m.register_forward_hook(hook) for op in ops for m in op.modules if m is not None]
    try:
        with decode_kernels(model, plan):
            step()
    finally:
        for h in handles:
            h.remove()
    for op, module, x, y in calls:
        flat_x = x.reshape(-1, x.shape[-1])
        flat_y = y.reshape(len(flat_x), -1)
        for i in range(len(flat_x)):
            one = _apply(op, module, flat_x[i:i + 1]) if op.kind == "linear" else \
                module(flat_x[i:i + 1]).reshape(1, -1)
            if not torch.equal(one, flat_y[i:i + 1]):
                p = plan.ops.get(op.key)
                ran = (p.fixed_rows or p.chunk) if p is not None else None
                return op.key, min(ran or len(flat_x), len(flat_x))
    return None
