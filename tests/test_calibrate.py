"""mgaudit calibrate: fitting tau, figures, gate.json, transfer, plot and refusals."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from cli_helpers import assert_one_line_error, invoke, scan_config
from typer.testing import CliRunner

from mgaudit.commands.calibrate import _tau
from mgaudit.calibrate import (
    CalibrateConfig,
    calibrate,
    candidate_table,
    figures_at,
    just_above,
)
from mgaudit.errors import GateError, TraceError, UsageError
from mgaudit.formats.gate import load_gate
from mgaudit.formats.parquet import atomic_write_table
from mgaudit.formats.traces import rows_to_table
from mgaudit.scan import scan

PROV = {"model": {"name": "tiny", "sha256": "x", "dtype": "bfloat16"}, "device": "cpu",
        "versions": {"torch": "0", "transformers": "0"}}
OTHER = {"model": {"name": "other", "sha256": "y", "dtype": "float16"}}

# flips of the fit set (sync rows), by batch size; free-mode flips at a large margin must be ignored
FLIPS_FIT = {4: [0.03125, 0.25], 8: [0.125, 0.40625, 0.0]}
FLIPS_EVAL = {4: [0.5, 0.0625], 8: [0.1875]}
FREE_FLIP_MARGIN = 5.0


def _row(prompt: int, bs: int, mode: str, step: int, margin: float, flip: bool, diff: float | None) -> dict:
    prefix = mode != "free" or not flip
    return {
        "prompt_id": f"p{prompt}", "prompt_index": prompt, "condition": "alone" if mode == "solo" else "padded",
        "batch_size": bs, "round": 0, "mode": mode,
        "batch_index": prompt // bs, "row": prompt % bs, "pad_len": 0, "prompt_len": 7, "step": step,
        "solo_token": 11, "batched_token": 12 if flip else 11,
        "solo_runner_up": 12, "batched_runner_up": 11 if flip else 12,
        "solo_top1_logit": 10.0, "solo_top2_logit": 10.0 - margin,
        "batched_top1_logit": 10.0, "batched_top2_logit": 10.0 - margin,
        "solo_margin": margin, "batched_margin": margin, "flip": flip, "prefix_match": prefix,
        "first_divergence": flip and prefix, "max_abs_logit_diff": diff, "severity": None,
    }


def make_rows(flips: dict[int, list[float]], seed: int = 0, prompts: int = 16, steps: int = 40,
              free_flip: bool = True) -> list[dict]:
    """Solo, sync and free rows; the sync flips sit at the given margins, the rest are stable."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(prompts):
        for s in range(steps):
            rows.append(_row(p, 1, "solo", s, float(rng.exponential(3.0)), False, None))
    for bs, fm in flips.items():
        queue = list(fm)
        for p in range(prompts):
            for s in range(steps):
                diff = float(rng.uniform(0.0, 0.1))
                if queue and s == 5 and p % 3 == 0:
                    rows.append(_row(p, bs, "sync", s, queue.pop(), True, diff))
                else:
                    rows.append(_row(p, bs, "sync", s, float(rng.exponential(3.0)), False, diff))
        assert not queue, "not enough slots for the flips"
        for s in range(steps):
            flip = free_flip and s == 3
            rows.append(_row(0, bs, "free", s, FREE_FLIP_MARGIN if flip else 2.0, flip, None if s > 3 else 0.01))
    return rows


def write_traces(d: Path, rows: list[dict], prov: dict = PROV, files: int = 2) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    chunk = math.ceil(len(rows) / files)
    for i in range(files):
        atomic_write_table(d / f"trace-{i:05d}.parquet", rows_to_table(rows[i * chunk:(i + 1) * chunk], prov))
    return d


@pytest.fixture
def fit_dir(tmp_path: Path) -> Path:
    return write_traces(tmp_path / "math", make_rows(FLIPS_FIT, seed=1))


@pytest.fixture
def eval_dir(tmp_path: Path) -> Path:
    return write_traces(tmp_path / "code", make_rows(FLIPS_EVAL, seed=2))


def sync_frame(d: Path) -> pd.DataFrame:
    df = pd.read_parquet(d)
    return df[df["mode"] == "sync"]


