"""Issue 12: reliability for CI and careless input. One section per numbered item.

Everything runs the tiny random model on CPU (fast tests).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import socket
import stat
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_helpers import assert_one_line_error, invoke, stderr_of

import mgaudit.decoding.step as step_mod
import mgaudit.decoding.stock as engine
from mgaudit.errors import OutputError
from mgaudit.scan import ScanConfig, scan

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _scan_args(prompts: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["scan", str(prompts), "--out", str(out), "--model", str(model), "--device", "cpu",
            "--max-new-tokens", "2", "--limit", "4", "--batch-sizes", "2", *extra]


def _verify_args(prompts: Path, model: Path, *extra: str) -> list[str]:
    return ["verify", str(prompts), "--model", str(model), "--device", "cpu", "--max-new-tokens", "4",
            "--batch-size", "3", "--limit", "4", *extra]


def _cfg(prompts: Path, out: Path, model: Path, **kw) -> ScanConfig:
    base = dict(prompts=str(prompts), out=out, model=str(model), device="cpu", batch_sizes=[2],
                max_new_tokens=3, limit=4)
    base.update(kw)
    return ScanConfig(**base)


def _no_model(monkeypatch) -> None:
    """Loading a model fails the test: checks must come first."""
    import mgaudit.models as models

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(models, "load_model", boom)


# --------------------------------------------------------------------------- 1. --overwrite


def test_01_overwrite_never_deletes_foreign_parquet(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    out = tmp_path / "t"
    scan(_cfg(prompts_file, out, tiny_model_dir), loaded=tiny_lm)
    ours = sorted(p.name for p in out.glob("trace-*.parquet"))
    # a prompts file kept in the same folder, and a file named like ours that mgaudit did not write
    foreign = out / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), foreign)
    impostor = out / "trace-mine.parquet"
    pq.write_table(pa.table({"x": [1]}), impostor)
    note = out / "notes.txt"
    note.write_text("keep me")
    res = invoke(_scan_args(prompts_file, out, tiny_model_dir, "--overwrite"))
    line = assert_one_line_error(res, "prompts.parquet", "trace-mine.parquet", "did not write")
    assert "2 Parquet file(s)" in line
    assert foreign.exists() and impostor.exists() and note.read_text() == "keep me"
    assert sorted(p.name for p in out.glob("trace-*.parquet")) == sorted(ours + ["trace-mine.parquet"])

    # once the foreign files are gone, --overwrite removes only mgaudit's files
    foreign.unlink()
    impostor.unlink()
    res = invoke(_scan_args(prompts_file, out, tiny_model_dir, "--overwrite"))
    assert res.exit_code == 0, stderr_of(res)
    assert note.read_text() == "keep me"


# --------------------------------------------------------------------------- 2. prompts past the context


def _long_prompts(tmp_path: Path, words: int = 600) -> Path:
    p = tmp_path / "long.jsonl"
    recs = [{"id": "short-a", "prompt": "how many apples"}, {"id": "huge", "prompt": " ".join(["the"] * words)},
            {"id": "short-b", "prompt": "find the total"}, {"id": "short-c", "prompt": "list three words"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


def test_02_prompt_longer_than_context_is_refused_or_skipped(tmp_path, tiny_model_dir) -> None:
    prompts = _long_prompts(tmp_path)  # the tiny model has 512 positions
    out = tmp_path / "t"
    line = assert_one_line_error(invoke(_scan_args(prompts, out, tiny_model_dir)), "huge", "512", "--skip-long")
    assert re.search(r"prompt huge is \d{3} tokens", line)
    assert not out.exists()

    res = invoke(_scan_args(prompts, out, tiny_model_dir, "--skip-long", "--json"))
    assert res.exit_code == 0, stderr_of(res)
    assert "skipped 1 of 4 prompts" in stderr_of(res)
    df = pd.read_parquet(out)
    assert set(df["prompt_id"]) == {"short-a", "short-b", "short-c"}
    assert json.loads((out / "_scan.json").read_text())["provenance"]["prompts"]["skipped_too_long"] == ["huge"]

    # verify too, and the token budget counts: 500 words + 64 new tokens do not fit 512
    assert_one_line_error(invoke(_verify_args(prompts, tiny_model_dir, "--policy", "none")), "huge")
    res = invoke(_verify_args(prompts, tiny_model_dir, "--policy", "none", "--skip-long", "--json"))
    assert res.exit_code == 0 and json.loads(res.stdout)["summary"]["sequences"] == 3


def test_02_context_check_counts_new_tokens() -> None:
    from mgaudit.errors import ContextLengthError
    from mgaudit.prompts import fit_context

    assert fit_context(["a", "b"], [400, 500], 12, 512) == [0, 1]
    with pytest.raises(ContextLengthError) as ei:
        fit_context(["a", "b"], [400, 501], 12, 512)
    assert ei.value.prompt_id == "b" and ei.value.prompt_tokens == 501 and ei.value.context == 512
    assert fit_context(["a", "b"], [400, 501], 12, 512, skip=True) == [0]
    with pytest.raises(ContextLengthError):
        fit_context(["a"], [600], 1, 512, skip=True)  # nothing left
    assert fit_context(["a"], [10**6], 1, None) == [0]  # unknown context: no check


# --------------------------------------------------------------------------- 3. huge batch sizes


def test_03_batch_sizes_above_the_prompt_count_are_capped(tmp_path, prompts_file, tiny_model_dir) -> None:
    out = tmp_path / "t"
    args = _scan_args(prompts_file, out, tiny_model_dir, "--json")
    args[args.index("--batch-sizes") + 1] = "2,64"
    res = invoke(args)
    assert res.exit_code == 0, stderr_of(res)
    assert "64 exceed the 4 prompts: capped to 4" in stderr_of(res)
    summary = json.loads(res.stdout)
    assert [e["batch_size"] for e in summary["by_batch_size"]] == [2, 4]
    df = pd.read_parquet(out)
    assert sorted(set(df["batch_size"])) == [1, 2, 4]


def test_03_batch_that_cannot_fit_is_refused_before_decoding(tmp_path, prompts_file, tiny_model_dir,
                                                            monkeypatch) -> None:
    import mgaudit.resources as resources

    monkeypatch.setattr(resources, "available_bytes", lambda device: 1024)
    calls = {"n": 0}
    real = engine.padded_decode
    monkeypatch.setattr(engine, "padded_decode", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), real(*a, **k))[1])
    out = tmp_path / "t"
    line = assert_one_line_error(invoke(_scan_args(prompts_file, out, tiny_model_dir)), "batch size 2", "free")
    assert "MiB" in line or "GiB" in line or "KiB" in line
    assert calls["n"] == 0 and not out.exists()
    assert_one_line_error(invoke(_verify_args(prompts_file, tiny_model_dir, "--policy", "none")), "batch size 3")


def test_03_memory_estimate_grows_with_the_batch(tiny_lm) -> None:
    from mgaudit.resources import decode_bytes

    cfg = tiny_lm.model.config
    one = decode_bytes(cfg, 1, 100, 50, 2)
    eight = decode_bytes(cfg, 8, 100, 50, 2)
    assert one > 0 and eight == pytest.approx(8 * one, rel=0.01)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 150 * 2
    assert one > kv  # the K/V cache is only part of it
    assert decode_bytes(cfg, 1, 100, 50, 2, kept_logits_rows=10) - one == 10 * cfg.vocab_size * 2


# --------------------------------------------------------------------------- 4. output paths first


def test_04_every_output_path_is_checked_before_model_work(tmp_path, prompts_file, monkeypatch) -> None:
    _no_model(monkeypatch)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    line = assert_one_line_error(invoke(_verify_args(prompts_file, Path("unused"), "--policy", "none",
                                                     "--report", str(blocker / "r.json"))), "report", "afile")
    assert "--out" not in line
    line = assert_one_line_error(invoke(_verify_args(prompts_file, Path("unused"), "--policy", "none",
                                                     "--report", "/proc/mgaudit-report.json")), "report", "/proc")
    assert "not writable" in line
    assert_one_line_error(invoke(_scan_args(prompts_file, Path("/proc/mgaudit-traces"), Path("unused"))),
                          "/proc", "not writable")
    assert_one_line_error(invoke(["demo", "--out", str(blocker / "d"), "--model", "unused"]), "afile")


def test_04_calibrate_checks_out_and_plot_before_reading_traces(tmp_path, monkeypatch) -> None:
    import mgaudit.calibrate as cal

    monkeypatch.setattr(cal, "load_traces", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read first")))
    (tmp_path / "traces").mkdir()
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for flag in ("--out", "--plot"):
        res = invoke(["calibrate", str(tmp_path / "traces"), flag, str(blocker / "x")])
        assert_one_line_error(res, "afile")


# --------------------------------------------------------------------------- 5. temp files


def test_05_temp_files_match_no_parquet_glob_and_resume_removes_them(tmp_path, prompts_file, tiny_model_dir,
                                                                     tiny_lm, monkeypatch) -> None:
    import duckdb

    from mgaudit.formats import traces

    out = tmp_path / "t"
    real_replace = traces.os.replace
    calls = {"n": 0}

    def killed(src, dst):  # as if SIGKILL hit between writing the temp file and the rename
        if str(dst).endswith(".parquet"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise SystemExit("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(traces.os, "replace", killed)
    monkeypatch.setattr(traces.os, "unlink", lambda p: None)  # a killed process cleans nothing up
    with pytest.raises(SystemExit):
        scan(_cfg(prompts_file, out, tiny_model_dir), loaded=tiny_lm)
    monkeypatch.undo()
    left = [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert left, "the simulated kill should leave a temp file"
    assert not [n for n in left if fnmatch.fnmatch(n, "*.parquet") or fnmatch.fnmatch(n, "*.json")]
    n = duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0]
    assert n == pd.read_parquet(out).shape[0] > 0  # the README's query works on the half-done folder

    res = scan(_cfg(prompts_file, out, tiny_model_dir, resume=True), loaded=tiny_lm)
    assert res.files_written > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------- 6. no empty --out


@pytest.mark.parametrize("extra", [["--dtype", "bogus"], ["--model", "/nonexistent/model"], ["--device", "cuda"]],
                         ids=["dtype", "model", "cuda"])
def test_06_failed_run_creates_no_output_dir(tmp_path, prompts_file, tiny_model_dir, extra) -> None:
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    out = tmp_path / "new" / "traces"
    assert_one_line_error(invoke(_scan_args(prompts_file, out, tiny_model_dir) + extra))
    assert not (tmp_path / "new").exists()
    report = tmp_path / "rep" / "r.json"
    assert_one_line_error(invoke(_verify_args(prompts_file, tiny_model_dir, "--policy", "none",
                                              "--report", str(report)) + extra))
    assert not (tmp_path / "rep").exists()
    if extra[0] != "--dtype":
        assert_one_line_error(invoke(["demo", "--out", str(tmp_path / "demo"), "--calibrate-on", str(prompts_file),
                                      "--verify-on", str(prompts_file), "--model", str(tiny_model_dir)] + extra))
        assert not (tmp_path / "demo").exists()


# --------------------------------------------------------------------------- 7. internal errors exit 3


@pytest.mark.parametrize("target", ["scan", "verify", "calibrate"])
def test_07_a_crash_exits_3_never_1(tmp_path, prompts_file, tiny_model_dir, monkeypatch, target) -> None:
    import importlib

    module = importlib.import_module(f"mgaudit.{target}")

    def crash(*a, **k):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(module, target, crash)
    args = {"scan": _scan_args(prompts_file, tmp_path / "t", tiny_model_dir),
            "verify": _verify_args(prompts_file, tiny_model_dir, "--policy", "none"),
            "calibrate": ["calibrate", str(tmp_path)]}[target]
    res = invoke(args)
    err = stderr_of(res)
    assert res.exit_code == 3, (res.exit_code, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: internal error: RuntimeError: something broke"), err
    assert "Traceback" not in err and "--debug" in lines[0]
    # --debug shows the real exception
    res = invoke(["--debug", *args])
    assert isinstance(res.exception, RuntimeError)


def test_07_the_console_script_never_exits_1_on_a_crash(monkeypatch, capsys) -> None:
    import mgaudit.cli as cli

    def crash(*a, **k):
        raise ValueError("outside any command")

    from mgaudit.commands.boundary import set_debug

    monkeypatch.setattr(cli, "app", crash)
    monkeypatch.delenv("MGAUDIT_DEBUG", raising=False)
    set_debug(False)  # an earlier in-process `--debug` run leaves it on
    with pytest.raises(SystemExit) as ei:
        cli.run()
    assert ei.value.code == 3
    assert capsys.readouterr().err.startswith("error: internal error: ValueError: outside any command")


def test_07_exit_codes_are_documented() -> None:
    res = invoke(["--help"])
    text = " ".join(res.stdout.split())
    for code in ("0 success", "1 verify", "2 bad input", "3 internal error", "130/143"):
        assert code in text, code
    assert "3 internal error" in " ".join(invoke(["verify", "--help"]).stdout.split())
    ci = (REPO / "docs" / "ci.md").read_text()
    assert "**3**" in ci and "internal error" in ci


# --------------------------------------------------------------------------- 8. progress without a terminal


def test_08_plain_progress_lines_when_stderr_is_not_a_tty(tmp_path, prompts_file, tiny_model_dir) -> None:
    res = invoke(_scan_args(prompts_file, tmp_path / "t", tiny_model_dir))
    assert res.exit_code == 0
    err = stderr_of(res)
    assert re.search(r"^progress: solo reference 0/4 prompts, 0:0\d elapsed$", err, re.M), err
    assert re.search(r"^progress: solo reference 4/4 prompts, \d+:\d\d elapsed, done$", err, re.M), err
    assert re.search(r"^progress: batched replays \(B=2\) 2/2 batches, .* done$", err, re.M), err
    assert "\x1b[" not in err  # no terminal codes in a CI log
    quiet = invoke(_scan_args(prompts_file, tmp_path / "q", tiny_model_dir, "--quiet"))
    assert quiet.exit_code == 0 and "progress:" not in stderr_of(quiet) and stderr_of(quiet).strip() == ""
    res = invoke(_verify_args(prompts_file, tiny_model_dir, "--policy", "none"))
    assert "progress: policy none (B=3) 4/4 prompts" in stderr_of(res)


def test_08_plain_progress_throttles_and_gives_an_eta(capsys) -> None:
    from mgaudit.commands.console import ProgressReporter
    from mgaudit.progress import Stage

    now = {"t": 0.0}
    rep = ProgressReporter(tty=False, interval=10.0, clock=lambda: now["t"])
    with rep:
        stage = Stage(rep, "batched", "batched replays", 4, unit="batches")
        for t in (5.0, 20.0, 25.0, 40.0):
            now["t"] = t
            stage.advance()
        now["t"] = 100.0  # the same stage again (verify's solo reference after scan's): its own clock
        again = Stage(rep, "batched", "batched replays", 2, unit="batches")
        now["t"] = 130.0
        again.advance()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "progress: batched replays 0/4 batches, 0:00 elapsed",
        "progress: batched replays 2/4 batches, 0:20 elapsed, ETA 0:20",  # 5 s was too soon after the start
        "progress: batched replays 4/4 batches, 0:40 elapsed, done",  # the last one always prints
        "progress: batched replays 0/2 batches, 0:00 elapsed",
        "progress: batched replays 1/2 batches, 0:30 elapsed, ETA 0:30",
    ]


# --------------------------------------------------------------------------- 9. SIGTERM


@pytest.fixture
def sigterm_guard():
    """If mgaudit did not take SIGTERM over, the signal would kill pytest: fail instead."""
    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM was not handled by mgaudit")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    assert signal.getsignal(signal.SIGTERM) is unhandled  # restored after the command
    signal.signal(signal.SIGTERM, previous)


def test_09_sigterm_during_scan_exits_143_and_resume_finishes(tmp_path, prompts_file, tiny_model_dir, monkeypatch,
                                                              sigterm_guard) -> None:
    real = engine.padded_decode
    calls = {"n": 0}

    def terminating(*args, **kwargs):
        if kwargs.get("forced") is not None:
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    out = tmp_path / "t"
    monkeypatch.setattr(engine, "padded_decode", terminating)
    res = invoke(_scan_args(prompts_file, out, tiny_model_dir, "--json"))
    monkeypatch.setattr(engine, "padded_decode", real)
    err = stderr_of(res)
    assert res.exit_code == 143, (res.exit_code, err, res.exception)
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    assert json.loads(res.stdout)["exit_code"] == 143
    assert len(list(out.glob("trace-b*.parquet"))) == 1 and not list(out.glob(".tmp-*"))
    assert invoke(_scan_args(prompts_file, out, tiny_model_dir, "--resume")).exit_code == 0
    assert len(list(out.glob("trace-b*.parquet"))) == 2


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["term", "int"])
def test_09_verify_interrupt_does_not_suggest_resume(prompts_file, tiny_model_dir, monkeypatch, sigterm_guard,
                                                     sig, code) -> None:
    real = engine.solo_decode

    def interrupted(*args, **kwargs):
        if sig == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "solo_decode", interrupted)
    res = invoke(_verify_args(prompts_file, tiny_model_dir, "--policy", "none"))
    err = stderr_of(res)
    assert res.exit_code == code, (res.exit_code, err, res.exception)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("progress:")]
    assert "--resume" not in err and len(lines) == 1, err
    assert lines[0] == ("terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted") + ": nothing more was written"


# --------------------------------------------------------------------------- 10. --json on error


def test_10_json_errors_are_json_objects(tmp_path, prompts_file, tiny_model_dir, monkeypatch) -> None:
    res = invoke(_verify_args(tmp_path / "missing.jsonl", tiny_model_dir, "--policy", "none", "--json"))
    obj = json.loads(res.stdout)
    assert res.exit_code == 2 and obj["exit_code"] == 2 and "missing.jsonl" in obj["error"]
    res = invoke(_scan_args(prompts_file, tmp_path / "t", tiny_model_dir, "--json", "--max-new-tokens", "x"))
    obj = json.loads(res.stdout)
    assert res.exit_code == 2 and obj["exit_code"] == 2 and "--max-new-tokens" in obj["error"]
    assert len([ln for ln in stderr_of(res).splitlines() if ln.strip()]) == 1  # usage errors: one line too
    res = invoke(["calibrate", str(tmp_path / "nothing"), "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["exit_code"] == 2
    import mgaudit.verify as v

    monkeypatch.setattr(v, "verify", lambda *a, **k: 1 / 0)
    res = invoke(_verify_args(prompts_file, tiny_model_dir, "--policy", "none", "--json"))
    assert res.exit_code == 3 and json.loads(res.stdout) == {"error": stderr_of(res).strip(), "exit_code": 3}


# --------------------------------------------------------------------------- 11. offline Hub


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def dead_hub(monkeypatch):
    import mgaudit.hub as hub

    monkeypatch.setattr(hub, "_cache", {})
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    return hub


@pytest.mark.parametrize("offline", [False, True], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_11_hub_lookups_fail_in_seconds_with_one_line(tmp_path, prompts_file, tiny_model_dir, dead_hub, monkeypatch,
                                                      offline) -> None:
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    res = invoke(_scan_args("hf:mgaudit-test/no-such-set", tmp_path / "t", tiny_model_dir))
    line = assert_one_line_error(res, "mgaudit-test/no-such-set", "local")
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached") in line
    res = invoke(_verify_args(prompts_file, Path("mgaudit-test/no-such-model"), "--policy", "none"))
    assert_one_line_error(res, "mgaudit-test/no-such-model", "local")
    assert time.monotonic() - t0 < 15, "offline lookups must not wait for retries"


# --------------------------------------------------------------------------- 12. resume with other batch sizes


def test_12_resume_with_new_batch_sizes_records_the_union(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    out = tmp_path / "t"
    scan(_cfg(prompts_file, out, tiny_model_dir, batch_sizes=[2]), loaded=tiny_lm)
    logs: list[str] = []
    res = scan(_cfg(prompts_file, out, tiny_model_dir, batch_sizes=[3], resume=True), loaded=tiny_lm,
               log=logs.append)
    manifest = json.loads((out / "_scan.json").read_text())
    assert manifest["batch_sizes"] == [2, 3]
    assert [e["batch_size"] for e in res.summary["by_batch_size"]] == [2, 3]
    assert sorted(set(pd.read_parquet(out)["batch_size"])) == [1, 2, 3]
    assert any("now covers 2, 3" in m for m in logs)
    with pytest.raises(OutputError) as ei:
        scan(_cfg(prompts_file, out, tiny_model_dir, max_new_tokens=5, resume=True), loaded=tiny_lm)
    assert "max_new_tokens was 3, now 5" in ei.value.message
    # --resume on a folder that does not exist yet simply starts the scan
    fresh = tmp_path / "fresh"
    assert scan(_cfg(prompts_file, fresh, tiny_model_dir, resume=True), loaded=tiny_lm).files_skipped == 0


# --------------------------------------------------------------------------- 13. calibrate: duplicates, intervals


def test_13_duplicate_trace_inputs_are_refused(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    out = tmp_path / "t"
    scan(_cfg(prompts_file, out, tiny_model_dir), loaded=tiny_lm)
    assert_one_line_error(invoke(["calibrate", str(out), str(out), "--method", "bound"]), "twice")
    assert_one_line_error(invoke(["calibrate", str(out), f"{tmp_path}/./t/", "--method", "bound"]), "twice")
    one = sorted(out.glob("trace-b*.parquet"))[0]
    assert_one_line_error(invoke(["calibrate", str(out), str(one), "--method", "bound"]), "twice")


def test_13_wilson_intervals_and_rule_of_three() -> None:
    from mgaudit.calibrate import interval95

    lo, hi = interval95(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # Wilson score, z = 1.96
    lo, hi = interval95(3, 640)
    assert lo < 3 / 640 < hi and round(hi, 4) == 0.0137
    assert interval95(0, 300) == [0.0, 0.01]  # rule of three
    assert interval95(30, 30) == [0.9, 1.0]
    assert interval95(0, 0) is None


def test_13_few_flips_warn_in_output_and_gate(tmp_path) -> None:
    from test_calibrate import FLIPS_FIT, make_rows, write_traces

    fit = write_traces(tmp_path / "math", make_rows(FLIPS_FIT, seed=1))  # 5 flips
    gate_path = tmp_path / "gate.json"
    res = invoke(["calibrate", str(fit), "--out", str(gate_path)])
    assert res.exit_code == 0
    out = " ".join(res.stdout.split())
    assert "warning: only 5 flips: recall 100% has a 95% interval of [40%, 100%]" in out
    assert "95% interval [40.0, 100.0]" in out and "flip rate" in out
    gate = json.loads(gate_path.read_text())
    assert gate["warnings"] and "only 5 flips" in gate["warnings"][0]
    assert gate["calibration"]["recall_ci95"] == [0.4, 1.0]
    lo, hi = gate["calibration"]["flip_rate_ci95"]
    assert lo < gate["calibration"]["flip_rate"] < hi
    many = {4: [0.01 * i for i in range(1, 17)], 8: [0.01 * i for i in range(17, 33)]}  # 32 flips
    rows = make_rows(many, seed=3, prompts=48)
    res = invoke(["calibrate", str(write_traces(tmp_path / "many", rows)), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["warnings"] == []


# --------------------------------------------------------------------------- 14. gate stack mismatch


def test_14_gate_from_another_stack_warns_or_is_refused(tmp_path, prompts_file, tiny_model_dir) -> None:
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"format": "mgaudit.gate", "version": 1, "threshold": 0.5, "metric": "batched_margin",
                                "provenance": {"model": {"name": "tiny-llama", "dtype": "float32", "device": "cuda:0",
                                                         "attn_implementation": "eager"}}}))
    report = tmp_path / "r.json"
    res = invoke(_verify_args(prompts_file, tiny_model_dir, "--gate", str(gate), "--report", str(report)))
    assert res.exit_code == 0, stderr_of(res)
    warn = [ln for ln in stderr_of(res).splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1
    for needle in ("dtype float32 (gate) vs bfloat16", "device kind cuda (gate) vs cpu", "attention eager (gate) vs sdpa"):
        assert needle in warn[0]
    mism = json.loads(report.read_text())["policy"]["gate"]["mismatches"]
    assert mism == {"dtype": ["float32", "bfloat16"], "device kind": ["cuda", "cpu"], "attention": ["eager", "sdpa"]}
    assert_one_line_error(invoke(_verify_args(prompts_file, tiny_model_dir, "--gate", str(gate), "--strict")),
                          "dtype float32", "another stack")
    # a matching gate passes --strict
    g = json.loads(gate.read_text())
    g["provenance"]["model"] = {"dtype": "bfloat16", "device": "cpu", "attn_implementation": "sdpa"}
    gate.write_text(json.dumps(g))
    res = invoke(_verify_args(prompts_file, tiny_model_dir, "--gate", str(gate), "--strict"))
    assert res.exit_code == 0 and "warning" not in stderr_of(res)


# --------------------------------------------------------------------------- 15. free-mode flips


def _force_batched_flip(monkeypatch, at_call: int = 2) -> None:
    """At every ``at_call``-th batched decode step of a padded batch, row 0's runner-up wins."""
    real = step_mod.forward_last
    state = {"n": 0}

    def wrapper(model, input_ids, attention_mask, position_ids, cache):
        logits = real(model, input_ids, attention_mask, position_ids, cache)
        if input_ids.shape[0] > 1 and input_ids.shape[1] == 1:
            state["n"] += 1
            if state["n"] % 6 == at_call:
                logits = logits.float()
                top = torch.topk(logits[0], 2)
                logits[0, top.indices[1]] = top.values[0] + 0.5
        return logits

    monkeypatch.setattr(step_mod, "forward_last", wrapper)


