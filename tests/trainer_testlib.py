"""Helpers of ``test_trainer.py``: a trimmed demo config, ``anysat_jax.main`` in subprocesses
run side by side, their ``summary.json`` and logged scalars, and checkpoint restoring.

Every subprocess of a test module shares one persistent XLA compilation cache, so that runs of
the same config compile once; the trainer still *traces* each bucket in every run, so the
compile counts of its ``summary.json`` are unaffected.

Run as a script (``python tests/trainer_testlib.py MODE [main flags]``) it wraps
``anysat_jax.main``:

  blowup STEP  trains, the compiled step seeing ``blow_up(params)`` (an inf loss) at STEP.
  sharded      checks that ``sharding.batch_sharding`` splits a batch over all devices of the
               ``config.mesh`` mesh, prints ``batch-sharding {...}``, then trains.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import ml_collections
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
THIS = pathlib.Path(__file__).resolve()

# (dataset, patch size) pairs of the "compiles" variant (2 datasets x 2 patch sizes).
COMPILE_PATCHES = {"planted": (30, 40), "treesatai_ts": (20, 30)}


def _geoplex() -> Any:
  spec = importlib.util.spec_from_file_location("_geoplex_config", REPO / "configs/geoplex.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def trimmed_config(variant: str, data_dir: str) -> ml_collections.ConfigDict:
  """The demo config, trimmed for tests.

  ``base``: no evaluations, PLANTED alone (s2 + s1, 4 dates each, batch 8, patch 30 m),
  8 steps, a checkpoint every 4 steps, the loss logged every step. ``compiles-<seed>``: the
  same plus TreeSatAI-TS (s2 + s1-asc, batch 2), both datasets at two patch sizes
  (``COMPILE_PATCHES``) with equal weights, and ``<seed>`` as the data seed (the mixture's
  draws) while the model keeps the base seed (so that its compiled programs are the base
  config's where they can be). ``evals``: ``base`` with the demo's evaluations (validation
  loss, k-NN) every 4 steps.
  """
  c = _geoplex().get_config("demo")
  variant, _, data_seed = variant.partition("-")
  if variant not in ("base", "compiles", "evals"):
    raise ValueError(f"unknown test config variant {variant!r}")
  keep = ("planted", "treesatai_ts") if variant == "compiles" else ("planted",)
  for name in list(c.data.datasets):
    if name not in keep:
      del c.data.datasets[name]
  c.data.data_dir = str(data_dir)
  c.total_steps = 8
  c.log_every = 1
  c.checkpoint.every_steps = 4
  c.checkpoint.keep = 10
  # Adam's eps above the float32 rounding noise of gradients that are zero in exact arithmetic
  # (e.g. key biases before a softmax): with 1e-8, Adam turns that noise into +-lr updates, and
  # runs whose reductions differ in order (sharded, 2 processes) drift apart for that reason.
  c.optim.eps = 1e-6
  # Projectors of the modalities read only (fewer leaves: faster traces and checkpoints).
  c.model.overrides = dict(c.model.overrides, modalities=("s2", "s1", "s1-asc"))
  p = c.data.datasets.planted
  p.modalities = ("s2", "s1")
  p.buckets = {"s2": 4, "s1": 4}
  p.batch_size = 8
  if variant == "evals":
    # The validation loss of PLANTED (its 2 val examples) and the k-NN monitor of PASTIS
    # (prepared by the test module), after steps 4 and 8.
    c.eval_every = 4
    c.evals.val.batch_size = 2
    c.evals.knn_pastis.max_examples = 4
  else:
    c.evals = {}
  if variant == "compiles":
    t = c.data.datasets.treesatai_ts
    t.modalities = ("s2", "s1-asc")
    t.buckets = {"s2": 4, "s1-asc": 4}
    t.crop = {}
    t.batch_size = 2
    for name, sizes in COMPILE_PATCHES.items():
      c.data.datasets[name].patch_sizes = sizes
      c.data.datasets[name].weight = 1.0
    if data_seed:
      del c.data["seed"]         # a reference to c.seed: setting it would set both
      c.data.seed = int(data_seed)
  return c


CONFIG_FILE = '''"""Test config written by tests/trainer_testlib.py."""
import sys

if {tests!r} not in sys.path:
  sys.path.append({tests!r})
import trainer_testlib


def get_config(arg=None):
  return trainer_testlib.trimmed_config(arg or "base", {data_dir!r})
'''


def write_config_file(directory: pathlib.Path, data_dir: pathlib.Path) -> pathlib.Path:
  """A config file for ``--config=FILE[:variant]`` (variants: see ``trimmed_config``)."""
  path = pathlib.Path(directory) / "trainer_test_config.py"
  path.write_text(CONFIG_FILE.format(tests=str(THIS.parent), data_dir=str(data_dir)))
  return path


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def subprocess_env(cache_dir: pathlib.Path | None, devices: int | None = None,
                   optimized: bool = False) -> dict[str, str]:
  """CPU-only JAX, ``devices`` host devices (None: one), the shared compilation cache.
  ``optimized``: XLA's default CPU optimisation levels instead of the tests' fast-compile ones
  (another fusion and reduction order: the same computation, rounded differently)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="1", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
                 os.pathsep),
             # Faster XLA compiles; every compared run uses the same setting.
             JAX_DISABLE_MOST_OPTIMIZATIONS="0" if optimized else "1")
  env["XLA_FLAGS"] = "" if optimized else "--xla_backend_optimization_level=0"  # as conftest
  if devices is not None:
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def main_args(config: str | os.PathLike, workdir: str | os.PathLike,
              overrides: dict[str, Any] | None = None, mode: tuple[str, ...] = ()) -> list[str]:
  """The command line of ``anysat_jax.main`` (or of this file in ``mode``)."""
  head = [sys.executable, str(THIS), *mode] if mode else [sys.executable, "-m",
                                                          "anysat_jax.main"]
  flags = [f"--config={config}", f"--workdir={workdir}"]
  flags += [f"--config.{k}={v}" for k, v in (overrides or {}).items()]
  return head + flags