def run_cli(*args: str):
    from mgaudit.cli import app

    return CliRunner().invoke(app, ["calibrate", *map(str, args)])


def all_flip_margins(flips: dict[int, list[float]]) -> list[float]:
    return [m for v in flips.values() for m in v]


# ------------------------------------------------------------------ library


def test_recall_covers_every_flip(fit_dir: Path) -> None:
    res = calibrate(CalibrateConfig(traces=[fit_dir]))
    df = sync_frame(fit_dir)
    flip_margins = df.loc[df["flip"], "batched_margin"].to_numpy()
    assert len(flip_margins) == len(all_flip_margins(FLIPS_FIT))
    assert (flip_margins < res.threshold).all()
    assert res.method == "recall"
    assert res.threshold == pytest.approx(just_above(max(all_flip_margins(FLIPS_FIT))) + 0.0625)
    assert res.threshold < FREE_FLIP_MARGIN  # free-mode flips are not used
    f = res.figures
    assert (f["steps"], f["flips"], f["flips_covered"], f["flips_missed"], f["recall"]) == (len(df), 5, 5, 0, 1.0)
    assert sum(v["steps"] for v in f["per_batch_size"].values()) == f["steps"]
    assert {k: v["flips"] for k, v in f["per_batch_size"].items()} == {"4": 2, "8": 3}
    # both taus are always reported
    assert res.recall_tau == res.threshold and res.bound_tau is not None


def test_zero_safety_is_strict_in_float32(fit_dir: Path) -> None:
    res = calibrate(CalibrateConfig(traces=[fit_dir], safety=0.0))
    top = np.float32(max(all_flip_margins(FLIPS_FIT)))
    assert res.threshold == just_above(top)
    assert top < np.float32(res.threshold) and float(top) < res.threshold
    assert res.figures["recall"] == 1.0
    # one float32 step lower would miss the top flip
    lower = candidate_table(pa.Table.from_pandas(sync_frame(fit_dir)), [float(top)])[0]
    assert lower["flips_missed"] == 1


def test_partial_target_recall_is_the_smallest_tau(fit_dir: Path) -> None:
    res = calibrate(CalibrateConfig(traces=[fit_dir], target_recall=0.6, safety=0.0))
    # 5 flips, 60% -> 3 must be covered: margins sorted 0, 0.03125, 0.125, ...
    assert res.threshold == just_above(0.125)
    assert res.figures["flips_covered"] == 3 and res.figures["recall"] == pytest.approx(0.6)


def test_bound_method_uses_factor_times_quantile(tmp_path: Path, fit_dir: Path) -> None:
    df = sync_frame(fit_dir)
    b = np.quantile(df["max_abs_logit_diff"].to_numpy(dtype=np.float64), 0.999)
    res = calibrate(CalibrateConfig(traces=[fit_dir], method="bound"))
    assert res.method == "bound"
    assert res.threshold == pytest.approx(2.0 * b)  # no safety added
    assert res.fit["bound_B"] == pytest.approx(b)
    res3 = calibrate(CalibrateConfig(traces=[fit_dir], method="bound", bound_factor=3.0, bound_quantile=0.5))
    assert res3.threshold == pytest.approx(3.0 * np.quantile(df["max_abs_logit_diff"].to_numpy(np.float64), 0.5))
    # bound needs no flips
    quiet = write_traces(tmp_path / "quiet", make_rows({4: []}, free_flip=False))
    res_q = calibrate(CalibrateConfig(traces=[quiet], method="bound"))
    assert res_q.recall_tau is None and res_q.figures["flips"] == 0 and res_q.figures["recall"] is None
    assert res_q.threshold > 0


def test_figures_and_candidates_agree_with_pandas(fit_dir: Path) -> None:
    df = sync_frame(fit_dir)
    table = pa.Table.from_pandas(df, preserve_index=False)
    for tau in (0.0, 0.1, 0.3, 1.0, 4.0):
        fig = figures_at(table, tau)
        cand = candidate_table(table, [tau])[0]
        below = df["batched_margin"] < tau
        assert fig["trigger_rate"] == pytest.approx(below.mean()) == cand["trigger_rate"]
        assert fig["flips_missed"] == int((df["flip"] & ~below).sum()) == cand["flips_missed"]
        assert fig["recall"] == pytest.approx((df["flip"] & below).sum() / df["flip"].sum())