def test_15_first_divergence_marks_one_step_per_parted_sequence(tmp_path, prompts_file, tiny_model_dir, tiny_lm,
                                                                monkeypatch) -> None:
    import duckdb

    out = tmp_path / "t"
    _force_batched_flip(monkeypatch)
    res = scan(_cfg(prompts_file, out, tiny_model_dir, max_new_tokens=8, limit=6), loaded=tiny_lm)
    df = pd.read_parquet(out)
    sync, free = df[df["mode"] == "sync"], df[df["mode"] == "free"]
    assert (sync["first_divergence"] == sync["flip"]).all()
    assert not df[df["mode"] == "solo"]["first_divergence"].any()
    parted = 0
    for _, g in free.groupby(["prompt_id", "batch_size"]):
        g = g.sort_values("step")
        firsts = g[g["first_divergence"]]
        if g["flip"].any():
            parted += 1
            assert len(firsts) == 1 and firsts["step"].iloc[0] == g[g["flip"]]["step"].min()
        else:
            assert firsts.empty
    assert parted >= 1 and free["flip"].sum() > free["first_divergence"].sum()  # flip overcounts, this does not
    # the README's DuckDB queries give the summary's figures
    block = README[README.index("per-step flip rate"):]
    queries = re.findall(r"```sql\n(.*?)```", block, re.S)[:2]
    assert len(queries) == 2
    rate = dict(duckdb.sql(queries[0].replace("DIR", str(out))).fetchall())
    diverged = dict(duckdb.sql(queries[1].replace("DIR", str(out))).fetchall())
    for e in res.summary["by_batch_size"]:
        assert rate[e["batch_size"]] == pytest.approx(e["sync"]["flip_rate"])
        assert diverged[e["batch_size"]] == e["free"]["sequences_diverged"]


