"""Greedy decoding is unchanged by seeded sampling: compare two runs of the same job, before and after.

``dump`` writes, for the sample sets, the greedy outputs of solo decoding and of every policy at
batch size 8 (tokens, top-1/top-2 logits, runner-ups, verified/repaired/audited flags) as JSON;
``compare`` checks two dumps field by field, and two scan trace folders column by column (every
column the older schema has; the newer one's sampling columns must be null in greedy rows).

    git archive BASE | tar -x -C /tmp/base
    PYTHONPATH=/tmp/base python benchmarks/greedy_unchanged.py dump /tmp/before.json
    python benchmarks/greedy_unchanged.py dump /tmp/after.json
    python benchmarks/greedy_unchanged.py compare /tmp/before.json /tmp/after.json [SCAN_BEFORE SCAN_AFTER]
"""

from __future__ import annotations

import json
import sys

FIELDS = ("tokens", "top1", "top2", "runner_up", "verified", "repaired", "audited")


def dump(path: str, limit: int = 8, tokens: int = 32) -> None:
    import torch

    from mgaudit.decoding.policies import DecodePolicy, decode, reference_decode
    from mgaudit.models import load_model
    from mgaudit.prompts import encode_prompt, load_prompts

    torch.set_num_threads(1)
    lm = load_model("smollm2", device="cpu")
    out = {}
    for name in ("math", "code", "chat"):
        ids = [encode_prompt(lm.tokenizer, p) for p in load_prompts(name, limit=limit).prompts]
        out[f"{name}/solo"] = [vars(reference_decode(lm.model, p, tokens, lm.eos_token_ids)) for p in ids]
        for pol in (DecodePolicy("none"), DecodePolicy("invariant"), DecodePolicy("gate", threshold=0.25),
                    DecodePolicy("always")):
            o = decode(lm.model, ids, pol, 8, tokens, lm.eos_token_ids, lm.pad_token_id)
            out[f"{name}/{pol.name}"] = [vars(s) for s in o.sequences]
    with open(path, "w") as f:
        json.dump({k: [{f: s[f] for f in FIELDS} for s in v] for k, v in out.items()}, f)


def compare_dumps(a_path: str, b_path: str) -> str:
    a, b = json.load(open(a_path)), json.load(open(b_path))
    assert a.keys() == b.keys(), "different runs"
    n = 0
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            for f in FIELDS:
                assert x[f] == y[f], (k, f)
            n += 1
    return f"decode outputs identical: {len(a)} runs, {n} sequences, fields {', '.join(FIELDS)}"


def compare_scans(a_dir: str, b_dir: str) -> str:
    import pyarrow.parquet as pq
    from pathlib import Path

    files = sorted(p.name for p in Path(a_dir).glob("trace-*.parquet"))
    assert files == sorted(p.name for p in Path(b_dir).glob("trace-*.parquet")), "different trace files"
    rows = 0
    for name in files:
        a, b = pq.read_table(Path(a_dir) / name), pq.read_table(Path(b_dir) / name)
        for col in a.column_names:
            assert a.column(col).equals(b.column(col)), (name, col)
        for col in set(b.column_names) - set(a.column_names):
            assert b.column(col).null_count == b.num_rows, (name, col)
        rows += a.num_rows
    return f"scan traces identical: {len(files)} files, {rows} rows, every column of the older schema"


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        dump(sys.argv[2])
    else:
        print(compare_dumps(sys.argv[2], sys.argv[3]))
        if len(sys.argv) > 5:
            print(compare_scans(sys.argv[4], sys.argv[5]))
