"""Feature tables: one row per vector, written as ``.npz`` or ``.parquet`` (with pyarrow)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from anysat_jax.io.atomic import replacing

TABLE_SUFFIXES = (".npz", ".parquet")


def write_table(path: str | os.PathLike, columns: Mapping[str, np.ndarray],
                meta: Mapping[str, Any]) -> None:
  """Writes equal-length columns ((N,), or (N, E) such as ``feature``) and JSON metadata,
  atomically (a temporary sibling renamed over ``path``)."""
  path = os.fspath(path)
  if path.lower().endswith(".npz"):
    with replacing(path) as tmp, open(tmp, "wb") as f:
      np.savez(f, **columns, meta=json.dumps(dict(meta)))
    return
  if not path.lower().endswith(".parquet"):
    raise ValueError(f"{path}: a table is written as {' or '.join(TABLE_SUFFIXES)}")
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    raise ValueError("writing .parquet needs pyarrow; write .npz instead") from None
  table = pa.table({k: pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])
                    if v.ndim == 2 else v for k, v in columns.items()})
  with replacing(path) as tmp:
    pq.write_table(table.replace_schema_metadata({"anysat": json.dumps(dict(meta))}), tmp)
