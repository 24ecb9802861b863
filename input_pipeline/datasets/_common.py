"""File access shared by the readers: every failure becomes a ``DataError`` naming file and id."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tifffile

from input_pipeline.dataset_spec import DataError, Example, array_problem

# tifffile warns on every TreeSatAI tile that GDAL_NODATA -9999 does not fit uint8; harmless.
logging.getLogger("tifffile").setLevel(logging.ERROR)

OnError = Callable[[DataError], None]


@contextlib.contextmanager
def guard(path: str | os.PathLike, example_id: str | None) -> Iterator[None]:
  """Turns any error raised while reading ``path`` into a ``DataError``."""
  try:
    yield
  except DataError:
    raise
  except FileNotFoundError as e:
    raise DataError("missing file", path=os.fspath(path), example_id=example_id) from e
  except Exception as e:  # Any library error means a bad file.
    raise DataError(f"cannot read ({type(e).__name__}: {e})", path=os.fspath(path),
                    example_id=example_id) from e


def read_tif(path: str | os.PathLike, example_id: str) -> np.ndarray:
  """A GeoTIFF as (C, H, W) in file band order, whatever its interleave; dtype as stored."""
  with guard(path, example_id), tifffile.TiffFile(path) as tif:
    series = tif.series[0]
    x = series.asarray()
    axes = series.axes
  real_numbers(x, path, example_id)
  if axes == "YX":
    return x[None]
  if axes == "YXS":
    return np.moveaxis(x, -1, 0)
  if len(axes) == 3 and axes[1:] == "YX":
    return x
  raise DataError(f"unexpected TIFF axes {axes!r}", path=os.fspath(path), example_id=example_id)


def read_npy(path: str | os.PathLike, example_id: str, mmap: bool = False) -> np.ndarray:
  """``np.load`` (memory-mapped if ``mmap``) with errors as ``DataError``."""
  with guard(path, example_id):
    x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
  return real_numbers(x, path, example_id)


def real_numbers(x: np.ndarray, path: str | os.PathLike, example_id: str | None) -> np.ndarray:
  """``x`` if it holds real numbers; a complex, string or object array raises ``DataError``
  (a cast to float32 would drop the imaginary part or parse strings silently)."""
  problem = array_problem("array", x)
  if problem is not None:
    raise DataError(problem, path=os.fspath(path), example_id=example_id)
  return x


def read_json(path: str | os.PathLike) -> Any:
  with guard(path, None), open(path) as f:
    return json.load(f)


def read_lines(path: str | os.PathLike) -> list[str]:
  """Non-empty stripped lines of a text file."""
  with guard(path, None), open(path) as f:
    return [line.strip() for line in f if line.strip()]


def check_length(x: np.ndarray, dates: np.ndarray, what: str, path: str | os.PathLike,
                 example_id: str) -> None:
  """Raises ``DataError`` unless a time series and its dates have the same length T."""
  if x.shape[0] != dates.shape[0]:
    raise DataError(f"{what}: {x.shape[0]} acquisitions but {dates.shape[0]} dates",
                    path=os.fspath(path), example_id=example_id)


def iter_examples(ids: Iterable[str], load: Callable[[str], Example],
                  on_error: OnError | None) -> Iterator[tuple[str, Example]]:
  """Yields ``(id, load(id))``; a ``DataError`` is raised, or passed to ``on_error`` and skipped."""
  for example_id in ids:
    try:
      ex = load(example_id)
    except DataError as e:
      report(e, on_error)
      continue
    yield example_id, ex


def report(error: DataError, on_error: OnError | None) -> None:
  """Raises ``error``, or hands it to ``on_error`` (the caller then skips the example)."""
  if on_error is None:
    raise error
  on_error(error)


def select(modalities: Iterable[str] | None, available: Iterable[str]) -> tuple[str, ...]:
  """The modalities to read: all ``available`` if None, else the given ones (checked)."""
  available = tuple(available)
  if modalities is None:
    return available
  chosen = tuple(modalities)
  unknown = [m for m in chosen if m not in available]
  if unknown or not chosen:
    raise ValueError(f"modalities {chosen} must be a non-empty subset of {available}")
  return chosen
