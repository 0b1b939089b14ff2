"""The main job in one call: scan a sample set, calibrate the gate on it, and
verify gated decoding on other sets with that gate (calibrate on one workload,
check on others)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class DemoConfig:
    out: Path = Path("mgaudit-out")
    model: str = "smollm2"
    device: str = "auto"
    calibrate_on: str = "math"
    verify_on: list[str] = field(default_factory=lambda: ["code", "chat"])
    batch_sizes: list[int] = field(default_factory=lambda: [4, 8, 16])
    verify_batch_size: int = 16
    max_new_tokens: int = 64
    limit: int | None = 16


def run_demo(config: DemoConfig, progress=None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    from .calibrate import CalibrateConfig, calibrate
    from .errors import TraceError
    from .models import load_model
    from .scan import ScanConfig, scan
    from .verify import VerifyConfig, verify

    log = log or (lambda m: None)
    out = Path(config.out)
    lm = load_model(config.model, "bfloat16", config.device, log=log)
    traces = out / f"traces-{_slug(config.calibrate_on)}"
    log(f"1/3 scan {config.calibrate_on} -> {traces}")
    scan_res = scan(ScanConfig(prompts=config.calibrate_on, out=traces, model=config.model, device=config.device,
                               batch_sizes=config.batch_sizes, max_new_tokens=config.max_new_tokens,
                               limit=config.limit, resume=traces.exists()),
                    progress=progress, log=log, loaded=lm)
    gate_path = out / "gate.json"
    log(f"2/3 calibrate -> {gate_path}")
    cal_cfg = CalibrateConfig(traces=[traces], out=gate_path, plot=out / "calibration.png")
    try:
        cal = calibrate(cal_cfg)
    except TraceError as exc:
        if "no flips" not in exc.message:
            raise
        log(f"{exc.message}: falling back to --method bound")
        cal_cfg.method = "bound"
        cal = calibrate(cal_cfg)
    reports = {}
    for name in config.verify_on:
        log(f"3/3 verify {name} with the gate (batch size {config.verify_batch_size})")
        reports[name] = verify(VerifyConfig(prompts=name, model=config.model, device=config.device, policy="gate",
                                            gate=gate_path, batch_size=config.verify_batch_size,
                                            max_new_tokens=config.max_new_tokens, limit=config.limit,
                                            report=out / f"verify-{_slug(name)}.json"),
                               progress=progress, log=log, loaded=lm)
    return {"scan": scan_res, "calibration": cal, "verify": reports}


def _slug(spec: str) -> str:
    """A file-name-safe label for a prompt set given by name or path."""
    import re

    name = Path(spec).name.split(".")[0] if ("/" in spec or "." in spec) else spec
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name) or "prompts"
