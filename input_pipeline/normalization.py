"""Per-(dataset, modality) channel statistics for the normalisation (x - mean_c) / std_c.

The official rule (spec C.1): over the examples of a split, the average of the per-example
per-channel means and the average of the per-example per-channel unbiased standard deviations,
each taken over (T, H, W); here values whose ``<mod>_valid`` is 0 are left out. Edge cases: an
example whose channel has fewer than 2 valid values does not enter that channel's std (fewer
than 1: nor its mean); a channel with no valid value anywhere gets mean 0, std 1; an average std
of 0 (constant channel) becomes 1.

Two places hold statistics, both ``{modality: {"mean": [...], "std": [...], "source": str}}``:

- next to a prepared dataset, ``<data_dir>/<name>/<version>/normalization.json``, computed on its
  training split, or its first non-empty split if it has none (``compute_stats``; written by
  ``prepare.ensure_prepared`` or this module's command line);
- shipped with the package, ``input_pipeline/normalization.json`` (``{dataset: {modality: ...}}``):
  the official TreeSatAI constants of the AnySat demo (``aerial``, ``s2``, 3-channel ``s1``) and,
  for every other (dataset, modality), statistics computed on the shipped or generated sample,
  marked as such in ``source``. ``python -m input_pipeline.package_stats`` regenerates it.

``load_stats`` picks, in order: official constants, the prepared dataset's file, the package's
sample statistics (with a warning: sample statistics are a stand-in for real data).

  python -m input_pipeline.normalization NAME [NAME ...] --data_dir=DIR [--split=train]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anysat_jax.core import modalities as mods
from input_pipeline import builders, naming
from input_pipeline.dataset_spec import Example

STATS_FILE = "normalization.json"
PACKAGE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), STATS_FILE)
OFFICIAL = "official (AnySat demo)"
SHIPPED = "computed on the shipped sample"
GENERATED = "computed on the generated sample"


@dataclasses.dataclass(frozen=True)
class Stats:
  """Channel statistics of one modality: ``mean``, ``std`` float32 (C,) in raw units."""

  mean: np.ndarray
  std: np.ndarray
  source: str

  def to_json(self) -> dict[str, Any]:
    return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
            "source": self.source}

  @classmethod
  def from_json(cls, d: Any, where: str = "statistics") -> Stats:
    """Checked ``Stats`` of a JSON object; ``where`` (file and modality) starts every error.

    Raises ``ValueError`` on a missing field, a non-numeric or empty list, lists of different
    lengths, a non-finite value or a std <= 0 (each would turn inputs into inf or NaN)."""
    if not isinstance(d, Mapping):
      raise ValueError(f"{where}: expected an object with mean, std and source, got "
                       f"{type(d).__name__}")
    missing = [k for k in ("mean", "std", "source") if k not in d]
    if missing:
      raise ValueError(f"{where}: missing field(s) {missing}")
    values = {}
    for k in ("mean", "std"):
      v = d[k]
      if (not isinstance(v, list) or not v
          or not all(isinstance(e, int | float) and not isinstance(e, bool) for e in v)):
        raise ValueError(f"{where}: {k} must be a non-empty list of numbers, got {v!r:.80}")
      values[k] = np.asarray(v, np.float64)
    mean, std = values["mean"], values["std"]
    if mean.shape != std.shape:
      raise ValueError(f"{where}: mean has {mean.size} channels, std {std.size}")
    for k, v in values.items():
      if not np.isfinite(v).all() or np.abs(v).max() > np.finfo(np.float32).max:
        raise ValueError(f"{where}: {k} has non-finite values: {v.tolist()}")
    if (std <= 0).any():
      raise ValueError(f"{where}: std must be > 0 in every channel, got {std.tolist()}")
    return cls(mean.astype(np.float32), std.astype(np.float32), str(d["source"]))


def _stats_of_file(obj: Any, path: str) -> dict[str, Stats]:
  """``{modality: Stats}`` of a statistics file's JSON object, checked (``Stats.from_json``)."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected an object {{modality: statistics}}")
  return {m: Stats.from_json(d, f"{path}: {m}") for m, d in obj.items()}


def _read_json(path: str) -> Any:
  """A JSON file; a syntax error raises ``ValueError`` naming the file."""
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e


