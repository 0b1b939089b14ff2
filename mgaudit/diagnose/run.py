"""``mgaudit diagnose``: which kernel makes a model's stack batch-variant.

Three diagnoses, each with a verdict in words:

* :func:`~mgaudit.diagnose.ops.probe_ops` (``diagnose ops``): op by op, for the model's
  own shapes, is the result of a row bit-identical to its batch-1 result as the number
  of rows M grows? (The invariance probe's view at chosen M: linear shapes, norms,
  activation, rotary, embedding, residual add; plus prefill- vs decode-shaped linear,
  sdpa with and without a padding mask, longer masked caches.)
* :func:`~mgaudit.diagnose.layers.locate_divergence` (``diagnose prompt``): for one
  prompt solo vs inside a left-padded batch, teacher-forced, the first layer and block
  (attention or MLP) whose output differs, per step.
* :func:`~mgaudit.diagnose.layers.kv_drift` (``diagnose kv``): how far the batched K/V
  cache has drifted from the solo one, per layer and step, up to the first argmax flip;
  written to Parquet (:data:`KV_SCHEMA`) with a PNG plot.

This module holds the configs, the runners the CLI calls, prompt/batch selection and the
K/V Parquet and plot writers; the diagnoses live in :mod:`mgaudit.diagnose.ops` and
:mod:`mgaudit.diagnose.layers`.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .layers import (  # noqa: F401  (re-exported)
    KvDriftResult,
    LocateReport,
    StepDivergence,
    kv_drift,
    kv_verdict,
    locate_divergence,
    locate_verdict,
)
from .ops import DEFAULT_ROWS, OpRow, OpsReport, ops_verdict, parse_rows, probe_ops  # noqa: F401
from ..models import ModelOptions
from ..errors import OutputError, PromptError, UsageError
from ..formats.kv import KV_COLUMNS, KV_FILE, KV_PLOT, KV_SCHEMA, kv_writer  # noqa: F401
from ..formats.files import atomic_write_bytes



# --------------------------------------------------------------------------- configs


def _check_common(batch_size: int | None = None, max_new_tokens: int | None = None, limit: int | None = None) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 2):
        raise UsageError(f"`batch_size` must be at least 2, got {batch_size}",
                         hint="a batch of 1 is the solo run itself")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UsageError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise UsageError(f"`limit` must be at least 1, got {limit}")


@dataclass
class OpsConfig(ModelOptions):
    rows: Sequence[int] = DEFAULT_ROWS
    seed: int = 0
    kv_len: int = 48
    threads: int | None = None  # torch threads (kernels can depend on it); None: torch's default

    def validate(self) -> None:
        if not self.rows or any(int(r) < 1 for r in self.rows):
            raise UsageError("`rows` must be whole numbers of at least 1")
        if self.kv_len < 2:
            raise UsageError(f"`kv_len` must be at least 2, got {self.kv_len}")


@dataclass
class PromptConfig(ModelOptions):
    prompt: str  # an id of the prompt set, or the text of a prompt
    prompts: str = "chat"  # where prompt ids and fillers come from
    batch_size: int = 8
    max_new_tokens: int = 32
    row: int = 0
    exact: bool = False  # a batch of copies of the prompt: equal lengths, no padding
    chat: bool = True
    threads: int | None = None  # torch threads (kernels can depend on it); None: torch's default

    def validate(self) -> None:
        _check_common(self.batch_size, self.max_new_tokens)
        if not 0 <= self.row < self.batch_size:
            raise UsageError(f"`row` must be between 0 and {self.batch_size - 1}, got {self.row}")


@dataclass
class KvConfig(ModelOptions):
    prompts: str
    out: Path
    batch_size: int = 8
    max_new_tokens: int = 64
    limit: int | None = None  # diagnose only the first N prompts (fillers still come from the whole set)
    flips: int = 3  # stop after this many prompts with a flip
    plot: Path | None = None  # default: OUT/kv.png
    chat: bool = True
    threads: int | None = None  # torch threads (kernels can depend on it); None: torch's default

    def validate(self) -> None:
        _check_common(self.batch_size, self.max_new_tokens, self.limit)
        if self.flips < 1:
            raise UsageError(f"`flips` must be at least 1, got {self.flips}")


# --------------------------------------------------------------------------- prompts and batches


def pick_prompt(prompt_set, text_or_id: str):
    """The prompt of ``prompt_set`` with this id, else a new prompt with this text."""
    from ..prompts import Prompt

    text_or_id = str(text_or_id)
    for p in prompt_set.prompts:
        if p.id == text_or_id:
            return p
    if not text_or_id.strip():
        raise PromptError("the prompt is empty", hint="give a prompt id of the set or a prompt text")
    return Prompt(id="cli", text=text_or_id, messages=None)


def batch_for(index: int | None, target_ids: list[int], encoded: list[list[int]], batch_size: int, row: int = 0,
              exact: bool = False) -> list[list[int]]:
    """A batch of ``batch_size`` prompts with ``target_ids`` at ``row``; the others are the next
    prompts of the set after ``index`` (cyclically, never the target itself), or copies of the
    target when ``exact``."""
    if exact:
        return [list(target_ids) for _ in range(batch_size)]
    pool = list(encoded) if index is None else list(encoded[index + 1:]) + list(encoded[:index])
    if not pool:
        raise PromptError("the prompt set has no other prompt to use as filler",
                          hint="use a set with at least two prompts, or `exact`")
    fillers = [pool[i % len(pool)] for i in range(batch_size - 1)]
    return fillers[:row] + [list(target_ids)] + fillers[row:]


# --------------------------------------------------------------------------- runners


def _load(config, log, loaded=None):
    """Set the torch thread count when asked, then load the model (unless one is given)."""

    if config.threads is not None:
        import torch

        if isinstance(config.threads, bool) or config.threads < 1:
            raise UsageError(f"`threads` must be at least 1, got {config.threads}")
        torch.set_num_threads(config.threads)
    if loaded is not None:
        return loaded
    return config.load(log=log)


def run_ops(config: OpsConfig, log: Callable[[str], None] | None = None, loaded=None) -> OpsReport:
    config.validate()
    lm = _load(config, log, loaded)
    report = probe_ops(lm, row_counts=config.rows, seed=config.seed, kv_len=config.kv_len, progress=log)
    report.provenance = lm.provenance()
    # the same evidence the ragged path plans with: per-op row limits with stated power
    from ..decoding.invariance import probe

    up_to = max(2, min(max(config.rows), 64))
    report.limits = probe(lm.model, up_to, seed=config.seed).summary()
    return report


def run_prompt(config: PromptConfig, log: Callable[[str], None] | None = None, loaded=None) -> LocateReport:
    from ..prompts import encode_prompt, load_prompts

    config.validate()
    prompt_set = load_prompts(config.prompts)
    prompt = pick_prompt(prompt_set, config.prompt)
    lm = _load(config, log, loaded)
    encoded = [encode_prompt(lm.tokenizer, p, chat=config.chat) for p in prompt_set.prompts]
    index = next((i for i, p in enumerate(prompt_set.prompts) if p is prompt), None)
    if index is None and log:
        log(f"no prompt with id {config.prompt!r} in {prompt_set.name}: using it as the prompt text")
    target = encoded[index] if index is not None else encode_prompt(lm.tokenizer, prompt, chat=config.chat)
    batch = batch_for(index, target, encoded, config.batch_size, config.row, config.exact)
    return locate_divergence(lm, target, batch, config.max_new_tokens, row=config.row, prompt_id=prompt.id)


@dataclass
class KvRun:
    out: Path
    plot: Path
    results: list[KvDriftResult]
    summary: dict[str, Any] = field(default_factory=dict)


def run_kv(config: KvConfig, log: Callable[[str], None] | None = None, loaded=None,
           on_prompt: Callable[[KvDriftResult], None] | None = None) -> KvRun:
    """kv_drift over the prompts, in order, until ``config.flips`` prompts have flipped."""
    import torch

    from .. import __version__
    from ..prompts import encode_prompt, load_prompts

    config.validate()
    prompt_set = load_prompts(config.prompts)  # `limit` bounds the diagnosed prompts; fillers come from all
    out = Path(config.out)
    plot = Path(config.plot) if config.plot else out / KV_PLOT
    for d in {out, plot.parent}:  # fail before the model runs, not after
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {d}: {exc.strerror or exc}", hint="choose a writable `out` / `plot`") from None
    lm = _load(config, log, loaded)
    encoded = [encode_prompt(lm.tokenizer, p, chat=config.chat) for p in prompt_set.prompts]
    results: list[KvDriftResult] = []
    for i, p in enumerate(prompt_set.prompts[:config.limit]):
        batch = batch_for(i, encoded[i], encoded, config.batch_size)
        res = kv_drift(lm, encoded[i], batch, config.max_new_tokens, row=0, prompt_id=p.id)
        results.append(res)
        if on_prompt:
            on_prompt(res)
        if sum(r.flipped_at_step is not None for r in results) >= config.flips:
            break
    provenance = {
        **lm.provenance(),
        "prompts": {"source": prompt_set.source, "name": prompt_set.name, "sha256": prompt_set.sha256,
                    "count": len(prompt_set.prompts)},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "torch_threads": torch.get_num_threads(),
        "mgaudit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_kv_table(out / KV_FILE, results, provenance)
    plot_kv_drift(results, plot)
    summary = kv_summary(results)
    summary["files"] = {"parquet": str(out / KV_FILE), "plot": str(plot)}
    return KvRun(out, plot, results, summary)


# --------------------------------------------------------------------------- K/V output


def write_kv_table(path: Path, results: Sequence[KvDriftResult], provenance: dict[str, Any]) -> Path:
    with kv_writer(Path(path), provenance) as w:
        w.write(r for res in results for r in res.records())
    return Path(path)


def plot_kv_drift(results: Sequence[KvDriftResult], path: Path, dpi: int = 110, max_panels: int = 3) -> Path:
    """K max |diff| vs step for a few layers, one panel per prompt (flipped prompts first),
    the first flip marked; PNG written atomically. matplotlib is imported here (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chosen = sorted(results, key=lambda r: r.flipped_at_step is None)[:max_panels]
    n = max(1, len(chosen))
    fig = Figure(figsize=(5.2 * n, 4.2), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, res in zip(axes, chosen):
        nl = res.n_layers
        layers = sorted({0, nl // 3, (2 * nl) // 3, nl - 1})
        k = np.asarray(res.k_max_abs_diff, dtype=float)
        for layer in layers:
            ax.plot(res.steps, k[:, layer], marker=".", ms=3, lw=1.2, label=f"layer {layer}: all valid positions")
        new = np.asarray(res.k_new_max_abs_diff, dtype=float)[:, nl - 1]
        ax.plot(res.steps[1:], new[1:], color="gray", ls=":", lw=1.0, label=f"layer {nl - 1}: newest column")
        if res.flipped_at_step is not None:
            ax.axvline(res.flipped_at_step, color="red", ls="--", lw=1.2, label=f"first flip (step {res.flipped_at_step})")
        ax.set_ylim(bottom=0.0)
        ax.set_xlabel("step (-1 = prefill)")
        ax.set_ylabel("K max |solo - batched|")
        slope = "n/a" if res.slope is None else f"{res.slope:.3g}/token"
        ax.set_title(f"{res.prompt_id}: B={res.batch_size}, pad {res.pad_len}, slope {slope}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not chosen:
        axes[0].text(0.5, 0.5, "no prompts", ha="center", va="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def kv_summary(results: Sequence[KvDriftResult]) -> dict[str, Any]:
    flipped = [r for r in results if r.flipped_at_step is not None]
    slopes = [r.slope for r in flipped if r.slope is not None]
    trends: dict[str, int] = {}
    for r in flipped:
        trends[r.trend or "n/a"] = trends.get(r.trend or "n/a", 0) + 1
    deep = results[0].n_layers - 1 if results else None
    if not results:
        verdict = "no prompts run."
    elif not flipped:
        verdict = f"no argmax flip in {len(results)} prompt(s); nothing to trace back."
    else:
        med = float(np.median(slopes)) if slopes else None
        main = max(trends, key=trends.get)
        verdict = (f"{len(flipped)} of {len(results)} prompt(s) flipped (first flips at steps "
                   f"{', '.join(str(r.flipped_at_step) for r in flipped)}); before the flip the layer {deep} K "
                   f"perturbation {main} in {trends[main]} of {len(flipped)}"
                   + (f" (median slope {med:.3g} per token)" if med is not None else "") + ".")
    return {
        "prompts": len(results),
        "prompts_flipped": len(flipped),
        "first_flip_steps": {r.prompt_id: r.flipped_at_step for r in results},
        "slopes": {r.prompt_id: r.slope for r in results},
        "slopes_new_column": {r.prompt_id: r.slope_new for r in results},
        "trends": {r.prompt_id: r.trend for r in results},
        "median_slope_flipped": float(np.median(slopes)) if slopes else None,
        "verdict": verdict,
        "results": [{"prompt_id": r.prompt_id, "verdict": r.verdict, "flipped_at_step": r.flipped_at_step,
                     "slope": r.slope, "slope_new": r.slope_new, "trend": r.trend, "pad_len": r.pad_len,
                     "prompt_len": r.prompt_len} for r in results],
    }
