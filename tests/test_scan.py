"""``mgaudit scan``: library and CLI, on the tiny random model (CPU)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from cli_helpers import assert_one_line_error as _assert_one_line_error
from cli_helpers import README, scan_config
from cli_helpers import invoke as _invoke
from cli_helpers import stderr_of as _stderr
import torch
from typer.testing import CliRunner

import mgaudit
import mgaudit.decoding.step as step_mod
from mgaudit.errors import MgauditError, ModelError, OutputError, PromptError, UsageError
from mgaudit.scan import ScanConfig, batch_groups, parse_batch_sizes, scan
from mgaudit.formats.traces import PROVENANCE_KEY

N_PROMPTS = 10  # conftest's prompts_file
SORT = ["mode", "batch_size", "prompt_index", "step"]


def _config(prompts: Path, out: Path, model_dir: Path, **kw) -> ScanConfig:
    base = dict(prompts=str(prompts), out=out, model=str(model_dir), dtype="bfloat16", device="cpu",
                batch_sizes=[2, 4], max_new_tokens=8)
    base.update(kw)
    return ScanConfig(**base)


def _frame(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out).sort_values(SORT).reset_index(drop=True)


def _trace_mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("trace-*.parquet"))}


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, tiny_model_dir, tiny_lm):
    """One scan of the prompts file at batch sizes 2 and 4, 8 new tokens (shared, read-only)."""
    from conftest import TINY_PROMPTS

    base = tmp_path_factory.mktemp("scan")
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"tiny-{i:02d}", "prompt": t}) + "\n"
                               for i, t in enumerate(TINY_PROMPTS)))
    out = base / "traces"
    result = scan(_config(prompts, out, tiny_model_dir), loaded=tiny_lm)
    return prompts, out, result


# --------------------------------------------------------------------------- the output


def test_output_opens_with_pandas_duckdb_and_pyarrow(scanned) -> None:
    import duckdb

    _, out, result = scanned
    df = pd.read_parquet(out)
    n = duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0]
    table = ds.dataset(str(out), format="parquet").to_table()
    assert len(df) == n == table.num_rows == result.summary["rows"] > 0
    assert set(df["mode"]) == {"solo", "sync", "free"}
    assert result.files_written == len(list(out.glob("trace-*.parquet")))
    assert result.files_skipped == 0
    assert not list(out.glob(".tmp-*"))


def test_flip_is_token_mismatch_on_every_row(scanned) -> None:
    import duckdb

    _, out, _ = scanned
    df = pd.read_parquet(out)
    assert (df["flip"] == (df["solo_token"] != df["batched_token"])).all()
    bad = duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet') "
                     "where flip <> (solo_token <> batched_token)").fetchall()[0][0]
    assert bad == 0
    solo = df[df["mode"] == "solo"]
    assert not solo["flip"].any() and (solo["solo_margin"] >= 0).all()
    assert solo["max_abs_logit_diff"].isna().all()


def test_sync_rows_follow_the_solo_length(scanned) -> None:
    _, out, _ = scanned
    df = pd.read_parquet(out)
    solo_len = df[df["mode"] == "solo"].groupby("prompt_id").size()
    assert len(solo_len) == N_PROMPTS and (solo_len <= 8).all()
    sync = df[df["mode"] == "sync"]
    per = sync.groupby(["prompt_id", "batch_size"]).size()
    for (pid, bs), n in per.items():
        assert n == solo_len[pid], (pid, bs)
    # Teacher forcing keeps the prefix: every sync step is compared against solo.
    assert sync["prefix_match"].all()
    assert sync["max_abs_logit_diff"].notna().all()
    assert all(math.isfinite(x) for x in sync["max_abs_logit_diff"])
    # The solo side of a sync row is the solo reference itself.
    solo = df[df["mode"] == "solo"].set_index(["prompt_id", "step"])
    for _, r in sync.iterrows():
        s = solo.loc[(r["prompt_id"], r["step"])]
        assert r["solo_token"] == s["solo_token"]
        assert r["solo_top1_logit"] == s["solo_top1_logit"]


def test_free_rows_cover_both_sides(scanned) -> None:
    _, out, _ = scanned
    df = pd.read_parquet(out)
    solo_len = df[df["mode"] == "solo"].groupby("prompt_id").size()
    free = df[df["mode"] == "free"]
    for (pid, bs), g in free.groupby(["prompt_id", "batch_size"]):
        assert list(g.sort_values("step")["step"]) == list(range(len(g)))
        assert len(g) >= solo_len[pid]
        g = g.sort_values("step")
        # prefix_match: every earlier token matched, so True up to and including
        # the first flip, False after it; logit diffs exist exactly where it is True.
        flips = list(g["flip"])
        upto = flips.index(True) + 1 if True in flips else len(flips)
        assert list(g["prefix_match"]) == [True] * upto + [False] * (len(flips) - upto)
        assert list(g["max_abs_logit_diff"].notna()) == list(g["prefix_match"])


def test_each_prompt_once_per_batch_size_and_mode(scanned) -> None:
    _, out, _ = scanned
    df = pd.read_parquet(out)
    # 10 prompts: batch size 4 leaves a short last batch (filled, not recorded twice).
    assert N_PROMPTS % 4 != 0
    for (bs, mode), g in df[df["mode"] != "solo"].groupby(["batch_size", "mode"]):
        per = g.groupby("prompt_id")[["batch_index", "row"]].nunique()
        assert sorted(per.index) == sorted(f"tiny-{i:02d}" for i in range(N_PROMPTS)), (bs, mode)
        assert (per["batch_index"] == 1).all() and (per["row"] == 1).all(), (bs, mode)
        assert (g.groupby("prompt_id")["step"].apply(lambda s: s.is_unique)).all()
    assert sorted(set(df["batch_size"])) == [1, 2, 4]
    pads = df[df["mode"] != "solo"]
    assert (pads["pad_len"] >= 0).all() and (pads["pad_len"] > 0).any()


def test_provenance_in_schema_metadata(scanned, tiny_model_dir) -> None:
    import torch
    import transformers

    _, out, _ = scanned
    for f in sorted(out.glob("trace-*.parquet")):
        meta = pq.read_schema(f).metadata
        prov = json.loads(meta[PROVENANCE_KEY])
        assert prov["model"]["name"] == tiny_model_dir.name
        assert prov["model"]["source"] == str(tiny_model_dir.resolve())
        assert prov["model"]["dtype"] == "bfloat16"
        assert prov["model"]["device"] == "cpu"
        assert prov["versions"]["torch"] == torch.__version__
        assert prov["versions"]["transformers"] == transformers.__version__
        assert prov["versions"]["mgaudit"] == mgaudit.__version__
        assert prov["mgaudit_version"] == mgaudit.__version__
        assert prov["config"]["max_new_tokens"] == 8 and prov["config"]["batch_sizes"] == [2, 4]
        assert prov["prompts"]["count"] == N_PROMPTS and len(prov["prompts"]["sha256"]) == 64


def test_summary_json(scanned) -> None:
    _, out, result = scanned
    summary = json.loads((out / "_summary.json").read_text())
    sizes = [e["batch_size"] for e in summary["by_condition"]]
    assert sizes == [2, 4]
    df = pd.read_parquet(out)
    for e in summary["by_condition"]:
        sync = df[(df["mode"] == "sync") & (df["batch_size"] == e["batch_size"])]
        assert e["sync"]["steps"] == len(sync)
        assert e["sync"]["flips"] == int(sync["flip"].sum())
        assert e["free"]["sequences"] == N_PROMPTS
    assert summary["solo"]["sequences"] == N_PROMPTS
    assert summary["rows"] == len(df)
    assert (out / "_scan.json").exists()
    assert result.summary["by_condition"] == summary["by_condition"]


def test_one_mode_only(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    out = tmp_path / "t"
    scan(_config(prompts_file, out, tiny_model_dir, batch_sizes=[3], modes=["sync"], limit=5), loaded=tiny_lm)
    df = pd.read_parquet(out)
    assert set(df["mode"]) == {"solo", "sync"}
    assert df["prompt_id"].nunique() == 5


def test_batch_larger_than_the_set(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    out = tmp_path / "t"
    scan(_config(prompts_file, out, tiny_model_dir, batch_sizes=[4], limit=3), loaded=tiny_lm)
    df = pd.read_parquet(out)
    for mode in ("sync", "free"):
        g = df[df["mode"] == mode]
        assert g.groupby("prompt_id")["row"].nunique().to_dict() == {f"tiny-{i:02d}": 1 for i in range(3)}
        assert (g.groupby("prompt_id")["step"].apply(lambda s: s.is_unique)).all()


# --------------------------------------------------------------------------- helpers


def test_batch_groups_cover_each_index_once() -> None:
    for n in (1, 3, 10, 16, 17):
        for b in (2, 4, 8):
            groups = batch_groups(n, b, seed=0)
            owned = [i for members, k in groups for i in members[:k]]
            assert sorted(owned) == list(range(n))
            assert all(len(m) == b for m, _ in groups)
            assert groups == batch_groups(n, b, seed=0)


def test_parse_batch_sizes() -> None:
    assert parse_batch_sizes("8,4, 4,16") == [4, 8, 16]
    for bad in ("4,x", "", ","):
        with pytest.raises(UsageError):
            parse_batch_sizes(bad)
    with pytest.raises(UsageError):
        ScanConfig(prompts="x", out=Path("o"), batch_sizes=[1]).validate()
    with pytest.raises(UsageError):
        ScanConfig(prompts="x", out=Path("o"), resume=True, overwrite=True).validate()


# --------------------------------------------------------------------------- resume / overwrite


def test_resume_rewrites_only_the_missing_file(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    out = tmp_path / "t"
    cfg = _config(prompts_file, out, tiny_model_dir)
    scan(cfg, loaded=tiny_lm)
    first = _frame(out)
    before = _trace_mtimes(out)
    victim = sorted(out.glob("trace-b*.parquet"))[2]
    victim.unlink()

    result = scan(_config(prompts_file, out, tiny_model_dir, resume=True), loaded=tiny_lm)
    assert result.files_written == 1 and result.files_skipped == len(before) - 1
    after = _trace_mtimes(out)
    assert set(after) == set(before)
    changed = [name for name in after if after[name] != before[name]]
    assert changed == [victim.name]
    pd.testing.assert_frame_equal(_frame(out), first)

    # Nothing left to do: a second resume writes nothing.
    again = scan(_config(prompts_file, out, tiny_model_dir, resume=True), loaded=tiny_lm)
    assert again.files_written == 0 and _trace_mtimes(out) == after


def test_non_empty_out_needs_resume_or_overwrite(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    out = tmp_path / "t"
    scan(_config(prompts_file, out, tiny_model_dir, batch_sizes=[2], limit=4), loaded=tiny_lm)
    with pytest.raises(OutputError, match="already holds") as info:
        scan(_config(prompts_file, out, tiny_model_dir, batch_sizes=[2], limit=4), loaded=tiny_lm)
    assert "`resume`" in info.value.one_line() and "`overwrite`" in info.value.one_line()
    # --overwrite starts over.
    result = scan(_config(prompts_file, out, tiny_model_dir, batch_sizes=[2], limit=4, overwrite=True),
                  loaded=tiny_lm)
    assert result.files_skipped == 0 and result.files_written == len(list(out.glob("trace-*.parquet")))


def test_resume_with_other_options_is_refused(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    out = tmp_path / "t"
    scan(_config(prompts_file, out, tiny_model_dir, batch_sizes=[2], limit=4), loaded=tiny_lm)
    before = _trace_mtimes(out)
    with pytest.raises(OutputError, match="max_new_tokens"):
        scan(_config(prompts_file, out, tiny_model_dir, batch_sizes=[2], limit=4, max_new_tokens=5, resume=True),
             loaded=tiny_lm)
    assert _trace_mtimes(out) == before


def test_cli_existing_output_exits_2(tmp_path, prompts_file, tiny_model_dir) -> None:
    out = tmp_path / "t"
    args = ["scan", str(prompts_file), "--out", str(out), "--model", str(tiny_model_dir), "--batch-sizes", "2",
            "--max-new-tokens", "2", "--limit", "2", "--device", "cpu", "--json"]
    assert _invoke(args).exit_code == 0
    result = _invoke(args)
    _assert_one_line_error(result, "--resume")
    assert _invoke(args + ["--resume"]).exit_code == 0
    assert _invoke(args + ["--overwrite"]).exit_code == 0


# --------------------------------------------------------------------------- interruption


def test_interrupted_scan_leaves_complete_files_and_resumes(tmp_path, prompts_file, tiny_model_dir, tiny_lm,
                                                             monkeypatch) -> None:
    from mgaudit.decoding import stock as engine

    ref = tmp_path / "ref"
    scan(_config(prompts_file, ref, tiny_model_dir), loaded=tiny_lm)
    out = tmp_path / "t"

    # scan imports padded_decode from mgaudit.decoding.stock at call time: count batched units
    # (the first padded_decode call of a unit is its sync pass) and raise inside the 2nd.
    real = engine.padded_decode
    calls = {"n": 0}

    def interrupting(model, prompts, *args, **kwargs):
        if kwargs.get("forced") is not None:
            calls["n"] += 1
            if calls["n"] == 2:
                def boom(step):
                    if step == 1:
                        raise KeyboardInterrupt
                kwargs["on_step"] = boom
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(engine, "padded_decode", interrupting)
    with pytest.raises(KeyboardInterrupt):
        scan(_config(prompts_file, out, tiny_model_dir), loaded=tiny_lm)
    monkeypatch.setattr(engine, "padded_decode", real)

    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    files = sorted(out.glob("trace-*.parquet"))
    # Solo references first, then the first batched unit; the second was interrupted.
    assert [f.name for f in files] == ["trace-b0002-g0000.parquet", "trace-solo-0000.parquet",
                                       "trace-solo-0001.parquet"]
    for f in files:
        pq.read_table(f)  # complete and readable
    assert len(pd.read_parquet(out)) > 0
    assert not (out / "_summary.json").exists()

    result = scan(_config(prompts_file, out, tiny_model_dir, resume=True), loaded=tiny_lm)
    assert result.files_skipped == len(files)
    assert sorted(p.name for p in out.glob("trace-*.parquet")) == sorted(p.name for p in ref.glob("trace-*.parquet"))
    assert (out / "_summary.json").exists()
    pd.testing.assert_frame_equal(_frame(out), _frame(ref))


def test_interrupt_during_write_leaves_no_temp_file(tmp_path, prompts_file, tiny_model_dir, tiny_lm,
                                                    monkeypatch) -> None:
    from mgaudit.formats import files

    out = tmp_path / "t"
    real = files.os.replace
    calls = {"n": 0}

    def replace(src, dst):
        if str(dst).endswith(".parquet"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        scan(_config(prompts_file, out, tiny_model_dir, batch_sizes=[2]), loaded=tiny_lm)
    monkeypatch.undo()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert len(list(out.glob("trace-*.parquet"))) == 2
    result = scan(_config(prompts_file, out, tiny_model_dir, batch_sizes=[2], resume=True), loaded=tiny_lm)
    assert result.files_skipped == 2 and result.files_written > 0


def test_cli_interrupt_exits_130_and_resume_finishes(tmp_path, prompts_file, tiny_model_dir, monkeypatch) -> None:
    from mgaudit.decoding import stock as engine

    real = engine.padded_decode
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        if kwargs.get("forced") is not None:  # solo_decode calls padded_decode too: count sync passes
            calls["n"] += 1
            if calls["n"] == 2:  # the 2nd batched unit
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "t"
    args = ["scan", str(prompts_file), "--out", str(out), "--model", str(tiny_model_dir), "--batch-sizes", "2",
            "--max-new-tokens", "2", "--limit", "4", "--device", "cpu", "--json"]
    monkeypatch.setattr(engine, "padded_decode", interrupting)
    result = _invoke(args)
    monkeypatch.setattr(engine, "padded_decode", real)
    assert result.exit_code == 130, (result.output, result.exception)
    assert "--resume" in _stderr(result) and "Traceback" not in _stderr(result)
    assert len(list(out.glob("trace-b*.parquet"))) == 1
    assert _invoke(args + ["--resume"]).exit_code == 0
    assert len(list(out.glob("trace-b*.parquet"))) == 2


# --------------------------------------------------------------------------- CLI


def test_cli_scan_json(tmp_path, prompts_file, tiny_model_dir) -> None:
    out = tmp_path / "t"
    result = _invoke(["scan", str(prompts_file), "--out", str(out), "--model", str(tiny_model_dir),
                      "--batch-sizes", "2", "--max-new-tokens", "4", "--device", "cpu", "--json"])
    assert result.exit_code == 0, (result.output, _stderr(result), result.exception)
    stdout = result.stdout
    summary = json.loads(stdout)
    assert [e["batch_size"] for e in summary["by_condition"]] == [2]
    assert summary["solo"]["sequences"] == N_PROMPTS
    assert summary["provenance"]["model"]["name"] == tiny_model_dir.name
    df = pd.read_parquet(out)
    assert len(df) == summary["rows"] and df["step"].max() <= 3


def test_cli_scan_table(tmp_path, prompts_file, tiny_model_dir) -> None:
    out = tmp_path / "t"
    result = _invoke(["scan", str(prompts_file), "--out", str(out), "--model", str(tiny_model_dir),
                      "--batch-sizes", "2", "--max-new-tokens", "2", "--limit", "4", "--device", "cpu"])
    assert result.exit_code == 0, (result.output, _stderr(result), result.exception)
    assert "scan: tiny_prompts on tiny-llama" in result.stdout and "reference: 4 sequences" in result.stdout


def _bad_model(tmp: Path, prompts: Path, model: Path) -> tuple[list[str], tuple[str, ...]]:
    return ["scan", str(prompts), "--out", str(tmp / "o"), "--model", "/nonexistent/x"], ("/nonexistent/x",)


def _malformed(tmp: Path, prompts: Path, model: Path):
    bad = tmp / "broken.jsonl"
    bad.write_text('{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": "two"}\n{"id": "c", "prompt": \n'
                   '{"id": "d", "prompt": "four"}\n')
    return ["scan", str(bad), "--out", str(tmp / "o"), "--model", str(model)], ("broken.jsonl", "line 3")


def _empty(tmp: Path, prompts: Path, model: Path):
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    return ["scan", str(empty), "--out", str(tmp / "o"), "--model", str(model)], ("empty",)


def _batch_x(tmp: Path, prompts: Path, model: Path):
    return ["scan", str(prompts), "--out", str(tmp / "o"), "--model", str(model), "--batch-sizes", "4,x"], \
        ("--batch-sizes",)


def _batch_1(tmp: Path, prompts: Path, model: Path):
    return ["scan", str(prompts), "--out", str(tmp / "o"), "--model", str(model), "--batch-sizes", "1"], \
        ("--batch-sizes",)


def _out_under_file(tmp: Path, prompts: Path, model: Path):
    f = tmp / "somefile"
    f.write_text("x")
    return ["scan", str(prompts), "--out", str(f / "sub"), "--model", str(model)], ("--out", "somefile")


def _out_is_file(tmp: Path, prompts: Path, model: Path):
    f = tmp / "afile.parquet"
    f.write_text("x")
    return ["scan", str(prompts), "--out", str(f), "--model", str(model)], ("--out", "not a directory")


CLI_ERRORS = [_bad_model, _malformed, _empty, _batch_x, _batch_1, _out_under_file, _out_is_file]


@pytest.mark.parametrize("case", CLI_ERRORS, ids=[c.__name__.lstrip("_") for c in CLI_ERRORS])
def test_cli_errors_exit_2_with_one_line(tmp_path, prompts_file, tiny_model_dir, case) -> None:
    args, needles = case(tmp_path, prompts_file, tiny_model_dir)
    args = args + ["--device", "cpu", "--max-new-tokens", "2"]
    _assert_one_line_error(_invoke(args), *needles)


@pytest.mark.parametrize("case", [_bad_model, _malformed, _out_is_file], ids=["bad_model", "malformed", "out_is_file"])
def test_cli_debug_raises(tmp_path, prompts_file, tiny_model_dir, case) -> None:
    args, _ = case(tmp_path, prompts_file, tiny_model_dir)
    result = _invoke(["--debug"] + args + ["--device", "cpu", "--max-new-tokens", "2"])
    assert result.exit_code != 2
    assert isinstance(result.exception, MgauditError), result.exception
    assert not isinstance(result.exception, SystemExit)
    # And it really propagates out of the app.
    from mgaudit.cli import app

    with pytest.raises(MgauditError):
        CliRunner().invoke(app, ["--debug"] + args + ["--device", "cpu"], catch_exceptions=False)
    # Without --debug again: back to the one-line message.
    _assert_one_line_error(_invoke(args + ["--device", "cpu"]))


def test_library_errors_are_typed(tmp_path, prompts_file, tiny_model_dir) -> None:
    with pytest.raises(ModelError):
        scan(_config(prompts_file, tmp_path / "o", "/nonexistent/x"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PromptError):
        scan(_config(empty, tmp_path / "o2", tiny_model_dir))
    assert not (tmp_path / "o2").exists()  # prompts are checked before --out is touched



def test_resume_with_other_modes_is_refused_or_completes(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    out = tmp_path / "t"
    scan(_config(prompts_file, out, tiny_model_dir, batch_sizes=[2], limit=4, modes=["sync"]), loaded=tiny_lm)
    sorted(out.glob("trace-b*.parquet"))[0].unlink()
    try:
        scan(_config(prompts_file, out, tiny_model_dir, batch_sizes=[2], limit=4, modes=["sync", "free"],
                     resume=True), loaded=tiny_lm)
    except OutputError:
        return  # refused: fine
    df = pd.read_parquet(out)
    # Accepted: then every prompt must have rows in both modes.
    assert df[df["mode"] == "free"]["prompt_id"].nunique() == 4


# --------------------------------------------------------------------------- resume with other batch sizes


def test_resume_with_new_batch_sizes_records_the_union(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    out = tmp_path / "t"
    scan(scan_config(prompts_file, out, tiny_model_dir, batch_sizes=[2]), loaded=tiny_lm)
    logs: list[str] = []
    res = scan(scan_config(prompts_file, out, tiny_model_dir, batch_sizes=[3], resume=True), loaded=tiny_lm,
               log=logs.append)
    manifest = json.loads((out / "_scan.json").read_text())
    assert manifest["batch_sizes"] == [2, 3]
    assert [e["batch_size"] for e in res.summary["by_condition"]] == [2, 3]
    assert sorted(set(pd.read_parquet(out)["batch_size"])) == [1, 2, 3]
    assert any("now covers 2, 3" in m for m in logs)
    with pytest.raises(OutputError) as ei:
        scan(scan_config(prompts_file, out, tiny_model_dir, max_new_tokens=5, resume=True), loaded=tiny_lm)
    assert "max_new_tokens was 3, now 5" in ei.value.message
    # --resume on a folder that does not exist yet simply starts the scan
    fresh = tmp_path / "fresh"
    assert scan(scan_config(prompts_file, fresh, tiny_model_dir, resume=True), loaded=tiny_lm).files_skipped == 0


# --------------------------------------------------------------------------- free-mode flips


def _force_batched_flip(monkeypatch, at_call: int = 2) -> None:
    """At every ``at_call``-th batched decode step of a padded batch, row 0's runner-up wins."""
    real = step_mod.forward_last
    state = {"n": 0}

    def wrapper(model, input_ids, attention_mask, position_ids, cache):
        logits = real(model, input_ids, attention_mask, position_ids, cache)
        if input_ids.shape[0] > 1 and input_ids.shape[1] == 1:
            state["n"] += 1
            if state["n"] % 6 == at_call:
                logits = logits.float()
                top = torch.topk(logits[0], 2)
                logits[0, top.indices[1]] = top.values[0] + 0.5
        return logits

    monkeypatch.setattr(step_mod, "forward_last", wrapper)