def test_candidates_include_grid_and_chosen(fit_dir: Path) -> None:
    res = calibrate(CalibrateConfig(traces=[fit_dir]))
    taus = [c["tau"] for c in res.candidates]
    assert taus == sorted(taus)
    for t in (0.0, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, res.threshold, res.bound_tau):
        assert t in taus
    for m in all_flip_margins(FLIPS_FIT):
        assert just_above(m) in taus
    recalls = [c["recall"] for c in res.candidates]
    assert recalls == sorted(recalls)


def test_batch_size_filter(fit_dir: Path) -> None:
    res = calibrate(CalibrateConfig(traces=[fit_dir], batch_sizes=[4], safety=0.0))
    assert res.threshold == just_above(max(FLIPS_FIT[4]))
    assert list(res.figures["per_batch_size"]) == ["4"]
    with pytest.raises(TraceError, match="batch size"):
        calibrate(CalibrateConfig(traces=[fit_dir], batch_sizes=[16]))


def test_transfer_to_eval_set(fit_dir: Path, eval_dir: Path) -> None:
    res = calibrate(CalibrateConfig(traces=[fit_dir], eval_traces=[eval_dir]))
    assert len(res.transfer) == 1
    t = res.transfer[0]
    df = sync_frame(eval_dir)
    below = df["batched_margin"] < res.threshold
    assert t["traces"] == str(eval_dir)
    assert t["steps"] == len(df) and t["flips"] == 3
    assert t["trigger_rate"] == pytest.approx(below.mean())
    # 0.5 is above the fitted tau (0.40625+ + 0.0625) -> one flip missed
    assert t["flips_missed"] == 1 and t["recall"] == pytest.approx(2 / 3)


def test_usage_errors(fit_dir: Path) -> None:
    # the library names the parameter (the CLI shows it as the flag: test_layering)
    for kw, name in ((dict(target_recall=0.0), "`target_recall`"), (dict(target_recall=1.5), "`target_recall`"),
                     (dict(safety=-0.1), "`safety`"), (dict(method="nope"), "`method`"),
                     (dict(bound_quantile=0.0), "`bound_quantile`"), (dict(bound_factor=0.0), "`bound_factor`")):
        with pytest.raises(UsageError, match=name):
            calibrate(CalibrateConfig(traces=[fit_dir], **kw))


# ------------------------------------------------------------------ CLI, gate.json, plot


