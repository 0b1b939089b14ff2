"""Careless input: prompts past the model's context, batch sizes larger than the prompt set or the
memory, and a Hugging Face Hub that cannot be reached.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pandas as pd
import pytest
from cli_helpers import assert_one_line_error, invoke, scan_args, stderr_of, verify_args

import mgaudit.decoding.stock as engine

# --------------------------------------------------------------------------- prompts past the context


def _long_prompts(tmp_path: Path, words: int = 600) -> Path:
    p = tmp_path / "long.jsonl"
    recs = [{"id": "short-a", "prompt": "how many apples"}, {"id": "huge", "prompt": " ".join(["the"] * words)},
            {"id": "short-b", "prompt": "find the total"}, {"id": "short-c", "prompt": "list three words"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


def test_prompt_longer_than_context_is_refused_or_skipped(tmp_path, tiny_model_dir) -> None:
    prompts = _long_prompts(tmp_path)  # the tiny model has 512 positions
    out = tmp_path / "t"
    line = assert_one_line_error(invoke(scan_args(prompts, out, tiny_model_dir)), "huge", "512", "--skip-long")
    assert re.search(r"prompt huge is \d{3} tokens", line)
    assert not out.exists()

    res = invoke(scan_args(prompts, out, tiny_model_dir, "--skip-long", "--json"))
    assert res.exit_code == 0, stderr_of(res)
    assert "skipped 1 of 4 prompts" in stderr_of(res)
    df = pd.read_parquet(out)
    assert set(df["prompt_id"]) == {"short-a", "short-b", "short-c"}
    assert json.loads((out / "_scan.json").read_text())["provenance"]["prompts"]["skipped_too_long"] == ["huge"]

    # verify too, and the token budget counts: 500 words + 64 new tokens do not fit 512
    assert_one_line_error(invoke(verify_args(prompts, tiny_model_dir, "--policy", "none")), "huge")
    res = invoke(verify_args(prompts, tiny_model_dir, "--policy", "none", "--skip-long", "--json"))
    assert res.exit_code == 0 and json.loads(res.stdout)["summary"]["sequences"] == 3


def test_context_check_counts_new_tokens() -> None:
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


# --------------------------------------------------------------------------- huge batch sizes


def test_batch_sizes_above_the_prompt_count_are_capped(tmp_path, prompts_file, tiny_model_dir) -> None:
    out = tmp_path / "t"
    args = scan_args(prompts_file, out, tiny_model_dir, "--json")
    args[args.index("--batch-sizes") + 1] = "2,64"
    res = invoke(args)
    assert res.exit_code == 0, stderr_of(res)
    assert "64 exceed the 4 prompts: capped to 4" in stderr_of(res)
    summary = json.loads(res.stdout)
    assert [e["batch_size"] for e in summary["by_condition"]] == [2, 4]
    df = pd.read_parquet(out)
    assert sorted(set(df["batch_size"])) == [1, 2, 4]


def test_batch_that_cannot_fit_is_refused_before_decoding(tmp_path, prompts_file, tiny_model_dir,
                                                            monkeypatch) -> None:
    import mgaudit.resources as resources

    monkeypatch.setattr(resources, "available_bytes", lambda device: 1024)
    calls = {"n": 0}
    real = engine.padded_decode
    monkeypatch.setattr(engine, "padded_decode", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), real(*a, **k))[1])
    out = tmp_path / "t"
    line = assert_one_line_error(invoke(scan_args(prompts_file, out, tiny_model_dir)), "batch size 2", "free")
    assert "MiB" in line or "GiB" in line or "KiB" in line
    assert calls["n"] == 0 and not out.exists()
    assert_one_line_error(invoke(verify_args(prompts_file, tiny_model_dir, "--policy", "none")), "batch size 3")


def test_memory_estimate_grows_with_the_batch(tiny_lm) -> None:
    from mgaudit.resources import decode_bytes

    cfg = tiny_lm.model.config
    one = decode_bytes(cfg, 1, 100, 50, 2)
    eight = decode_bytes(cfg, 8, 100, 50, 2)
    assert one > 0 and eight == pytest.approx(8 * one, rel=0.01)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 150 * 2
    assert one > kv  # the K/V cache is only part of it
    assert decode_bytes(cfg, 1, 100, 50, 2, kept_logits_rows=10) - one == 10 * cfg.vocab_size * 2


# --------------------------------------------------------------------------- offline Hub


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
def test_hub_lookups_fail_in_seconds_with_one_line(tmp_path, prompts_file, tiny_model_dir, dead_hub, monkeypatch,
                                                      offline) -> None:
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    res = invoke(scan_args("hf:mgaudit-test/no-such-set", tmp_path / "t", tiny_model_dir))
    line = assert_one_line_error(res, "mgaudit-test/no-such-set", "local")
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached") in line
    res = invoke(verify_args(prompts_file, Path("mgaudit-test/no-such-model"), "--policy", "none"))
    assert_one_line_error(res, "mgaudit-test/no-such-model", "local")
    assert time.monotonic() - t0 < 15, "offline lookups must not wait for retries"