def _channel_moments(x: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and unbiased std of (..., C, H, W) over all other axes, valid values only.

  Returns float64 (C,) each; NaN where a channel has fewer than 1 (mean) or 2 (std) values.
  """
  c = x.shape[-3]
  xc = np.moveaxis(np.asarray(x, np.float64), -3, 0).reshape(c, -1)
  w = np.ones_like(xc) if valid is None else np.moveaxis(
      np.broadcast_to(valid, x.shape) != 0, -3, 0).reshape(c, -1).astype(np.float64)
  n = w.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = (xc * w).sum(1) / n
    var = (((xc - mean[:, None]) ** 2) * w).sum(1) / (n - 1)
  return np.where(n > 0, mean, np.nan), np.sqrt(np.where(n > 1, var, np.nan))


def compute_stats(source: Sequence[Example], modalities: Sequence[str], *,
                  max_examples: int | None = None, description: str | None = None
                  ) -> dict[str, Stats]:
  """Official-rule statistics of ``modalities`` over the examples of ``source``.

  source: random-access examples (e.g. ``builders.data_sources(...)[split]``); raw values, with
    optional ``<mod>_valid``.
  max_examples: use at most this many examples, evenly spaced over the source.
  description: the ``source`` field of the result (default: "computed on N examples").
  """
  n = len(source)
  if n == 0:
    raise ValueError("cannot compute statistics on an empty source")
  idx = range(n) if max_examples is None or max_examples >= n else (
      np.arange(max_examples) * n // max_examples)
  per_example: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m: [] for m in modalities}
  for i in idx:
    ex = source[int(i)]
    for m in modalities:
      per_example[m].append(_channel_moments(ex[m], ex.get(m + mods.VALID_SUFFIX)))
  desc = description or f"computed on {len(idx)} examples"
  out = {}
  for m, moments in per_example.items():
    means, stds = (np.stack(v) for v in zip(*moments, strict=True))
    with warnings.catch_warnings():  # All-NaN channels are handled below.
      warnings.simplefilter("ignore", RuntimeWarning)
      mean, std = np.nanmean(means, 0), np.nanmean(stds, 0)
    mean = np.nan_to_num(mean, nan=0.0)
    std = np.where(std > 0, std, 1.0)  # Also replaces NaN.
    out[m] = Stats(mean.astype(np.float32), std.astype(np.float32), desc)
  return out


def stats_file(data_dir: str, name: str) -> str:
  """The statistics file of the prepared dataset ``name`` (``naming`` layout)."""
  return os.path.join(naming.prepared_dir(data_dir, name), STATS_FILE)


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` atomically (temporary file + rename), each list of numbers on one line."""
  text = re.sub(r"\[([^\[\]{}\"]*)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                json.dumps(obj, indent=1))
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    f.write(text + "\n")
  os.replace(tmp, path)


def write_stats(path: str, stats: Mapping[str, Stats]) -> None:
  """Writes ``{modality: stats}`` to ``path`` as JSON."""
  write_json(path, {m: s.to_json() for m, s in stats.items()})


def read_stats(path: str) -> dict[str, Stats]:
  """Reads a file written by ``write_stats``; raises ``ValueError`` naming the file and the
  modality on a missing field or a bad value (see ``Stats.from_json``)."""
  return _stats_of_file(_read_json(path), path)


def package_stats() -> dict[str, dict[str, Stats]]:
  """The statistics shipped with the package: ``{dataset: {modality: Stats}}`` (checked)."""
  obj = _read_json(PACKAGE_FILE)
  return {ds: _stats_of_file(per, f"{PACKAGE_FILE}: {ds}") for ds, per in obj.items()}


def load_stats(dataset: str, modality: str, path: str | None = None) -> Stats:
  """The statistics to normalise ``modality`` of ``dataset`` (a registry name) with.

  Official constants first, then the prepared dataset's file ``path`` (see ``stats_file``), then
  the package's statistics computed on the sample (logged as a warning when ``path`` was given).
  """
  shipped = package_stats().get(dataset, {})
  if modality in shipped and shipped[modality].source == OFFICIAL:
    return shipped[modality]
  if path is not None and os.path.exists(path):
    computed = read_stats(path)
    if modality in computed:
      return computed[modality]
  if modality not in shipped:
    raise ValueError(f"no normalisation statistics for {dataset}/{modality} (looked in "
                     f"{path or 'no prepared-data file'} and {PACKAGE_FILE}); compute them with "
                     "python -m input_pipeline.normalization")
  if path is not None:
    logging.getLogger(__name__).warning(
        "%s/%s: no statistics in %s; using the package's (%s)", dataset, modality, path,
        shipped[modality].source)
  return shipped[modality]


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m input_pipeline.normalization",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("names", nargs="+", help="prepared datasets (as named under data_dir)")
  parser.add_argument("--data_dir", help="where the prepared datasets are")
  parser.add_argument("--split", default="train", help="split to compute the statistics on")
  parser.add_argument("--max_examples", type=int, help="evenly spaced subset of the split")
  args = parser.parse_args(argv)
  if not args.data_dir:
    parser.error("give --data_dir")
  for name in args.names:
    source = builders.data_sources(name, args.data_dir)[args.split]
    modalities = [k for k in source[0] if k in mods.MODALITIES]
    stats = compute_stats(source, modalities, max_examples=args.max_examples,
                          description=f"computed on split {args.split!r} of {name}")
    path = stats_file(args.data_dir, name)
    write_stats(path, stats)
    print(f"{name}: {', '.join(stats)} → {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
