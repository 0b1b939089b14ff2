"""Outputs: every path checked before any work, files written atomically (an interrupted run
leaves none half-written), no output folder from a failed run, permissions from the umask.

Everything runs the tiny random model on CPU.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_helpers import assert_one_line_error, invoke, no_model, scan_args, scan_config, verify_args

from mgaudit.scan import scan

# --------------------------------------------------------------------------- output paths first


def test_every_output_path_is_checked_before_model_work(tmp_path, prompts_file, monkeypatch) -> None:
    no_model(monkeypatch)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    line = assert_one_line_error(invoke(verify_args(prompts_file, Path("unused"), "--policy", "none",
                                                     "--report", str(blocker / "r.json"))), "report", "afile")
    assert "--out" not in line
    line = assert_one_line_error(invoke(verify_args(prompts_file, Path("unused"), "--policy", "none",
                                                     "--report", "/proc/mgaudit-report.json")), "report", "/proc")
    assert "not writable" in line
    assert_one_line_error(invoke(scan_args(prompts_file, Path("/proc/mgaudit-traces"), Path("unused"))),
                          "/proc", "not writable")
    assert_one_line_error(invoke(["demo", "--out", str(blocker / "d"), "--model", "unused"]), "afile")


def test_calibrate_checks_out_and_plot_before_reading_traces(tmp_path, monkeypatch) -> None:
    import mgaudit.calibrate as cal

    monkeypatch.setattr(cal, "load_traces", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read first")))
    (tmp_path / "traces").mkdir()
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for flag in ("--out", "--plot"):
        res = invoke(["calibrate", str(tmp_path / "traces"), flag, str(blocker / "x")])
        assert_one_line_error(res, "afile")


# --------------------------------------------------------------------------- temp files


def test_temp_files_match_no_parquet_glob_and_resume_removes_them(tmp_path, prompts_file, tiny_model_dir,
                                                                     tiny_lm, monkeypatch) -> None:
    import duckdb

    from mgaudit.formats import files

    out = tmp_path / "t"
    real_replace = files.os.replace
    calls = {"n": 0}

    def killed(src, dst):  # as if SIGKILL hit between writing the temp file and the rename
        if str(dst).endswith(".parquet"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise SystemExit("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", killed)
    monkeypatch.setattr(files.os, "unlink", lambda p: None)  # a killed process cleans nothing up
    with pytest.raises(SystemExit):
        scan(scan_config(prompts_file, out, tiny_model_dir), loaded=tiny_lm)
    monkeypatch.undo()
    left = [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert left, "the simulated kill should leave a temp file"
    assert not [n for n in left if fnmatch.fnmatch(n, "*.parquet") or fnmatch.fnmatch(n, "*.json")]
    n = duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0]
    assert n == pd.read_parquet(out).shape[0] > 0  # the README's query works on the half-done folder

    res = scan(scan_config(prompts_file, out, tiny_model_dir, resume=True), loaded=tiny_lm)
    assert res.files_written > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------- no empty --out


@pytest.mark.parametrize("extra", [["--dtype", "bogus"], ["--model", "/nonexistent/model"], ["--device", "cuda"]],
                         ids=["dtype", "model", "cuda"])
def test_failed_run_creates_no_output_dir(tmp_path, prompts_file, tiny_model_dir, extra) -> None:
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    out = tmp_path / "new" / "traces"
    assert_one_line_error(invoke(scan_args(prompts_file, out, tiny_model_dir) + extra))
    assert not (tmp_path / "new").exists()
    report = tmp_path / "rep" / "r.json"
    assert_one_line_error(invoke(verify_args(prompts_file, tiny_model_dir, "--policy", "none",
                                              "--report", str(report)) + extra))
    assert not (tmp_path / "rep").exists()
    if extra[0] != "--dtype":
        assert_one_line_error(invoke(["demo", "--out", str(tmp_path / "demo"), "--calibrate-on", str(prompts_file),
                                      "--verify-on", str(prompts_file), "--model", str(tiny_model_dir)] + extra))
        assert not (tmp_path / "demo").exists()


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_respect_the_umask(tmp_path, prompts_file, tiny_model_dir, tiny_lm, umask, mode) -> None:
    from mgaudit.calibrate import CalibrateConfig, calibrate
    from mgaudit.verify import VerifyConfig, verify

    old = os.umask(umask)
    try:
        out = tmp_path / "t"
        scan(scan_config(prompts_file, out, tiny_model_dir), loaded=tiny_lm)
        calibrate(CalibrateConfig(traces=[out], out=tmp_path / "gate.json", plot=tmp_path / "c.png", method="bound"))
        verify(VerifyConfig(prompts=str(prompts_file), policy="none", batch_size=2, max_new_tokens=2, limit=2,
                            report=tmp_path / "r.json"), loaded=tiny_lm)
    finally:
        os.umask(old)
    files = list(out.iterdir()) + [tmp_path / "gate.json", tmp_path / "c.png", tmp_path / "r.json"]
    assert len(files) > 5
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == mode, (f.name, oct(f.stat().st_mode))
