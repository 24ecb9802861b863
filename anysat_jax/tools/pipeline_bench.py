"""Input-pipeline throughput on the samples, next to what a tiny AnySat step consumes.

  python -m anysat_jax.pipeline_bench [--seconds=3] [--data_dir=DIR] [--read_threads=4]
      [--model_batch=8]

Prepares the GeoPlex datasets from the shipped / generated samples (into a temporary folder
unless ``--data_dir``), then prints examples/s of each dataset's training pipeline at its
official batch size, of the GeoPlex mixture, and of a tiny AnySat forward + backward on a
TreeSatAI batch at 20 m patches: ``jax.jit(jax.grad(lambda p, b: model.apply(p, b, 20).sum()))``.
That step is a proxy of a training step (no JEPA/contrastive loss, no optimizer). Batch sizes
are global (the GeoPlex per-device sizes on one device).
The two are timed one after the other, each with the whole machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from anysat_jax import AnySat
from anysat_jax.models import xla_options
from anysat_jax.models.validation import validate_inputs
from configs.common import GEOPLEX, default_dataset_config
from input_pipeline import loader, mixture, prepare


def _rate(next_batch: Callable[[], int], seconds: float,
          min_batches: int = 1) -> tuple[float, int]:
  """(examples/s, batches) of ``next_batch`` (returns its batch size) over at least
  ``seconds`` and ``min_batches`` calls, after one warm-up call."""
  next_batch()  # Warm up: threads started, first batch ready.
  n = examples = 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds or n < min_batches:
    examples += next_batch()
    n += 1
  return examples / (time.perf_counter() - start), n


def _size(batch: dict[str, Any]) -> int:
  return len(batch["name"])


def bench_pipelines(config: ml_collections.ConfigDict, seconds: float
                    ) -> Iterator[tuple[str, int, float, int]]:
  """Yields (dataset or "mixture", batch size, examples/s, batches timed); the mixture's
  rate is over at least 30 steps, whichever datasets they drew."""
  for name in config.datasets:
    it = iter(loader.dataset_pipeline(config, name, shard_index=0, shard_count=1))
    rate, n = _rate(lambda it=it: _size(next(it)), seconds)
    it.close()
    yield name, loader.global_batch_size(name, config.datasets[name], shard_count=1), rate, n
  mix = mixture.mixture(config, shard_index=0, shard_count=1)
  rate, n = _rate(lambda: _size(next(mix)[2]), seconds, min_batches=30)
  mix.close()
  yield "mixture", 0, rate, n


def bench_model(config: ml_collections.ConfigDict, batch_size: int, seconds: float) -> float:
  """Examples/s of a tiny AnySat forward + backward on a TreeSatAI batch (20 m patches)."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.datasets = {"treesatai_ts": cfg.datasets.treesatai_ts}
  cfg.datasets.treesatai_ts.batch_size = batch_size
  cfg.datasets.treesatai_ts.per_device_batch = None
  it = iter(loader.dataset_pipeline(cfg, "treesatai_ts", shard_index=0, shard_count=1))
  batch = loader.model_inputs(next(it))
  it.close()
  model = AnySat(size="tiny")
  validate_inputs(batch, 20, model.config)
  grad = jax.jit(jax.grad(lambda p, b: model.apply(p, b, 20).sum()),
                 compiler_options=xla_options.training())
  batch = jax.device_put({k: np.asarray(v, np.float32) for k, v in batch.items()})

  def step() -> int:
    jax.block_until_ready(grad(model.params, batch))
    return batch_size

  rate, _ = _rate(step, seconds)
  return rate


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.pipeline_bench",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=3.0, help="timing per row")
  parser.add_argument("--data_dir", help="prepared data (default: a temporary folder)")
  parser.add_argument("--read_threads", type=int, default=4)
  parser.add_argument("--model_batch", type=int, default=8)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.ERROR)
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or tmp
    for name in GEOPLEX:
      prepare.ensure_prepared(name, data_dir)
    config = ml_collections.ConfigDict(dict(data_dir=data_dir, seed=0, skip_bad=False,
                                            read_threads=args.read_threads,
                                            prefetch_batches=2))
    config.datasets = {n: default_dataset_config(n) for n in GEOPLEX}
    for d in config.datasets.values():
      d.batch_size, d.per_device_batch = d.per_device_batch, None
    config.mixture = dict(kind="iid")  # The samples hold fewer examples than one batch.
    rates = {}
    print(f"{'pipeline':<14} {'batch':>6} {'examples/s':>11} {'batches timed':>14}")
    for name, batch_size, rate, n in bench_pipelines(config, args.seconds):
      rates[name] = rate
      print(f"{name:<14} {batch_size or 'mixed':>6} {rate:>11.1f} {n:>14}")
    model_rate = bench_model(config, args.model_batch, args.seconds)
  print(f"\ntiny AnySat forward+backward (proxy step), TreeSatAI batch {args.model_batch}, "
        f"20 m patches, on {jax.devices()[0].platform}: {model_rate:.1f} examples/s")
  ratio = rates["treesatai_ts"] / model_rate
  print(f"TreeSatAI pipeline / proxy step: {ratio:.1f}x (target >= 5x)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
