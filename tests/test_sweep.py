"""``scan --sweep``: a server's determinism card. Against the fake server (tests/fake_openai_server.py)
made to change its answers from a chosen number of requests in flight on, and against a server
decoding with the tiny model (tests/model_server.py) for the cache, depth and route axes. The
real engines run under the sweep in tests/test_engines.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from cli_helpers import assert_one_line_error, invoke, stderr_of
from fake_openai_server import FLIP_STEP, FakeServer

ONSET = 6  # the fake server changes its answers from this many requests in flight on


def _prompts(tmp: Path, n: int = 8) -> Path:
    path = tmp / "chat.jsonl"
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"question number {i}?"}]} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _sweep(url: str, prompts: Path, out: Path, *extra: str):
    return invoke(["scan", str(prompts), "--endpoint", url, "--sweep", "--max-concurrency", "8", "--rounds", "2",
                   "--max-new-tokens", "6", "--out", str(out), "-q", *extra])


@pytest.fixture(scope="module")
def onset_card(tmp_path_factory):
    """One sweep of a fake server whose onset is ONSET: (its out folder, its prompts, the server)."""
    tmp = tmp_path_factory.mktemp("onset")
    prompts = _prompts(tmp)
    with FakeServer(delay=0.3) as srv:
        srv.flip_at = ONSET
        res = _sweep(srv.url, prompts, tmp / "out", "--axes", "concurrency,staggered", "--json")
        assert res.exit_code == 0, stderr_of(res)
        yield tmp / "out", prompts, srv, json.loads(res.stdout)


# --------------------------------------------------------------------------- the plan


def test_bisection_locates_an_onset_between_powers_of_two() -> None:
    from mgaudit.audit.sweep import coarse_levels, next_level

    for onset in (2, 3, 5, 6, 7, 9, 12, 16):
        tested = {level: level >= onset for level in [1] + coarse_levels(16)}
        while (level := next_level(tested)) is not None:
            assert level not in tested
            tested[level] = level >= onset
        first = min(level for level, d in tested.items() if d)
        assert first == onset and onset - 1 in tested, (onset, sorted(tested))
    assert next_level({1: False, 2: False, 4: False}) is None  # nothing differs: nothing to refine
    assert next_level({1: True, 2: True, 4: True}) is None  # alone already differs (run to run)
    assert coarse_levels(6) == [2, 4, 6] and coarse_levels(8) == [2, 4, 8] and coarse_levels(2) == [2]


def test_long_prompts_reach_their_length_and_differ_from_the_start() -> None:
    from mgaudit.audit.sweep import long_prompt
    from mgaudit.prompts import Prompt

    pool = [Prompt(f"p{i}", None, [{"role": "user", "content": f"question {i} about {'x ' * i}"}]) for i in range(4)]
    count = lambda text: len(text.split())  # noqa: E731
    longs = [long_prompt(p, pool, i, 300, count) for i, p in enumerate(pool)]
    for p, q in zip(pool, longs):
        text = q.messages[-1]["content"]
        assert q.id == f"{p.id}@long" and count(text) >= 300 and text.endswith(p.messages[-1]["content"])
    assert len({q.messages[-1]["content"][:200] for q in longs}) == len(longs)


def test_onset_evidence_from_rows() -> None:
    from mgaudit.audit.outcomes import onset, position_bins
    from mgaudit.stats import proportion

    def row(level: int, identical: int, n: int = 24) -> dict:
        return {"level": level, "sequences": n, "identical": proportion(identical, n)}

    o = onset([row(1, 24), row(2, 24), row(3, 21), row(4, 24), row(8, 20)])
    assert o["level"] == 3 and o["exact"] and o["identical_up_to"] == 2 and o["identical_above"] == [4]
    assert o["differing"]["k"] == 3 and o["differing"]["ci95"][0] < 0.125 < o["differing"]["ci95"][1]
    assert o["below"] == {"level": 2, "sequences": 24, "differing_upper95": 3 / 24}
    assert "0 of 24" in o["statement"] and "3 of 24" in o["statement"]
    o = onset([row(1, 24), row(2, 24), row(8, 23)])
    assert o["level"] == 8 and not o["exact"]  # not bisected (a plan stopped early): said so
    o = onset([row(1, 23), row(2, 20)])
    assert o["level"] == 1 and o["below"] is None and o["identical_up_to"] is None  # run to run
    o = onset([row(1, 24), row(4, 24)])
    assert o["level"] is None and o["identical_up_to"] == 4 and o["at_top"]["differing_upper95"] == 3 / 24
    assert position_bins(10) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 10)]


# --------------------------------------------------------------------------- the card of the fake server


def test_onset_is_located_exactly_and_the_card_says_so(onset_card) -> None:
    out, _, _, printed = onset_card
    card = json.loads((out / "_card.json").read_text())
    assert printed == card and card["format"] == "mgaudit.card"
    assert (out / "_card.md").read_text().startswith("## Determinism card") and (out / "_card.png").stat().st_size > 0
    for name in ("together", "staggered"):
        o = card["onsets"][name]
        assert o["level"] == ONSET and o["exact"] and o["below"]["level"] == ONSET - 1, o
        assert o["identical_up_to"] == ONSET - 1 and o["differing"]["k"] == o["differing"]["n"] > 0
        series = next(s for s in card["series"] if s["name"] == name)
        levels = [r["level"] for r in series["rows"]]
        assert levels == [1, 2, 4, 5, 6, 8]  # powers of two, then bisected between 4 and 8
        for r in series["rows"]:
            assert r["rounds"] == 2 and len(r["per_round"]) == 2
            differ = r["level"] >= ONSET
            assert (r["identical"]["k"] == 0) == differ and (r["identical"]["k"] == r["identical"]["n"]) != differ
            assert r["first_divergences"] == ([FLIP_STEP] * r["sequences"] if differ else [])
            if differ:
                assert r["flips"]["k"] > 0 and r["margins_at_flips"]["reference"]["median"] == pytest.approx(0.05)
    assert card["position"]["step"] == FLIP_STEP
    assert card["expectation"]["identical_up_to"] == ONSET - 1
    stag = next(s for s in card["series"] if s["name"] == "staggered")
    spacing = [r["spacing_seconds"] for r in stag["rows"] if r["level"] > 1]
    assert all(0 < x < 1 for x in spacing) and spacing == sorted(spacing, reverse=True)  # shorter as more join
    assert {x["axis"] for x in card["not_run"]} == {"cache", "depth", "route"}
    assert card["requests"]["candidate"] <= card["requests"]["bound"] and card["requests"]["retried"] == 0


def test_verify_checks_a_cards_expectation(onset_card, tmp_path) -> None:
    out, prompts, srv, _ = onset_card
    args = ["verify", str(prompts), "--endpoint", srv.url, "--card", str(out / "_card.json"), "--max-new-tokens", "6"]
    res = invoke(args + ["-q", "--json"])
    assert res.exit_code == 0, (res.output, stderr_of(res))
    rep = json.loads(res.stdout)
    assert rep["candidate"]["batch_size"] == ONSET - 1 and rep["candidate"]["card"]["expects"].startswith(
        f"identical up to {ONSET - 1} in flight")
    srv.flip_at = ONSET - 2  # the server changed: the card's expectation no longer holds
    try:
        res = invoke(args)
        assert res.exit_code == 1 and "FAIL" in res.output and "expects" in res.output
    finally:
        srv.flip_at = ONSET
    assert_one_line_error(invoke(args + ["-b", "4"]), "--card", "--batch-size")
    other = json.loads((out / "_card.json").read_text())
    other["engine"]["model"] = "another-model"
    (tmp_path / "other.json").write_text(json.dumps(other))
    res = invoke([a if a != str(out / "_card.json") else str(tmp_path / "other.json") for a in args] + ["--strict"])
    assert_one_line_error(res, "another server", "another-model")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "mgaudit.verify"}))
    assert_one_line_error(invoke(args[:5] + [str(tmp_path / "bad.json")]), "not an mgaudit determinism card")


def test_an_interrupted_sweep_resumes_to_the_same_card(tmp_path) -> None:
    prompts = _prompts(tmp_path)
    with FakeServer(delay=0.2) as srv:
        srv.flip_at = ONSET
        full = _sweep(srv.url, prompts, tmp_path / "full", "--axes", "concurrency")
        assert full.exit_code == 0, stderr_of(full)
        srv.behaviour, srv.fail_after_n = "drop_after", srv.posts + 60  # the connection drops mid-sweep
        cut = _sweep(srv.url, prompts, tmp_path / "cut", "--axes", "concurrency", "--retries", "0")
        line = assert_one_line_error(cut, "RemoteProtocolError", "resume")
        assert not (tmp_path / "cut" / "_card.json").exists() and "failed after 1 attempts" in line
        srv.behaviour = "ok"
        resumed = _sweep(srv.url, prompts, tmp_path / "cut", "--axes", "concurrency", "--resume")
        assert resumed.exit_code == 0, stderr_of(resumed)
        other = _sweep(srv.url, prompts, tmp_path / "cut", "--axes", "concurrency", "--resume", "--rounds", "3")
        assert_one_line_error(other, "--resume", "sweep")
    a, b = (json.loads((tmp_path / d / "_card.json").read_text()) for d in ("full", "cut"))
    assert _counts(a) == _counts(b) and a["onsets"]["together"]["level"] == ONSET
    frames = [pd.read_parquet(tmp_path / d).sort_values(["condition", "batch_size", "round", "mode", "prompt_id",
                                                          "step"]).reset_index(drop=True) for d in ("full", "cut")]
    pd.testing.assert_frame_equal(*frames)


def _counts(card: dict) -> list:
    """A card without its timings: per series and level, what was counted."""
    keep = ("level", "sequences", "identical", "per_round", "flips", "first_divergences", "lengths", "severity",
            "retried_requests", "flips_by_position")
    return [[s["axis"], s["name"], s["onset"], [{k: r[k] for k in keep} for r in s["rows"]]]
            for s in card["series"]] + [card["requests"], card["expectation"], card["position"]]


def test_transient_failures_are_retried_and_counted(tmp_path) -> None:
    prompts = _prompts(tmp_path, 4)
    with FakeServer(delay=0.05) as srv:
        srv.behaviour, srv.fail_every = "flaky", 5  # every fifth POST answers 503 once
        res = _sweep(srv.url, prompts, tmp_path / "o", "--axes", "concurrency", "--max-concurrency", "2",
                     "--rounds", "1", "--json")
    assert res.exit_code == 0, stderr_of(res)
    card = json.loads(res.stdout)
    retried = card["requests"]["retried"]
    assert retried > 0 and retried == sum(r["retried_requests"] for s in card["series"] if s["axis"] == "concurrency"
                                          for r in s["rows"][1:]) + card["series"][0]["rows"][0]["retried_requests"]


def test_cold_requests_are_salted_on_vllm_and_warm_hits_are_counted(tmp_path) -> None:
    prompts = _prompts(tmp_path, 4)
    with FakeServer(delay=0.02) as srv:
        srv.engine = "vllm"
        res = _sweep(srv.url, prompts, tmp_path / "o", "--axes", "cache", "--rounds", "1", "--json")
    assert res.exit_code == 0, stderr_of(res)
    card = json.loads(res.stdout)
    assert card["engine"]["prefix_cache"] == {"enabled": True, "block_size": 16, "switch": "cache_salt",
                                              "from": "/metrics vllm:cache_config_info"}
    salts = [b["cache_salt"] for b in srv.bodies if "cache_salt" in b]
    assert len(salts) == len(set(salts)) == 4 + 4  # reference and alone runs: each a salt of its own
    assert len([b for b in srv.bodies if "cache_salt" not in b]) == 2 * 4  # primed, then warm
    warm = next(s for s in card["series"] if s["name"] == "warm")["rows"][0]
    assert warm["cached_prompt_tokens"] == 5 and card["notes"] == []


# --------------------------------------------------------------------------- the other axes, on the tiny model


def test_cache_depth_and_route_axes(model_server, tiny_model_dir, prompts_file, tmp_path) -> None:
    res = invoke(["scan", str(prompts_file), "--endpoint", model_server.url, "--model", str(tiny_model_dir),
                  "--sweep", "--max-concurrency", "4", "--rounds", "1", "--limit", "4", "--max-new-tokens", "4",
                  "--long-prompt-tokens", "96", "--out", str(tmp_path / "o"), "-q", "--json"])
    assert res.exit_code == 0, stderr_of(res)
    card = json.loads(res.stdout)
    names = {(s["axis"], s["name"]): s for s in card["series"]}
    assert set(names) == {("repetition", "alone, run to run"), ("concurrency", "together"),
                          ("concurrency", "staggered"), ("cache", "cold"), ("cache", "warm"),
                          ("cache", "cold, long prompts"), ("cache", "warm, long prompts"),
                          ("depth", "prompts as given"), ("depth", "long prompts"),
                          ("route", "token ids (completions)"), ("route", "chat template (server)")}
    assert card["not_run"] == [] and card["engine"]["prefix_cache"]["switch"] == "cache_prompt"
    warm = names[("cache", "warm")]["rows"]
    assert [r["condition"] for r in warm] == ["warm-cache"] and warm[0]["sequences"] == 4
    long_rows = names[("depth", "long prompts")]["rows"]
    assert [r["level"] for r in long_rows] == [1, 4] and all(r["prompt_tokens"]["min"] >= 96 for r in long_rows)
    short = names[("depth", "prompts as given")]["rows"]
    assert short[0]["prompt_tokens"]["max"] < 96
    route = names[("route", "chat template (server)")]["rows"]
    assert [r["variant"] for r in route] == ["chat", "chat"]
    # the model server decodes every request alone, exactly: identical everywhere, nothing to bisect
    assert all(r["identical"]["k"] == r["identical"]["n"] for s in card["series"] for r in s["rows"])
    assert card["onsets"]["together"]["level"] is None and card["expectation"]["identical_up_to"] == 4
    files = {p.name for p in (tmp_path / "o").glob("trace-*.parquet")}
    assert {"trace-cache-0000-long.parquet", "trace-b0004-g0000-chat.parquet", "trace-s0004-g0000.parquet"} <= files


# --------------------------------------------------------------------------- bad input, politely


def test_bad_sweep_input_is_one_line(tmp_path, prompts_file) -> None:
    from mgaudit.endpoint.process import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    assert_one_line_error(invoke(["scan", str(prompts_file), "--endpoint", url, "--sweep", "--out",
                                  str(tmp_path / "o")]), "cannot reach the server", url)
    assert time.monotonic() - t0 < 5 and not (tmp_path / "o").exists()
    base = ["scan", str(prompts_file), "--out", str(tmp_path / "o")]
    for extra, needles in [
        (["--sweep"], ("--sweep", "--endpoint")),
        (["--sweep", "--endpoint", url, "--reference", "local"], ("--sweep", "--reference")),
        (["--sweep", "--endpoint", url, "--rounds", "0"], ("--rounds",)),
        (["--sweep", "--endpoint", url, "--max-concurrency", "1"], ("--max-concurrency",)),
        (["--sweep", "--endpoint", url, "--axes", "concurrency,speed"], ("--axes", "speed")),
        (["--sweep", "--endpoint", url, "--batch-sizes", "4"], ("--batch-sizes", "--sweep")),
        (["--endpoint", url, "--rounds", "2"], ("--rounds", "--sweep")),
        (["--sweep", "--endpoint", url, "--prefix-cache"], ("--prefix-cache", "--axes")),
    ]:
        assert_one_line_error(invoke(base + extra), *needles)
