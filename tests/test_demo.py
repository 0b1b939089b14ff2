"""`mgaudit demo`: scan, calibrate and verify end to end (tiny model)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mgaudit.cli import app


def test_demo_runs_scan_calibrate_verify(tmp_path, prompts_file, tiny_model_dir) -> None:
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, [
        "demo", "--out", str(out), "--model", str(tiny_model_dir), "--device", "cpu",
        "--calibrate-on", str(prompts_file), "--verify-on", str(prompts_file),
        "--limit", "6", "--max-new-tokens", "6",
    ])
    assert res.exit_code == 0, res.output
    assert list(out.glob("traces-*/trace-*.parquet"))
    gate = json.loads((out / "gate.json").read_text())
    assert gate["format"] == "mgaudit.gate" and gate["threshold"] >= 0
    reports = list(out.glob("verify-*.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["summary"]["all_identical"] is True
    assert report["policy"]["name"] == "gate"
    assert "PASS" in res.output
