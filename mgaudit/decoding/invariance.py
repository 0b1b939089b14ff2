"""The per-op row-invariance probe: measurement with stated power, its report, and its cache.

Greedy decoding of a batch is identical to solo decoding only if every row of every op of the
decode step computes what it would compute alone. The ops are found, run and planned in
:mod:`mgaudit.decoding.kernels`; this module measures them. Their CPU and GPU kernels may change
the reduction order with the row count M, differently on different machines: on an AMD EPYC
(AVX512-BF16, no AMX) bf16 ``down_proj`` (576x1536) differs from the one-row result from M = 2 in
about 1 of 10^4 elements, while on an Intel Xeon with AMX every shape is invariant below 64 rows.

:func:`probe` measures, for each op and each way of running it (``layout``), the largest M up to
``up_to`` such that every row of an M-row application equals that row applied alone, bit for bit,
for every M' <= M. For each M it compares at least :data:`MIN_ELEMENTS` output elements (so a
difference in 1 of 10^4 elements is missed with probability below 1 %), drawn from real
activations captured at that op in a short decode of the model and from scaled random rows. It
also checks, for the batch-invariant contract, that a row's result in a
:data:`~mgaudit.decoding.kernels.FIXED_ROWS`-row product does not depend on its position or on the
other rows. The contract's sharing checks (may rows share an attention call, may prompts share a
prefill pack) run when that contract is first asked for (``contract="batch-invariant"``) and are
then kept with the cached report. :func:`measure_rows` runs the same measurement at chosen row
counts with every point kept (what ``diagnose ops`` shows).

The report is cached per (model weights digest, dtype, device, the machine's kernel identity from
:mod:`mgaudit.machine`, torch version, threads) under ``$MGAUDIT_CACHE/probes/``;
``MGAUDIT_NO_PROBE_CACHE=1`` makes :func:`probe` measure again (and store the fresh report).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .kernels import FIXED_ROWS, LAYOUTS, Op, apply_op, dtype_of, find_ops

#: Per-element difference rate the probe is sized to catch (1 in 10^4) ...
TARGET_RATE = 1e-4
#: ... with at most this probability of missing it at a given row count.
MISS_PROBABILITY = 0.01
#: Elements compared per (op, layout, M): (1 - 1e-4) ** n < 0.01.
MIN_ELEMENTS = math.ceil(math.log(MISS_PROBABILITY) / math.log1p(-TARGET_RATE))
MIN_DRAWS = 3
PROBE_FORMAT = "mgaudit.probe"
PROBE_VERSION = 8
#: Set to 1: :func:`probe` does not reuse a cached report.
NO_CACHE_ENV = "MGAUDIT_NO_PROBE_CACHE"


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



# --------------------------------------------------------------------------- results


@dataclass
class Point:
    """One row count M of one op and layout: every compared row of an M-row application against
    that row applied alone (kept by :func:`measure_rows`, not by the planning probe)."""

    rows: int
    identical: bool = True
    differing: int = 0  # differing output elements over all comparisons
    rows_differing: int = 0  # compared rows with at least one differing element
    max_abs_diff: float = 0.0
    elements: int = 0
    row0_identical: bool | None = None  # the first row alone, where rows are not drawn at random

    def add(self, got: torch.Tensor, ref: torch.Tensor) -> int:
        """Compare ``got`` (one result row per leading index) with ``ref`` (the same rows computed
        alone), bit for bit; returns the elements that differ."""
        diff = got != ref
        bad = int(diff.sum())
        if bad:
            self.differing += bad
            self.rows_differing += int(diff.reshape(len(got), -1).any(-1).sum())
            self.max_abs_diff = max(self.max_abs_diff, float((got.float() - ref.float()).abs().max()))
            self.identical = False
        self.elements += got.numel()
        return bad


@dataclass
class LayoutResult:
    layout: str
    limit: int  # largest M (<= up_to) with every M' in 2..M identical to one-row results
    first_failure: int | None = None  # smallest M where a row differed
    differing: int = 0  # differing elements at that M
    elements: int = 0  # output elements compared in all
    draws: int = 0
    points: list[Point] | None = None  # per row count, where asked (measure_rows)


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
    #: batch-invariant attention: whether rows padded to the bucket may share one call
    #: (see mgaudit.decoding.ragged.check_attention_sharing)
    attention: dict[str, Any] | None = None
    #: batch-invariant prefill: whether prompts may share one pack (see mgaudit.decoding.packed.check_sharing)
    prefill: dict[str, Any] | None = None
    #: whether the two sharing checks above have run (None there then means: not applicable to the model)
    sharing_checked: bool = False
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
        def layout(x):
            points = [Point(**p) for p in x["points"]] if x.get("points") is not None else None
            return LayoutResult(**{**x, "points": points})

        ops = [OpResult(**{**o, "layouts": [layout(x) for x in o["layouts"]]}) for o in data["ops"]]
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


# --------------------------------------------------------------------------- measurement


def _draws_for(m: int, out_per_row: int) -> int:
    return max(MIN_DRAWS, math.ceil(MIN_ELEMENTS / (m * max(out_per_row, 1))))


@torch.inference_mode()
def probe_op(op: Op, pool: _Pool, up_to: int, layouts=LAYOUTS, fixed_rows: int | None = FIXED_ROWS,
             device=None, dtype=None, rows: Sequence[int] | None = None) -> OpResult:
    """Row invariance of one op for M = 2..up_to in each layout (stopping at the first M that
    differs), and its fixed-row-count check. ``rows``: measure exactly these row counts instead,
    every one, keeping a :class:`Point` per row count."""
    module = op.modules[0]
    device = device or next(iter(module.parameters()), torch.empty(0)).device
    dtype = dtype or dtype_of(module)
    layouts = layouts if op.kind == "linear" else ("batched",)
    counts = list(rows) if rows is not None else list(range(2, up_to + 1))
    # One-row results for a shared pool of rows: every M-row product below is checked against them.
    n_pool = max(2 * up_to, 64)
    x = pool.rows(op, n_pool, device, dtype)
    solo = torch.cat([apply_op(op, module, x[i:i + 1]) for i in range(n_pool)])
    out_per_row = solo.shape[-1]
    gen = pool.gen
    results = []
    for layout in layouts:
        res = LayoutResult(layout, up_to, points=[] if rows is not None else None)
        for m in counts:
            point = Point(m)
            for _ in range(_draws_for(m, out_per_row)):
                idx = torch.randperm(n_pool, generator=gen)[:m].to(x.device)
                point.add(apply_op(op, module, x[idx], layout), solo[idx])
                res.draws += 1
            res.elements += point.elements
            if res.points is not None:
                res.points.append(point)
            if not point.identical and res.first_failure is None:
                res.limit = max([r for r in counts if r < m], default=1 if m > 1 else 0)
                res.first_failure, res.differing = m, point.differing
                if rows is None:
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
            refs[i] = apply_op(op, module, z)[0]
        return refs[i]

    elements = 0
    for _ in range(_draws_for(rows, module.weight.shape[0])):
        idx = torch.randperm(n, generator=gen)[:rows].tolist()
        got = apply_op(op, module, x[idx])
        elements += got.numel()
        if not torch.equal(got, torch.stack([ref(i) for i in idx])):
            return False, elements
    return True, elements


def _measure_ops(model, real: dict[str, torch.Tensor], gen: torch.Generator, up_to: int,
                 rows: Sequence[int] | None = None, layouts=LAYOUTS,
                 on_op: Callable[[OpResult], None] | None = None) -> list[OpResult]:
    """Every op of the decode step (and the residual add), measured by :func:`probe_op`."""
    fixed = FIXED_ROWS if rows is None else None
    results = []
    for op in find_ops(model):
        try:
            res = probe_op(op, _Pool(real.get(op.key), gen), up_to, layouts, fixed, rows=rows)
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
        res = probe_op(add_op, _Pool(both, gen), up_to, layouts, fixed, device=norm_rows.device,
                       dtype=norm_rows.dtype, rows=rows)
        results.append(res)
        if on_op:
            on_op(res)
    return results


def probe(model, up_to: int, *, seed: int = 0, use_cache: bool = True, contract: str = "solo",
          on_op: Callable[[OpResult], None] | None = None) -> ProbeReport:
    """Probe every op of a decode step for row invariance up to ``up_to`` rows (cached).

    ``contract="batch-invariant"`` also runs that contract's sharing checks
    (:func:`sharing_checks`) if the report does not hold them yet; they are cached with it.
    """
    up_to = max(int(up_to), 2)
    fp = fingerprint(model)
    rep = _load_cached(fp, up_to) if use_cache else None
    if rep is None:
        t0 = time.perf_counter()
        real = capture_activations(model, seed=seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        rep = ProbeReport(up_to, _measure_ops(model, real, gen, up_to, on_op=on_op), fp, time.perf_counter() - t0)
    elif contract != "batch-invariant" or rep.sharing_checked:
        return rep
    if contract == "batch-invariant":
        sharing_checks(model, rep, seed=seed)
    if use_cache:
        _store(rep)
    return rep


def sharing_checks(model, report: ProbeReport, seed: int = 0) -> ProbeReport:
    """Add the batch-invariant contract's sharing checks to ``report`` (once): may rows share an
    attention call (:func:`mgaudit.decoding.ragged.check_attention_sharing`), may prompts share a
    prefill pack (:func:`mgaudit.decoding.packed.check_sharing`)."""
    from .packed import check_sharing
    from .ragged import check_attention_sharing

    if not report.sharing_checked:
        report.attention = check_attention_sharing(model, report.up_to,
                                                   torch.Generator(device="cpu").manual_seed(seed))
        report.prefill = check_sharing(model, FIXED_ROWS, seed=seed)
        report.sharing_checked = True
    return report


def measure_rows(model, rows: Sequence[int], *, seed: int = 0, layouts=("batched",)) -> list[OpResult]:
    """The probe's measurement at exactly the row counts ``rows`` (M = 1 included), for every op,
    without stopping at the first M that differs and with every :class:`Point` kept (not cached)."""
    rows = sorted(set(int(r) for r in rows))
    real = capture_activations(model, seed=seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return _measure_ops(model, real, gen, max(max(rows), 2), rows=rows, layouts=layouts)


# --------------------------------------------------------------------------- the cache


def fingerprint(model) -> dict[str, Any]:
    """What the kernels' behaviour depends on: model weights, dtype, device, the machine's kernel
    identity (:func:`mgaudit.machine.kernel_identity`), torch, threads."""
    from ..machine import kernel_identity

    p = next(model.parameters())
    return {
        "model": type(model).__name__,  # the weights digest below identifies the model (not its path)
        "weights": _weights_digest(model),
        "dtype": str(p.dtype).replace("torch.", ""),
        "device": p.device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": kernel_identity(p.device),
    }


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
    if os.environ.get(NO_CACHE_ENV, "") not in ("", "0"):
        return None
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
