"""Recomputes the statistics shipped in ``input_pipeline/normalization.json`` from the samples.

  python -m input_pipeline.package_stats

Every registry dataset is prepared from its shipped (or generated) sample in a temporary folder
and its training split's statistics are computed by the official rule
(``normalization.compute_stats``), marked "computed on the shipped sample" or "... generated
sample"; TreeSatAI-TS ``aerial``, ``s2`` and 3-channel ``s1`` keep the official constants of the
AnySat demo.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

from input_pipeline import builders, normalization, prepare
from input_pipeline.datasets import registry
from input_pipeline.normalization import GENERATED, OFFICIAL, PACKAGE_FILE, SHIPPED, Stats

# The demo's TreeSatAI constants (spec D), used as (x - mean) / std.
TREESATAI_DEMO = {
    "aerial": ([150.89349365234375, 92.7138900756836, 84.85437774658203, 80.70423889160156],
               [36.764923095703125, 27.62498664855957, 22.479450225830078, 26.733688354492188]),
    "s2": ([4304.32958984375, 4159.2666015625, 4057.776611328125, 4328.951171875,
            4571.22119140625, 4644.87109375, 4837.2470703125, 4700.2578125, 2823.264404296875,
            2319.97021484375],
           [3537.99755859375, 3324.23486328125, 3270.070068359375, 3250.530029296875,
            2897.391357421875, 2754.4970703125, 2821.521484375, 2625.952392578125,
            1731.56298828125, 1549.3028564453125]),
    "s1": ([3.2893013954162598, -3.682938814163208, 0.6116273403167725],
           [40.11152267456055, 40.535335540771484, 1.0343183279037476]),
}


def write_package_file(path: str = PACKAGE_FILE) -> dict[str, dict[str, Stats]]:
  """Recomputes the package's statistics from the samples; writes them to ``path``
  atomically and returns ``{dataset: {modality: Stats}}``."""
  out: dict[str, dict[str, Stats]] = {}
  with tempfile.TemporaryDirectory() as data_dir:
    for dataset in registry.names():
      spec = registry.get_spec(dataset)
      # FLAIR: aerial-flair from the real aerial patches, not from the synthetic FLAIR-2 sample.
      groups = ([("aerial-flair",), ("s2",)] if dataset == "flair" else [tuple(spec.modalities)])
      per: dict[str, Stats] = {}
      for group in groups:
        name = prepare.ensure_prepared(dataset, data_dir, modalities=group, with_stats=False)
        sources = builders.data_sources(name, data_dir)
        split = prepare.stats_split(sources)
        for m, s in normalization.compute_stats(sources[split], group).items():
          kind = GENERATED if prepare.sample_kind(dataset, m) == "generated" else SHIPPED
          per[m] = dataclasses.replace(s, source=kind)
      if dataset == "treesatai_ts":
        per.update({m: Stats(np.asarray(mean, np.float32), np.asarray(std, np.float32), OFFICIAL)
                    for m, (mean, std) in TREESATAI_DEMO.items()})
      out[dataset] = per
  normalization.write_json(path, {ds: {m: s.to_json() for m, s in per.items()}
                                  for ds, per in out.items()})
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  argparse.ArgumentParser(prog="python -m input_pipeline.package_stats",
                          description=__doc__.split("\n")[0]).parse_args(argv)
  for ds, per in write_package_file().items():
    print(f"{ds}: " + ", ".join(f"{m} ({s.source})" for m, s in per.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
