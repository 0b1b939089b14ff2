"""The formats layer: one Parquet writer (schema, metadata, atomic write, counts), the K/V table
and trace files through it, the run provenance block."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mgaudit.formats.kv import KV_COLUMNS, KV_SCHEMA_VERSION, kv_writer
from mgaudit.formats.parquet import PROVENANCE_KEY, SCHEMA_VERSION_KEY, TableWriter
from mgaudit.formats.provenance import run_provenance

SCHEMA = pa.schema([pa.field("a", pa.int32(), nullable=False), pa.field("b", pa.string(), nullable=True)])


def test_table_writer_writes_on_exit_with_metadata_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    with TableWriter(path, SCHEMA, "7", {"model": "m"}) as w:
        w.write([{"a": 1, "b": "x"}])
        w.write({"a": i, "b": None} for i in range(2, 4))
        assert not path.exists()  # nothing until the block ends
    assert w.result == {"path": str(path), "rows": 3}
    t = pq.read_table(path)
    assert t.column("a").to_pylist() == [1, 2, 3] and t.schema.field("a").type == pa.int32()
    meta = t.schema.metadata
    assert json.loads(meta[PROVENANCE_KEY]) == {"model": "m"} and meta[SCHEMA_VERSION_KEY] == b"7"
    with pytest.raises(RuntimeError, match="already written"):
        w.write([{"a": 4, "b": None}])


def test_table_writer_leaves_nothing_when_the_block_fails(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    with pytest.raises(KeyboardInterrupt):
        with TableWriter(path, SCHEMA, "1", {}) as w:
            w.write([{"a": 1, "b": "x"}])
            raise KeyboardInterrupt
    assert not path.exists() and not list(tmp_path.iterdir())


def test_kv_table_goes_through_the_one_writer(tmp_path: Path) -> None:
    row = {c: 0 for c in KV_COLUMNS} | {"prompt_id": "p", "flip": False, "flipped_at_step": None}
    with kv_writer(tmp_path / "kv.parquet", {"x": 1}) as w:
        w.write([row, row])
    t = pq.read_table(tmp_path / "kv.parquet")
    assert t.num_rows == 2 and t.column_names == KV_COLUMNS
    assert t.schema.metadata[SCHEMA_VERSION_KEY] == KV_SCHEMA_VERSION.encode()


def test_run_provenance_block(tmp_path: Path) -> None:
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        out: Path
        n: int = 3

    class Prompts:
        source, name, sha256, prompts = "file", "set", "abc", [1, 2]

    prov = run_provenance({"model": {"name": "m"}}, Prompts(), Cfg(tmp_path), prompts_extra={"skipped": []},
                          batch_sizes=[4])
    assert prov["model"] == {"name": "m"} and prov["batch_sizes"] == [4]
    assert prov["prompts"] == {"source": "file", "name": "set", "sha256": "abc", "count": 2, "skipped": []}
    assert prov["config"] == {"out": str(tmp_path), "n": 3}
    assert prov["mgaudit_version"] and prov["created"].endswith("+00:00")


def test_verify_report_round_trips_and_reads_like_its_json(tmp_path: Path) -> None:
    from mgaudit.errors import InputError
    from mgaudit.formats.report import REPORT_FORMAT, VerifyReport

    rep = VerifyReport(candidate={"policy": {"name": "gate"}}, reference={"backend": "local"},
                       summary={"identical": 2, "sequences": 2}, sequences=[{"id": "a"}])
    assert rep["summary"]["identical"] == 2 and dict(rep)["format"] == REPORT_FORMAT
    rep.write(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == rep.to_dict()
    assert VerifyReport.read(tmp_path / "r.json") == rep
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="not an mgaudit verify report"):
        VerifyReport.read(tmp_path / "bad.json")
    with pytest.raises(KeyError):
        rep["nope"]
