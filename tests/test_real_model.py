"""The default model (SmolLM2-135M-Instruct, bfloat16, CPU): scan against ``generate``.

All tests are ``slow``: run them with ``pytest -m slow tests/test_real_model.py``.
Sizes are kept small so the file runs in about two minutes on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import cut_after_eos
from mgaudit.decoding.stock import solo_decode
from mgaudit.prompts import encode_prompt, load_prompts
from mgaudit.scan import ScanConfig, scan

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parent / "data"
MAX_NEW = 32
N_MATH = 8


@pytest.fixture(scope="module")
def math_scan(tmp_path_factory, real_lm):
    """8 ``math`` prompts (of different lengths) in one batch of 8, 32 tokens, sync and free."""
    out = tmp_path_factory.mktemp("real") / "math"
    config = ScanConfig(prompts="math", out=out, model="smollm2", dtype="bfloat16", device="cpu",
                        batch_sizes=[8], max_new_tokens=MAX_NEW, limit=N_MATH, modes=["sync", "free"])
    result = scan(config, loaded=real_lm)
    return out, result, pd.read_parquet(out)


def test_scan_solo_tokens_equal_generate(math_scan, real_lm) -> None:
    _, _, df = math_scan
    solo = df[df["mode"] == "solo"]
    eos = real_lm.eos_token_ids
    assert eos
    for p in load_prompts("math", limit=3).prompts:
        ids = encode_prompt(real_lm.tokenizer, p)
        with torch.inference_mode():
            out = real_lm.model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                do_sample=False,
                max_new_tokens=MAX_NEW,
                eos_token_id=eos,
                pad_token_id=real_lm.pad_token_id,
            )
        want = cut_after_eos(out[0, len(ids):].tolist(), set(eos))
        got = solo[solo["prompt_id"] == p.id].sort_values("step")["solo_token"].tolist()
        assert got == want, p.id
        row = solo[solo["prompt_id"] == p.id].iloc[0]
        assert row["prompt_len"] == len(ids)


@pytest.mark.parametrize("set_name", ["chat", "code"])
def test_the_loop_solo_equals_generate_at_64_tokens(real_lm, set_name) -> None:
    """The one loop's solo mode (decoding.stock.solo_decode) is stock ``generate(do_sample=False)`` at
    batch size 1, token for token, on every prompt of the sample set."""
    eos = real_lm.eos_token_ids
    for p in load_prompts(set_name).prompts:
        ids = encode_prompt(real_lm.tokenizer, p)
        with torch.inference_mode():
            out = real_lm.model.generate(input_ids=torch.tensor([ids]),
                                         attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                                         do_sample=False, max_new_tokens=64, eos_token_id=eos,
                                         pad_token_id=real_lm.pad_token_id)
        want = cut_after_eos(out[0, len(ids):].tolist(), set(eos))
        assert solo_decode(real_lm.model, ids, 64, eos).tokens == want, p.id


def test_math_scan_rows_are_consistent(math_scan) -> None:
    _, result, df = math_scan
    assert set(df["mode"]) == {"solo", "sync", "free"}
    assert (df["flip"] == (df["solo_token"] != df["batched_token"])).all()
    solo = df[df["mode"] == "solo"]
    assert solo["prompt_id"].nunique() == N_MATH
    assert (solo["solo_margin"] >= 0).all()
    assert (solo["solo_top1_logit"] >= solo["solo_top2_logit"]).all()
    for mode in ("sync", "free"):
        g = df[df["mode"] == mode]
        assert g["prompt_id"].nunique() == N_MATH and (g["batch_size"] == 8).all()
        assert g["pad_len"].max() > 0  # the prompts have different lengths
    sync = df[df["mode"] == "sync"]
    assert (sync.groupby("prompt_id").size() == solo.groupby("prompt_id").size()).all()
    assert sync["max_abs_logit_diff"].notna().all()
    entry = result.summary["by_condition"][0]
    assert entry["condition"] == "padded" and entry["batch_size"] == 8
    assert entry["sync"]["steps"] == len(sync) and entry["sync"]["flips"] == int(sync["flip"].sum())
    assert entry["free"]["sequences"] == N_MATH


@pytest.mark.parametrize("name", ["heldout_chat.jsonl", "heldout_competition_math.jsonl"])
def test_heldout_sets_scan(tmp_path, real_lm, name) -> None:
    out = tmp_path / "t"
    config = ScanConfig(prompts=str(DATA / name), out=out, model="smollm2", dtype="bfloat16", device="cpu",
                        batch_sizes=[2], max_new_tokens=8, limit=3)
    result = scan(config, loaded=real_lm)
    df = pd.read_parquet(out)
    assert df["prompt_id"].nunique() == 3
    assert set(df["mode"]) == {"solo", "sync", "free"}
    assert (df["flip"] == (df["solo_token"] != df["batched_token"])).all()
    assert result.summary["solo"]["sequences"] == 3
    assert (out / "_summary.json").exists()