@dataclasses.dataclass
class Run:
  """A finished (or killed) subprocess: exit code, outputs, wall and CPU time, and the
  ``summary.json`` of its workdir as it was when the process ended (None: not written)."""

  returncode: int
  stdout: str
  stderr: str
  seconds: float
  cpu_seconds: float = 0.0
  summary: dict | None = None

  def describe(self) -> str:
    return (f"exit {self.returncode} after {self.seconds:.1f} s ({self.cpu_seconds:.1f} s CPU)"
            f"\n--- stdout\n{self.stdout}\n--- stderr (tail)\n{self.stderr[-6000:]}")


class Proc:
  """A subprocess whose outputs go to files (no pipe to fill up)."""

  live: set[Proc] = set()   # started, not yet waited for (``kill_all``)
  finished: list[tuple[str, float, float]] = []   # (name, wall seconds, CPU seconds)

  def __init__(self, args: list[str], env: dict[str, str], log_dir: pathlib.Path, name: str,
               workdir: pathlib.Path | None = None):
    log_dir = pathlib.Path(log_dir)
    self.workdir = workdir
    if workdir is not None and (pathlib.Path(workdir) / "summary.json").exists():
      (pathlib.Path(workdir) / "summary.json").unlink()     # a summary of an earlier run
    log_dir.mkdir(parents=True, exist_ok=True)
    self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")  # noqa: SIM115
    self.name, self.start, self.cpu_seconds = name, time.time(), 0.0
    self.popen = subprocess.Popen(args, cwd=REPO, env=env, stdout=self._out, stderr=self._err,
                                  stdin=subprocess.DEVNULL)
    Proc.live.add(self)

  def stderr_text(self) -> str:
    return self.err_path.read_text(errors="replace")

  def stdout_text(self) -> str:
    return self.out_path.read_text(errors="replace")

  def _reap(self, block: bool) -> bool:
    """Waits for the process with ``os.wait4`` (to get its CPU time); True once it ended."""
    if self.popen.returncode is not None:
      return True
    try:
      pid, status, usage = os.wait4(self.popen.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:        # reaped by another thread meanwhile
      return self.popen.returncode is not None
    if pid == 0:
      return False
    self.popen.returncode = os.waitstatus_to_exitcode(status)
    self.cpu_seconds = usage.ru_utime + usage.ru_stime
    return True

  def poll(self) -> int | None:
    self._reap(block=False)
    return self.popen.returncode

  def wait(self, timeout: float) -> Run:
    end, timed_out = time.time() + timeout, False
    while not self._reap(block=False):
      if time.time() > end:
        self.popen.kill()
        self._reap(block=True)
        timed_out = True
        break
      time.sleep(0.05)
    Proc.live.discard(self)
    self._out.close()
    self._err.close()
    run = Run(self.popen.returncode, self.out_path.read_text(errors="replace"),
              self.err_path.read_text(errors="replace"), time.time() - self.start,
              self.cpu_seconds, read_summary(self.workdir) if self.workdir else None)
    Proc.finished.append((self.name, run.seconds, run.cpu_seconds))
    if timed_out:
      raise TimeoutError(f"{self.popen.args} timed out after {timeout} s\n{run.describe()}")
    return run

  def signal(self, signum: int) -> None:
    os.kill(self.popen.pid, signum)

  @classmethod
  def kill_all(cls) -> None:
    for proc in list(cls.live):
      if proc.poll() is None:
        proc.signal(signal.SIGKILL)
      proc.wait(30)


class Slots:
  """At most ``capacity`` subprocesses at a time: ``with slots(n):`` waits for ``n`` free slots
  (a run of ``n`` processes that must run together), first come first served. A burst of
  compiling processes on a small machine only slows every one of them (and whatever else runs
  beside them); queued, each finishes sooner and the total CPU time is the same or less."""

  def __init__(self, capacity: int):
    self.capacity, self._free, self._closed = max(1, capacity), max(1, capacity), False
    self._queue: collections.deque = collections.deque()
    self._cond = threading.Condition()

  @contextlib.contextmanager
  def __call__(self, n: int = 1):
    n, ticket = min(n, self.capacity), object()
    with self._cond:
      self._queue.append(ticket)
      self._cond.wait_for(lambda: self._closed or (self._queue[0] is ticket and self._free >= n))
      self._queue.remove(ticket)
      self._cond.notify_all()
      if self._closed:
        raise RuntimeError("scenarios closed before this run started")
      self._free -= n
    try:
      yield
    finally:
      with self._cond:
        self._free += n
        self._cond.notify_all()

  def close(self) -> None:
    """Runs still waiting for a slot raise instead of starting."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()


class Scenarios:
  """Runs scenario functions (subprocess runs and their checks) in background threads, so that
  independent runs share the CPUs, at most ``max_processes`` subprocesses at a time (scenario
  functions take their processes' slots with ``with runs.slots(n):``, after waiting for the
  results they depend on); ``result(name)`` waits for one."""

  def __init__(self, max_workers: int, max_processes: int = 2):
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, max_workers))
    self._futures: dict[str, concurrent.futures.Future] = {}
    self.slots = Slots(max_processes)

  def submit(self, name: str, fn, *args) -> None:
    self._futures[name] = self._pool.submit(fn, *args)

  def result(self, name: str, timeout: float | None = None) -> Any:
    return self._futures[name].result(timeout)

  def close(self) -> None:
    for f in self._futures.values():
      f.cancel()
    self.slots.close()
    Proc.kill_all()
    self._pool.shutdown(wait=True, cancel_futures=True)


def wait_until(predicate, proc: Proc, timeout: float, what: str) -> None:
  """Polls ``predicate()`` every 20 ms while ``proc`` runs."""
  end = time.time() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process ended before {what}:\n{proc.wait(1).describe()}")
    if time.time() > end:
      proc.signal(signal.SIGKILL)
      raise AssertionError(f"timed out waiting for {what}:\n{proc.wait(5).describe()}")
    time.sleep(0.02)


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """Finalised checkpoint steps under ``workdir/checkpoints`` (orbax renames a step's
  ``<step>.orbax-checkpoint-tmp*`` folder to ``<step>`` once it is complete)."""
  d = pathlib.Path(workdir) / "checkpoints"
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


_PROGRESS = re.compile(r"^step (\d+)/\d+ (.*?) \|", re.M)


def read_summary(workdir: str | os.PathLike) -> dict | None:
  """The run's ``workdir/summary.json`` (None if absent)."""
  path = pathlib.Path(workdir) / "summary.json"
  return json.loads(path.read_text()) if path.exists() else None


def final(run: Run) -> tuple[int, float, str]:
  """(steps, final loss (NaN if no step ran), fingerprint) of a run's summary."""
  s = run.summary
  assert s is not None, f"no summary.json:\n{run.describe()}"
  loss = float("nan") if s["final_loss"] is None else float(s["final_loss"])
  return int(s["steps"]), loss, s["fingerprint"]


def compiles(run: Run) -> tuple[int, int]:
  """(compiles, buckets) of a run's summary."""
  assert run.summary is not None, f"no summary.json:\n{run.describe()}"
  return run.summary["num_compiles"], run.summary["num_buckets"]


def logged_scalars(out: str) -> dict[int, dict[str, float]]:
  """The scalars of the trainer's progress lines (stdout): {step: {name: value}}."""
  return {int(step): {k: float(v) for k, v in (kv.split("=", 1) for kv in body.split())}
          for step, body in _PROGRESS.findall(out)}


def host(tree: Any) -> Any:
  """A pytree of JAX arrays as NumPy arrays (PRNG keys as their key data)."""
  import jax

  def leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  return jax.tree.map(leaf, tree)


def abstract_state(config: ml_collections.ConfigDict) -> Any:
  import jax

  from anysat_jax.tasks import pretrain as train
  return jax.eval_shape(lambda: train.init_state(config))


def restore(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
            step: int | None = None) -> tuple[Any, dict]:
  """(TrainState of NumPy arrays, data-iterator state) of a checkpoint, onto this process's
  first device whatever the mesh it was saved from."""
  import jax
  import orbax.checkpoint as ocp

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        abstract_state(config))
  with ocp.CheckpointManager(pathlib.Path(workdir).resolve() / "checkpoints") as manager:
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  return host(restored.state), restored.data


