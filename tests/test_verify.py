"""``mgaudit verify``: CLI and library on the tiny random model (CPU).

Exit 0 iff every sequence is identical to solo, 1 when one differs (forced here
by flipping a logit in the batched fast path), 2 with one line on stderr for
bad input.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error as _assert_one_line_error
from cli_helpers import invoke as _invoke
from cli_helpers import stderr_of as _stderr
from cli_helpers import assert_one_line_error, invoke, stderr_of, verify_args

from perturb import flip_logits_at
from mgaudit.errors import GateError, UsageError
from mgaudit.formats.report import REPORT_FORMAT, REPORT_VERSION
from mgaudit.verify import VerifyConfig, verify

LIMIT = 6
MAX_NEW = 8
TOP_KEYS = {"format", "version", "candidate", "reference", "summary", "sequences", "differences", "provenance"}
SUMMARY_KEYS = {"sequences", "identical", "all_identical", "trigger_rate", "repairs", "reference_seconds",
                "candidate_seconds", "severity", "teacher_forced"}
RECORD_KEYS = {"prompt_id", "identical", "first_divergence", "triggers", "repairs", "reference_tokens",
               "candidate_tokens"}
DIVERGENCE_KEYS = {"reference_token", "candidate_token", "reference_margin", "candidate_margin", "verified"}
IDS = [f"tiny-{i:02d}" for i in range(LIMIT)]


def _ok(result, code: int = 0) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, _stderr(result), result.exception)
    assert "Traceback" not in _stderr(result)


def _base(prompts: Path, model: Path) -> list[str]:
    return ["verify", str(prompts), "--model", str(model), "--device", "cpu", "--max-new-tokens", str(MAX_NEW),
            "--batch-size", "4", "--limit", str(LIMIT)]


def _write_gate(path: Path, threshold=0.5, **extra) -> Path:
    gate = {"format": "mgaudit.gate", "version": 1, "threshold": threshold, "metric": "batched_margin",
            "method": "recall", **extra}
    path.write_text(json.dumps(gate))
    return path


def _check_schema(report: dict, batch_size: int = 4) -> None:
    assert TOP_KEYS <= set(report)
    assert report["format"] == REPORT_FORMAT and report["version"] == REPORT_VERSION
    s = report["summary"]
    assert SUMMARY_KEYS <= set(s)
    assert s["sequences"] == LIMIT == len(report["sequences"])
    assert 0 <= s["identical"] <= s["sequences"]
    assert s["all_identical"] == (s["identical"] == s["sequences"])
    assert 0.0 <= s["trigger_rate"] <= 1.0
    assert s["candidate_seconds"] > 0
    if report["reference"]["decoded"]:  # else every reference run came from the cache
        assert s["reference_seconds"] > 0
        assert s["speedup_vs_reference"] == pytest.approx(s["reference_seconds"] / s["candidate_seconds"])
    else:
        assert s["reference_seconds"] is None and report["reference"]["cache"]["hits"] == LIMIT
    assert [r["prompt_id"] for r in report["sequences"]] == IDS
    for r in report["sequences"]:
        assert RECORD_KEYS <= set(r)
        assert 0 <= r["repairs"] <= r["triggers"] <= max(r["steps"] - 1, 0)
        if r["identical"]:
            assert r["first_divergence"] is None and r["reference_tokens"] == r["candidate_tokens"]
        else:
            assert DIVERGENCE_KEYS <= set(r["divergence"]) and isinstance(r["first_divergence"], int)
    assert s["repairs"] == sum(r["repairs"] for r in report["sequences"])
    assert s["identical"] == sum(r["identical"] for r in report["sequences"])
    prov = report["provenance"]
    assert prov["prompts"]["count"] == LIMIT and prov["config"]["batch_size"] == batch_size
    assert prov["config"]["max_new_tokens"] == MAX_NEW


# --------------------------------------------------------------------------- exit 0


@pytest.mark.parametrize(
    "extra",
    [["--policy", "always"], ["--policy", "invariant"], ["--policy", "gate", "--threshold", "0.5"], "gate-file"],
    ids=["always", "invariant", "gate-threshold", "gate-file"],
)
def test_cli_policies_exit_0(tmp_path, prompts_file, tiny_model_dir, extra) -> None:
    if extra == "gate-file":
        extra = ["--policy", "gate", "--gate", str(_write_gate(tmp_path / "gate.json", 0.5))]
    result = _invoke(_base(prompts_file, tiny_model_dir) + extra)
    _ok(result, 0)
    assert "PASS" in result.stdout and f"all {LIMIT} sequences identical" in result.stdout
    assert "FAIL" not in result.stdout


def test_cli_json_schema(tmp_path, prompts_file, tiny_model_dir) -> None:
    gate = _write_gate(tmp_path / "gate.json", 0.5)
    result = _invoke(_base(prompts_file, tiny_model_dir) + ["--policy", "gate", "--gate", str(gate), "--json"])
    _ok(result, 0)
    report = json.loads(result.stdout)  # stdout is the JSON and nothing else
    _check_schema(report)
    s = report["summary"]
    assert s["all_identical"] is True and s["identical"] == LIMIT
    assert s["trigger_rate"] > 0  # tau = 0.5 triggers on the tiny model
    cand = report["candidate"]
    assert cand["policy"]["name"] == "gate" and cand["threshold"] == 0.5 and cand["batch_size"] == 4
    assert cand["policy"]["fast_path"] == "ragged"
    assert s["severity"]["tau_source"]["path"] == str(gate) and s["severity"]["tau"] == 0.5
    assert report["provenance"]["model"]["name"] == tiny_model_dir.name


def test_cli_report_file_has_the_json_schema(tmp_path, prompts_file, tiny_model_dir) -> None:
    out = tmp_path / "sub" / "report.json"
    result = _invoke(_base(prompts_file, tiny_model_dir) + ["--policy", "always", "--report", str(out)])
    _ok(result, 0)
    assert "report written to" in _stderr(result)
    report = json.loads(out.read_text())
    _check_schema(report)
    assert report["candidate"]["policy"]["name"] == "always" and report["candidate"]["policy"]["fast_path"] is None
    # always: every step after the first is verified
    for r in report["sequences"]:
        assert r["triggers"] == r["steps"] - 1
    # and --json prints the same document the report holds (timings aside)
    out2 = tmp_path / "r2.json"
    result = _invoke(_base(prompts_file, tiny_model_dir) + ["--policy", "always", "--report", str(out2), "--json"])
    _ok(result, 0)
    printed, written = json.loads(result.stdout), json.loads(out2.read_text())
    assert set(printed) == set(written)
    assert printed["sequences"] == written["sequences"] and printed["candidate"] == written["candidate"]
    timings = ("reference_seconds", "candidate_seconds", "candidate_tokens_per_second", "reference_tokens_per_second",
               "speedup_vs_reference")
    assert {k: v for k, v in printed["summary"].items() if k not in timings} == \
        {k: v for k, v in written["summary"].items() if k not in timings}


def test_library_verify(tmp_path, prompts_file, tiny_lm) -> None:
    config = VerifyConfig(prompts=str(prompts_file), model="unused", device="cpu", policy="invariant",
                          batch_size=3, max_new_tokens=MAX_NEW, limit=LIMIT)
    report = verify(config, loaded=tiny_lm)
    _check_schema(report, batch_size=3)
    assert report["summary"]["all_identical"] and report["summary"]["triggers"] == 0
    assert report["candidate"]["threshold"] is None and report["candidate"]["policy"]["fast_path"] is None


# --------------------------------------------------------------------------- exit 1


def _flip_row0_at_step3(monkeypatch) -> dict:
    """The 3rd batched decode forward (logits of step 3): row 0's runner-up wins by 0.01."""
    return flip_logits_at(monkeypatch, call=2)


