"""Real engines against the local model (``verify --endpoint URL --reference local``) and against each
other (``--reference URL``): llama.cpp's llama-server (Q4_1 kernels) and vLLM's CPU build (bf16),
started once per session (tests/engines.py). The figures these comparisons produce depend on the
engine and the CPU: the tests check what the report must say about every difference, not how many
there are (docs/endpoints.md has the measured tables)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cli_helpers import invoke, stderr_of

HELDOUT_CHAT = Path(__file__).parent / "data" / "heldout_chat.jsonl"
TAU = "0.5"  # a gate threshold: what splits rounding noise from anomalies in these reports


def _verify(url: str, *extra: str):
    res = invoke(["verify", str(HELDOUT_CHAT), "--endpoint", url, "--reference", "local", "--device", "cpu",
                  "--max-new-tokens", "24", "--threshold", TAU, "-q", "--json", *extra])
    return res, json.loads(res.stdout)


def _check_report(res, rep: dict, route: str) -> None:
    """Every difference carries both margins and a severity; the exit code says what they add up to."""
    s = rep["summary"]
    assert rep["reference"]["cross"] and rep["reference"]["backend"] == "local"
    assert rep["provenance"]["vocabulary"]["checked"] in ("token ids of a test string", "vocabulary size")
    counts = s["severity"]["counts"]
    expected = 0 if s["all_identical"] else (4 if counts["anomalous"] or s["severity"]["first_divergences"]["anomalous"]
                                             else 1)
    assert res.exit_code == expected, (res.exit_code, stderr_of(res))
    tf = s["teacher_forced"]
    assert tf["steps"] >= sum(r["reference_steps"] for r in rep["sequences"] if r["identical"])
    for d in rep["differences"]:
        assert d["severity"] in ("within_noise", "anomalous"), d
        assert math.isfinite(d["reference_margin"]) and math.isfinite(d["candidate_margin"]), d
        assert d["candidate_token"] != d["reference_token"]
    firsts = [d for d in rep["differences"] if d["kind"] == "first_divergence"]
    assert len(firsts) == s["sequences"] - s["identical"]
    if firsts:  # each diverged sequence was scored on the reference's tokens past its divergence
        assert route in tf["route"] and tf["requests"] >= 1 and tf["available"]
        assert len([d for d in rep["differences"] if d["kind"] == "flip"]) == tf["flips"] >= len(firsts)


@pytest.mark.slow
def test_llama_server_against_the_local_model(llama_server) -> None:
    res, rep = _verify(llama_server.url, "-b", "4")
    _check_report(res, rep, "continuation")
    assert rep["candidate"]["engine"] == "llama.cpp"


@pytest.mark.slow
def test_vllm_against_the_local_model(vllm_server) -> None:
    res, rep = _verify(vllm_server.url, "-b", "4")
    _check_report(res, rep, "prompt-logprobs")
    assert rep["candidate"]["engine"] == "vllm"
    tf = rep["summary"]["teacher_forced"]
    if tf["requests"]:  # one scoring request per sequence scored past its divergence
        assert tf["requests_per_sequence"] == 1.0


@pytest.mark.slow
def test_two_llama_servers_one_slot_against_eight(llama_server, tmp_path) -> None:
    from mgaudit.endpoint.llama_server import LlamaServer

    with LlamaServer(llama_server.binary, llama_server.model, slots=1, ctx=1024,
                     log_path=tmp_path / "one-slot.log") as one:
        res = invoke(["verify", str(HELDOUT_CHAT), "--endpoint", llama_server.url, "--reference", one.url,
                      "--model", "smollm2", "-b", "6", "--max-new-tokens", "24", "--threshold", TAU, "-q", "--json"])
    rep = json.loads(res.stdout)
    assert rep["reference"]["backend"] == "endpoint" and rep["reference"]["label"].endswith(one.url)
    assert rep["provenance"]["endpoint"]["props"]["total_slots"] == llama_server.slots
    assert rep["provenance"]["reference"]["endpoint"]["props"]["total_slots"] == 1
    assert res.exit_code in (0, 1, 4) and (res.exit_code == 0) == rep["summary"]["all_identical"]
    for d in rep["differences"]:
        assert d["severity"] in ("within_noise", "anomalous")