def saved_partition_specs(workdir: str | os.PathLike, step: int) -> dict[str, list]:
  """{array path: partition spec} from the sharding metadata orbax stored with a checkpoint's
  train state (``state/_sharding``: base64 paths -> JSON NamedSharding descriptions)."""
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state" / "_sharding"
  out = {}
  for key, value in json.loads(path.read_text()).items():
    value = json.loads(value) if isinstance(value, str) else value
    out[base64.b64decode(key).decode()] = value["partition_spec"]
  return out


def rel_l2(a: Any, b: Any) -> float:
  """||a - b|| / ||b|| over every leaf of two pytrees of float arrays."""
  import jax
  la = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)]
  lb = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(b)]
  assert len(la) == len(lb)
  num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(la, lb, strict=True))
  den = sum(float(np.sum(y ** 2)) for y in lb)
  return (num / den) ** 0.5


BLOWUP = 3e38   # finite, but sums of a few of them overflow float32


def blow_up(params: Any) -> Any:
  """``params`` with the predictor's output bias at ``BLOWUP``: finite parameters whose JEPA
  loss is inf. (NaN *inputs* do not do it on CPU: jitted, the projectors' ReLU after a
  GroupNorm turns NaN into 0, and a batch of NaN still gives a finite loss.)"""
  out = dict(params)
  out["predictor"] = dict(params["predictor"])
  out["predictor"]["proj_out"] = dict(params["predictor"]["proj_out"],
                                      bias=params["predictor"]["proj_out"]["bias"] * 0 + BLOWUP)
  return out


