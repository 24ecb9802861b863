"""What every training loop does around its steps: restore-or-init with the data iterator,
periodic and final saves, a stop (SIGTERM) agreed across processes, the non-finite loss check,
input validation and compile counting per bucket, and ``workdir/summary.json``.

A trainer builds a ``Loop``, gets its state from ``restore_or_init``, and for every step calls
``validate_once`` / ``traced`` (from inside the jitted function), ``record`` (the step's metrics
stay on the device) and ``end_step``, which saves when due and says whether to stop; it calls
``flush`` (one transfer of every pending step's metrics, checked for non-finite losses) when it
logs and before a save (``save_due``). The host never waits for a step otherwise, so it reads
and places the next batch while the device runs the current one. ``finish`` prints the
``compiles: ...`` and ``final: ...`` lines and writes the summary:

  {"task", "steps", "total_steps", "compiles": {bucket: traces}, "num_compiles",
   "num_buckets", "final_loss" (null: no step ran), "fingerprint", "metrics": {name: value}}
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils

from anysat_jax import sharding
from anysat_jax.checkpoints import manager as ckpt
from anysat_jax.tasks import optim
from anysat_jax.tasks.state import TrainState


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
  """Swallows what libraries print to stdout / stderr meanwhile (TFDS's dataset preparation
  notices and progress bars) unless absl's verbosity is INFO or more; log records still show
  (absl's handler keeps its own stream)."""
  if logging.get_verbosity() >= logging.INFO:
    yield
    return
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    yield


def make_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard scalars in ``workdir`` (process 0), asynchronous; also to the log when absl's
  verbosity is INFO or more (the console of ``anysat_jax.main`` logs only at --verbosity=1)."""
  verbose = logging.get_verbosity() >= logging.INFO
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([metric_writers.LoggingWriter()] if verbose else [])
  if verbose:
    return metric_writers.create_default_writer(workdir)
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or inf; the last checkpoint is left intact."""


class DataIterator(Protocol):
  """What the loop needs of a data iterator: ``get_state()`` (JSON-able) and ``set_state``."""

  def get_state(self) -> Any: ...

  def set_state(self, state: Any) -> None: ...


def fingerprint(state: TrainState) -> str:
  """Hex digest of the parameter bytes and of the EMA teacher's if any (to compare runs
  exactly). Multi-process: leaves sharded over several processes (FSDP) are gathered first, a
  collective that every process must reach."""
  is_ema = lambda x: isinstance(x, optim.EmaTeacherState)
  trees = [state.params] + [s.teacher for s in jax.tree.leaves(state.opt_state, is_leaf=is_ema)
                            if is_ema(s)]
  h = hashlib.sha256()
  for tree in trees:
    for leaf in jax.tree.leaves(tree):
      if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = multihost_utils.process_allgather(leaf, tiled=True)
      h.update(np.asarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()[:16]


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (np.ndarray, list, tuple)):
    return [_jsonable(v) for v in np.asarray(x).tolist()]
  if isinstance(x, (float, np.floating)):
    return None if not math.isfinite(x) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_json(path: str, tree: Any) -> None:
  """Writes ``tree`` as JSON (non-finite floats as null), atomically."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(_jsonable(tree), f, indent=1)
  os.replace(tmp, path)


class Loop:
  """The loop tail shared by the trainers (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, stop: dict[str, bool],
               total_steps: int, mesh: jax.sharding.Mesh, skip_nonfinite: bool = False):
    self.config, self.workdir, self.total_steps, self.mesh = config, workdir, total_steps, mesh
    self._stop, self._skip = stop, skip_nonfinite
    self._pending: list[tuple[int, str, Any, Any]] = []
    os.makedirs(workdir, exist_ok=True)
    self.manager = ckpt.checkpoint_manager(workdir, config)
    self.traces: Counter = Counter()       # bucket -> times the step was traced
    self.buckets: set = set()              # buckets validated (seen) in this process
    self.data_iter: DataIterator | None = None

  def restore_or_init(self, init: Callable[..., TrainState], *args: Any,
                      data_iter: DataIterator) -> tuple[TrainState, Any]:
    """(state, its sharding): the newest checkpoint that restores (``ckpt.restore_latest``,
    after ``ckpt.check_config``) with ``data_iter`` set to its position, else
    ``jit(init)(*args)``. Prints ``resumed from checkpoint at step N``."""
    self.data_iter = data_iter
    abstract = jax.eval_shape(init, *args)
    state_sharding = sharding.tree_sharding(abstract, self.mesh, self.config.mesh.fsdp_min_size)
    restored = None
    if self.manager.latest_step() is not None:
      others = ckpt.check_config(self.workdir, self.config)
      if others:
        logging.warning("resuming with changed settings: %s", ", ".join(others))
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_sharding)
      restored = ckpt.restore_latest(self.manager, target, data_iter.set_state)
    ckpt.write_config(self.workdir, self.config)
    if restored is None:
      return jax.jit(init, out_shardings=state_sharding)(*args), state_sharding
    step, state = restored
    logging.info("resumed from step %d", step)
    print(f"resumed from checkpoint at step {step}", flush=True)
    return state, state_sharding

  def traced(self, bucket: Hashable) -> None:
    """Call from inside the jitted step: counts its traces (compiles) per bucket."""
    self.traces[bucket] += 1

  def validate_once(self, bucket: Hashable, validate: Callable[..., Any], *args: Any) -> None:
    """Runs ``validate(*args)`` the first time ``bucket`` is seen (before its compile)."""
    if bucket not in self.buckets:
      validate(*args)
      self.buckets.add(bucket)

  def record(self, step: int, metrics: Mapping[str, jax.Array], tag: Any = None,
             where: str = "") -> None:
    """Keeps the metrics of step ``step`` (0-based) on the device until the next ``flush``;
    ``tag`` comes back with them, ``where`` completes a non-finite error message."""
    self._pending.append((step, where, tag, metrics))

  def flush(self) -> list[tuple[int, Any, dict[str, np.ndarray]]]:
    """(step, tag, host metrics) of every pending step, fetched in one transfer, in step
    order; raises ``NonFiniteLossError`` at the first non-finite loss (with
    ``skip_nonfinite``: logs it; the step kept its state)."""
    pending, self._pending = self._pending, []
    fetched = jax.device_get([m for *_, m in pending])
    for (step, where, _, _), m in zip(pending, fetched, strict=True):
      self._check_finite(step, m, where)
    return [(step, tag, m) for (step, _, tag, _), m in zip(pending, fetched, strict=True)]

  def _check_finite(self, step: int, metrics: Mapping[str, Any], where: str) -> None:
    if bool(metrics["finite"]):
      return
    msg = f"non-finite loss at step {step}{where}: loss={metrics['loss']}"
    if self._skip:
      logging.warning("%s; step skipped", msg)
      return
    self.manager.wait_until_finished()
    raise NonFiniteLossError(msg + f"; last good checkpoint: step {self.manager.latest_step()}")

  def save(self, step: int, state: TrainState) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(self.data_iter.get_state())))

  def stop_requested(self) -> bool:
    """The stop flag, agreed across processes (any process's signal stops all of them at the
    same step): a collective that every process reaches after every step."""
    flag = bool(self._stop["requested"])
    if jax.process_count() == 1:
      return flag
    flags = multihost_utils.process_allgather(np.array([flag], np.int32))
    return bool(np.max(flags))

  def save_due(self, step: int) -> bool:
    """A periodic save after ``step`` steps: every ``checkpoint.every_steps`` and the last."""
    return step % self.config.checkpoint.every_steps == 0 or step == self.total_steps

  def end_step(self, step: int, state: TrainState, save: bool = False) -> bool:
    """After ``step`` steps: saves if due (``save_due``, ``save`` or a stop; pending metrics
    are checked first: a non-finite loss is never saved); True when the run must stop now
    (signal; saved, waited for)."""
    stop = self.stop_requested()
    if stop or save or self.save_due(step):
      self.flush()
      self.save(step, state)
      print(f"checkpoint: step {step}", flush=True)
    if stop:
      self.manager.wait_until_finished()
      print(f"stopped by signal at step {step}; checkpoint saved", flush=True)
    return stop

  def finish(self, step: int, state: TrainState, loss: float,
             metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Waits for the saves, prints ``compiles: ...`` and ``final: ...`` and writes
    ``workdir/summary.json`` (process 0); returns the summary."""
    self.flush()
    self.manager.wait_until_finished()
    fp = fingerprint(state)
    summary = dict(task=self.config.get("task", "pretrain"), steps=step,
                   total_steps=self.total_steps,
                   compiles={"/".join(map(str, k)) if isinstance(k, tuple) else str(k): n
                             for k, n in sorted(self.traces.items(), key=str)},
                   num_compiles=sum(self.traces.values()), num_buckets=len(self.buckets),
                   final_loss=float(loss), fingerprint=fp, metrics=dict(metrics or {}))
    print(f"compiles: {summary['num_compiles']} for {summary['num_buckets']} buckets",
          flush=True)
    print(f"final: step={step} loss={float(loss):.6f} fingerprint={fp}", flush=True)
    if jax.process_index() == 0:
      write_json(os.path.join(self.workdir, "summary.json"), summary)
    return summary
