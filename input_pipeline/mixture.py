"""The GeoPlex mixture: at every training step, one batch of one dataset at one patch size.

Step ``s`` draws a dataset with probability proportional to its ``weight`` (official: PLANTED 2,
S2NAIP-Urban 4, the others 1) and a patch size uniformly from its ``patch_sizes``, with an RNG
seeded by ``(config.seed, s)`` only: every JAX process makes the same choice at the same step
and so compiles and runs the same (dataset, patch size) bucket. It then takes the next batch of
that dataset's pipeline (``loader.dataset_pipeline``: per-process shard, infinite, reshuffled
every epoch) and yields ``(dataset_name, patch_size_m, batch)``.

Deviation from the original (spec A.3): there, an epoch samples datasets without replacement
(weighted interleaving until each loader is exhausted), so each epoch is one full pass over the
four small datasets plus a slice of S2NAIP. Here draws are independent per step, so the share
of steps of each dataset is its weight / sum of weights and the datasets' epochs are decoupled.

The iterator is a ``grain.DatasetIterator``: its state (the step and every dataset iterator's
state) restores mid-epoch with no example repeated or skipped, also through
``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` (orbax).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from input_pipeline import loader
from input_pipeline.dataset_spec import Example


def choose(seed: int, step: int, weights: Mapping[str, float],
           patch_sizes: Mapping[str, Sequence[int]]) -> tuple[str, int]:
  """The (dataset, patch size in metres) of ``step``: a function of (seed, step) only.

  Datasets are taken in sorted name order, so the choice does not depend on dict order.
  """
  names = sorted(weights)
  p = np.array([weights[n] for n in names], np.float64)
  if len(names) == 0 or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(f"mixture weights must be non-negative with a positive sum: {weights}")
  rng = np.random.default_rng([seed, step])
  name = names[int(rng.choice(len(names), p=p / p.sum()))]
  sizes = patch_sizes[name]
  return name, int(sizes[int(rng.integers(len(sizes)))])


class MixtureIterator(grain.DatasetIterator):
  """Yields ``(dataset_name, patch_size_m, batch)``; see the module docstring.

  State: ``{"step": int, "datasets": {name: that dataset iterator's state}}``.
  """

  def __init__(self, iterators: Mapping[str, grain.DatasetIterator],
               weights: Mapping[str, float], patch_sizes: Mapping[str, Sequence[int]],
               seed: int):
    if set(weights) != set(iterators) or set(patch_sizes) != set(iterators):
      raise ValueError("iterators, weights and patch_sizes must have the same datasets")
    super().__init__(list(iterators.values()))
    self._iterators = dict(iterators)
    self._weights = dict(weights)
    self._patch_sizes = {n: tuple(int(p) for p in s) for n, s in patch_sizes.items()}
    self._seed = seed
    self._step = 0

  @property
  def step(self) -> int:
    """Steps taken so far (the next batch is step ``step``)."""
    return self._step

  @property
  def skipped(self) -> dict[str, int]:
    """Bad examples skipped so far, per dataset (``skip_bad``)."""
    return {n: loader.skipped(it) for n, it in self._iterators.items()}

  def __next__(self) -> tuple[str, int, Example]:
    name, patch_size = choose(self._seed, self._step, self._weights, self._patch_sizes)
    batch = next(self._iterators[name])
    self._step += 1
    return name, patch_size, batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step,
            "datasets": {n: it.get_state() for n, it in self._iterators.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    if set(state["datasets"]) != set(self._iterators):
      raise ValueError(f"state of datasets {sorted(state['datasets'])}, expected "
                       f"{sorted(self._iterators)}")
    for n, it in self._iterators.items():
      it.set_state(state["datasets"][n])
    self._step = int(state["step"])


def mixture(config: ml_collections.ConfigDict, *, datasets: Sequence[str] | None = None,
            shard_index: int | None = None, shard_count: int | None = None) -> MixtureIterator:
  """The training mixture of ``datasets`` (default: all of ``config.datasets``).

  Fields: see ``loader``'s module docstring; ``weight`` and ``patch_sizes`` per dataset.
  """
  names = list(datasets or config.datasets)
  iterators = {n: iter(loader.dataset_pipeline(config, n, training=True,
                                               shard_index=shard_index,
                                               shard_count=shard_count)) for n in names}
  return MixtureIterator(iterators,
                         weights={n: float(config.datasets[n].weight) for n in names},
                         patch_sizes={n: tuple(config.datasets[n].patch_sizes) for n in names},
                         seed=int(config.seed))