def _row_of(stdout: str, pid: str) -> list[str]:
    rows = [ln for ln in stdout.splitlines() if pid in ln and "│" in ln]
    assert rows, stdout
    return [c.strip() for c in rows[0].split("│")[1:-1]]


@pytest.mark.parametrize("policy", ["invariant", "none"])
def test_cli_exit_1_when_a_sequence_differs(tmp_path, prompts_file, tiny_model_dir, monkeypatch, policy) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    state = _flip_row0_at_step3(monkeypatch)
    report_path = tmp_path / "report.json"
    result = _invoke(_base(prompts_file, tiny_model_dir) + ["--policy", policy, "--report", str(report_path)])
    _ok(result, 1)
    assert state["flipped"] is not None
    solo_tok, runner = state["flipped"]
    out = result.stdout
    assert "FAIL" in out and "PASS" not in out
    cells = _row_of(out, "tiny-00")
    assert cells[0] == "tiny-00" and cells[1] == "3"  # the prompt and its first divergent step
    assert cells[-1] == "-"  # no threshold: no severity

    report = json.loads(report_path.read_text())
    _check_schema(report)
    assert report["summary"]["all_identical"] is False
    rec = report["sequences"][0]
    assert rec["prompt_id"] == "tiny-00" and rec["identical"] is False
    assert rec["first_divergence"] == 3
    d = rec["divergence"]
    assert d["reference_token"] == solo_tok and d["candidate_token"] == runner != solo_tok
    assert d["reference_margin"] > 0
    assert d["candidate_margin"] == pytest.approx(0.01, abs=1e-3)
    assert d["verified"] is False and "severity" not in d  # no threshold given
    assert rec["repairs"] == 0
    assert isinstance(d["reference_text"], str) and isinstance(d["candidate_text"], str)
    assert rec["candidate_tokens"][3] == runner and rec["reference_tokens"][3] == solo_tok


