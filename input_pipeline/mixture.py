"""The GeoPlex mixture: at every training step, one batch of one dataset at one patch size.

Official epoch semantics (``config.mixture.kind = "epoch"``, the default; spec A.3): an epoch
gives each dataset ``floor(N / global batch)`` batches (its loader with ``drop_last``). Step
``s`` draws a dataset with probability proportional to its ``weight`` (official: PLANTED 2,
S2NAIP-Urban 4, the others 1) among the datasets whose batches of the current epoch are not
used up, and a patch size uniformly from its ``patch_sizes``. The epoch ends when every dataset
is used up or after ``epoch_steps`` steps, whichever comes first; ``epoch_steps`` is set, or
derived as the official ``floor(N_ref / (epoch_reduce x global batch_ref))`` of the dataset
``epoch_reference`` (GeoPlex: one tenth of S2NAIP-Urban), or unset (no cap). With the real sizes
each epoch is one full pass over the four small datasets and a slice of S2NAIP-Urban.

``kind = "iid"``: every step draws among all datasets by weight, independently (the share of
steps of a dataset is its weight / the sum of weights).

The draws of step ``s`` use the stream ``streams.rng(seed, streams.MIXTURE, s)`` and the epoch
counters, which are the same on every process, so every process makes the same choice at the same
step and compiles and runs the same (dataset, patch size) bucket. The iterator then takes the
next batch of that dataset's pipeline (``loader.dataset_pipeline``: per-process shard, infinite,
reshuffled at every pass over the data) and yields ``(dataset_name, patch_size_m, batch)``. A
dataset's passes over its data are continuous (no example left out at an epoch boundary), so they
drift against the mixture's epochs by the remainder ``N mod global batch``.

The iterator is a ``grain.DatasetIterator``: its state (the step, the epoch counters and every
dataset iterator's state) restores mid-epoch with no example repeated or skipped, also through
``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` (orbax).

Config (``config.mixture``, all optional)::

  kind              "epoch" (default) or "iid"
  epoch_steps       int: steps per epoch at most
  epoch_reference   dataset name whose split sets the epoch length (with epoch_reduce)
  epoch_reduce      int: the official ``reduce_factor`` (GeoPlex 10)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from anysat_jax.core import streams
from input_pipeline import loader
from input_pipeline.dataset_spec import Example

KINDS = ("epoch", "iid")


def choose(seed: int, step: int, weights: Mapping[str, float],
           patch_sizes: Mapping[str, Sequence[int]],
           available: Sequence[str] | None = None) -> tuple[str, int]:
  """The (dataset, patch size in metres) of ``step``: a dataset drawn by weight among
  ``available`` (default: all), then a patch size uniformly; a function of its arguments only.

  Datasets are taken in sorted name order, so the choice does not depend on dict order.
  """
  names = sorted(weights if available is None else available)
  p = np.array([weights[n] for n in names], np.float64)
  if len(names) == 0 or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(f"mixture weights must be non-negative with a positive sum: "
                     f"{ {n: weights[n] for n in names} }")
  rng = streams.rng(seed, streams.MIXTURE, step)
  name = names[int(rng.choice(len(names), p=p / p.sum()))]
  sizes = patch_sizes[name]
  return name, int(sizes[int(rng.integers(len(sizes)))])


@dataclasses.dataclass
class Sampler:
  """The step → (dataset, patch size) draws; see the module docstring. Host-only, no data.

  ``epoch_batches`` {name: batches per epoch} selects the epoch semantics; None = i.i.d.
  State (``get_state``): step, epoch, epoch_step and the batches left in the epoch.
  """

  seed: int
  weights: Mapping[str, float]
  patch_sizes: Mapping[str, Sequence[int]]
  epoch_batches: Mapping[str, int] | None = None
  epoch_steps: int | None = None
  step: int = 0
  epoch: int = 0
  epoch_step: int = 0
  remaining: dict[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self) -> None:
    if set(self.weights) != set(self.patch_sizes):
      raise ValueError("weights and patch_sizes must have the same datasets")
    if self.epoch_batches is not None:
      if set(self.epoch_batches) != set(self.weights):
        raise ValueError("epoch_batches must have the datasets of weights")
      empty = [n for n, b in self.epoch_batches.items() if b < 1]
      if empty:
        raise ValueError(f"{', '.join(sorted(empty))}: the split holds no full global batch, "
                         "so the epoch mixture would never draw it")
      if self.epoch_steps is not None and self.epoch_steps < 1:
        raise ValueError(f"epoch_steps must be >= 1, got {self.epoch_steps}")
      if not self.remaining:
        self.remaining = dict(self.epoch_batches)

  def draw(self) -> tuple[str, int]:
    """The next step's (dataset, patch size in metres); advances the state."""
    available = None
    if self.epoch_batches is not None:
      if self.epoch_step == self.epoch_steps or not any(self.remaining.values()):
        self.epoch, self.epoch_step = self.epoch + 1, 0
        self.remaining = dict(self.epoch_batches)
      available = [n for n, left in self.remaining.items() if left > 0]
    name, patch = choose(self.seed, self.step, self.weights, self.patch_sizes, available)
    if available is not None:
      self.remaining[name] -= 1
    self.step += 1
    self.epoch_step += 1
    return name, patch

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step,
            "remaining": dict(self.remaining)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.step, self.epoch = int(state["step"]), int(state["epoch"])
    self.epoch_step = int(state["epoch_step"])
    self.remaining = {n: int(v) for n, v in state["remaining"].items()}


