"""Real engines against the local model (``verify --endpoint URL --reference local``) and against each
other (``--reference URL``): llama.cpp's llama-server (Q4_1 kernels) and vLLM's CPU build (bf16),
started once per session (tests/engines.py). The figures these comparisons produce depend on the
engine and the CPU: the tests check what the report must say about every difference, not how many
there are (docs/endpoints.md has the measured tables). The same holds for the determinism cards
(``scan --sweep``) both engines get here: short sweeps, checked for what a card must say."""

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


# --------------------------------------------------------------------------- determinism cards (scan --sweep)


def _card(url: str, out: Path, *extra: str) -> dict:
    res = invoke(["scan", str(HELDOUT_CHAT), "--endpoint", url, "--sweep", "--limit", "4", "--rounds", "2",
                  "--max-new-tokens", "8", "--out", str(out), "-q", "--json", *extra])
    assert res.exit_code == 0, stderr_of(res)
    card = json.loads(res.stdout)
    assert all((out / name).is_file() for name in ("_card.json", "_card.md", "_card.png"))
    return card


def _check_card(card: dict, top: int) -> None:
    """What every card must say, whatever the engine found: rows pooled over both rounds, onsets that
    agree with their rows, the expectation below the onset."""
    series = {(s["axis"], s["name"]): s for s in card["series"]}
    for name in ("together", "staggered"):
        s = series[("concurrency", name)]
        levels = [r["level"] for r in s["rows"]]
        assert levels[0] == 1 and levels[-1] == top and set(card["sweep"]["levels"]) <= set(levels)
        for r in s["rows"]:
            assert r["sequences"] == 4 * 2 and len(r["per_round"]) == 2
            diverged = r["sequences"] - r["identical"]["k"]
            assert r["flips"]["k"] >= diverged and (r["flips"]["k"] == 0) == (diverged == 0)
        o = s["onset"]
        differing = [r["level"] for r in s["rows"] if r["identical"]["k"] < r["identical"]["n"]]
        assert o["level"] == (min(differing) if differing else None)
        if o["level"] and o["level"] > 1:
            assert o["exact"] and o["below"]["level"] == o["level"] - 1  # bisected to adjacent levels
    exp = card["expectation"]
    together = card["onsets"]["together"]
    assert exp["identical_up_to"] == (together["identical_up_to"] if together["level"] else top)
    long_rows = series[("depth", "long prompts")]["rows"]
    assert [r["level"] for r in long_rows] == [1, top] and all(r["prompt_tokens"]["min"] >= 200 for r in long_rows)
    assert [r["variant"] for r in series[("route", "chat template (server)")]["rows"]] == ["chat", "chat"]
    assert card["not_run"] == [] and card["requests"]["candidate"] <= card["requests"]["bound"]


def _verify_card(url: str, card_path: Path) -> None:
    res = invoke(["verify", str(HELDOUT_CHAT), "--endpoint", url, "--limit", "4", "--max-new-tokens", "8",
                  "--card", str(card_path), "-q", "--json"])
    rep = json.loads(res.stdout)
    card = json.loads(card_path.read_text())
    assert rep["candidate"]["batch_size"] == card["expectation"]["identical_up_to"]
    assert rep["candidate"]["card"]["engine_differences"] == {}
    assert res.exit_code == (0 if rep["summary"]["all_identical"] else 1), stderr_of(res)


@pytest.mark.slow
def test_llama_server_cards(llama_server, tmp_path) -> None:
    card = _card(llama_server.url, tmp_path / "np8", "--model", "smollm2", "--long-prompt-tokens", "200")
    assert card["engine"]["engine"] == "llama.cpp" and card["engine"]["slots"] == llama_server.slots
    assert card["sweep"]["top"] == llama_server.slots  # the top level is the server's slots unless given
    _check_card(card, llama_server.slots)
    warm = {s["name"]: s["rows"][0] for s in card["series"] if s["axis"] == "cache"}
    assert warm["warm"]["cached_prompt_tokens"] > 0 and warm["warm, long prompts"]["cached_prompt_tokens"] >= 200
    assert warm["cold"]["cached_prompt_tokens"] == 0  # cache_prompt false: nothing read from the slot
    _verify_card(llama_server.url, tmp_path / "np8" / "_card.json")
    from mgaudit.endpoint.llama_server import LlamaServer

    with LlamaServer(llama_server.binary, llama_server.model, slots=2, ctx=2048,
                     log_path=tmp_path / "np2.log") as two:
        small = _card(two.url, tmp_path / "np2", "--axes", "concurrency")
    assert small["sweep"]["top"] == 2 and [r["level"] for r in small["series"][1]["rows"]] == [1, 2]


@pytest.mark.slow
def test_vllm_card(vllm_server, tmp_path) -> None:
    card = _card(vllm_server.url, tmp_path / "c", "--model", "smollm2", "--long-prompt-tokens", "200",
                 "--max-concurrency", "32")
    assert card["engine"]["engine"] == "vllm" and card["engine"]["version"]
    cache = card["engine"]["prefix_cache"]
    assert cache["enabled"] and cache["switch"] == "cache_salt" and cache["block_size"] > 0
    _check_card(card, 32)
    warm = {s["name"]: s["rows"][0] for s in card["series"] if s["axis"] == "cache"}
    assert warm["warm, long prompts"]["cached_prompt_tokens"] > 0  # read from vllm:prefix_cache_hits_total
    _verify_card(vllm_server.url, tmp_path / "c" / "_card.json")
