"""The sampler gives the same picks as another revision of it: tokens, runner-ups, scores, margins
and margin kinds, field by field, and the time each takes.

The other revision's ``mgaudit/decoding/sampling.py`` and ``draws.py`` are read from git into a
temporary package; both pick on the same logits: those of a real batch (16 chat prompts decoded
for 24 steps) and random rows built to reach every path (flat rows with huge nuclei, exact ties,
one dominant token, half the vocabulary at -inf, a constant row, a small vocabulary), at a dozen
settings and two seeds, some steps with inactive rows. Times are reported for the real logits and the random rows
apart (the random ones are far from a model's: flat rows with tens of thousands of candidates).

    python benchmarks/sampler_unchanged.py BASE_REVISION
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import CONFIGS  # noqa: E402

SETTINGS = {**CONFIGS, "t0.3": dict(temperature=0.3), "t2.0": dict(temperature=2.0),
            "t1.5-p0.99": dict(temperature=1.5, top_p=0.99), "t1-k1": dict(temperature=1.0, top_k=1),
            "t1-p0.5": dict(temperature=1.0, top_p=0.5), "t1-minp0.1": dict(temperature=1.0, min_p=0.1),
            "t0.05": dict(temperature=0.05)}
FIELDS = ("token", "runner_up", "top1", "top2", "kind")


def other_revision(rev: str, root: Path):
    """The sampler of revision ``rev`` as a package ``base_sampler`` under ``root``."""
    import importlib

    pkg = root / "base_sampler"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("sampling", "draws"):
        src = subprocess.run(["git", "show", f"{rev}:mgaudit/decoding/{name}.py"], check=True, capture_output=True,
                             text=True).stdout
        (pkg / f"{name}.py").write_text(src.replace("from ..errors import", "from mgaudit.errors import"))
    sys.path.insert(0, str(root))
    return importlib.import_module("base_sampler.sampling")


def real_logits(steps: int = 24):
    import torch

    from mgaudit.decoding.loop import padded_prefill
    from mgaudit.models import load_model
    from mgaudit.prompts import encode_prompt, load_prompts

    lm = load_model("smollm2", device="cpu")
    ids = [encode_prompt(lm.tokenizer, p) for p in load_prompts("chat", limit=16).prompts]
    logits, cache, positions, advance = padded_prefill(lm.model, ids, lm.pad_token_id)
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            out.append(logits.clone())
            positions = positions + 1
            logits = advance(cache, torch.argmax(logits, -1)[:, None], positions)
    return out


def random_logits():
    import torch

    g = torch.Generator().manual_seed(0)
    flat = torch.randn(8, 49152, generator=g).bfloat16()
    tied = torch.zeros(4, 49152)
    tied[:, :7] = 3.0
    spiky = torch.randn(4, 49152, generator=g) * 0.1
    spiky[:, 100] = 30
    masked = torch.randn(4, 49152, generator=g) * 0.5
    masked[:, ::2] = -math.inf
    wide = torch.randn(4, 49152, generator=g) * 0.05
    wide[:, :3] += 2
    return [flat, tied.bfloat16(), spiky.bfloat16(), torch.randn(6, 300, generator=g) * 3, masked,
            torch.zeros(2, 4000), wide]


def same(a, b) -> str | None:
    for f in FIELDS:
        for u, v in zip(getattr(a, f), getattr(b, f)):
            if not (u == v or (isinstance(u, float) and math.isnan(u) and math.isnan(v))):
                return f
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="the git revision to compare with")
    args = ap.parse_args(argv)

    from mgaudit.decoding import sampling as new

    with tempfile.TemporaryDirectory() as tmp:
        old = other_revision(args.base, Path(tmp))
        real = real_logits()
        logits = real + random_logits()
        differ = picks = 0
        seconds = {(kind, side): 0.0 for kind in ("real", "random") for side in ("base", "this")}
        for name, kw in SETTINGS.items():
            for seed in (0, 11):
                s, s_old = new.Sampling(seed=seed, **kw), old.Sampling(seed=seed, **kw)
                for i, lg in enumerate(logits):
                    seeds = [s.draw_seed(f"p{r}") for r in range(lg.shape[0])]
                    active = None if i % 3 else [r % 4 != 1 for r in range(lg.shape[0])]
                    t0 = time.perf_counter()
                    a = old.SampleRule(s_old, seeds, first=i).pick(lg, i, active)
                    t1 = time.perf_counter()
                    b = new.SampleRule(s, seeds, first=i).pick(lg, i, active)
                    kind = "real" if i < len(real) else "random"
                    seconds[kind, "base"] += t1 - t0
                    seconds[kind, "this"] += time.perf_counter() - t1
                    picks += 1
                    field = same(a, b)
                    if field:
                        differ += 1
                        print(f"differ: {name} seed {seed} logits {i}: {field}", file=sys.stderr)
    print(f"{picks} picks (each a batch of rows), {differ} differ")
    for kind in ("real", "random"):
        base, this = seconds[kind, "base"], seconds[kind, "this"]
        print(f"{kind} logits: {this / base:.2f}x the base revision's time ({this:.1f} s against {base:.1f} s)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