def test_cli_json_exit_1(prompts_file, tiny_model_dir, monkeypatch) -> None:
    _flip_row0_at_step3(monkeypatch)
    result = _invoke(_base(prompts_file, tiny_model_dir) + ["--policy", "invariant", "--json"])
    _ok(result, 1)
    report = json.loads(result.stdout)
    assert report["summary"]["all_identical"] is False
    bad = [r for r in report["sequences"] if not r["identical"]]
    assert [r["prompt_id"] for r in bad] == ["tiny-00"] and bad[0]["first_divergence"] == 3


@pytest.mark.parametrize("tau, code, severity", [("1000", 1, "within_noise"), ("0", 4, "anomalous")])
def test_cli_severity_of_the_flip(prompts_file, tiny_model_dir, monkeypatch, tau, code, severity) -> None:
    """The injected flip takes the reference's runner-up: within noise under a large tau, anomalous at tau 0."""
    _flip_row0_at_step3(monkeypatch)
    result = _invoke(_base(prompts_file, tiny_model_dir) + ["--policy", "invariant", "--threshold", tau, "--json"])
    _ok(result, code)
    report = json.loads(result.stdout)
    d = report["sequences"][0]["divergence"]
    assert d["severity"] == severity and d["candidate_token"] == d["reference_runner_up"]
    assert d["reference_gap_exact"] and d["reference_gap"] == pytest.approx(d["reference_margin"])
    assert report["summary"]["severity"]["first_divergences"][severity] == 1


def test_cli_gate_repairs_the_flip_and_exits_0(prompts_file, tiny_model_dir, monkeypatch) -> None:
    _flip_row0_at_step3(monkeypatch)
    result = _invoke(_base(prompts_file, tiny_model_dir) + ["--policy", "gate", "--threshold", "1.0", "--json"])
    _ok(result, 0)
    report = json.loads(result.stdout)
    assert report["summary"]["all_identical"] is True
    assert report["summary"]["repairs"] >= 1 and report["sequences"][0]["repairs"] >= 1


# --------------------------------------------------------------------------- exit 2


def _not_json(tmp: Path) -> Path:
    p = tmp / "gate.json"
    p.write_text("{ not json")
    return p