def epoch_length(mcfg: Mapping[str, Any], split_sizes: Mapping[str, int],
                 global_batches: Mapping[str, int]) -> int | None:
  """Steps per epoch at most: ``epoch_steps``, or the official formula on ``epoch_reference``
  (``floor(N_ref / (epoch_reduce x global batch_ref))``), or None (no cap)."""
  if mcfg.get("epoch_steps") is not None:
    return int(mcfg["epoch_steps"])
  ref = mcfg.get("epoch_reference")
  if ref is None:
    return None
  if ref not in split_sizes:
    raise ValueError(f"mixture.epoch_reference {ref!r} is not among the datasets "
                     f"{sorted(split_sizes)}")
  steps = split_sizes[ref] // (int(mcfg.get("epoch_reduce") or 1) * global_batches[ref])
  if steps < 1:
    raise ValueError(f"mixture epoch of {ref}: {split_sizes[ref]} examples / (reduce "
                     f"{mcfg.get('epoch_reduce')} x batch {global_batches[ref]}) is < 1 step")
  return steps


def sampler(config: ml_collections.ConfigDict, split_sizes: Mapping[str, int],
            global_batches: Mapping[str, int]) -> Sampler:
  """The ``Sampler`` of ``config`` (a data config) for datasets of these sizes and global batch
  sizes (the datasets of ``split_sizes``)."""
  mcfg = dict(config.get("mixture") or {})
  kind = mcfg.get("kind", "epoch")
  if kind not in KINDS:
    raise ValueError(f"unknown mixture.kind {kind!r} (known: {', '.join(KINDS)})")
  names = list(split_sizes)
  weights = {n: float(config.datasets[n].weight) for n in names}
  patch_sizes = {n: tuple(int(p) for p in config.datasets[n].patch_sizes) for n in names}
  if kind == "iid":
    return Sampler(int(config.seed), weights, patch_sizes)
  return Sampler(int(config.seed), weights, patch_sizes,
                 epoch_batches={n: split_sizes[n] // global_batches[n] for n in names},
                 epoch_steps=epoch_length(mcfg, split_sizes, global_batches))


class MixtureIterator(grain.DatasetIterator):
  """Yields ``(dataset_name, patch_size_m, batch)``; see the module docstring.

  State: the ``Sampler`` state (``step``, ``epoch``, ``epoch_step``, ``remaining``) and
  ``"datasets"``: {name: that dataset iterator's state}.
  """

  def __init__(self, iterators: Mapping[str, grain.DatasetIterator], draws: Sampler):
    if set(draws.weights) != set(iterators):
      raise ValueError("the iterators and the sampler must have the same datasets")
    super().__init__(list(iterators.values()))
    self._iterators = dict(iterators)
    self._sampler = draws

  @property
  def step(self) -> int:
    """Steps taken so far (the next batch is step ``step``)."""
    return self._sampler.step

  @property
  def epoch(self) -> int:
    """The mixture epoch of the last step (0-based)."""
    return self._sampler.epoch

  @property
  def skipped(self) -> dict[str, int]:
    """Bad examples skipped so far, per dataset (``skip_bad``)."""
    return {n: loader.skipped(it) for n, it in self._iterators.items()}

  def __next__(self) -> tuple[str, int, Example]:
    before = self._sampler.get_state()
    name, patch_size = self._sampler.draw()
    try:
      batch = next(self._iterators[name])
    except BaseException:
      self._sampler.set_state(before)     # The step did not happen.
      raise
    return name, patch_size, batch

  def get_state(self) -> dict[str, Any]:
    return {**self._sampler.get_state(),
            "datasets": {n: it.get_state() for n, it in self._iterators.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    if set(state["datasets"]) != set(self._iterators):
      raise ValueError(f"state of datasets {sorted(state['datasets'])}, expected "
                       f"{sorted(self._iterators)}")
    for n, it in self._iterators.items():
      it.set_state(state["datasets"][n])
    self._sampler.set_state(state)


def mixture(config: ml_collections.ConfigDict, *, shard_index: int, shard_count: int,
            num_devices: int | None = None,
            datasets: Sequence[str] | None = None) -> MixtureIterator:
  """The training mixture of ``datasets`` (default: all of ``config.datasets``) for process
  ``shard_index`` of ``shard_count``; ``num_devices``: the devices of the data axis
  (``loader.global_batch_size``). Fields: see ``loader``'s docstring and this module's."""
  names = list(datasets or config.datasets)
  sizes = {n: len(loader.open_split(config, n)[1]) for n in names}
  batches = {n: loader.global_batch_size(n, config.datasets[n], shard_count=shard_count,
                                         num_devices=num_devices) for n in names}
  iterators = {n: iter(loader.dataset_pipeline(config, n, training=True, shard_index=shard_index,
                                               shard_count=shard_count, num_devices=num_devices))
               for n in names}
  return MixtureIterator(iterators, sampler(config, sizes, batches))
