"""The main job in one call: scan a sample set, calibrate the gate on it, and
verify gated decoding on other sets with that gate (calibrate on one workload,
check on others), then a verdict.

Two sizes: the default (a few minutes of decoding on a 2-core CPU) and
``PAPER`` (the paper-size run: 16 prompts a set, 64 tokens, batch sizes 4, 8, 16)."""

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
    batch_sizes: list[int] = field(default_factory=lambda: [4, 8])
    verify_batch_size: int = 8
    max_new_tokens: int = 32
    limit: int | None = 8

    @classmethod
    def paper(cls, **kw: Any) -> "DemoConfig":
        """The paper-size run."""
        return cls(**{**PAPER, **kw})


#: The paper-size run (``mgaudit demo --paper``).
PAPER: dict[str, Any] = {"batch_sizes": [4, 8, 16], "verify_batch_size": 16, "max_new_tokens": 64, "limit": 16}


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """The story in figures: what plain batching did in the scan, what the gate did in verify."""
    summary = result["scan"].summary
    free = [e["free"] for e in summary["by_condition"] if "free" in e]
    sync = [e["sync"] for e in summary["by_condition"] if "sync" in e]
    reports = result["verify"]
    identical = sum(r["summary"]["identical"] for r in reports.values())
    sequences = sum(r["summary"]["sequences"] for r in reports.values())
    return {
        "plain_batching": {
            "sync_steps": sum(s["steps"] for s in sync),
            "flips": sum(s["flips"] for s in sync),
            "sequences": sum(f["sequences"] for f in free),
            "sequences_diverged": sum(f["sequences_diverged"] for f in free),
        },
        "threshold": result["calibration"].threshold,
        "method": result["calibration"].method,
        "gated": {"sets": list(reports), "sequences": sequences, "identical": identical},
        "pass": identical == sequences,
    }


def run_demo(config: DemoConfig, progress=None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    from .calibrate import CalibrateConfig, calibrate
    from .errors import NoFlipsError
    from .models import load_model
    from .scan import ScanConfig, scan
    from .formats.files import check_output_dir
    from .verify import VerifyConfig, verify

    log = log or (lambda m: None)
    out = Path(config.out)
    check_output_dir(out, "demo output directory")  # before the model loads; nothing is created yet
    lm = load_model(config.model, "bfloat16", config.device, log=log)
    # one folder per size, so a rerun of the same size resumes and another size starts its own
    traces = out / f"traces-{_slug(config.calibrate_on)}-{config.limit or 'all'}x{config.max_new_tokens}"
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
    except NoFlipsError as exc:
        log(f"{exc.message}: falling back to the bound method")
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
    result = {"scan": scan_res, "calibration": cal, "verify": reports}
    result["verdict"] = verdict(result)
    return result


def _slug(spec: str) -> str:
    """A file-name-safe label for a prompt set given by name or path."""
    import re

    name = Path(spec).name.split(".")[0] if ("/" in spec or "." in spec) else spec
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name) or "prompts"
