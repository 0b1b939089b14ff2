"""The K/V drift table (``diagnose kv``'s kv.parquet): one row per (prompt, step, layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from .parquet import TableWriter

KV_SCHEMA_VERSION = "1"
KV_FILE = "kv.parquet"
KV_PLOT = "kv.png"

#: One row per (prompt, step, layer). ``step`` -1 is the state after the prefill; step
#: s >= 0 after the decode forward that fed generated token s (its argmax is token s+1).
KV_FIELDS: list[pa.Field] = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),
    pa.field("layer", pa.int32(), nullable=False),
    pa.field("k_max_abs_diff", pa.float32(), nullable=False),  # over the row's valid positions
    pa.field("v_max_abs_diff", pa.float32(), nullable=False),
    pa.field("k_rel", pa.float32(), nullable=False),  # / max |solo K| of the layer
    pa.field("v_rel", pa.float32(), nullable=False),
    pa.field("flipped_at_step", pa.int32(), nullable=True),  # first flip of the prompt; null: none
    pa.field("k_new_max_abs_diff", pa.float32(), nullable=False),  # positions written at this step
    pa.field("v_new_max_abs_diff", pa.float32(), nullable=False),
    pa.field("flip", pa.bool_(), nullable=False),  # batched argmax != solo argmax at this step
    pa.field("batch_size", pa.int32(), nullable=False),
    pa.field("row", pa.int32(), nullable=False),
    pa.field("pad_len", pa.int32(), nullable=False),
    pa.field("prompt_len", pa.int32(), nullable=False),
]
KV_SCHEMA = pa.schema(KV_FIELDS)
KV_COLUMNS = [f.name for f in KV_FIELDS]


def kv_writer(path: Path, provenance: dict[str, Any]) -> TableWriter:
    """The writer of one K/V table (see :class:`mgaudit.formats.parquet.TableWriter`)."""
    return TableWriter(path, KV_SCHEMA, KV_SCHEMA_VERSION, provenance)