BAD = {
    "bogus-policy": (lambda t: ["--policy", "bogus"], ("--policy", "bogus")),
    "gate-without-tau": (lambda t: ["--policy", "gate"], ("--gate", "--threshold")),
    "missing-gate": (lambda t: ["--policy", "gate", "--gate", str(t / "missing.json")], ("missing.json",)),
    "gate-not-json": (lambda t: ["--policy", "gate", "--gate", str(_not_json(t))], ("gate.json", "JSON")),
    "gate-wrong-format": (lambda t: ["--gate", str(_write_gate(t / "g.json", 0.5, format="other"))],
                          ("g.json", "format")),
    "gate-and-threshold": (lambda t: ["--policy", "gate", "--gate", str(_write_gate(t / "g.json")),
                                      "--threshold", "0.5"], ("--gate", "--threshold")),
    "batch-size-0": (lambda t: ["--policy", "always", "--batch-size", "0"], ("--batch-size",)),
    "negative-threshold": (lambda t: ["--policy", "gate", "--threshold", "-1"], ("--threshold",)),
    "max-new-tokens-0": (lambda t: ["--policy", "always", "--max-new-tokens", "0"], ("--max-new-tokens",)),
    "bad-fast-path": (lambda t: ["--policy", "gate", "--threshold", "0.5", "--fast-path", "x"], ("--fast-path",)),
    "max-rows-0": (lambda t: ["--policy", "invariant", "--max-rows", "0"], ("--max-rows",)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_exit_2(tmp_path, prompts_file, tiny_model_dir, case) -> None:
    make, needles = BAD[case]
    result = _invoke(_base(prompts_file, tiny_model_dir) + make(tmp_path))
    _assert_one_line_error(result, *needles)


def test_cli_unknown_model_exit_2(prompts_file) -> None:
    result = _invoke(_base(prompts_file, Path("/nonexistent/model-x")) + ["--policy", "always"])
    _assert_one_line_error(result, "/nonexistent/model-x")


def test_cli_missing_prompts_exit_2(tmp_path, tiny_model_dir) -> None:
    missing = tmp_path / "nope.jsonl"
    result = _invoke(_base(missing, tiny_model_dir) + ["--policy", "always"])
    _assert_one_line_error(result, "nope.jsonl")


def test_library_errors_are_typed(tmp_path, prompts_file, tiny_lm) -> None:
    def cfg(**kw):
        base = dict(prompts=str(prompts_file), device="cpu", batch_size=2, max_new_tokens=2, limit=2)
        base.update(kw)
        return VerifyConfig(**base)

    with pytest.raises(UsageError):
        verify(cfg(policy="gate"), loaded=tiny_lm)
    with pytest.raises(UsageError):
        verify(cfg(policy="gate", threshold=math.nan), loaded=tiny_lm)
    with pytest.raises(GateError):
        verify(cfg(policy="gate", gate=tmp_path / "missing.json"), loaded=tiny_lm)
    with pytest.raises(GateError):
        verify(cfg(policy="gate", gate=_not_json(tmp_path)), loaded=tiny_lm)
    report_path = tmp_path / "never.json"
    with pytest.raises(UsageError):
        verify(cfg(policy="bogus", report=report_path), loaded=tiny_lm)
    assert not report_path.exists()


# --------------------------------------------------------------------------- contracts and drift


def test_cli_gate_reports_what_it_checked(prompts_file, tiny_model_dir) -> None:
    result = _invoke(_base(prompts_file, tiny_model_dir) + ["--policy", "gate", "--threshold", "0.5",
                                                            "--audit-every", "3", "--json"])
    _ok(result)
    rep = json.loads(result.stdout)
    s = rep["summary"]
    assert s["contract"] == "solo" and s["audit_every"] == 3 and s["drift_events"] == len(rep["drift"]) == 0
    assert s["audits"] > 0  # tau 0.5 does not cover every step; audits look at the others
    assert "bit for bit" in s["exactness"] and f"{s['identical']}/{s['sequences']}" in s["exactness"]
    assert rep["probe"]["min_elements_per_row_count"] >= 46050 and rep["probe"]["ops"]
    assert all(r["audits"] + r["triggers"] >= 1 for r in rep["sequences"])  # every row's last step is checked


def test_cli_batch_invariant_contract(prompts_file, tiny_model_dir) -> None:
    result = _invoke(_base(prompts_file, tiny_model_dir) + ["--policy", "invariant", "--contract",
                                                            "batch-invariant", "--json"])
    _ok(result)
    rep = json.loads(result.stdout)
    assert rep["summary"]["contract"] == "batch-invariant" and rep["summary"]["all_identical"]
    plan = rep["summary"]["plan"]
    assert all("16 rows padded" in v for k, v in plan.items() if k.startswith("linear"))
    assert set(plan) - {k for k in plan if k.startswith("linear")} <= {"attention", "prefill"}
    assert "batch-invariant kernels" in rep["summary"]["exactness"]


@pytest.mark.parametrize("extra, needle", [(["--contract", "bogus"], "--contract"),
                                           (["--audit-every", "0"], "--audit-every"),
                                           (["--policy", "always", "--contract", "batch-invariant"],
                                            "batch-invariant")])
def test_cli_contract_and_audit_bad_input(prompts_file, tiny_model_dir, extra, needle) -> None:
    result = _invoke(_base(prompts_file, tiny_model_dir) + extra)
    assert result.exit_code == 2, result.output
    assert needle in _stderr(result)


# --------------------------------------------------------------------------- gate stack mismatch


def test_gate_from_another_stack_warns_or_is_refused(tmp_path, prompts_file, tiny_model_dir) -> None:
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"format": "mgaudit.gate", "version": 1, "threshold": 0.5, "metric": "batched_margin",
                                "provenance": {"model": {"name": "tiny-llama", "dtype": "float32", "device": "cuda:0",
                                                         "attn_implementation": "eager"}}}))
    report = tmp_path / "r.json"
    res = invoke(verify_args(prompts_file, tiny_model_dir, "--gate", str(gate), "--report", str(report)))
    assert res.exit_code == 0, stderr_of(res)
    warn = [ln for ln in stderr_of(res).splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1
    for needle in ("dtype float32 (gate) vs bfloat16", "device kind cuda (gate) vs cpu", "attention eager (gate) vs sdpa"):
        assert needle in warn[0]
    mism = json.loads(report.read_text())["candidate"]["gate_mismatches"]
    assert mism == {"dtype": ["float32", "bfloat16"], "device kind": ["cuda", "cpu"], "attention": ["eager", "sdpa"]}
    assert_one_line_error(invoke(verify_args(prompts_file, tiny_model_dir, "--gate", str(gate), "--strict")),
                          "dtype float32", "another stack")
    # a matching gate passes --strict
    g = json.loads(gate.read_text())
    g["provenance"]["model"] = {"dtype": "bfloat16", "device": "cpu", "attn_implementation": "sdpa"}
    gate.write_text(json.dumps(g))
    res = invoke(verify_args(prompts_file, tiny_model_dir, "--gate", str(gate), "--strict"))
    assert res.exit_code == 0 and "warning" not in stderr_of(res)


# --------------------------------------------------------------------------- verify report fields


def test_report_names_the_policy_run_and_keeps_token_lists(tmp_path, prompts_file, tiny_model_dir,
                                                              monkeypatch) -> None:
    from perturb import flip_logits_at

    flip_logits_at(monkeypatch, call=2)
    report = tmp_path / "r.json"
    res = invoke(verify_args(prompts_file, tiny_model_dir, "--policy", "none", "--report", str(report)))
    assert res.exit_code == 1
    data = json.loads(report.read_text())
    text = json.dumps(data)
    assert "gated_" not in text and "threshold_text" not in text and "loaded_" not in text
    bad = [r for r in data["sequences"] if not r["identical"]]
    assert bad
    for r in data["sequences"]:
        assert isinstance(r["reference_tokens"], list) and isinstance(r["candidate_tokens"], list)
        assert len(r["candidate_tokens"]) == r["steps"] and len(r["reference_tokens"]) == r["reference_steps"]
        assert (r["reference_tokens"] == r["candidate_tokens"]) == r["identical"]
    r = bad[0]
    k, d = r["first_divergence"], r["divergence"]
    assert d["candidate_token"] == r["candidate_tokens"][k] != r["reference_tokens"][k] == d["reference_token"]
    assert {"candidate_text", "candidate_margin", "candidate_context"} <= set(d)