def test_first_divergence_marks_one_step_per_parted_sequence(tmp_path, prompts_file, tiny_model_dir, tiny_lm,
                                                                monkeypatch) -> None:
    import duckdb

    out = tmp_path / "t"
    _force_batched_flip(monkeypatch)
    res = scan(scan_config(prompts_file, out, tiny_model_dir, max_new_tokens=8, limit=6), loaded=tiny_lm)
    df = pd.read_parquet(out)
    sync, free = df[df["mode"] == "sync"], df[df["mode"] == "free"]
    assert (sync["first_divergence"] == sync["flip"]).all()
    assert not df[df["mode"] == "solo"]["first_divergence"].any()
    parted = 0
    for _, g in free.groupby(["prompt_id", "batch_size"]):
        g = g.sort_values("step")
        firsts = g[g["first_divergence"]]
        if g["flip"].any():
            parted += 1
            assert len(firsts) == 1 and firsts["step"].iloc[0] == g[g["flip"]]["step"].min()
        else:
            assert firsts.empty
    assert parted >= 1 and free["flip"].sum() > free["first_divergence"].sum()  # flip overcounts, this does not
    # the README's DuckDB queries give the summary's figures
    block = README[README.index("per-step flip rate"):]
    queries = re.findall(r"```sql\n(.*?)```", block, re.S)[:2]
    assert len(queries) == 2
    rate = {(c, b): v for c, b, v in duckdb.sql(queries[0].replace("DIR", str(out))).fetchall()}
    diverged = {(c, b): v for c, b, v in duckdb.sql(queries[1].replace("DIR", str(out))).fetchall()}
    assert set(rate) == {(e["condition"], e["batch_size"]) for e in res.summary["by_condition"]}
    for e in res.summary["by_condition"]:
        assert rate[e["condition"], e["batch_size"]] == pytest.approx(e["sync"]["flip_rate"])
        assert diverged[e["condition"], e["batch_size"]] == e["free"]["sequences_diverged"]
