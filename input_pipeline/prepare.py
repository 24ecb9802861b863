"""Builds one dataset as TFDS ArrayRecord files from its published layout.

  python -m input_pipeline.prepare DATASET --manual_dir=DIR --data_dir=DIR \\
      [--modalities=s2,s1] [--skip_bad] [--overwrite]

Writes ``DIR/<name>/1.0.0/`` and prints the example count of every split. A bad file stops the
build with its ``DataError`` (exit status 1) unless ``--skip_bad`` is given, in which case bad
examples are left out and counted. ``--modalities`` builds a subset, named
``<dataset>_<mod>_...`` (e.g. ``flair --modalities=aerial-flair`` → ``flair_aerial_flair``).
``--overwrite`` replaces an existing build only once the new one is built and read back
(``build_replacing``): a failed build leaves the old one as it was.

``ensure_prepared(dataset, data_dir)`` does the same from Python for users without the data: it
builds the dataset from the shipped sample, or from a synthetic one that ``samples.generate``
writes into ``data_dir/raw/<dataset>``, unless it is already built, and writes its
normalisation statistics (``normalization.stats_file``) if they are missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence

import tensorflow_datasets as tfds

from anysat_jax.io import directories
from input_pipeline import builders, naming, normalization
from input_pipeline.dataset_spec import DataError, DatasetSpec
from input_pipeline.datasets import registry
from input_pipeline.samples import generate

SAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")
# Dataset → its shipped sample (under SAMPLES_DIR); the others are generated.
SHIPPED_SAMPLES = {
    "treesatai_ts": "TreeSatAI-TS",
    "sen1floods11": "Sen1Floods11",
    "pastis_hd": "PASTIS",
    "pastis_hd_cls": "PASTIS",
    "flair": os.path.join("FLAIR", "torchgeo_fake_flair2"),
}
FLAIR_REAL_AERIAL = os.path.join("FLAIR", "real_aerial")  # For FLAIR's aerial-flair alone.


def sample_kind(dataset: str, modality: str) -> str:
  """``"shipped"`` or ``"generated"``: where ``ensure_prepared``'s data of a modality comes from."""
  shipped = dataset in SHIPPED_SAMPLES and not (dataset.startswith("pastis") and modality == "spot")
  return "shipped" if shipped else "generated"


def _generate_once(what: str, out_dir: str, seed: int, base: str | None = None) -> None:
  """Writes ``samples.generate`` output for ``what`` (on a copy of ``base`` if given) into
  ``out_dir`` unless it exists; concurrent callers race safely (temporary folder + rename)."""
  if os.path.isdir(out_dir):
    return
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
  try:
    if base is not None:
      shutil.copytree(base, tmp, dirs_exist_ok=True)
    generate.generate(what, tmp, seed=seed)
    os.rename(tmp, out_dir)
  except OSError:
    if not os.path.isdir(out_dir):
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def sample_dir(dataset: str, data_dir: str, modalities: Sequence[str] | None = None,
               seed: int = 0) -> str:
  """The folder ``ensure_prepared`` builds ``dataset`` from: its shipped sample, or a synthetic
  one written into ``data_dir/raw/<dataset>`` (PASTIS-HD with SPOT: the shipped sample plus
  generated SPOT images)."""
  wanted = tuple(modalities or registry.get_spec(dataset).modalities)
  if dataset == "flair" and wanted == ("aerial-flair",):
    return os.path.join(SAMPLES_DIR, FLAIR_REAL_AERIAL)
  raw = os.path.join(data_dir, "raw", dataset)
  if dataset.startswith("pastis") and "spot" in wanted:
    _generate_once("pastis_hd_spot", raw, seed, base=os.path.join(SAMPLES_DIR, "PASTIS"))
    return raw
  if dataset in SHIPPED_SAMPLES:
    return os.path.join(SAMPLES_DIR, SHIPPED_SAMPLES[dataset])
  _generate_once(dataset, raw, seed)
  return raw


def stats_split(sources: Mapping[str, object]) -> str:
  """The split statistics are computed on: ``train``, else the first non-empty one."""
  return "train" if "train" in sources else next(iter(sources))


