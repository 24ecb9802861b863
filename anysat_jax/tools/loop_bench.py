"""The pretraining loop's speed against its compiled step alone (``bench --loop``).

  python -m anysat_jax.bench --loop [--config configs/geoplex.py:demo] [--steps 60] [--warm 20]

1. Runs the real loop (``trainers.pretrain.pretrain``) for ``warm + steps`` steps in a temporary
   working directory, with no evaluation and no periodic checkpoint inside the window, and reads
   its steps/s over the last ``steps`` steps from its progress line (the loop's own clock, which
   leaves compiles out; every bucket is compiled within the first ``warm`` steps).
2. Replays the same steps (the data mixture is deterministic: same buckets, batches and masks)
   from a fresh state through the same step, compiled per bucket before the clock starts (a
   persistent compilation cache spares the recompiles), with the batch and masks on the device
   before the clock starts, timing each step to ``block_until_ready``.

Prints ``loop <x> steps/s, isolated step <y> steps/s, ratio <x / y>``: below 1, the loop loses
time outside the compiled step (host batch and mask preparation, transfers, metrics).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import sys
import tempfile
import time

import jax
import ml_collections

from anysat_jax import sharding
from anysat_jax.core import modalities as mods
from anysat_jax.tasks import pretrain as train
from anysat_jax.trainers import pretrain as trainer
from input_pipeline import loader

RATE = re.compile(r"^step (\d+)/\d+ .*\| ([0-9.]+) steps/s")


class _Tee(io.TextIOBase):
  """Writes to the console and keeps a copy."""

  def __init__(self, out: io.TextIOBase):
    self.out, self.buf = out, io.StringIO()

  def write(self, s: str) -> int:
    self.out.write(s)
    return self.buf.write(s)

  def flush(self) -> None:
    self.out.flush()


def loop_config(config: ml_collections.ConfigDict, warm: int, steps: int
                ) -> ml_collections.ConfigDict:
  """``config`` for the window: ``warm + steps`` steps, a progress line after ``warm`` and at
  the end, no evaluation, a checkpoint only at the end."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.total_steps = warm + steps
  config.log_every = math.gcd(warm, steps)
  config.eval_every = 10 ** 9
  config.checkpoint.every_steps = 10 ** 9
  config.profile_steps = 0
  return config


def loop_rate(config: ml_collections.ConfigDict, warm: int) -> float:
  """Steps/s of the loop over the steps after ``warm`` (mean of its progress-line rates)."""
  tee = _Tee(sys.stdout)
  with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(tee):
    trainer.pretrain(config, workdir, {"requested": False})
  rates = [(int(m[1]), float(m[2])) for m in map(RATE.match, tee.buf.getvalue().splitlines())
           if m]
  window = [r for s, r in rates if s > warm]
  if not window:
    raise RuntimeError("the loop printed no progress line after the warm-up steps")
  # Equal step counts per line: the window's rate is the harmonic mean of the line rates.
  return len(window) / sum(1.0 / r for r in window)


def isolated_rate(config: ml_collections.ConfigDict, warm: int) -> float:
  """Steps/s of the compiled step alone over the same steps after ``warm``."""
  mesh = sharding.make_mesh(config)
  task = train.PretrainTask(config)
  data = trainer.build_data(config)
  abstract = jax.eval_shape(task.init_state)
  state_sharding = sharding.tree_sharding(abstract, mesh, config.mesh.fsdp_min_size)
  state = jax.jit(task.init_state, out_shardings=state_sharding)()
  step_fn = task.jit_step(state_sharding, lambda _: None)
  batch_sharding = sharding.batch_sharding(mesh)
  compiled: dict[tuple, object] = {}      # bucket signature -> executable, compiled untimed
  total = 0.0
  with jax.set_mesh(mesh):
    for step in range(config.total_steps):
      name, patch, batch = next(data)
      batch = loader.model_inputs(batch)
      first = next(m for m in config.data.datasets[name].modalities
                   if not mods.get(m).context_token)
      side = mods.grid_side(first, batch[first].shape[-1], patch)
      b = len(next(iter(batch.values())))
      masks = train.host_masks(config, step, b, side)
      gbatch = jax.block_until_ready(sharding.global_batch(batch, batch_sharding))
      gmasks = jax.block_until_ready(sharding.global_batch(masks, batch_sharding))
      key = (patch, *((k, v.shape, v.dtype) for k, v in sorted({**gbatch, **gmasks}.items())))
      if key not in compiled:
        compiled[key] = step_fn.lower(state, gbatch, gmasks, patch_size=patch).compile()
      t0 = time.perf_counter()
      state, metrics = compiled[key](state, gbatch, gmasks)
      jax.block_until_ready((state, metrics))
      if step >= warm:
        total += time.perf_counter() - t0
  return (config.total_steps - warm) / total


def report(config: ml_collections.ConfigDict, warm: int, steps: int) -> int:
  """Runs both measurements and prints the ratio line; 0 on success."""
  if jax.process_count() > 1:
    raise SystemExit("bench --loop runs in one process")
  config = loop_config(config, warm, steps)
  with tempfile.TemporaryDirectory() as cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    loop = loop_rate(config, warm)
    alone = isolated_rate(config, warm)
  print(f"loop {loop:.3f} steps/s, isolated step {alone:.3f} steps/s, ratio "
        f"{loop / alone:.3f} (steps {warm + 1}-{warm + steps})", flush=True)
  return 0
