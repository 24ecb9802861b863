"""Pretraining validation loss: the JEPA + contrastive loss per dataset on the val splits.

The official run validates every epoch and lowers the learning rate on a plateau of this loss,
so it must be comparable from one evaluation to the next: the batches are read once (same
examples, evaluation transforms: centred crops, evenly spaced dates), and the block masks and
the in-step random draws are fixed per (seed, dataset, batch), not per training step.

The loss is the task's, passed in as a plain callable::

  loss_fn(params, batch, masks, *, patch_size) -> (loss, aux)

- ``params``: whatever the task needs (student and EMA teacher), passed through unchanged;
- ``batch``: model inputs (``loader.model_inputs``), numpy, batch-major, every row real;
- ``masks``: ``ctx_idx`` int32 (B, K_ctx), ``tgt_idx`` int32 / ``tgt_valid`` bool (B, T, K_tgt)
  (the layout of ``tasks.pretrain.host_masks``) and ``seed`` int32 (): the loss draws its own
  randomness (temporal and modality masks) from ``jax.random.key(masks["seed"])`` only;
- ``patch_size``: metres (static under jit);
- returns the scalar total loss (mean over the batch) and ``{name: scalar}`` parts (e.g.
  ``jepa``, ``contrastive``).

The loss must run teacher and student in evaluation mode (dropout off): with fixed params it
is then a deterministic function of the val data. Sharding is the caller's: wrap ``loss_fn``
to place the batch and masks on the mesh.

Use from the pretraining loop (every ``eval_every`` steps, e.g. once per epoch)::

  sets = pretrain_loss.val_sets(config.data, mask_config(config), seed=config.seed)  # once
  ...
  metrics = pretrain_loss.evaluate(val_loss_fn, params, sets)
  # {"val/<dataset>/loss", "val/<dataset>/<aux>", "val/<dataset>/examples", "val/loss"}
  plateau_value = metrics["val/loss"]
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from anysat_jax.core import modalities as mods
from anysat_jax.tasks import masking
from input_pipeline import builders, loader, naming

LossFn = Callable[..., tuple[Any, Mapping[str, Any]]]


@dataclasses.dataclass(frozen=True)
class ValSet:
  """The fixed val batches of one (dataset, patch size) and their fixed masks."""

  name: str
  patch_size: int
  batches: list[dict[str, np.ndarray]]   # Model inputs, every row a real example.
  masks: list[dict[str, np.ndarray]]

  @property
  def examples(self) -> int:
    return sum(len(next(iter(b.values()))) for b in self.batches)


def grid_side(batch: Mapping[str, np.ndarray], modalities: Sequence[str], patch_size: int) -> int:
  """Patches per side of a batch's tile at ``patch_size`` metres (first gridded modality)."""
  name = next(m for m in modalities if not mods.get(m).context_token)
  return round(batch[name].shape[-1] * mods.get(name).gsd / patch_size)


def fixed_masks(seed: int, dataset: str, batch_index: int, batch_size: int, side: int,
                cfg: masking.MaskConfig) -> dict[str, np.ndarray]:
  """The masks of val batch ``batch_index`` of ``dataset`` (see the module doc): a function of
  (seed, dataset, batch index) only. Block masks as ``masking.block_masks`` with the batch index
  in place of the step and the dataset in the seed, so they never equal a training step's."""
  ds_seed = int(np.random.SeedSequence([seed, zlib.crc32(dataset.encode()), 1 << 20])
                .generate_state(1)[0])
  m = masking.block_masks(ds_seed, batch_index, range(batch_size), side, cfg)
  return {"ctx_idx": m["ctx_idx"], "tgt_idx": m["tgt_idx"].transpose(1, 0, 2),
          "tgt_valid": m["tgt_valid"].transpose(1, 0, 2),
          "seed": np.int32(np.random.SeedSequence([ds_seed, batch_index]).generate_state(1)[0]
                           >> 1)}