def _blow_up_at(step: int) -> None:
  """Makes the trainer's compiled step see ``blow_up(params)`` at its call ``step`` (= the
  train step of a fresh run); the compiled program is unchanged."""
  from anysat_jax.tasks import pretrain as train
  original = train.PretrainTask.jit_step

  def patched(self, *args, **kwargs):
    fn = original(self, *args, **kwargs)
    calls = {"n": 0}

    def wrapper(state, batch, masks, patch_size):
      if calls["n"] == step:
        state = state.replace(params=blow_up(state.params))
      calls["n"] += 1
      return fn(state, batch, masks, patch_size=patch_size)

    return wrapper

  train.PretrainTask.jit_step = patched


def _check_batch_sharding(argv: list[str]) -> None:
  """Loads the config of ``argv`` (with its ``--config.mesh.*`` overrides) and prints the
  device and rows of every shard of a batch placed by ``sharding.batch_sharding``."""
  import jax

  from anysat_jax import sharding
  path = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
  spec = importlib.util.spec_from_file_location("_trainer_test_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  for a in argv:
    if a.startswith("--config.mesh."):
      key, value = a[len("--config.mesh."):].split("=", 1)
      config.mesh[key] = int(value)
  mesh = sharding.make_mesh(config)
  n = jax.device_count()
  x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
  g = sharding.global_batch({"x": x}, sharding.batch_sharding(mesh))["x"]
  rows = sorted((s.device.id, s.index[0].start, s.index[0].stop) for s in g.addressable_shards)
  print("batch-sharding " + json.dumps({"mesh": dict(mesh.shape), "devices": n, "rows": rows}),
        flush=True)


def _script(argv: list[str]) -> None:
  from absl import app

  mode, rest = argv[0], argv[1:]
  if mode == "blowup":
    _blow_up_at(int(rest[0]))
    rest = rest[1:]
  elif mode == "sharded":
    _check_batch_sharding(rest)
  else:
    raise SystemExit(f"unknown mode {mode!r}")
  from anysat_jax import main
  app.run(main.main, argv=[sys.argv[0], *rest])


if __name__ == "__main__":
  _script(sys.argv[1:])
