"""Compiled memory and FLOPs of the pretraining step, per GeoPlex bucket (``bench --compiled``).

For every (dataset, patch size) bucket of a pretraining config, the train step is lowered on
abstract inputs (``jax.ShapeDtypeStruct``: nothing is allocated) at the bucket's batch size,
shapes and series lengths, and compiled for the default backend. XLA's
``memory_analysis().temp_size_in_bytes`` (activations and scratch, beyond parameters, optimiser
state and inputs) and the FLOPs are machine-independent figures of the program. XLA counts a
loop body once, so the FLOPs are those of the same step lowered with ``chunk_tokens=0`` (no
loops; its ``cost_analysis``, without compiling it): the recomputation of the chunks in the
backward pass is not in them. Printed lines::

  compiled <dataset> p<patch> b<batch> <dtype> temp_gib <x> tflop <x>
  compiled: worst temp_gib <x>
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from anysat_jax.core import modalities as mods
from anysat_jax.tasks import pretrain as train
from anysat_jax.tools.gpu_bench import buckets

GIB = 2.0 ** 30
# Datasets whose readers deliver per-value validity masks ``<mod>_valid`` with every series.
VALUE_MASKED = ("planted",)


def load_config(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(variant)`` of a config file."""
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def abstract_batch(shapes: dict[str, tuple[int | None, int]], batch: int,
                   value_masks: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """Input specs as the pipeline delivers them, for ``{modality: (T or None, pixels)}``: float32
  images / series, int32 dates, float32 date masks, optional uint8 value masks."""
  out = {}
  for name, (t, px) in shapes.items():
    c = mods.get(name).channels
    if t is None:
      out[name] = jax.ShapeDtypeStruct((batch, c, px, px), jnp.float32)
      continue
    out[name] = jax.ShapeDtypeStruct((batch, t, c, px, px), jnp.float32)
    out[name + mods.DATES_SUFFIX] = jax.ShapeDtypeStruct((batch, t), jnp.int32)
    out[name + mods.MASK_SUFFIX] = jax.ShapeDtypeStruct((batch, t), jnp.float32)
    if value_masks:
      out[name + mods.VALID_SUFFIX] = jax.ShapeDtypeStruct((batch, t, c, px, px), jnp.uint8)
  return out


def grid_side(shapes: dict[str, tuple[int | None, int]], patch: int) -> int:
  """Patches per side of a bucket: the first grid modality's extent / patch size."""
  name = next(m for m in shapes if not mods.get(m).context_token)
  return round(shapes[name][1] * mods.get(name).gsd / patch)


def lower_step(config: ml_collections.ConfigDict, state: Any, patch: int, batch: int,
               shapes: dict[str, tuple[int | None, int]], value_masks: bool = False) -> Any:
  """The lowered train step of one bucket; ``state`` is abstract (``eval_shape``)."""
  inputs = abstract_batch(shapes, batch, value_masks)
  masks = train.host_masks(config, 0, batch, grid_side(shapes, patch))
  masks = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in masks.items()}
  step = train.jit_train_step(config, None, lambda _: None)
  return step.lower(state, inputs, masks, patch_size=patch)


def unchunked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with ``chunk_tokens=0`` (for the FLOP count)."""
  config = copy.deepcopy(config)
  config.model.overrides = {**config.model.overrides, "chunk_tokens": 0}
  return config


def _flops(stage: Any) -> float:
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan")))


def report(config: ml_collections.ConfigDict, only: Sequence[str] = ()) -> int:
  """Compiles the buckets one at a time (``only``: ``dataset:patch`` names) and prints a line
  each, then the worst temp memory. Returns 0, or 1 if a bucket failed to compile."""
  dtype = train.model_configs(config)[0].dtype
  state = jax.eval_shape(lambda: train.init_state(config))
  todo = [b for b in buckets(config) if not only or f"{b[0]}:{b[1]}" in only]
  unknown = set(only) - {f"{b[0]}:{b[1]}" for b in todo}
  if unknown:
    raise SystemExit(f"unknown buckets {sorted(unknown)}; the config has "
                     f"{', '.join(f'{b[0]}:{b[1]}' for b in buckets(config))}")
  worst, failed = 0.0, 0
  for name, patch, batch, shapes in todo:
    t0 = time.perf_counter()
    args = (state, patch, batch, shapes, name in VALUE_MASKED)
    try:
      temp = lower_step(config, *args).compile().memory_analysis().temp_size_in_bytes / GIB
      tflop = _flops(lower_step(unchunked(config), *args)) / 1e12
    except Exception as e:   # report and go on with the other buckets
      print(f"compiled {name} p{patch} b{batch} {dtype} failed: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}", flush=True)
      failed += 1
      continue
    worst = max(worst, temp)
    print(f"compiled {name} p{patch} b{batch} {dtype} temp_gib {temp:.2f} tflop {tflop:.3f}",
          flush=True)
    print(f"  ({time.perf_counter() - t0:.0f} s to compile)", file=sys.stderr, flush=True)
  print(f"compiled: worst temp_gib {worst:.2f}", flush=True)
  return 1 if failed else 0