def _val_batches(data: ml_collections.ConfigDict, name: str, split: str, batch_size: int,
                 max_batches: int) -> list[dict[str, np.ndarray]]:
  """Up to ``max_batches`` full evaluation batches of ``split`` (model inputs only)."""
  d = ml_collections.ConfigDict(data.datasets[name].to_dict())
  d.split, d.batch_size, d.per_device_batch = split, batch_size, None
  config = ml_collections.ConfigDict(dict(
      data_dir=data.data_dir, seed=0, read_threads=data.get("read_threads", 2),
      prefetch_batches=1, skip_bad=bool(data.get("skip_bad", False)), datasets={name: d}))
  out = []
  for batch in loader.dataset_pipeline(config, name, shard_index=0, shard_count=1,
                                       training=False):
    if len(out) == max_batches or batch["example_mask"].min() == 0:
      break  # The padded last batch would bias the contrastive loss (duplicate tiles).
    out.append(loader.model_inputs(batch))
  return out


def val_sets(data: ml_collections.ConfigDict, mask_cfg: masking.MaskConfig, *, seed: int,
             split: str = "val", batch_size: int = 8, max_batches: int = 4,
             patch_sizes: Mapping[str, int] | None = None) -> list[ValSet]:
  """The val batches and masks of every dataset of ``data.datasets`` (host only, read once).

  data: the run's ``config.data`` (prepared datasets under ``data.data_dir``).
  batch_size: rows per batch, capped per dataset at its split size (one shape per dataset).
  max_batches: full batches per dataset; a partial last batch is not used (counted in the log).
  patch_sizes: {dataset: metres}; default the dataset's first configured patch size.
  A dataset whose split is empty or missing is left out with a warning.
  """
  log = logging.getLogger(__name__)
  out = []
  for name, dcfg in data.datasets.items():
    built = naming.prepared_name(name, tuple(dcfg.modalities), data.data_dir)
    sources = builders.data_sources(built, data.data_dir)
    n = len(sources[split]) if split in sources else 0
    if n == 0:
      log.warning("validation loss: %s has no %r examples; left out", name, split)
      continue
    b = min(batch_size, n)
    batches = _val_batches(data, name, split, b, max_batches)
    patch = int((patch_sizes or {}).get(name, dcfg.patch_sizes[0]))
    side = grid_side(batches[0], dcfg.modalities, patch)
    masks = [fixed_masks(seed, name, i, b, side, mask_cfg) for i in range(len(batches))]
    used = len(batches) * b
    if used < n:
      log.info("validation loss: %s uses %d of its %d %r examples", name, used, n, split)
    out.append(ValSet(name, patch, batches, masks))
  if not out:
    raise ValueError(f"validation loss: no dataset has {split!r} examples")
  return out


def evaluate(loss_fn: LossFn, params: Any, sets: Sequence[ValSet]) -> dict[str, float]:
  """Mean loss and parts per dataset over its fixed batches, and their mean over datasets.

  Returns ``val/<name>/loss``, ``val/<name>/<aux>``, ``val/<name>/examples`` and ``val/loss``
  (unweighted mean over datasets, the value a plateau schedule watches). Raises
  ``FloatingPointError`` naming the dataset and batch if a loss is not finite.
  """
  out: dict[str, float] = {}
  per_dataset = []
  for s in sets:
    sums: dict[str, float] = {}
    for i, (batch, masks) in enumerate(zip(s.batches, s.masks, strict=True)):
      loss, aux = loss_fn(params, batch, masks, patch_size=s.patch_size)
      values = {"loss": float(loss)} | {k: float(v) for k, v in aux.items()}
      bad = [k for k, v in values.items() if not np.isfinite(v)]
      if bad:
        raise FloatingPointError(f"validation loss: {s.name} batch {i}: {bad} not finite")
      for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v
    for k, v in sums.items():
      out[f"val/{s.name}/{k}"] = v / len(s.batches)
    out[f"val/{s.name}/examples"] = float(s.examples)
    per_dataset.append(out[f"val/{s.name}/loss"])
  out["val/loss"] = float(np.mean(per_dataset))
  return out