def ensure_prepared(dataset: str, data_dir: str, *, modalities: Sequence[str] | None = None,
                    manual_dir: str | None = None, with_stats: bool = True, seed: int = 0) -> str:
  """Builds ``dataset`` into ``data_dir`` unless built; returns its name under ``data_dir``.

  Builds from ``manual_dir`` if given, else from the sample (``sample_dir``). With
  ``with_stats``, also writes the normalisation statistics of its training split (or first
  non-empty split) if missing. Safe to call from several processes on one ``data_dir``: the
  build goes to a temporary folder that is renamed into place.
  """
  spec = registry.get_spec(dataset, modalities)
  path = naming.prepared_dir(data_dir, spec.name)
  if not naming.is_prepared(data_dir, spec.name):
    manual_dir = manual_dir or sample_dir(dataset, data_dir, modalities, seed)
    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=data_dir, prefix=".tmp-")
    try:
      report = builders.build(spec, manual_dir, tmp)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      os.rename(report.path, path)
    except OSError:
      if not naming.is_prepared(data_dir, spec.name):
        raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  stats_path = normalization.stats_file(data_dir, spec.name)
  if with_stats and not os.path.exists(stats_path):
    sources = builders.data_sources(spec.name, data_dir)
    split = stats_split(sources)
    normalization.write_stats(stats_path, normalization.compute_stats(
        sources[split], tuple(spec.modalities),
        description=f"computed on split {split!r} of {spec.name}"))
  return spec.name


def build_replacing(spec: DatasetSpec, manual_dir: str, data_dir: str, *,
                    skip_bad: bool = False) -> builders.BuildReport:
  """``builders.build`` that replaces an existing build only once the new one is complete.

  Builds into a temporary sibling of ``data_dir/<name>``, reads every split back (example counts
  as reported), then swaps it in for ``data_dir/<name>/<VERSION>`` (``io.directories``). A build
  that fails leaves the old one as it was; the old one's normalisation statistics go with it.
  """
  dest = os.path.join(data_dir, spec.name, naming.VERSION)
  tmp = directories.sibling_tempdir(os.path.join(data_dir, spec.name))
  try:
    report = builders.build(spec, manual_dir, tmp, skip_bad=skip_bad, progress=True)
    got = {s: len(src) for s, src in builders.data_sources(spec.name, tmp).items()}
    want = {s: n for s, n in report.counts.items() if n}
    if got != want:
      raise DataError(f"the new build reads back {got} examples, not {want}; the old build is "
                      "kept", path=report.path)
    directories.swap_into_place(report.path, dest)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dataclasses.replace(report, path=dest)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m input_pipeline.prepare",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("dataset", choices=registry.names())
  parser.add_argument("--manual_dir", required=True, help="the dataset in its published layout")
  parser.add_argument("--data_dir", required=True, help="where the TFDS files are written")
  parser.add_argument("--modalities", help="comma-separated subset of the dataset's modalities")
  parser.add_argument("--skip_bad", action="store_true", help="skip and count bad examples")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing build once the new one is complete")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  tfds.disable_progress_bar()  # One tqdm bar per split from ``builders.build`` instead.
  try:
    spec = registry.get_spec(args.dataset,
                             args.modalities.split(",") if args.modalities else None)
  except ValueError as e:
    parser.error(str(e))
  if args.skip_bad and not registry.reader_accepts(spec, "on_error"):
    parser.error(f"{args.dataset}: its reader cannot skip bad examples")
  try:
    if args.overwrite:
      report = build_replacing(spec, args.manual_dir, args.data_dir, skip_bad=args.skip_bad)
    else:
      report = builders.build(spec, args.manual_dir, args.data_dir, skip_bad=args.skip_bad,
                              progress=True)
  except (DataError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{report.name} → {report.path}")
  for split, n in report.counts.items():
    print(f"  {split}: {n} examples" + ("" if n else " (empty, not written)"))
  if args.skip_bad:
    print(f"  skipped {len(report.skipped)} bad examples")
  return 0


if __name__ == "__main__":
  sys.exit(main())
