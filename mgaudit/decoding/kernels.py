"""The kernels of a batched decode step: which ops it shares between rows, how each op runs
(a per-op plan), the mode that applies a plan, and the search for the op that drifted.

On the ragged path (solo prefill, per-row unpadded attention) the ops that see several rows at
once are the linear layers (every distinct weight shape, ``lm_head`` included), the norms, the MLP
activation, the rotary embedding, the embedding and the residual adds (:func:`find_ops`). Their
CPU and GPU kernels may change the reduction order with the row count, differently on different
machines; :mod:`mgaudit.decoding.invariance` measures that (the probe) and :func:`plan_for` turns
its report into a :class:`Plan`: each op batched where its limit allows, else in the layout with
the highest limit, in chunks of that many rows. :func:`decode_kernels` applies a plan to the
model's modules inside a ``with`` block (decode steps only: the solo prefill must stay what
``generate`` runs) and restores them in ``finally``. :func:`localize` replays one step with every
planned op recorded and finds the first op whose rows differ from the same rows run alone.

The batch-invariant contract (``fixed_rows``): every linear layer of a decode step runs at one
fixed row count (:data:`FIXED_ROWS`), padded with zero rows, solo included, so a row's result does
not depend on the batch (:func:`fixed_rows_plan`; the packed prefill uses the same mode).

This module is below both the probe and :mod:`mgaudit.decoding.packed`.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .ragged import BUCKET as ATTENTION_BUCKET

#: Ways of running a linear layer: one GEMM, or one GEMM on the column-major copy of the input
#: (which the CPU kernels route through another path).
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


def apply_op(op: Op, module, x: torch.Tensor, layout: str = "batched") -> torch.Tensor:
    """Run ``op`` on rows ``x`` (one row per leading index); returns one output row per input row."""
    if op.kind == "linear":
        if layout == "colmajor" and len(x) > 1:
            x = x.t().contiguous().t()
        return F.linear(x, module.weight, module.bias)
    if op.kind == "embedding":
        return module(x)
    if op.kind == "rotary":
        cos, sin = module(x[:, None, :1].float().to(dtype_of(module)), x.long())
        return torch.cat([cos.reshape(len(x), -1), sin.reshape(len(x), -1)], dim=-1)
    if op.kind == "add":
        half = x.shape[-1] // 2
        return x[:, :half] + x[:, half:]
    return module(x[:, None, :]).reshape(len(x), -1)


def dtype_of(module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    for b in module.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.float32


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


def plan_for(report: Any, batch_size: int, *, max_rows: int | None = None,
             contract: str = "solo", model=None) -> Plan:
    """The cheapest per-op plan the probe supports for ``batch_size`` rows.

    ``report``: a :class:`mgaudit.decoding.invariance.ProbeReport` (its per-op layout limits, its
    fixed row count and sharing checks), or None. ``max_rows`` forces every linear layer into chunks of that many rows (an override).
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
                    outs.append(apply_op(op, module, part, p.layout)[:n])
                return outs[0] if len(outs) == 1 else torch.cat(outs)
            if p.chunk and len(flat) > p.chunk:
                return torch.cat([apply_op(op, module, c, p.layout) for c in flat.split(p.chunk)])
            return apply_op(op, module, flat, p.layout)
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


# --------------------------------------------------------------------------- localisation


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
            one = apply_op(op, module, flat_x[i:i + 1]) if op.kind == "linear" else \
                module(flat_x[i:i + 1]).reshape(1, -1)
            if not torch.equal(one, flat_y[i:i + 1]):
                p = plan.ops.get(op.key)
                ran = (p.fixed_rows or p.chunk) if p is not None else None
                return op.key, min(ran or len(flat_x), len(flat_x))
    return None
