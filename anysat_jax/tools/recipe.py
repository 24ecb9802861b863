"""Simulates the data and mask draws of a pretraining config, without data or model (host only).

  python -m anysat_jax.recipe --config=configs/geoplex.py [--steps=N] [--devices=D]
      [--sizes=treesatai_ts=38520,pastis_hd=1455,...] [--config.key=value ...]

Prints one line per dataset, ``share <name> <fraction of the N steps>``, drawn by the config's
mixture (``input_pipeline.mixture``) with the training split sizes of ``--sizes`` (else those of
the prepared data in ``config.data.data_dir``) and the global batch sizes on ``--devices``
devices of the data axis (default 8, the paper's); then one line per (dataset, patch size)
bucket, ``masks <name> p<patch> ctx <mean context cells> tgt <mean target cells per block>
leak <fraction of context cells inside a target> tkeep <mean fraction of real dates kept per
sample>``, from the masks the training step uses (``anysat_jax.tasks.masking``) over up to
``MASK_STEPS`` of the steps that drew the bucket, ``MASK_ROWS`` rows each; ``tkeep`` is over
every time series of the bucket, with real-date counts spread evenly over 2..T_b (a single date
is always kept), ``-`` for a bucket without series; last, ``recipe: <N> steps simulated``.

``PAPER_SIZES`` are the official training split sizes (spec A.3, A.14): with them and 8
devices the shares are the paper's 1.6 / 8.1 / 8.6 / 23.4 / 58.3 %.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from anysat_jax.core import modalities as mods
from anysat_jax.tasks import masking
from anysat_jax.tasks import pretrain as train
from input_pipeline import loader, mixture
from input_pipeline.datasets import registry

PAPER_SIZES = {"treesatai_ts": 38520, "pastis_hd": 1455, "flair": 49230, "planted": 1075701,
               "s2naip_urban": 359046}
MASK_STEPS = 8
MASK_ROWS = 32
_TKEEP_SEED = 0           # The simulated date masks (not a run's draw).

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Pretraining config file (FILE or FILE:ARG).")
flags.DEFINE_integer("steps", 10_000, "Steps to simulate.", lower_bound=1)
flags.DEFINE_integer("devices", 8, "Devices of the data axis of the planned run.", lower_bound=1)
flags.DEFINE_string("sizes", None, "Training split sizes, name=count,... (default: the prepared "
                    "data of config.data.data_dir).")


def parse_sizes(text: str, names: Sequence[str]) -> dict[str, int]:
  """``"a=1,b=2"`` → {"a": 1, "b": 2}; every one of ``names`` must be given, nothing else."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, count = item.partition("=")
    if not sep or not count.strip().isdigit():
      raise ValueError(f"--sizes: {item!r} is not name=count")
    out[name.strip()] = int(count)
  if set(out) != set(names):
    raise ValueError(f"--sizes must give exactly the config's datasets {sorted(names)}, "
                     f"got {sorted(out)}")
  return out


def split_sizes(data: ml_collections.ConfigDict) -> dict[str, int]:
  """Training split sizes of the prepared datasets of ``data``."""
  out = {}
  for name in data.datasets:
    try:
      out[name] = len(loader.open_split(data, name)[1])
    except FileNotFoundError as e:
      raise ValueError(f"{e}; or pass --sizes") from None
  return out


def grid_side(name: str, dcfg: ml_collections.ConfigDict, patch: int) -> int:
  """Patches per side of dataset ``name``'s (cropped) tiles at ``patch`` metres."""
  spec = registry.get_spec(name)
  m = next(m for m in dcfg.modalities if not mods.get(m).context_token)
  pixels = min(int(dcfg.get("crop", {}).get(m, spec.modalities[m][-1])), spec.modalities[m][-1])
  return mods.grid_side(m, pixels, patch)


def temporal_keep(buckets: Mapping[str, int], keep: float, rows: int) -> float | None:
  """Mean fraction of real dates ``masking.select_dates`` keeps per sample, over series with
  real-date counts spread evenly over 2..T_b (1 if T_b = 1); None without series."""
  rng = np.random.default_rng(_TKEEP_SEED)
  fractions = []
  for t in buckets.values():
    n_real = np.arange(rows) % max(t - 1, 1) + min(2, t)
    date_mask = np.arange(t)[None, :] < n_real[:, None]
    _, valid = masking.select_dates(rng.random((rows, t + 1)), date_mask, keep)
    fractions.append(valid.sum(1) / n_real)
  return float(np.mean(fractions)) if fractions else None


def simulate(config: ml_collections.ConfigDict, steps: int, sizes: Mapping[str, int],
             devices: int) -> list[str]:
  """The report lines (see the module docstring)."""
  data = config.data
  batches = {n: loader.global_batch_size(n, data.datasets[n], shard_count=1,
                                         num_devices=devices) for n in data.datasets}
  draws = mixture.sampler(data, sizes, batches)
  picks = [draws.draw() for _ in range(steps)]
  counts = collections.Counter(name for name, _ in picks)
  lines = [f"share {n} {counts[n] / steps:.4f}" for n in data.datasets]
  at = collections.defaultdict(list)
  for step, pick in enumerate(picks):
    at[pick].append(step)
  mcfg = train.mask_config(config)
  for name, dcfg in data.datasets.items():
    for patch in dcfg.patch_sizes:
      side = grid_side(name, dcfg, int(patch))
      rows = range(min(batches[name], MASK_ROWS))
      drawn = [masking.block_masks(int(config.seed), s, rows, side, mcfg)
               for s in (at[(name, int(patch))] or range(MASK_STEPS))[:MASK_STEPS]]
      ctx = np.mean([m["ctx_idx"].shape[1] for m in drawn])
      tgt = np.mean([m["tgt_valid"].sum(-1).mean() for m in drawn])
      leak = np.mean([masking.leak(m) for m in drawn])
      tkeep = temporal_keep(dict(dcfg.buckets), mcfg.temporal_keep, MASK_ROWS)
      lines.append(f"masks {name} p{int(patch)} ctx {ctx:.1f} tgt {tgt:.1f} leak {leak:.4f} "
                   f"tkeep {'-' if tkeep is None else f'{tkeep:.3f}'}")
  lines.append(f"recipe: {steps} steps simulated")
  return lines


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required")
  names = list(config.data.datasets)
  try:
    sizes = (parse_sizes(FLAGS.sizes, names) if FLAGS.sizes is not None
             else split_sizes(config.data))
    lines = simulate(config, FLAGS.steps, sizes, FLAGS.devices)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  print("\n".join(lines), flush=True)


def run() -> None:
  """``python -m anysat_jax.recipe``."""
  app.run(main)