def test_cli_json_trigger_rate_matches_parquet(tmp_path: Path, fit_dir: Path) -> None:
    gate_path = tmp_path / "out" / "gate.json"
    r = run_cli(fit_dir, "--out", gate_path, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    df = sync_frame(fit_dir)
    thr = np.float32(data["threshold"])  # tau is a float32 number, compared with float32 margins
    margins = df["batched_margin"].to_numpy(dtype=np.float32)
    assert (margins[df["flip"].to_numpy()] < thr).all()
    expected = (margins < thr).mean()
    assert data["figures"]["trigger_rate"] == pytest.approx(expected)
    gate = json.loads(gate_path.read_text())
    assert gate["calibration"]["trigger_rate"] == pytest.approx(expected)
    assert gate["threshold"] == data["threshold"]


def test_cli_tables_and_words(tmp_path: Path, fit_dir: Path, eval_dir: Path) -> None:
    r = run_cli(fit_dir, "--eval", eval_dir)
    assert r.exit_code == 0, r.output
    res = calibrate(CalibrateConfig(traces=[fit_dir]))
    df = sync_frame(fit_dir)
    rate = (df["batched_margin"] < res.threshold).mean()
    assert "tau candidates" in r.stdout
    assert f"chosen tau = {_tau(res.threshold)}" in r.stdout
    assert f"trigger rate {100 * rate:.2f}%" in r.stdout
    assert "transfer" in r.stdout and "66.67%" in r.stdout  # 2 of the 3 eval flips
    assert not (tmp_path / "gate.json").exists()  # --out is optional


def test_gate_json_round_trip(tmp_path: Path, fit_dir: Path) -> None:
    out = tmp_path / "gate.json"
    res = calibrate(CalibrateConfig(traces=[fit_dir], out=out))
    gate = load_gate(out)
    assert gate["format"] == "mgaudit.gate" and gate["version"] == 1
    assert gate["threshold"] == res.threshold  # load_gate: the exact float32 value
    assert gate["metric"] == "batched_margin"
    assert gate["rule"] == "verify when batched_margin < threshold"
    assert gate["method"] == "recall"
    assert {k: np.float32(v) for k, v in gate["alternatives"].items()} == {"recall": np.float32(res.recall_tau),
                                                                          "bound": np.float32(res.bound_tau)}
    assert gate["parameters"]["safety"] == 0.0625 and gate["parameters"]["target_recall"] == 1.0
    for k in ("steps", "flips", "recall", "trigger_rate", "flips_missed", "per_batch_size"):
        assert gate["calibration"][k] == res.figures[k]
    assert [t["path"] for t in gate["traces"]] == ["math"]  # relative to the gate file's folder
    assert gate["provenance"] == PROV
    assert gate["created"] and gate["mgaudit_version"]
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write leaves no temp file


def test_plot_is_written(tmp_path: Path, fit_dir: Path) -> None:
    import matplotlib.image as mpimg

    png = tmp_path / "figs" / "calibration.png"
    r = run_cli(fit_dir, "--plot", png)
    assert r.exit_code == 0, r.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    img = mpimg.imread(png)
    assert img.ndim == 3 and float(np.std(img)) > 0


def test_eval_of_other_model_is_refused(tmp_path: Path, fit_dir: Path) -> None:
    other = write_traces(tmp_path / "other", make_rows(FLIPS_EVAL), prov=OTHER)
    with pytest.raises(TraceError, match="different models"):
        calibrate(CalibrateConfig(traces=[fit_dir], eval_traces=[other]))
    r = run_cli(fit_dir, "--eval", other)
    assert r.exit_code == 2
    assert str(other) in r.stderr and r.stderr.strip().count("\n") == 0


def _bad_nonexistent(tmp: Path) -> tuple[list[Path], str]:
    return [tmp / "nope"], "no such trace"


def _bad_empty_dir(tmp: Path) -> tuple[list[Path], str]:
    (tmp / "empty").mkdir()
    return [tmp / "empty"], "no trace-"


def _bad_schema(tmp: Path) -> tuple[list[Path], str]:
    d = tmp / "wrong"
    d.mkdir()
    atomic_write_table(d / "trace-00000.parquet", pa.table({"prompt_id": ["a"], "margin": [0.5]}))
    return [d], "missing column"


def _bad_no_flips(tmp: Path) -> tuple[list[Path], str]:
    return [write_traces(tmp / "quiet", make_rows({4: [], 8: []}, free_flip=True))], "no flips in 1280 synchronous steps"


def _bad_mixed(tmp: Path) -> tuple[list[Path], str]:
    a = write_traces(tmp / "a", make_rows(FLIPS_FIT))
    b = write_traces(tmp / "b", make_rows(FLIPS_FIT), prov=OTHER)
    return [a, b], "different models"


def _bad_mixed_in_one_dir(tmp: Path) -> tuple[list[Path], str]:
    d = write_traces(tmp / "a", make_rows(FLIPS_FIT), files=1)
    atomic_write_table(d / "trace-00009.parquet", rows_to_table(make_rows(FLIPS_FIT)[:10], OTHER))
    return [d], "different models"


def _bad_no_sync(tmp: Path) -> tuple[list[Path], str]:
    rows = [r for r in make_rows(FLIPS_FIT) if r["mode"] != "sync"]
    return [write_traces(tmp / "nosync", rows)], "no synchronous"


def _bad_no_rows(tmp: Path) -> tuple[list[Path], str]:
    return [write_traces(tmp / "zero", [], files=1)], "no rows"


@pytest.mark.parametrize("case", [_bad_nonexistent, _bad_empty_dir, _bad_schema, _bad_no_flips, _bad_mixed,
                                  _bad_mixed_in_one_dir, _bad_no_sync, _bad_no_rows],
                         ids=lambda f: f.__name__[5:])
def test_bad_traces_exit_2_one_line(tmp_path: Path, case) -> None:
    paths, needle = case(tmp_path)
    r = run_cli(*paths)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert err.count("\n") == 0, err
    assert needle in err
    assert str(paths[-1]) in err or str(paths[0]) in err
    assert "Traceback" not in r.output
    assert r.stdout == ""


def test_no_flips_message_suggests_bound(tmp_path: Path) -> None:
    paths, _ = _bad_no_flips(tmp_path)
    r = run_cli(*paths)
    assert "--method bound" in r.stderr
    # and the suggestion works
    assert run_cli(*paths, "--method", "bound").exit_code == 0


@pytest.mark.parametrize("args,flag", [(["--target-recall", "0"], "--target-recall"),
                                       (["--target-recall", "1.01"], "--target-recall"),
                                       (["--safety", "-1"], "--safety"),
                                       (["--method", "median"], "--method")])
def test_cli_usage_errors(fit_dir: Path, args: list[str], flag: str) -> None:
    r = run_cli(fit_dir, *args)
    assert r.exit_code == 2
    assert flag in r.stderr and r.stderr.strip().count("\n") == 0


def test_out_is_a_directory(tmp_path: Path, fit_dir: Path) -> None:
    r = run_cli(fit_dir, "--out", tmp_path)
    assert r.exit_code == 2 and "is a directory" in r.stderr


# ------------------------------------------------------------------ load_gate


def _gate(tmp: Path, obj) -> Path:
    p = tmp / "gate.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


GOOD = {"format": "mgaudit.gate", "version": 1, "threshold": 0.5, "metric": "batched_margin"}


@pytest.mark.parametrize("content,needle", [
    (None, "no such gate file"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ({**GOOD, "format": "x"}, "not an mgaudit gate"),
    ({**GOOD, "version": 2}, "unsupported gate version"),
    ({k: v for k, v in GOOD.items() if k != "threshold"}, "no threshold"),
    ({**GOOD, "threshold": -0.1}, ">= 0"),
    ({**GOOD, "threshold": "0.5"}, "finite number"),
    ({**GOOD, "threshold": True}, "finite number"),
    ('{"format": "mgaudit.gate", "version": 1, "threshold": NaN}', "finite number"),
])
def test_load_gate_errors(tmp_path: Path, content, needle: str) -> None:
    path = tmp_path / "gate.json" if content is None else _gate(tmp_path, content)
    with pytest.raises(GateError) as exc:
        load_gate(path)
    line = exc.value.one_line()
    assert needle in line and str(path) in line and "\n" not in line


def test_load_gate_accepts_zero_and_int(tmp_path: Path) -> None:
    assert load_gate(_gate(tmp_path, {**GOOD, "threshold": 0}))["threshold"] == 0.0


def test_library_imports_no_torch_or_matplotlib() -> None:
    import subprocess
    import sys

    code = ("import sys, mgaudit.calibrate, mgaudit.plots; "
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- calibrate: duplicates, intervals


def test_duplicate_trace_inputs_are_refused(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    out = tmp_path / "t"
    scan(scan_config(prompts_file, out, tiny_model_dir), loaded=tiny_lm)
    assert_one_line_error(invoke(["calibrate", str(out), str(out), "--method", "bound"]), "twice")
    assert_one_line_error(invoke(["calibrate", str(out), f"{tmp_path}/./t/", "--method", "bound"]), "twice")
    one = sorted(out.glob("trace-b*.parquet"))[0]
    assert_one_line_error(invoke(["calibrate", str(out), str(one), "--method", "bound"]), "twice")


def test_wilson_intervals_and_rule_of_three() -> None:
    from mgaudit.stats import interval95

    lo, hi = interval95(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # Wilson score, z = 1.96
    lo, hi = interval95(3, 640)
    assert lo < 3 / 640 < hi and round(hi, 4) == 0.0137
    assert interval95(0, 300) == [0.0, 0.01]  # rule of three
    assert interval95(30, 30) == [0.9, 1.0]
    assert interval95(0, 0) is None


def test_few_flips_warn_in_output_and_gate(tmp_path) -> None:

    fit = write_traces(tmp_path / "math", make_rows(FLIPS_FIT, seed=1))  # 5 flips
    gate_path = tmp_path / "gate.json"
    res = invoke(["calibrate", str(fit), "--out", str(gate_path)])
    assert res.exit_code == 0
    out = " ".join(res.stdout.split())
    assert "warning: only 5 flips: recall 100% has a 95% interval of [40%, 100%]" in out
    assert "95% interval [40.0, 100.0]" in out and "flip rate" in out
    gate = json.loads(gate_path.read_text())
    assert gate["warnings"] and "only 5 flips" in gate["warnings"][0]
    assert gate["calibration"]["recall_ci95"] == [0.4, 1.0]
    lo, hi = gate["calibration"]["flip_rate_ci95"]
    assert lo < gate["calibration"]["flip_rate"] < hi
    many = {4: [0.01 * i for i in range(1, 17)], 8: [0.01 * i for i in range(17, 33)]}  # 32 flips
    rows = make_rows(many, seed=3, prompts=48)
    res = invoke(["calibrate", str(write_traces(tmp_path / "many", rows)), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["warnings"] == []


# --------------------------------------------------------------------------- float32 text


def test_thresholds_print_as_shortest_float32_decimals(tmp_path) -> None:
    from mgaudit.formats.gate import float32_text, float32_up

    assert float32_text(0.3125000298023224) == "0.31250003"
    assert float32_text(np.nextafter(np.float32(0.0625), np.float32(1))) == "0.06250001"
    assert float32_text(1.4e-45) == "1e-45"
    assert float32_text(0.5) == "0.5" and float32_text(0.0) == "0"
    rng = np.random.default_rng(0)
    for x in np.concatenate([rng.uniform(0, 4, 500), rng.exponential(1e-6, 100)]).astype(np.float32):
        text = float32_text(x)
        assert np.float32(float(text)) == x, (x, text)
        assert len(text.replace("-", "")) <= len(repr(float(x)))
    assert float32_up(0.1) >= 0.1 and np.float32(float32_up(0.1)) == float32_up(0.1)

    fit = write_traces(tmp_path / "math", make_rows(FLIPS_FIT, seed=1))
    gate = tmp_path / "gate.json"
    res = invoke(["calibrate", str(fit), "--out", str(gate)])
    raw = gate.read_text()
    literal = re.search(r'"threshold": ([0-9.e-]+)', raw).group(1)
    tau = json.loads(raw)["threshold"]
    assert literal == float32_text(tau) and len(literal) <= 10
    assert f"chosen tau = {literal}" in res.stdout
    assert not re.search(r"\d\.\d{12,}", res.stdout)  # no float64 noise anywhere in the tables
    from mgaudit.formats.gate import load_gate

    assert load_gate(gate)["threshold"] == float(np.float32(tau))


# --------------------------------------------------------------------------- gate.json paths


def test_gate_stores_trace_paths_relative_to_itself(tmp_path, prompts_file, tiny_model_dir, tiny_lm) -> None:
    from mgaudit.calibrate import CalibrateConfig, calibrate

    traces = tmp_path / "work" / "traces"
    scan(scan_config(prompts_file, traces, tiny_model_dir), loaded=tiny_lm)
    gate_path = tmp_path / "ci" / "gate.json"
    calibrate(CalibrateConfig(traces=[traces.resolve()], out=gate_path, method="bound",
                              eval_traces=[traces.resolve()]))
    gate = json.loads(gate_path.read_text())
    assert gate["traces"][0]["path"] == "../work/traces"
    assert (gate_path.parent / gate["traces"][0]["path"]).resolve() == traces.resolve()
    assert len(gate["traces"][0]["sha256"]) == 64 and gate["traces"][0]["files"] == len(list(traces.glob("*.parquet")))
    assert gate["transfer"][0]["traces"] == "../work/traces"
    assert not Path(gate["provenance"]["config"]["out"]).is_absolute()
    assert str(tmp_path) not in json.dumps({k: gate[k] for k in ("traces", "transfer")})
