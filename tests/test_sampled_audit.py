"""Seeded sampling through the audit core and the CLI: flags, traces, verify, servers and seeds.

The ``backend`` fixture runs a test on the local tiny model and on a model server that samples
with mgaudit's sampler and the request's ``seed`` (tests/model_server.py).
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from cli_helpers import assert_one_line_error, invoke, no_model, scan_args, stderr_of, verify_args
from model_server import ModelServer

SAMPLED = ["--temperature", "0.9", "--top-p", "0.95", "--sample-seed", "7"]


@pytest.mark.parametrize("extra, flag", [
    (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "0.7", "--top-p", "0"], "--top-p"),
    (["--temperature", "0.7", "--top-p", "1.5"], "--top-p"),
    (["--temperature", "0.7", "--top-k", "0"], "--top-k"),
    (["--temperature", "0.7", "--min-p", "2"], "--min-p"),
    (["--temperature", "0.7", "--sample-seed", "-3"], "--sample-seed"),
])
@pytest.mark.parametrize("command", ["scan", "verify"])
def test_bad_sampling_flags_are_one_line_naming_the_flag(command, extra, flag, tmp_path, prompts_file,
                                                         tiny_model_dir, monkeypatch) -> None:
    no_model(monkeypatch)
    args = scan_args(prompts_file, tmp_path / "t", tiny_model_dir) if command == "scan" else \
        verify_args(prompts_file, tiny_model_dir, "--policy", "always")
    assert_one_line_error(invoke(args + extra), flag)


def _traces(out):
    return pd.read_parquet(out)


def test_sampled_scan_records_draws_and_sampling_margins(backend, tmp_path, prompts_file) -> None:
    from mgaudit.decoding.sampling import Sampling

    out = tmp_path / "t"
    res = invoke(["scan", str(prompts_file), *backend.args, "--batch-sizes", "2,4", "--max-new-tokens", "6",
                  "--out", str(out), "-q", *SAMPLED])
    assert res.exit_code == 0, stderr_of(res)
    df = _traces(out)
    s = Sampling(0.9, top_p=0.95, seed=7)
    seeds = {p: s.draw_seed(p) for p in df.prompt_id.unique()}
    assert (df.draw_seed == df.prompt_id.map(seeds)).all() and (df.draw_counter == df.step).all()
    solo = df[df["mode"] == "solo"]
    if backend.name == "local":
        assert set(solo.solo_margin_kind) <= {"sample", "mask", "horizon"} and (solo.solo_margin >= 0).all()
    else:  # a server's draws are unknown: no margin, the token's logprob in top-1
        assert solo.solo_margin.isna().all() and solo.solo_margin_kind.isna().all()
        assert (solo.solo_top1_logit <= 0).all()
        res = invoke(["calibrate", str(out), "--method", "bound", "--out", str(tmp_path / "g.json"), "-q"])
        assert_one_line_error(res, "sampled on a server")
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["provenance"]["config"]["temperature"] == 0.9


def test_resume_refuses_other_sampling(tmp_path, prompts_file, tiny_model_dir) -> None:
    out = tmp_path / "t"
    assert invoke(scan_args(prompts_file, out, tiny_model_dir, *SAMPLED, "-q")).exit_code == 0
    res = invoke(scan_args(prompts_file, out, tiny_model_dir, "--temperature", "0.5", "--resume", "-q"))
    assert_one_line_error(res, "sampling")


def test_calibrate_fits_on_sampled_traces(tmp_path, prompts_file, tiny_model_dir) -> None:
    out = tmp_path / "t"
    assert invoke(scan_args(prompts_file, out, tiny_model_dir, *SAMPLED, "-q")).exit_code == 0
    res = invoke(["calibrate", str(out), "--method", "bound", "--out", str(tmp_path / "gate.json"), "-q"])
    assert res.exit_code == 0, stderr_of(res)
    gate = json.loads((tmp_path / "gate.json").read_text())
    assert gate["provenance"]["config"]["temperature"] == 0.9 and gate["calibration"]["steps"] > 0


@pytest.mark.parametrize("policy", ["gate", "invariant", "always", "none"])
def test_sampled_verify_of_a_policy(policy, prompts_file, tiny_model_dir, tmp_path) -> None:
    report = tmp_path / "r.json"
    extra = ["--threshold", "0.5"] if policy == "gate" else []
    res = invoke(verify_args(prompts_file, tiny_model_dir, "--policy", policy, "--report", str(report), "-q",
                             *SAMPLED, *extra))
    rep = json.loads(report.read_text())
    if policy != "none":
        assert res.exit_code == 0, stderr_of(res)
        assert rep["summary"]["all_identical"]
        assert "sampled by mgaudit's sampler" in rep["summary"]["exactness"]
    assert rep["summary"]["sampling"]["temperature"] == 0.9
    assert all(isinstance(r["draw_seed"], int) for r in rep["sequences"])


def test_a_seed_honouring_server_sampled_alone_and_in_flight(model_server, prompts_file, tiny_model_dir) -> None:
    args = ["--endpoint", model_server.url, "--model", str(tiny_model_dir)]
    res = invoke(["verify", str(prompts_file), *args, "-b", "4", "--max-new-tokens", "8", "--json", *SAMPLED])
    assert res.exit_code == 0, stderr_of(res)
    rep = json.loads(res.stdout)
    seeds = rep["summary"]["seeds"]
    assert seeds["honours_seeds"] and seeds["repeatable"] == seeds["prompts"] == 10
    assert seeds["seed_changes_output"] > 0


def test_a_server_sampled_like_the_local_model_with_the_same_seeds(model_server, prompts_file,
                                                                   tiny_model_dir) -> None:
    args = ["--endpoint", model_server.url, "--reference", "local", "--model", str(tiny_model_dir), "--device", "cpu"]
    res = invoke(["verify", str(prompts_file), *args, "-b", "4", "--max-new-tokens", "8", "--json", *SAMPLED])
    assert res.exit_code == 0, stderr_of(res)
    assert json.loads(res.stdout)["summary"]["identical"] == 10


def test_a_server_that_ignores_seeds_is_reported(tiny_lm, prompts_file, tiny_model_dir) -> None:
    with ModelServer(tiny_lm, behaviour="seed_ignored") as srv:
        res = invoke(["verify", str(prompts_file), "--endpoint", srv.url, "--model", str(tiny_model_dir), "-b", "4",
                      "--max-new-tokens", "8", "--threshold", "0.5", "--json", *SAMPLED])
    assert res.exit_code == 1, stderr_of(res)
    rep = json.loads(res.stdout)
    s = rep["summary"]
    assert not s["seeds"]["honours_seeds"] and s["seeds"]["not_repeatable"]
    assert s["severity"]["counts"]["unknown"] > 0 and s["severity"]["counts"]["anomalous"] == 0
    first = next(d for d in rep["differences"])
    assert first["reference_margin"] is None and "sampled" in first["reason"]
    assert "sampled" in s["teacher_forced"]["reason"]


def test_server_requests_carry_every_sampling_field() -> None:
    from mgaudit.audit.remote import sampling_fields
    from mgaudit.audit.steps import Request, Settings
    from mgaudit.decoding.sampling import Sampling
    from mgaudit.prompts import Prompt

    req = Request(Prompt(id="p1", text="hi", messages=None), 0, (1, 2))
    greedy = Settings(8)
    assert sampling_fields(greedy, req, "llama.cpp") == {}
    s = Settings(8, sampling=Sampling(0.7, top_p=0.9, seed=3))
    llama = sampling_fields(s, req, "llama.cpp")
    assert llama == {"temperature": 0.7, "top_p": 0.9, "seed": Sampling(0.7, seed=3).draw_seed("p1"), "top_k": 0,
                     "min_p": 0.0}
    assert set(sampling_fields(s, req, "vllm")) == {"temperature", "top_p", "seed"}
    assert not math.isnan(llama["seed"])
