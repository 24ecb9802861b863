"""Writes small, format-faithful fake datasets in the published on-disk layouts.

For the datasets of which no public sample exists (``shared/data/README.md`` section 5): same
file types, keys, dtypes, per-pixel shapes and date formats as the real releases, with few
examples and short time series. Values are drawn in the real ranges and the labels have spatial
(or spectral) structure that the inputs reflect, so a model can overfit them. The output depends
only on ``seed`` (byte-identical files for the same seed).

Usage::

  python -m input_pipeline.samples.generate DATASET OUT_DIR [--seed N] [--num N]

``DATASET`` is one of ``planted``, ``s2naip_urban``, ``bradd_s1ts``, ``sickle``, ``timesen2crop``
and ``pastis_hd_spot`` (SPOT-6 images, written into a copy of a PASTIS root when ``OUT_DIR`` holds
one). Each is written by the module of that name in ``input_pipeline/samples/synthetic/``, whose
docstring gives the files, their formats and what ``num`` counts.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

import numpy as np

from input_pipeline.samples.synthetic import (
  bradd_s1ts,
  pastis_hd_spot,
  planted,
  s2naip_urban,
  sickle,
  timesen2crop,
)
from input_pipeline.samples.synthetic.common import Rng

# dataset -> (writer(out_dir, rng, num) -> ids, default num).
GENERATORS: dict[str, tuple[Callable[[str, Rng, int], list[str]], int]] = {
    "planted": (planted.write, planted.NUM),
    "s2naip_urban": (s2naip_urban.write, s2naip_urban.NUM),
    "bradd_s1ts": (bradd_s1ts.write, bradd_s1ts.NUM),
    "sickle": (sickle.write, sickle.NUM),
    "timesen2crop": (timesen2crop.write, timesen2crop.NUM),
    "pastis_hd_spot": (pastis_hd_spot.write, pastis_hd_spot.NUM),
}


def generate(dataset: str, out_dir: str, seed: int = 0, num: int | None = None) -> list[str]:
  """Writes the fake ``dataset`` under ``out_dir``; returns the example ids written.

  ``num``: examples per split, pixels per tile (timesen2crop) or images (pastis_hd_spot without
  a PASTIS root); None = the dataset's default (see its module's docstring).
  """
  if dataset not in GENERATORS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(GENERATORS)}")
  fn, default_num = GENERATORS[dataset]
  os.makedirs(out_dir, exist_ok=True)
  return fn(out_dir, np.random.default_rng(seed), default_num if num is None else num)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("dataset", choices=tuple(GENERATORS))
  parser.add_argument("out_dir")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num", type=int, default=None)
  args = parser.parse_args(argv)
  ids = generate(args.dataset, args.out_dir, seed=args.seed, num=args.num)
  print(f"{args.dataset}: wrote {len(ids)} examples under {args.out_dir}")


if __name__ == "__main__":
  main()
