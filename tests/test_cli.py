"""The command line's conventions: exit codes (3 for a crash, never 1), plain progress lines without
a terminal, SIGTERM and SIGINT, JSON errors, help by metavar, documented environment variables,
and one-line errors.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch
from cli_helpers import README, REPO, invoke, scan_args, stderr_of, verify_args

import mgaudit.decoding.stock as engine

# --------------------------------------------------------------------------- internal errors exit 3


@pytest.mark.parametrize("target", ["scan", "verify", "calibrate"])
def test_a_crash_exits_3_never_1(tmp_path, prompts_file, tiny_model_dir, monkeypatch, target) -> None:
    import importlib

    module = importlib.import_module(f"mgaudit.{target}")

    def crash(*a, **k):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(module, target, crash)
    args = {"scan": scan_args(prompts_file, tmp_path / "t", tiny_model_dir),
            "verify": verify_args(prompts_file, tiny_model_dir, "--policy", "none"),
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


def test_the_console_script_never_exits_1_on_a_crash(monkeypatch, capsys) -> None:
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


def test_exit_codes_are_documented() -> None:
    res = invoke(["--help"])
    text = " ".join(res.stdout.split())
    for code in ("0 success", "1 verify", "2 bad input", "3 internal error", "4 verify", "130/143"):
        assert code in text, code
    assert "3 internal error" in " ".join(invoke(["verify", "--help"]).stdout.split())
    ci = (REPO / "docs" / "ci.md").read_text()
    assert "| 3 | internal error" in ci and "| 4 | some difference is anomalous" in ci


# --------------------------------------------------------------------------- progress without a terminal


def test_plain_progress_lines_when_stderr_is_not_a_tty(tmp_path, prompts_file, tiny_model_dir) -> None:
    res = invoke(scan_args(prompts_file, tmp_path / "t", tiny_model_dir))
    assert res.exit_code == 0
    err = stderr_of(res)
    assert re.search(r"^progress: reference runs 0/4 prompts, 0:0\d elapsed$", err, re.M), err
    assert re.search(r"^progress: reference runs 4/4 prompts, \d+:\d\d elapsed, done$", err, re.M), err
    assert re.search(r"^progress: candidate runs \(in a padded batch of 2\) 2/2 groups, .* done$", err, re.M), err
    assert "\x1b[" not in err  # no terminal codes in a CI log
    quiet = invoke(scan_args(prompts_file, tmp_path / "q", tiny_model_dir, "--quiet"))
    assert quiet.exit_code == 0 and "progress:" not in stderr_of(quiet) and stderr_of(quiet).strip() == ""
    res = invoke(verify_args(prompts_file, tiny_model_dir, "--policy", "none"))
    assert "progress: candidate: policy none at batch size 3 4/4 prompts" in stderr_of(res)


def test_plain_progress_throttles_and_gives_an_eta(capsys) -> None:
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


# --------------------------------------------------------------------------- SIGTERM


@pytest.fixture
def sigterm_guard():
    """If mgaudit did not take SIGTERM over, the signal would kill pytest: fail instead."""
    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM was not handled by mgaudit")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    assert signal.getsignal(signal.SIGTERM) is unhandled  # restored after the command
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_scan_exits_143_and_resume_finishes(tmp_path, prompts_file, tiny_model_dir, monkeypatch,
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
    res = invoke(scan_args(prompts_file, out, tiny_model_dir, "--json"))
    monkeypatch.setattr(engine, "padded_decode", real)
    err = stderr_of(res)
    assert res.exit_code == 143, (res.exit_code, err, res.exception)
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    assert json.loads(res.stdout)["exit_code"] == 143
    assert len(list(out.glob("trace-b*.parquet"))) == 1 and not list(out.glob(".tmp-*"))
    assert invoke(scan_args(prompts_file, out, tiny_model_dir, "--resume")).exit_code == 0
    assert len(list(out.glob("trace-b*.parquet"))) == 2


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["term", "int"])
def test_verify_interrupt_does_not_suggest_resume(prompts_file, tiny_model_dir, monkeypatch, sigterm_guard,
                                                     sig, code) -> None:
    real = engine.solo_decode

    def interrupted(*args, **kwargs):
        if sig == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "solo_decode", interrupted)
    res = invoke(verify_args(prompts_file, tiny_model_dir, "--policy", "none", "--no-reference-cache"))
    err = stderr_of(res)
    assert res.exit_code == code, (res.exit_code, err, res.exception)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("progress:")]
    assert "--resume" not in err and len(lines) == 1, err
    assert lines[0] == ("terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted") + ": nothing more was written"


# --------------------------------------------------------------------------- --json on error


def test_json_errors_are_json_objects(tmp_path, prompts_file, tiny_model_dir, monkeypatch) -> None:
    res = invoke(verify_args(tmp_path / "missing.jsonl", tiny_model_dir, "--policy", "none", "--json"))
    obj = json.loads(res.stdout)
    assert res.exit_code == 2 and obj["exit_code"] == 2 and "missing.jsonl" in obj["error"]
    res = invoke(scan_args(prompts_file, tmp_path / "t", tiny_model_dir, "--json", "--max-new-tokens", "x"))
    obj = json.loads(res.stdout)
    assert res.exit_code == 2 and obj["exit_code"] == 2 and "--max-new-tokens" in obj["error"]
    assert len([ln for ln in stderr_of(res).splitlines() if ln.strip()]) == 1  # usage errors: one line too
    res = invoke(["calibrate", str(tmp_path / "nothing"), "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["exit_code"] == 2
    import mgaudit.verify as v

    monkeypatch.setattr(v, "verify", lambda *a, **k: 1 / 0)
    res = invoke(verify_args(prompts_file, tiny_model_dir, "--policy", "none", "--json"))
    assert res.exit_code == 3 and json.loads(res.stdout) == {"error": stderr_of(res).strip(), "exit_code": 3}


# --------------------------------------------------------------------------- help and conventions


COMMANDS = [[], ["scan"], ["calibrate"], ["verify"], ["demo"], ["model"], ["model", "fetch"], ["model", "info"],
            ["diagnose"], ["diagnose", "ops"], ["diagnose", "prompt"], ["diagnose", "kv"], ["server"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: "-".join(c) or "root")
def test_help_uses_metavars(cmd) -> None:
    res = invoke([*cmd, "-h"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert not re.search(r"<(str|int|float|bool|path|list\[[^]]*\])>", text), text
    assert not re.search(r"\{[a-z_]+\}", text), text


def test_expected_metavars_completion_and_version() -> None:
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


def test_every_environment_variable_is_documented() -> None:
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


# --------------------------------------------------------------------------- one line, no typos


def test_errors_are_one_line_without_doubled_words(tmp_path, tiny_model_dir) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "unterminated}\n')
    res = invoke(scan_args(bad, tmp_path / "t", tiny_model_dir))
    err = stderr_of(res)
    assert res.exit_code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, repr(err)  # exactly one line, nothing before it
    assert "at at" not in err and "Unterminated string starting at column 23" in err
    gate = tmp_path / "g.json"
    gate.write_text('{"threshold": "x}')
    res = invoke(verify_args(tmp_path / "bad.jsonl", tiny_model_dir, "--gate", str(gate)))
    assert "at at" not in stderr_of(res) and "starting at line 1, column 15" in stderr_of(res)
