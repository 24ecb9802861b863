"""The pretraining loop: data mixture, mesh, compiled steps per bucket, checkpoints, logging."""

from __future__ import annotations

import os
import time
from collections import Counter

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from anysat_jax import sharding
from anysat_jax.core import modalities as mods
from anysat_jax.models.validation import validate_inputs
from anysat_jax.tasks import pretrain as train
from input_pipeline import loader, mixture, prepare


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or inf; the last checkpoint is left intact."""


def build_data(config: ml_collections.ConfigDict) -> mixture.MixtureIterator:
  """Prepares every dataset of ``config.data.datasets`` (from the shipped samples when no
  ``manual_dir`` is given) and returns the training mixture for this process."""
  data = config.data
  for name, dcfg in data.datasets.items():
    prepare.ensure_prepared(name, data.data_dir, modalities=tuple(dcfg.modalities),
                            manual_dir=dcfg.get("manual_dir"))
  if data.shard_by_process:
    return mixture.mixture(data)
  # Every process reads the global batch and keeps its rows: the run does not depend on the
  # process count (at the cost of reading the data once per process).
  return mixture.mixture(data, shard_index=0, shard_count=1)


def local_rows(batch: dict[str, np.ndarray], config: ml_collections.ConfigDict
               ) -> dict[str, np.ndarray]:
  if config.data.shard_by_process or jax.process_count() == 1:
    return batch
  n = len(next(iter(batch.values())))
  per = n // jax.process_count()
  start = jax.process_index() * per
  return {k: v[start:start + per] for k, v in batch.items()}


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.checkpoint.keep, enable_async_checkpointing=config.checkpoint.use_async,
      create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def _side(patch_size: int, dcfg: ml_collections.ConfigDict, batch: dict) -> int:
  """Patches per side of a batch's tile at ``patch_size`` metres."""
  name = next(m for m in dcfg.modalities if not mods.get(m).context_token)
  m = mods.get(name)
  return round(batch[name].shape[-1] * m.gsd / patch_size)


def pretrain(config: ml_collections.ConfigDict, workdir: str, stop: dict[str, bool]) -> None:
  """Runs (or resumes) pretraining until ``config.total_steps``; see ``anysat_jax.main``."""
  from clu import metric_writers, periodic_actions

  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config)
  logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  data_iter = build_data(config)
  enc_cfg, _ = train.model_configs(config)
  abstract = jax.eval_shape(lambda: train.init_state(config))
  state_sharding = sharding.tree_sharding(abstract, mesh, config.mesh.fsdp_min_size)
  batch_sharding = sharding.batch_sharding(mesh)
  manager = checkpoint_manager(workdir, config)
  latest = manager.latest_step()
  if latest is None:
    state = jax.jit(lambda: train.init_state(config), out_shardings=state_sharding)()
  else:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sharding)
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    state = restored.state
    data_iter.set_state(restored.data)
    logging.info("resumed from step %d", latest)
    print(f"resumed from checkpoint at step {latest}", flush=True)

  traces: Counter = Counter()
  bucket = {"key": None}
  step_fn = train.jit_train_step(config, state_sharding,
                                 lambda patch: traces.update([bucket["key"]]))
  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                           every_steps=config.log_every)
  hooks = [report]
  if config.get("profile_steps"):
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps))
  step = int(jax.device_get(state.step))
  seen_buckets: set = set()
  sums: dict[str, list[float]] = {}
  metrics = {"loss": float("nan")}   # no step to run: resumed at total_steps
  t_start = time.time()

  def save(step: int) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave(data_iter.get_state())))

  with jax.set_mesh(mesh):
    while step < config.total_steps:
      name, patch_size, batch = next(data_iter)
      batch = loader.model_inputs(batch)
      bucket["key"] = (name, patch_size)
      if bucket["key"] not in seen_buckets:
        validate_inputs(batch, patch_size, enc_cfg)     # once per bucket, before compiling
        seen_buckets.add(bucket["key"])
      side = _side(patch_size, config.data.datasets[name], batch)
      b = len(next(iter(batch.values())))
      masks = train.host_masks(config, step, b, side)
      gbatch = sharding.global_batch(local_rows(batch, config), batch_sharding)
      gmasks = sharding.global_batch(local_rows(masks, config), batch_sharding)
      state, metrics = step_fn(state, gbatch, gmasks, patch_size=patch_size)
      metrics = jax.device_get(metrics)
      if not bool(metrics["finite"]):
        msg = (f"non-finite loss at step {step} ({name}, patch {patch_size} m): "
               f"loss={metrics['loss']}")
        if config.nonfinite == "stop":
          manager.wait_until_finished()
          raise NonFiniteLossError(msg + f"; last good checkpoint: step {manager.latest_step()}")
        logging.warning("%s; step skipped", msg)
      step += 1
      for k in ("loss", "jepa", "contrastive"):
        sums.setdefault(f"{k}/{name}", []).append(float(metrics[k]))
      for hook in hooks:
        hook(step)
      if step % config.log_every == 0 or step == config.total_steps:
        scalars = {k: float(np.mean(v)) for k, v in sums.items()}
        scalars.update(loss=float(metrics["loss"]), lr=float(metrics["lr"]))
        writer.write_scalars(step, scalars)
        sums.clear()
      if stop["requested"] or step % config.checkpoint.every_steps == 0 \
          or step == config.total_steps:
        save(step)
        if stop["requested"]:
          manager.wait_until_finished()
          print(f"stopped by signal at step {step}; checkpoint saved", flush=True)
          return
  manager.wait_until_finished()
  writer.flush()
  elapsed = time.time() - t_start
  logging.info("trained %d steps in %.1f s", step, elapsed)
  print(f"compiles: {sum(traces.values())} for {len(seen_buckets)} buckets", flush=True)
  print(f"final: step={step} loss={float(metrics['loss']):.6f} "
        f"fingerprint={train.fingerprint(state)}", flush=True)

