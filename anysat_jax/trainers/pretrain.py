"""The pretraining loop: data mixture, mesh, one compiled step per bucket, logging; checkpoints,
stop and summary through ``trainers.loop``."""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions

from anysat_jax import sharding
from anysat_jax.core import modalities as mods
from anysat_jax.models.validation import validate_inputs
from anysat_jax.tasks import pretrain as train
from anysat_jax.trainers import pretrain_evals
from anysat_jax.trainers.loop import Loop, make_writer, quiet_libraries
from input_pipeline import loader, mixture, prepare


def build_data(config: ml_collections.ConfigDict) -> mixture.MixtureIterator:
  """Prepares every dataset of ``config.data.datasets`` (from the shipped samples when no
  ``manual_dir`` is given) and returns the training mixture for this process."""
  data = config.data
  with quiet_libraries():
    for name, dcfg in data.datasets.items():
      prepare.ensure_prepared(name, data.data_dir, modalities=tuple(dcfg.modalities),
                              manual_dir=dcfg.get("manual_dir"))
  if data.shard_by_process:
    return mixture.mixture(data, shard_index=jax.process_index(),
                           shard_count=jax.process_count(), num_devices=jax.device_count())
  # Every process reads the global batch and keeps its rows: the run does not depend on the
  # process count (at the cost of reading the data once per process).
  return mixture.mixture(data, shard_index=0, shard_count=1, num_devices=jax.device_count())


def local_rows(batch: dict[str, np.ndarray], config: ml_collections.ConfigDict
               ) -> dict[str, np.ndarray]:
  if config.data.shard_by_process or jax.process_count() == 1:
    return batch
  n = len(next(iter(batch.values())))
  per = n // jax.process_count()
  start = jax.process_index() * per
  return {k: v[start:start + per] for k, v in batch.items()}


def _side(patch_size: int, dcfg: ml_collections.ConfigDict, batch: dict) -> int:
  """Patches per side of a batch's tile at ``patch_size`` metres."""
  name = next(m for m in dcfg.modalities if not mods.get(m).context_token)
  return mods.grid_side(name, batch[name].shape[-1], patch_size)


def _eta(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


def start_line(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> str:
  """``start: mesh {...} over D devices, P processes; N steps; datasets: name (patches m), ...;
  B buckets`` (a bucket: a (dataset, patch size) pair, one compiled step each)."""
  datasets = config.data.datasets
  ds = ", ".join(f"{n} ({'/'.join(map(str, d.patch_sizes))} m)" for n, d in datasets.items())
  buckets = sum(len(d.patch_sizes) for d in datasets.values())
  return (f"start: mesh {dict(mesh.shape)} over {jax.device_count()} devices, "
          f"{jax.process_count()} processes; {config.total_steps} steps; datasets: {ds}; "
          f"{buckets} buckets")


def progress_line(step: int, total: int, scalars: dict[str, float], rate: float) -> str:
  """``step S/T loss=... loss/<dataset>=... | R steps/s, ETA h:mm:ss`` (losses of the steps
  since the previous line: the last step's total, each dataset's mean)."""
  parts = [f"loss={scalars['loss']:.6f}"] + [
      f"{k}={v:.6f}" for k, v in sorted(scalars.items()) if k.startswith("loss/")]
  eta = _eta((total - step) / rate) if rate > 0 else "?"
  return f"step {step}/{total} " + " ".join(parts) + f" | {rate:.2f} steps/s, ETA {eta}"


def pretrain(config: ml_collections.ConfigDict, workdir: str, stop: dict[str, bool]) -> None:
  """Runs (or resumes) pretraining until ``config.total_steps``; see ``anysat_jax.main``.

  Console: a start line, one line per ``log_every`` steps (``progress_line``), one per compile
  (bucket, seconds), per evaluation (``pretrain_evals.console_line``) and per checkpoint, and
  the final lines of ``Loop.finish``. TensorBoard: the same scalars in ``workdir``.
  """
  mesh = sharding.make_mesh(config)
  print(start_line(config, mesh), flush=True)
  loop = Loop(config, workdir, stop, config.total_steps, mesh,
              skip_nonfinite=config.nonfinite == "skip")
  writer = make_writer(workdir)
  data_iter = build_data(config)
  task = train.PretrainTask(config)
  evals = pretrain_evals.PretrainEvals(config, task)
  state, state_sharding = loop.restore_or_init(task.init_state, data_iter=data_iter)
  batch_sharding = sharding.batch_sharding(mesh)
  bucket = {"key": None}
  step_fn = task.jit_step(state_sharding, lambda patch: loop.traced(bucket["key"]))
  hooks = [periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                           every_steps=config.log_every)]
  if config.get("profile_steps"):
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps))
  step = int(jax.device_get(state.step))
  sums: dict[str, list[float]] = {}
  last = {"loss": float("nan")}      # no step to run: resumed at total_steps
  scalars: dict[str, float] = {}
  summary: dict[str, float] = {}
  t_start = t_log = time.time()
  step_log = step

  with jax.set_mesh(mesh):
    while step < config.total_steps:
      name, patch_size, batch = next(data_iter)
      batch = loader.model_inputs(batch)
      bucket["key"] = (name, patch_size)
      loop.validate_once(bucket["key"], validate_inputs, batch, patch_size, task.enc_cfg)
      side = _side(patch_size, config.data.datasets[name], batch)
      b = len(next(iter(batch.values())))
      masks = train.host_masks(config, step, b, side)
      gbatch = sharding.global_batch(local_rows(batch, config), batch_sharding)
      gmasks = sharding.global_batch(local_rows(masks, config), batch_sharding)
      traces, t0 = loop.traces[bucket["key"]], time.time()
      state, metrics = step_fn(state, gbatch, gmasks, patch_size=patch_size)
      if loop.traces[bucket["key"]] > traces:      # traced and compiled in this call
        print(f"compiled {name}/{patch_size} in {time.time() - t0:.1f} s", flush=True)
        t_log += time.time() - t0          # compiles are not training speed
      loop.record(step, metrics, name, f" ({name}, patch {patch_size} m)")
      step += 1
      for hook in hooks:
        hook(step)
      logs = step % config.log_every == 0 or step == config.total_steps
      if logs or loop.save_due(step):
        for _, ds, m in loop.flush():
          for k in ("loss", "jepa", "contrastive"):
            sums.setdefault(f"{k}/{ds}", []).append(float(m[k]))
          last = m
      if logs:
        scalars = {k: float(np.mean(v)) for k, v in sums.items()}
        scalars.update(loss=float(last["loss"]), lr=float(last["lr"]))
        writer.write_scalars(step, scalars)
        now = time.time()
        rate = (step - step_log) / max(now - t_log, 1e-9)
        print(progress_line(step, config.total_steps, scalars, rate), flush=True)
        t_log, step_log = now, step
        sums.clear()
      if evals.due(step):
        t0 = time.time()
        values = evals.run(state)
        state = evals.plateau(state, values)
        writer.write_scalars(step, values)
        print(pretrain_evals.console_line(step, values), flush=True)
        summary.update(values)
        t_log += time.time() - t0
      if loop.end_step(step, state):
        return
  writer.flush()
  logging.info("trained %d steps in %.1f s", step, time.time() - t_start)
  loop.finish(step, state, float(last["loss"]), {**scalars, **summary})
