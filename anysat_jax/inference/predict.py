"""Maps and tables from a fine-tuning run (the library of ``python -m anysat_jax.predict``,
``inference.predict_cli``).

Loads the run's ``best`` (the monitored evaluation's best parameters, ``<workdir>/best``) or
``last`` (``<workdir>/checkpoints``) parameters and its resolved config
(``<workdir>/checkpoints/config.json``), reads the inputs like ``embed`` (``--input MOD=PATH``
for every modality the run was trained on, ``--bands``, ``--dates``, ...), normalises them with
the statistics the training used, and runs the model in sliding windows.

Segmentation and change-detection runs: each window's logits (at the label's resolution) are
blended over the overlaps (``tiling.Blender``), then turned into classes: a GeoTIFF of class ids
(uint8, or uint16 past 255 classes) on the input's georeference with nodata (255 / 65535) where
no window saw a valid input value, and optionally a float32 GeoTIFF of the K class
probabilities (softmax of the blended logits; NaN as nodata). Classification runs: a table
(``.npz`` / ``.parquet``), one row per window: ``class`` (the most probable), ``probability``
(its probability), ``probabilities`` (K,) (softmax, or per-class sigmoids for a multilabel run),
with the window's position. Memory holds one batch of windows and one row of windows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from anysat_jax.checkpoints import manager as ckpt
from anysat_jax.core import modalities as mods
from anysat_jax.inference import embed, tiling
from anysat_jax.io import atomic, geotiff, raster_backend
from anysat_jax.models import heads, xla_options
from anysat_jax.tasks import schedules
from anysat_jax.tasks.finetune import FinetuneTask
from input_pipeline import naming
from input_pipeline.normalization import load_stats, stats_file

log = logging.getLogger("anysat_jax.predict")

CHECKPOINTS = ("best", "last")
# The optimiser and schedule of the task are not used; FinetuneTask needs some run length.
_NO_STEPS = schedules.Steps(per_epoch=1, total=1, eval_every=1, warmup=0, min_steps=0)


@dataclasses.dataclass(frozen=True)
class Run:
  """A fine-tuning run ready to predict.

  Attributes:
    config: the run's resolved config.
    task: its ``FinetuneTask`` (model, label spec, patch size).
    params: ``{"encoder": ..., "head": ...}`` of the chosen checkpoint.
    step: the checkpoint's step.
    modalities: the modalities the run was trained on.
    stats: {modality: (mean (C,), std (C,))}, the statistics the training normalised with.
  """

  config: ml_collections.ConfigDict
  task: FinetuneTask
  params: Any
  step: int
  modalities: tuple[str, ...]
  stats: dict[str, tuple[np.ndarray, np.ndarray]]


def _restore_params(workdir: str, checkpoint: str) -> tuple[int, Any]:
  """(step, params as host arrays) of the run's best or last checkpoint."""
  if checkpoint == "last":
    step, state = ckpt.restore_raw(workdir)
    return step, state["params"]
  directory = os.path.join(os.path.abspath(workdir), "best")
  step = None
  if os.path.isdir(directory):
    with ocp.CheckpointManager(directory) as manager:
      step = manager.latest_step()        # the best one: the manager keeps only it
  if step is None:
    raise FileNotFoundError(f"{directory}: no best checkpoint (the run made no monitored "
                            "evaluation); use --checkpoint last")
  path = os.path.join(directory, str(step), "default")
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return step, ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config of the fine-tuning run in ``workdir``."""
  path = ckpt.config_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of a fine-tuning run?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get("task") != "finetune":
    raise ValueError(f"{workdir} is a {config.get('task')!r} run; predict needs a fine-tuning "
                     "run")
  return config


def check_modalities(config: ml_collections.ConfigDict, given: Sequence[str]) -> None:
  """Raises ValueError unless ``given`` are exactly the modalities the run was trained on."""
  trained = tuple(config.data.datasets[config.dataset].modalities)
  missing = [m for m in trained if m not in given]
  extra = [m for m in given if m not in trained]
  if missing or extra:
    raise ValueError(f"the run was trained on {', '.join(trained)}: "
                     + "; ".join([*([f"missing --input for {', '.join(missing)}"] * bool(missing)),
                                  *([f"{', '.join(extra)} not used by the run"] * bool(extra))]))


def load_run(workdir: str, checkpoint: str = "best") -> Run:
  """The run of ``workdir``: config, task, the ``best`` or ``last`` parameters (checked against
  the task's shapes) and the training's normalisation statistics. The encoder's initialisation
  (``config.init``) must still be readable: it defines the encoder's configuration."""
  if checkpoint not in CHECKPOINTS:
    raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
  config = read_config(workdir)
  _, enc_cfg = ckpt.load_encoder(config)
  task = FinetuneTask(config, enc_cfg, _NO_STEPS)
  step, params = _restore_params(workdir, checkpoint)
  want = jax.eval_shape(task.init_state, None).params
  shapes = lambda t: {"/".join(str(getattr(k, "key", k)) for k in p): tuple(np.shape(v))
                      for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  if shapes(want) != shapes(params):
    diff = sorted(set(shapes(want).items()) ^ set(shapes(params).items()))
    raise ValueError(f"{workdir}: the {checkpoint} checkpoint does not match the run's model: "
                     f"{diff[:6]}")
  d = config.data.datasets[config.dataset]
  modalities = tuple(d.modalities)
  try:
    spath = stats_file(config.data.data_dir,
                       naming.prepared_name(config.dataset, modalities, config.data.data_dir))
  except FileNotFoundError:
    log.warning("%s: the run's prepared data is not in %s; normalising with the package's "
                "statistics of %s", workdir, config.data.data_dir, config.dataset)
    spath = None
  stats = {}
  for m in modalities:
    s = load_stats(config.dataset, m, spath)
    stats[m] = (np.asarray(s.mean, np.float32), np.asarray(s.std, np.float32))
  log.info("%s: %s checkpoint of step %d (%s, %d classes)", workdir, checkpoint, step,
           config.dataset, task.label.num_classes)
  return Run(config, task, params, step, modalities, stats)


class Predictor:
  """The run's model with the call of ``AnySat`` that ``embed.encode`` makes: logits per
  window, (B, K) for a tile classifier, (B, n, n, K) at the label's resolution for a dense
  head (the head's output resized bilinearly as in training)."""

  def __init__(self, run: Run):
    self.config = run.task.model.encoder.config
    self.params = jax.device_put(run.params)
    self.resolution = run.task.label.resolution_m
    task = run.task

    def logits(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
      y = task.model.apply({"params": params}, batch, task.patch_size)
      if task.dense:
        dm = task.model.dense_modality
        side = round(batch[dm].shape[-1] * mods.get(dm).gsd / self.resolution)
        y = heads.resize_logits(y, (side, side))
      return y

    self._logits = jax.jit(logits, compiler_options=xla_options.forward(self.config.dtype))

  def __call__(self, batch: dict[str, np.ndarray], patch_size: int, output: str,
               output_modality: str | None, *, raster_dense: bool = True) -> np.ndarray:
    del patch_size, output, output_modality, raster_dense      # fixed by the run
    return np.asarray(self._logits(self.params, {k: jnp.asarray(v) for k, v in batch.items()}))


def probabilities(logits: np.ndarray, multilabel: bool = False) -> np.ndarray:
  """Class probabilities over the last axis: softmax, or sigmoids when ``multilabel``."""
  logits = logits.astype(np.float32)
  if multilabel:
    return 1.0 / (1.0 + np.exp(-logits))
  e = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def class_dtype(num_classes: int) -> tuple[type, int]:
  """(dtype, nodata value) of a class map: uint8 up to 255 classes, else uint16."""
  if num_classes < 255:
    return np.uint8, 255
  if num_classes < 65535:
    return np.uint16, 65535
  raise ValueError(f"{num_classes} classes do not fit a uint16 class map")


def prepare_scene(run: Run, found: dict[str, Any], dates: dict[str, np.ndarray],
                  tile_m: float | None, overlap_m: float) -> embed.Scene:
  """The checked scene of the run's modalities, windows on the label grid for dense runs."""
  check_modalities(run.config, list(found))
  arrays = {m: found[m] for m in run.modalities}
  task = run.task
  output = "dense" if task.dense else "tile"
  dm = task.model.dense_modality if task.dense else None
  scene = embed.prepare(Predictor(run), arrays, dates, task.patch_size, output, dm,
                        tile_m=tile_m, overlap_m=overlap_m, stats=run.stats)
  if not task.dense:
    return scene
  win = scene.windows
  cell = tiling.frac(task.label.resolution_m)
  if (win.tile / cell).denominator != 1 or (win.overlap / cell).denominator != 1:
    raise ValueError(f"windows of {float(win.tile):g} m overlapping by {float(win.overlap):g} m "
                     f"are not whole numbers of {float(cell):g} m label pixels")
  shapes = {k: v.shape for k, v in arrays.items()}
  return dataclasses.replace(scene, windows=tiling.windows(shapes, win.tile, overlap_m, cell,
                                                           snap_to_cells=True))


def blended_logits(scene: embed.Scene, num_classes: int, *, taper: str = "linear",
                   batch: int = 8, progress: bool = False) -> Iterator[np.ndarray]:
  """Blended logits (k, W, K) of a dense scene, top to bottom; NaN where no valid input."""
  blender = tiling.Blender(scene.windows, num_classes, taper)
  for chunk, y in embed.encode(scene, batch=batch, progress=progress):
    for (oy, ox), f in zip(chunk, y, strict=True):
      rows = blender.add(oy, ox, None if np.isnan(f).all() else f)
      if rows is not None and len(rows):
        yield rows
  yield blender.finish()


def write_maps(rows: Iterator[np.ndarray], shape: tuple[int, int, int], out: str,
               probs: str | None, georef: geotiff.GeoRef | None, metadata: dict[str, str],
               compression: str = "deflate", backend: str | None = None) -> None:
  """Streams blended logits (k, W, K) into the class map ``out`` and, if given, the
  probability map ``probs`` (kept in a memory-mapped file beside it until the class map is
  written); both atomic, written by the raster ``backend`` (None: the active one)."""
  h, w, k = shape
  dtype, nodata = class_dtype(k)
  with contextlib.ExitStack() as stack:
    stash = None
    if probs is not None:
      scratch = stack.enter_context(tempfile.TemporaryDirectory(
          dir=os.path.dirname(os.path.abspath(probs))))
      stash = np.lib.format.open_memmap(os.path.join(scratch, "p.npy"), "w+", np.float32,
                                        (h, w, k))

    def classes() -> Iterator[np.ndarray]:
      done = 0
      for logits in rows:
        p = probabilities(np.nan_to_num(logits))
        p[np.isnan(logits).any(-1)] = np.nan
        if stash is not None:
          stash[done:done + len(p)] = p
        done += len(p)
        yield np.where(np.isnan(p[..., :1]), nodata,
                       np.argmax(np.nan_to_num(p), -1)[..., None]).astype(dtype)

    with atomic.replacing(out) as tmp:
      raster_backend.write_rows(tmp, (h, w, 1), classes(), georef, metadata,
                                compression=compression, nodata=nodata, dtype=dtype,
                                backend=backend)
    if stash is not None:
      side = geotiff.tile_side(k)
      with atomic.replacing(probs) as tmp:
        raster_backend.write_rows(tmp, shape, (stash[r:r + side] for r in range(0, h, side)),
                                  georef, metadata, compression=compression,
                                  nodata=float("nan"), backend=backend)


def classify_table(scene: embed.Scene, multilabel: bool, name: str,
                   georef: geotiff.GeoRef | None, gsd: float, batch: int = 8,
                   progress: bool = False) -> dict[str, np.ndarray]:
  """Columns of a classification run's table: one row per window (class -1 and NaN
  probabilities for a window without a valid input)."""
  logits = np.concatenate([y for _, y in embed.encode(scene, batch=batch, progress=progress)])
  seen = ~np.isnan(logits).all(-1)
  p = probabilities(np.nan_to_num(logits), multilabel)
  p[~seen] = np.nan
  cls = np.where(seen, np.argmax(np.nan_to_num(p), -1), -1)
  best = np.where(seen, np.take_along_axis(np.nan_to_num(p), np.maximum(cls, 0)[:, None],
                                           -1)[:, 0], np.nan)
  win = scene.windows
  rows = np.array([(float(oy), float(ox)) for oy, ox in win.origins], np.float64)
  if georef is not None:
    x, y = georef.xy(rows[:, 0] / gsd, rows[:, 1] / gsd)
  else:
    x = y = np.full(len(rows), np.nan)
  return {"name": np.full(len(rows), name), "window": np.arange(len(rows)),
          "row_m": rows[:, 0], "col_m": rows[:, 1], "size_m": np.full(len(rows), float(win.tile)),
          "x": x, "y": y, "class": cls.astype(np.int32), "probability": best.astype(np.float32),
          "probabilities": p.astype(np.float32)}
