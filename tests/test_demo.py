"""`mgaudit demo`: scan, calibrate and verify end to end (tiny model)."""

from __future__ import annotations

import json
import re

from cli_helpers import README, invoke, stderr_of

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
    assert report["candidate"]["policy"]["name"] == "gate"
    assert "PASS" in res.output


# --------------------------------------------------------------------------- the demo


def test_demo_default_is_small_and_paper_is_a_flag(tmp_path, monkeypatch) -> None:
    import mgaudit.demo as demo

    small, paper = demo.DemoConfig(), demo.DemoConfig.paper()
    work = lambda c: c.limit * c.max_new_tokens * (1 + len(c.batch_sizes))  # noqa: E731
    assert work(paper) >= 4 * work(small)
    assert (paper.limit, paper.max_new_tokens, paper.batch_sizes, paper.verify_batch_size) == (16, 64, [4, 8, 16], 16)
    seen = {}

    def fake_run(config, progress=None, log=None):
        seen["config"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", fake_run)
    invoke(["demo", "--out", str(tmp_path / "d"), "--paper"])
    assert seen["config"].limit == 16 and seen["config"].max_new_tokens == 64
    res = invoke(["demo", "--out", str(tmp_path / "d"), "--max-new-tokens", "5"])
    assert seen["config"].limit == small.limit and seen["config"].max_new_tokens == 5
    assert res.exit_code == 130 and "rerun the same command" in stderr_of(res)
    assert "mgaudit demo --paper" in README
    assert re.search(r"mgaudit demo\b.*?\d+(\.\d+)? min", README, re.S)


def test_demo_tells_the_story(tmp_path, prompts_file, tiny_model_dir) -> None:
    res = invoke(["demo", "--out", str(tmp_path / "d"), "--model", str(tiny_model_dir), "--device", "cpu",
                  "--calibrate-on", str(prompts_file), "--verify-on", str(prompts_file), "--limit", "4",
                  "--max-new-tokens", "4"])
    assert res.exit_code == 0, stderr_of(res)
    out = " ".join(res.stdout.split())
    assert re.search(r"verdict: PASS\. Plain batched decoding flipped \d+ of \d+ teacher-forced steps and changed "
                     r"\d+ of \d+ free-running sequences; with the gate \(tau = [0-9.e-]+, method \w+\) 4 of 4 "
                     r"sequences of .* were identical to solo\.", out), out
    for stage in ("1/3 scan", "2/3 calibrate", "3/3 verify"):
        assert stage in stderr_of(res)