def test_15_version_1_traces_still_read(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    from mgaudit.formats.traces import read_traces

    out = tmp_path / "t"
    scan(_cfg(prompts_file, out, tiny_model_dir), loaded=tiny_lm)
    f = sorted(out.glob("trace-b*.parquet"))[0]
    t = pq.read_table(f)
    pq.write_table(t.drop(["first_divergence"]), f)
    table, _ = read_traces(out)
    fd = table["first_divergence"].to_pylist()
    flip, pm = table["flip"].to_pylist(), table["prefix_match"].to_pylist()
    assert fd == [a and b for a, b in zip(flip, pm)]


# --------------------------------------------------------------------------- 16. float32 text


def test_16_thresholds_print_as_shortest_float32_decimals(tmp_path) -> None:
    from mgaudit.formats.gate import float32_text, float32_up
    from test_calibrate import FLIPS_FIT, make_rows, write_traces

    assert float32_text(0.3125000298023224) == "0.31250003"
    assert float32_text(np.nextafter(np.float32(0.0625), np.float32(1))) == "0.06250001"
    assert float32_text(1.4e-45) == "1e-45"
    assert float32_text(0.5) == "0.5" and float32_text(0.0) == "0"
    rng = np.random.default_rng(0)
    for x in np.concatenate([rng.uniform(0, 4, 500), rng.exponential(1e-6, 100)]).astype(np.float32):
        text = float32_text(x)
        assert np.float32(float(text)) == x, (x, text)
        assert len(text.replace("-", "")) <= len(repr(float(x)))
    assert float32_up(0.1) >= 0.1 and np.float32(float32_up(0.1)) == float32_up(0.1)

    fit = write_traces(tmp_path / "math", make_rows(FLIPS_FIT, seed=1))
    gate = tmp_path / "gate.json"
    res = invoke(["calibrate", str(fit), "--out", str(gate)])
    raw = gate.read_text()
    literal = re.search(r'"threshold": ([0-9.e-]+)', raw).group(1)
    tau = json.loads(raw)["threshold"]
    assert literal == float32_text(tau) and len(literal) <= 10
    assert f"chosen tau = {literal}" in res.stdout
    assert not re.search(r"\d\.\d{12,}", res.stdout)  # no float64 noise anywhere in the tables
    from mgaudit.formats.gate import load_gate

    assert load_gate(gate)["threshold"] == float(np.float32(tau))


# --------------------------------------------------------------------------- 17. gate.json paths


def test_17_gate_stores_trace_paths_relative_to_itself(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    from mgaudit.calibrate import CalibrateConfig, calibrate

    traces = tmp_path / "work" / "traces"
    scan(_cfg(prompts_file, traces, tiny_model_dir), loaded=tiny_lm)
    gate_path = tmp_path / "ci" / "gate.json"
    calibrate(CalibrateConfig(traces=[traces.resolve()], out=gate_path, method="bound",
                              eval_traces=[traces.resolve()]))
    gate = json.loads(gate_path.read_text())
    assert gate["traces"][0]["path"] == "../work/traces"
    assert (gate_path.parent / gate["traces"][0]["path"]).resolve() == traces.resolve()
    assert len(gate["traces"][0]["sha256"]) == 64 and gate["traces"][0]["files"] == len(list(traces.glob("*.parquet")))
    assert gate["transfer"][0]["traces"] == "../work/traces"
    assert not Path(gate["provenance"]["config"]["out"]).is_absolute()
    assert str(tmp_path) not in json.dumps({k: gate[k] for k in ("traces", "transfer")})


# --------------------------------------------------------------------------- 18. permissions


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_18_outputs_respect_the_umask(tmp_path, prompts_file, tiny_model_dir, tiny_lm, umask, mode) -> None:
    from mgaudit.calibrate import CalibrateConfig, calibrate
    from mgaudit.verify import VerifyConfig, verify

    old = os.umask(umask)
    try:
        out = tmp_path / "t"
        scan(_cfg(prompts_file, out, tiny_model_dir), loaded=tiny_lm)
        calibrate(CalibrateConfig(traces=[out], out=tmp_path / "gate.json", plot=tmp_path / "c.png", method="bound"))
        verify(VerifyConfig(prompts=str(prompts_file), policy="none", batch_size=2, max_new_tokens=2, limit=2,
                            report=tmp_path / "r.json"), loaded=tiny_lm)
    finally:
        os.umask(old)
    files = list(out.iterdir()) + [tmp_path / "gate.json", tmp_path / "c.png", tmp_path / "r.json"]
    assert len(files) > 5
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == mode, (f.name, oct(f.stat().st_mode))


# --------------------------------------------------------------------------- 19. verify report fields


def test_19_report_names_the_policy_run_and_keeps_token_lists(tmp_path, prompts_file, tiny_model_dir,
                                                              monkeypatch) -> None:
    from perturb import flip_logits_at

    flip_logits_at(monkeypatch, call=2)
    report = tmp_path / "r.json"
    res = invoke(_verify_args(prompts_file, tiny_model_dir, "--policy", "none", "--report", str(report)))
    assert res.exit_code == 1
    data = json.loads(report.read_text())
    text = json.dumps(data)
    assert "gated_" not in text and "threshold_text" not in text
    bad = [r for r in data["sequences"] if not r["identical"]]
    assert bad
    for r in data["sequences"]:
        assert isinstance(r["solo_tokens"], list) and isinstance(r["policy_tokens"], list)
        assert len(r["policy_tokens"]) == r["steps"] and len(r["solo_tokens"]) == r["solo_steps"]
        assert (r["solo_tokens"] == r["policy_tokens"]) == r["identical"]
    r = bad[0]
    k = r["first_divergence"]
    assert r["policy_token"] == r["policy_tokens"][k] != r["solo_tokens"][k] == r["solo_token"]
    assert {"policy_text", "policy_margin", "policy_context"} <= set(r)


# --------------------------------------------------------------------------- 20. help and conventions


COMMANDS = [[], ["scan"], ["calibrate"], ["verify"], ["demo"], ["model"], ["model", "fetch"], ["model", "info"],
            ["diagnose"], ["diagnose", "ops"], ["diagnose", "prompt"], ["diagnose", "kv"], ["server"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: "-".join(c) or "root")
def test_20_help_uses_metavars(cmd) -> None:
    res = invoke([*cmd, "-h"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert not re.search(r"<(str|int|float|bool|path|list\[[^]]*\])>", text), text
    assert not re.search(r"\{[a-z_]+\}", text), text


def test_20_expected_metavars_completion_and_version() -> None:
    scan_help = invoke(["scan", "-h"]).stdout
    assert "Usage: mgaudit scan [OPTIONS] PROMPTS" in scan_help
    for m in ("DIR", "LIST", " N "):
        assert m in scan_help, m
    assert "--install-completion" in invoke(["--help"]).stdout
    res = invoke(["--version"])
    assert res.exit_code == 0
    v = res.stdout
    assert re.search(r"^mgaudit \d", v, re.M) and f"torch {torch.__version__}" in v
    assert re.search(r"^transformers \d", v, re.M) and re.search(r"^device (cpu|cuda)", v, re.M)
    assert re.search(r"^cpu .+, \d+ cores", v, re.M)


def test_20_every_environment_variable_is_documented() -> None:
    import mgaudit.hub as hub

    read = set()
    for f in (REPO / "mgaudit").rglob("*.py"):
        read |= set(re.findall(r"""(?:environ(?:\.get)?[\[(]|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']""", f.read_text()))
    read |= set(hub.OFFLINE_VARS)
    assert {"MGAUDIT_CACHE", "MGAUDIT_DEBUG", "HF_ENDPOINT"} <= read
    help_text = " ".join(invoke(["--help"]).stdout.split())
    for var in sorted(read):
        assert var in help_text, var
        assert var in README, var


# --------------------------------------------------------------------------- 21. the demo


def test_21_demo_default_is_small_and_paper_is_a_flag(tmp_path, monkeypatch) -> None:
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


def test_21_demo_tells_the_story(tmp_path, prompts_file, tiny_model_dir) -> None:
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


# --------------------------------------------------------------------------- 22. typos, one line


def test_22_no_doubled_words_and_no_blank_line_before_error(tmp_path, tiny_model_dir) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "unterminated}\n')
    res = invoke(_scan_args(bad, tmp_path / "t", tiny_model_dir))
    err = stderr_of(res)
    assert res.exit_code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, repr(err)  # exactly one line, nothing before it
    assert "at at" not in err and "Unterminated string starting at column 23" in err
    gate = tmp_path / "g.json"
    gate.write_text('{"threshold": "x}')
    res = invoke(_verify_args(tmp_path / "bad.jsonl", tiny_model_dir, "--gate", str(gate)))
    assert "at at" not in stderr_of(res) and "starting at line 1, column 15" in stderr_of(res)
    for f in list((REPO / "mgaudit").rglob("*.py")) + [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        doubled = re.findall(r"\b(at|the|a|to|of|is|in|and) \1\b", f.read_text())
        assert not doubled, (f.name, doubled)
