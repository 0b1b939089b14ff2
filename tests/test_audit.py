"""The audit core: scan and verify behave the same on every backend, and compare any reference
with any candidate, with the severity of every difference.

The ``backend`` fixture (conftest) runs each behaviour test twice: on the local tiny model and on
a server that decodes with the same model (tests/model_server.py). The cross-backend tests
compare such servers, made to depart from the reference in controlled ways, with the local model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_helpers import assert_one_line_error, invoke, stderr_of
from model_server import ModelServer

N_PROMPTS = 10  # conftest's prompts_file


def _scan(backend, prompts: Path, out: Path, *extra: str):
    return invoke(["scan", str(prompts), *backend.args, "--batch-sizes", "2,4", "--max-new-tokens", "6",
                   "--out", str(out), "-q", *extra])


def _verify(args: list[str], prompts: Path, *extra: str):
    return invoke(["verify", str(prompts), *args, "--max-new-tokens", "8", "-q", *extra])


# --------------------------------------------------------------------------- the trace directory, per backend


def test_overwrite_never_deletes_foreign_parquet(backend, tmp_path, prompts_file) -> None:
    out = tmp_path / "t"
    assert _scan(backend, prompts_file, out).exit_code == 0
    ours = sorted(p.name for p in out.glob("trace-*.parquet"))
    foreign = out / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a"]}), foreign)
    impostor = out / "trace-mine.parquet"  # named like ours, written by someone else
    pq.write_table(pa.table({"x": [1]}), impostor)
    note = out / "notes.txt"
    note.write_text("keep me")
    line = assert_one_line_error(_scan(backend, prompts_file, out, "--overwrite"), "prompts.parquet",
                                 "trace-mine.parquet", "did not write")
    assert "2 Parquet file(s)" in line
    assert foreign.exists() and impostor.exists()
    assert sorted(p.name for p in out.glob("trace-*.parquet")) == sorted(ours + ["trace-mine.parquet"])
    foreign.unlink()
    impostor.unlink()
    res = _scan(backend, prompts_file, out, "--overwrite")
    assert res.exit_code == 0, stderr_of(res)
    assert note.read_text() == "keep me" and sorted(p.name for p in out.glob("trace-*.parquet")) == ours


def test_existing_traces_need_resume_or_overwrite(backend, tmp_path, prompts_file) -> None:
    out = tmp_path / "t"
    assert _scan(backend, prompts_file, out).exit_code == 0
    assert_one_line_error(_scan(backend, prompts_file, out), "already holds", "--resume", "--overwrite")


def test_resume_rewrites_only_missing_units_and_refuses_other_options(backend, tmp_path, prompts_file) -> None:
    out = tmp_path / "t"
    assert _scan(backend, prompts_file, out, "--threshold", "0.5").exit_code == 0
    first = pd.read_parquet(out).sort_values(["mode", "batch_size", "prompt_index", "step"]).reset_index(drop=True)
    files = sorted(out.glob("trace-*.parquet"))
    lost = files[len(files) // 2]
    lost.unlink()
    (out / f".tmp-{lost.name}.abcd1234.partial").write_bytes(b"half a file")  # an interrupted write
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("trace-*.parquet")}
    res = _scan(backend, prompts_file, out, "--resume", "--threshold", "0.5")
    assert res.exit_code == 0, stderr_of(res)
    assert lost.exists() and not list(out.glob(".tmp-*"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("trace-*.parquet") if p.name != lost.name} == kept
    again = pd.read_parquet(out).sort_values(["mode", "batch_size", "prompt_index", "step"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(first, again)  # severities too: the reference's alternatives were read back
    solo = again[again["mode"] == "solo"]
    assert solo["solo_alternatives"].map(lambda a: a is not None and len(a) >= 2).all()
    line = assert_one_line_error(_scan(backend, prompts_file, out, "--resume", "--threshold", "0.5",
                                       "--max-new-tokens", "5"), "--resume", "max_new_tokens")
    assert "was 6" in line


# --------------------------------------------------------------------------- verify, per backend


def test_verify_report_has_one_schema(backend, tmp_path, prompts_file) -> None:
    report = tmp_path / "r.json"
    res = _verify(backend.args, prompts_file, "-b", "1", "--report", str(report),
                  *(["--policy", "none"] if backend.name == "local" else []))
    assert res.exit_code == 0, (res.output, stderr_of(res))
    rep = json.loads(report.read_text())
    assert rep["format"] == "mgaudit.verify" and rep["version"] == 2
    assert set(rep) == {"format", "version", "candidate", "reference", "summary", "sequences", "differences",
                        "drift", "probe", "provenance"}
    assert rep["candidate"]["backend"] == backend.name and rep["reference"]["cross"] is False
    assert len(rep["sequences"]) == N_PROMPTS and rep["summary"]["all_identical"]
    for r in rep["sequences"]:
        assert r["identical"] and r["reference_tokens"] == r["candidate_tokens"] and len(r["candidate_tokens"]) > 0
    assert rep["provenance"]["prompts"]["count"] == N_PROMPTS and rep["provenance"]["mgaudit_version"]


@pytest.mark.parametrize("extra, needle", [
    (["--gate", "g.json", "--threshold", "0.5"], "exclude each other"),
    (["--fail-on", "anomalous"], "--fail-on"),
    (["--fail-on", "sometimes"], "--fail-on"),
    (["--reference", "nowhere"], "--reference"),
    (["--threshold", "-1"], "--threshold"),
])
def test_verify_bad_input_exit_2(backend, prompts_file, extra, needle) -> None:
    assert_one_line_error(_verify(backend.args, prompts_file, *extra), needle)


# --------------------------------------------------------------------------- a server against the local model


@pytest.fixture
def server(tiny_lm, request):
    """A model server with the behaviour (and engine) the test names: ``@pytest.mark.parametrize`` on it."""
    behaviour, engine = request.param
    with ModelServer(tiny_lm, behaviour=behaviour, engine=engine) as srv:
        yield srv


def _cross(srv, tiny_model_dir) -> list[str]:
    return ["--endpoint", srv.url, "--reference", "local", "--model", str(tiny_model_dir), "--device", "cpu"]


@pytest.mark.parametrize("server", [("exact", "llama.cpp")], indirect=True)
def test_a_faithful_server_is_identical_to_the_local_model(server, tiny_model_dir, prompts_file) -> None:
    res = _verify(_cross(server, tiny_model_dir), prompts_file, "-b", "4", "--threshold", "1.0", "--json")
    assert res.exit_code == 0, (res.output, stderr_of(res))
    rep = json.loads(res.stdout)
    assert rep["reference"]["cross"] and rep["reference"]["backend"] == "local"
    assert rep["summary"]["identical"] == N_PROMPTS and rep["differences"] == []
    assert rep["provenance"]["vocabulary"]["checked"] == "token ids of a test string"


@pytest.mark.parametrize("server", [("near_tie", "llama.cpp"), ("near_tie", "vllm")], indirect=True)
def test_near_tie_departures_are_within_noise_exit_1(server, tiny_model_dir, prompts_file, tmp_path) -> None:
    report = tmp_path / "r.json"
    res = _verify(_cross(server, tiny_model_dir), prompts_file, "-b", "4", "--threshold", "1.0",
                  "--report", str(report))
    rep = json.loads(report.read_text())
    assert server.departures > 0 and not rep["summary"]["all_identical"]
    assert res.exit_code == 1, (res.output, stderr_of(res))
    assert "within noise" in res.output
    counts = rep["summary"]["severity"]["counts"]
    assert counts["anomalous"] == 0 and counts["within_noise"] > 0
    for d in rep["differences"]:
        assert d["severity"] == "within_noise" and d["reference_gap"] < 1.0 and d["reference_gap_exact"]
        assert d["reference_margin"] is not None and d["candidate_margin"] is not None
    tf = rep["summary"]["teacher_forced"]
    assert tf["available"] and tf["flips"] >= len([r for r in rep["sequences"] if not r["identical"]])
    if server.engine == "vllm":  # one scoring request per diverged sequence
        assert tf["route"] == "prompt-logprobs" and tf["requests_per_sequence"] == 1.0
    else:
        assert tf["route"] == "continuation" and tf["requests_per_sequence"] >= 1.0
    # --fail-on anomalous lets differences within noise pass
    res = _verify(_cross(server, tiny_model_dir), prompts_file, "-b", "4", "--threshold", "1.0",
                  "--fail-on", "anomalous")
    assert res.exit_code == 0, (res.output, stderr_of(res))


@pytest.mark.parametrize("server", [("anomalous", "llama.cpp")], indirect=True)
def test_a_confident_departure_is_anomalous_exit_4(server, tiny_model_dir, prompts_file) -> None:
    res = _verify(_cross(server, tiny_model_dir), prompts_file, "-b", "4", "--threshold", "1.0", "--json")
    assert res.exit_code == 4, (res.output, stderr_of(res))
    rep = json.loads(res.stdout)
    anomalous = [d for d in rep["differences"] if d["severity"] == "anomalous"]
    assert anomalous and all(d["reference_gap"] >= 1.0 for d in anomalous)
    worst = rep["summary"]["severity"]["worst"][0]
    assert worst["reference_gap"] == max(d["reference_gap"] for d in rep["differences"] if d["kind"] == "flip")
    assert rep["summary"]["severity"]["tau_source"] == {"from": "threshold", "value": 1.0}
    res = _verify(_cross(server, tiny_model_dir), prompts_file, "-b", "4", "--threshold", "1.0",
                  "--fail-on", "anomalous")
    assert res.exit_code == 4


@pytest.mark.parametrize("server", [("near_tie", "llama.cpp")], indirect=True)
def test_scan_against_the_local_model_writes_the_same_traces(server, tiny_model_dir, prompts_file, tmp_path) -> None:
    out = tmp_path / "t"
    res = invoke(["scan", str(prompts_file), *_cross(server, tiny_model_dir), "--batch-sizes", "4",
                  "--max-new-tokens", "8", "--threshold", "1.0", "--out", str(out), "-q", "--json"])
    assert res.exit_code == 0, stderr_of(res)
    df = pd.read_parquet(out)
    assert set(zip(df["condition"], df["batch_size"])) == {("alone", 1), ("in-flight", 4)}
    flips = df[df["first_divergence"]]
    assert len(flips) and (flips["severity"] == "within_noise").all()
    assert df[~df["first_divergence"]]["severity"].isna().all()
    sync = df[(df["mode"] == "sync") & (df["condition"] == "in-flight")]
    solo_len = df[df["mode"] == "solo"].groupby("prompt_id").size()
    assert (sync.groupby("prompt_id").size() == solo_len).all()  # teacher-forced over the whole reference
    summary = json.loads(res.stdout)
    assert summary["reference"]["cross"] and summary["scoring"]["route"] == "continuation"


def test_two_servers_compare_with_each_other(tiny_lm, tiny_model_dir, prompts_file) -> None:
    with ModelServer(tiny_lm, behaviour="exact") as ref, ModelServer(tiny_lm, behaviour="near_tie") as cand:
        res = _verify(["--endpoint", cand.url, "--reference", ref.url, "--model", str(tiny_model_dir)],
                      prompts_file, "-b", "4", "--threshold", "1.0", "--json")
        rep = json.loads(res.stdout)
        assert rep["reference"]["backend"] == "endpoint" and rep["reference"]["label"].endswith(ref.url)
        assert res.exit_code == (0 if rep["summary"]["all_identical"] else 1), stderr_of(res)
        assert cand.departures > 0 and not rep["summary"]["all_identical"]
        assert rep["provenance"]["reference"]["model"]["source"] == f"endpoint:{ref.url}"


def test_a_reference_with_another_vocabulary_is_refused_before_decoding(tiny_lm, tiny_model_dir,
                                                                        prompts_file) -> None:
    with ModelServer(tiny_lm, tokenize_offset=1) as other, ModelServer(tiny_lm) as cand:
        res = _verify(["--endpoint", cand.url, "--reference", other.url, "--model", str(tiny_model_dir)],
                      prompts_file, "-b", "4")
        assert_one_line_error(res, "--reference", other.url, "vocabulary")
        assert other.posts == 0 and cand.posts == 0


def test_an_unreachable_reference_fails_in_seconds(model_server, tiny_model_dir, prompts_file) -> None:
    from mgaudit.endpoint.process import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    before = model_server.posts
    t0 = time.monotonic()
    res = _verify(["--endpoint", model_server.url, "--reference", url, "--model", str(tiny_model_dir)],
                  prompts_file, "-b", "4")
    assert time.monotonic() - t0 < 10
    assert_one_line_error(res, "cannot reach the server", url)
    assert model_server.posts == before


def test_the_reference_is_decoded_once(model_server, tiny_model_dir, prompts_file, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MGAUDIT_CACHE", str(tmp_path / "cache"))
    args = ["--endpoint", model_server.url, "--reference", "local", "--model", str(tiny_model_dir), "--device", "cpu"]
    first = json.loads(_verify(args, prompts_file, "-b", "4", "--json").stdout)
    second = json.loads(_verify(args, prompts_file, "-b", "2", "--json").stdout)
    assert first["reference"]["decoded"] == N_PROMPTS and first["reference"]["cache"]["stored"] == N_PROMPTS
    assert second["reference"]["decoded"] == 0 and second["reference"]["cache"]["hits"] == N_PROMPTS
    assert [r["reference_tokens"] for r in first["sequences"]] == [r["reference_tokens"] for r in second["sequences"]]
    third = json.loads(_verify(args, prompts_file, "-b", "2", "--json", "--no-reference-cache").stdout)
    assert third["reference"]["decoded"] == N_PROMPTS and third["reference"]["cache"]["hits"] == 0


def test_severity_classification() -> None:
    from mgaudit.audit.severity import ANOMALOUS, UNKNOWN, WITHIN_NOISE, Threshold, summarize
    from mgaudit.audit.steps import Steps

    t = Threshold(0.5)
    # the reference took 3 at 10.0; 7 is its runner-up at 9.75, 9 its third choice at 9.6, 11 fourth at 9.0
    ref = Steps([3], [10.0], [9.75], [7], alternatives=[[(3, 10.0), (7, 9.75), (9, 9.6), (11, 9.0)]])
    assert t.classify(ref, 0, 7)[:2] == (WITHIN_NOISE, "reference gap 0.25 < tau 0.5")
    assert t.classify(ref, 0, 9)[0] == WITHIN_NOISE  # the third choice, 0.4 below: rounding can do that too
    assert t.classify(ref, 0, 11)[0] == ANOMALOUS  # 1.0 below: it cannot
    assert t.classify(ref, 0, 42)[0] == ANOMALOUS  # not listed, so at least 1.0 below
    assert t.classify(ref, 0, -1)[0] == ANOMALOUS  # the candidate stopped
    near = Steps([3], [10.0], [9.9], [7], alternatives=[[(3, 10.0), (7, 9.9)]])
    assert t.classify(near, 0, 42)[0] == UNKNOWN  # not listed, and what is listed lies within tau
    at_tau = Steps([3], [10.0], [9.5], [7])  # no alternatives: the runner-up's gap is the margin
    assert t.classify(at_tau, 0, 7)[0] == ANOMALOUS  # at tau: the gate would not have verified it
    assert t.classify(Steps([3], [float("nan")], [float("nan")], [-1]), 0, 7)[0] == UNKNOWN  # no logprobs
    diffs = [{"prompt_id": "a", "step": 1, "severity": WITHIN_NOISE, "reference_margin": 0.1},
             {"prompt_id": "b", "step": 2, "severity": ANOMALOUS, "reference_margin": 3.0}]
    s = summarize(diffs, t)
    assert s["counts"][WITHIN_NOISE] == 1 and s["counts"][ANOMALOUS] == 1
    assert s["worst"][0]["prompt_id"] == "b" and s["anomalous"]["ci95"][0] < 0.5 < s["anomalous"]["ci95"][1]
    assert sum(h["count"] for h in s["reference_gap_histogram"]) == 2


def test_prompt_logprobs_are_read_as_vllm_sends_them() -> None:
    from mgaudit.audit.remote import prompt_logprob_steps

    answer = {"choices": [{"prompt_logprobs": [
        None,
        {"3575": {"logprob": -11.5, "rank": 3056}, "29": {"logprob": -0.8, "rank": 1}, "28": {"logprob": -2.5, "rank": 2}},
        {"282": {"logprob": -0.3, "rank": 1}, "2240": {"logprob": -2.3, "rank": 2}},
    ]}]}
    steps = prompt_logprob_steps(answer, prompt_len=1, steps=2)
    assert steps.tokens == [29, 282] and steps.runner_up == [28, 2240]
    assert abs(steps.margin(0) - 1.7) < 1e-9 and abs(steps.margin(1) - 2.0) < 1e-9
    assert prompt_logprob_steps({"choices": [{}]}, 1, 2) is None


def test_cache_is_isolated_per_run() -> None:
    from mgaudit.models import cache_root

    root = cache_root()
    assert "mgaudit-test-cache-" in str(root) and (root / "models").is_symlink()
    assert os.environ["MGAUDIT_CACHE"] == str(root)
