"""The fine-tuning (and linear-probing) loop on one downstream dataset.

  python -m anysat_jax.main --config=configs/pastis_semseg.py:demo --workdir=runs/pastis_demo

``run(config, workdir, stop)`` prepares the dataset, loads the encoder (``config.init``, see
``checkpoints.manager.load_encoder``), builds the ``FinetuneTask`` once, trains with AdamW,
runs the periodic evaluations of ``config.evals`` (``evaluators.registry``; metrics reset each
time), keeps the parameters of the best monitored evaluation (``eval.monitor``,
``eval.select_best``), early-stops after ``eval.patience`` evaluations without improvement (not
before ``min_epochs``), and at the end evaluates those parameters with every evaluator and
writes ``workdir/metrics.json`` and PNG figures in ``workdir/figures/``. Checkpoints, resume,
stop on signal and ``summary.json`` come from ``trainers.loop``.

Steps: ``steps_per_epoch`` = floor(training examples / batch) (``drop_last``), ``total_steps`` =
``epochs`` x that, unless set (``tasks.schedules``). Not done: PLANTED's density sampling, fp16
mixed precision (float32 here), FLAIR's 5-window test-time tiling (the evaluation uses the
loader's centred 500-px crop) and the validation metrics' accumulation across epochs (spec B.5).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import periodic_actions

from anysat_jax import sharding
from anysat_jax.checkpoints import manager as ckpt
from anysat_jax.evaluators import registry
from anysat_jax.evaluators.classification import scalars
from anysat_jax.models import xla_options
from anysat_jax.models.validation import validate_inputs
from anysat_jax.tasks import schedules
from anysat_jax.tasks.finetune import FinetuneTask
from anysat_jax.trainers.loop import Loop, make_writer, write_json
from input_pipeline import builders, loader, naming, prepare


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  d = config.data.datasets[config.dataset]
  built = naming.prepared_name(config.dataset, tuple(d.modalities), config.data.data_dir)
  return len(builders.data_sources(built, config.data.data_dir)[split])


def _signature(batch: dict[str, np.ndarray]) -> str:
  return ",".join(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in batch.items())


def run(config: ml_collections.ConfigDict, workdir: str, stop: dict[str, bool]) -> None:
  """Fine-tunes (or linear-probes) and evaluates; resumes from ``workdir/checkpoints``."""
  name, d = config.dataset, config.data.datasets[config.dataset]
  prepare.ensure_prepared(name, config.data.data_dir, modalities=tuple(d.modalities),
                          manual_dir=d.get("manual_dir"))
  monitor_every = config.evals[config.eval.monitor].every_steps if config.evals else None
  steps = schedules.steps_for(config, num_examples(config, d.split), monitor_every)
  encoder_params, enc_cfg = ckpt.load_encoder(config)
  task = FinetuneTask(config, enc_cfg, steps)
  mesh = sharding.make_mesh(config)
  bsharding = sharding.batch_sharding(mesh)
  evals = registry.build(config, task, bsharding, enc_cfg)
  monitor = evals[config.eval.monitor]
  loop = Loop(config, workdir, stop, steps.total, mesh)
  writer = make_writer(workdir)
  logging.info("%s (%s, %s): %d steps, %d per epoch, eval every %d", config.experiment, name,
               config.train_mode, steps.total, steps.per_epoch, steps.eval_every)

  train_iter = iter(loader.dataset_pipeline(
      config.data, name, training=True, shard_index=jax.process_index(),
      shard_count=jax.process_count()))
  state, state_sharding = loop.restore_or_init(task.init_state, encoder_params,
                                               data_iter=train_iter)
  del encoder_params
  best = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "best"),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["monitor"],
                                           best_mode="max", create=True))
  bucket = {"key": None}

  def step_fn(s, b):
    loop.traced(bucket["key"])
    return task.train_step(s, b)

  step_fn = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_sharding, None),
                    compiler_options=xla_options.training())
  report = periodic_actions.ReportProgress(num_train_steps=steps.total, writer=writer,
                                           every_steps=config.log_every)
  step = int(jax.device_get(state.step))
  losses: list[float] = []
  last_loss, lr = float("nan"), float("nan")
  early = False

  with jax.set_mesh(mesh):
    while step < steps.total:
      batch = next(train_iter)
      bucket["key"] = _signature(batch)
      loop.validate_once(bucket["key"], validate_inputs, loader.model_inputs(batch),
                         task.patch_size, enc_cfg, task.model.output, task.model.dense_modality)
      device_batch = sharding.global_batch({k: v for k, v in batch.items() if k != "name"},
                                           bsharding)
      state, m = step_fn(state, device_batch)
      loop.record(step, m)
      step += 1
      report(step)
      logs = step % config.log_every == 0 or step == steps.total
      if logs or loop.save_due(step):
        rows = loop.flush()
        losses += [float(r["loss"]) for _, _, r in rows]
        last_loss, lr = (losses[-1], float(rows[-1][2]["lr"])) if rows else (last_loss, lr)
      if logs:
        writer.write_scalars(step, {"train/loss": float(np.mean(losses)), "lr": lr})
        losses.clear()
      for ev_name, ev in evals.items():
        if not ev.due(step, steps.total, steps.per_epoch) and not (
            ev is monitor and step == steps.total):
          continue
        results = ev.evaluate(state.params).results
        writer.write_scalars(step, scalars(ev_name, results))
        if ev is monitor:
          early = _keep_best(config, best, state.params, step, steps,
                             float(results[task.metric.monitor]))
      if loop.end_step(step, state, save=early):
        return
      if early:
        break
    params, evaluated = state.params, step
    if config.eval.select_best and best.best_step() is not None:
      evaluated = best.best_step()
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            state.params)
      params = best.restore(evaluated, args=ocp.args.StandardRestore(target))
    results = finish(config, workdir, task, evals, params, step, evaluated)
  writer.flush()
  loop.finish(step, state, last_loss, results)


def _keep_best(config: ml_collections.ConfigDict, best: ocp.CheckpointManager, params: Any,
               step: int, steps: schedules.Steps, value: float) -> bool:
  """Saves ``params`` as a candidate best; True when early stopping is due."""
  best.save(step, args=ocp.args.StandardSave(params),
            metrics={"monitor": value if math.isfinite(value) else -math.inf})
  best.wait_until_finished()
  if config.eval.patience > 0 and step >= steps.min_steps \
      and step - best.best_step() >= config.eval.patience * steps.eval_every:
    print(f"early stopping at step {step}: best {config.eval.monitor} at step "
          f"{best.best_step()}", flush=True)
    return True
  return False


def finish(config: ml_collections.ConfigDict, workdir: str, task: FinetuneTask,
           evals: dict[str, Any], params: Any, step: int, evaluated: int) -> dict[str, float]:
  """Evaluates ``params`` with every evaluator, writes metrics.json and the figures (process
  0); returns the scalar results as ``{eval/name: value}``."""
  out: dict[str, Any] = dict(experiment=config.experiment, dataset=config.dataset,
                             train_mode=config.train_mode, monitor=task.metric.monitor,
                             monitor_eval=config.eval.monitor, metric=task.metric.name,
                             step=step, evaluated_step=evaluated, evals={})
  flat: dict[str, float] = {}
  for name, ev in evals.items():
    evaluation = ev.evaluate(params)
    out["evals"][name] = dict(evaluation.results, split=ev.split)
    values = scalars(name, evaluation.results)
    flat.update(values)
    print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items()), flush=True)
    if jax.process_index() == 0:
      ev.write_figures(os.path.join(workdir, "figures"), evaluation)
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, "metrics.json"), out)
  return flat
