"""The one Parquet writer of mgaudit (trace files and K/V tables): an explicit schema, the
provenance and the schema version in the file's metadata (built here only), rows collected and
written atomically when the writer finalizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .files import atomic_write_bytes

PROVENANCE_KEY = b"mgaudit.provenance"
SCHEMA_VERSION_KEY = b"mgaudit.schema_version"


def with_metadata(schema: pa.Schema, version: str, provenance: dict[str, Any]) -> pa.Schema:
    """``schema`` carrying the provenance (JSON) and the schema version."""
    return schema.with_metadata({PROVENANCE_KEY: json.dumps(provenance, sort_keys=True, default=str).encode(),
                                 SCHEMA_VERSION_KEY: version.encode()})


def table(rows: Iterable[dict[str, Any]], schema: pa.Schema, version: str, provenance: dict[str, Any]) -> pa.Table:
    """Rows (dicts with every column of ``schema``) as a table of ``schema`` with its metadata."""
    rows = list(rows)
    columns = {f.name: [r[f.name] for r in rows] for f in schema}
    return pa.Table.from_pydict({f.name: columns[f.name] for f in schema},
                                schema=with_metadata(schema, version, provenance))


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """Write a Parquet file (zstd) atomically (see :mod:`mgaudit.formats.files`)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(Path(path), sink.getvalue().to_pybytes())


def read_metadata(path: Path) -> dict[bytes, bytes]:
    """The schema metadata of a Parquet file ({} where it has none); raises what pyarrow raises."""
    return pq.read_schema(path).metadata or {}


class TableWriter:
    """``with TableWriter(path, schema, version, provenance) as w: w.write(rows)``: the file appears
    (atomically) when the block ends without an error; ``finalize()`` writes it and returns counts."""

    def __init__(self, path: Path, schema: pa.Schema, version: str, provenance: dict[str, Any]):
        self.path, self.schema, self.version, self.provenance = Path(path), schema, version, provenance
        self.rows: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        if self.result is not None:
            raise RuntimeError(f"{self.path}: already written")
        self.rows.extend(rows)

    def finalize(self) -> dict[str, Any]:
        if self.result is None:
            atomic_write_table(self.path, table(self.rows, self.schema, self.version, self.provenance))
            self.result = {"path": str(self.path), "rows": len(self.rows)}
        return self.result

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
