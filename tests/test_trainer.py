"""The pretraining loop (``python -m anysat_jax.main`` end to end), ``PretrainTask.train_step``
and the resume helpers of ``checkpoints.manager``.

Subprocess runs (helpers in ``trainer_testlib``) use a trimmed demo config (PLANTED s2 + s1,
8 steps; see ``trainer_testlib.trimmed_config``) on the shipped samples, prepared once per
module; they start at the module's first test and run in background threads, two processes at
a time (``tl.Slots``), while the in-process tests (first in this file) run; their results are
read from ``summary.json``. Checked: a (data=2,
fsdp=4) mesh over 8 CPU devices and 2 processes (gloo collectives, FSDP across them) against a
single-device run; one compile per (dataset, patch size) bucket; kill -9 / SIGTERM and resume
against an uninterrupted run, SIGTERM to one of two processes, and a rerun of a finished run;
non-finite losses. In process: one step leaves the projectors of absent modalities untouched,
the EMA teacher follows its schedule, ``skip`` skips a step; a damaged newest checkpoint falls
back to the previous one; a resume with another model names the differing keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import signal
from collections import Counter

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
import trainer_testlib as tl
from tensorflow.core.util import event_pb2

from anysat_jax.checkpoints import manager as ckpt
from anysat_jax.core import modalities as mods
from anysat_jax.tasks import optim, schedules
from anysat_jax.tasks import pretrain as train
from anysat_jax.tasks.state import TrainState
from anysat_jax.trainers import pretrain as trainer
from input_pipeline import loader, mixture, prepare

TIMEOUT = 900  # seconds of wall time per run: generous, the machine may be shared
REL = 1e-5     # rel-L2 / relative tolerance between runs whose reductions may be reordered
# Any rounding difference grows along the run: a ReLU input within rounding of 0 flips, the
# gradient of a bias that was exactly 0 (a channel dead on the whole batch) becomes ~1e-5, and
# Adam, which normalises it, moves that bias by a whole learning rate. Measured on the trimmed
# demo config: the single-device run against itself compiled with XLA's default optimisation
# levels (same computation, another fusion order) differs by 2e-7 in the loss at step 1, 2e-5
# at step 3, 3e-3 at step 7; the sharded run against the single-device one by as much, no more.
# So steps 1-2 are compared at REL, and later steps and the final parameters against that
# control (``rounding``): within ROUNDING_FACTOR x its deviation so far.
ROUNDING_FACTOR = 10


@dataclasses.dataclass
class Env:
  root: pathlib.Path
  data_dir: pathlib.Path
  config_file: pathlib.Path
  cache_dir: pathlib.Path
  logs: pathlib.Path

  def config(self, variant: str = "base"):
    return tl.trimmed_config(variant, str(self.data_dir))

  def workdir(self, name: str) -> pathlib.Path:
    return self.root / "runs" / name


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
  root = tmp_path_factory.mktemp("trainer")
  data_dir = root / "data"
  # Prepared once here, so that concurrent subprocesses find them built.
  for name, modalities in (("planted", ("s2", "s1")), ("treesatai_ts", ("s2", "s1-asc")),
                           ("pastis_hd_cls", ("s2", "s1"))):
    prepare.ensure_prepared(name, str(data_dir), modalities=modalities)
  return Env(root, data_dir, tl.write_config_file(root, data_dir), root / "xla_cache",
             root / "logs")


def _start(env: Env, name: str, overrides: dict | None = None, mode: tuple[str, ...] = (),
           devices: int | None = None, config: str = "", log: str = "",
           optimized: bool = False) -> tl.Proc:
  cfg = f"{env.config_file}:{config}" if config else env.config_file
  args = tl.main_args(cfg, env.workdir(name), overrides, mode)
  return tl.Proc(args, tl.subprocess_env(env.cache_dir, devices, optimized), env.logs,
                 log or name, env.workdir(name))


def _ok(run: tl.Run) -> tl.Run:
  assert run.returncode == 0, run.describe()
  return run


# --- The subprocess runs, in background threads, 2 processes at a time (see ``runs``) -----


def _reference(env: Env, runs: tl.Scenarios) -> tl.Run:
  """The uninterrupted single-device run the others are compared with."""
  with runs.slots(1):
    return _start(env, "reference", config="evals").wait(TIMEOUT)


def _rounding(env: Env, runs: tl.Scenarios) -> tl.Run:
  """The reference's training on one device, compiled at XLA's default optimisation levels:
  how far rounding alone moves the run (the control of the sharded and 2-process runs)."""
  with runs.slots(1):
    return _start(env, "rounding", optimized=True).wait(TIMEOUT)


SHARDED = {"mesh.data": 2, "mesh.fsdp": 4, "mesh.fsdp_min_size": 1024}


def _sharded(env: Env, runs: tl.Scenarios) -> tl.Run:
  with runs.slots(1):
    return _start(env, "sharded", SHARDED, mode=("sharded",), devices=8).wait(TIMEOUT)


def _two_process_flags(port: int, i: int) -> dict:
  return {"distributed.coordinator_address": f"127.0.0.1:{port}",
          "distributed.num_processes": 2, "distributed.process_id": i,
          "distributed.cpu_collectives": "gloo", "data.shard_by_process": False,
          # FSDP across the processes too: each holds half of the large leaves.
          "mesh.data": 1, "mesh.fsdp": 2, "mesh.fsdp_min_size": 1024}


def _two_processes(env: Env, runs: tl.Scenarios) -> list[tl.Run]:
  with runs.slots(2):
    port = tl.free_port()
    # One workdir for both: orbax writes one checkpoint from all processes.
    procs = [_start(env, "two_processes", _two_process_flags(port, i), log=f"two_processes_{i}")
             for i in range(2)]
    return [p.wait(TIMEOUT) for p in procs]


def _two_processes_one_sigterm(env: Env, runs: tl.Scenarios) -> tuple[list, list[int], list]:
  """The 2-process run, SIGTERM to process 1 only once the trainers started; then resumed."""
  runs.result("two_processes")      # its compiled programs are in the cache now
  with runs.slots(2):
    return _two_sigterm_runs(env)


def _two_sigterm_runs(env: Env) -> tuple[list, list[int], list]:
  port = tl.free_port()
  procs = [_start(env, "two_sigterm", _two_process_flags(port, i), log=f"two_sigterm_{i}")
           for i in range(2)]
  tl.wait_until(lambda: "mesh {" in procs[1].stdout_text(), procs[1], TIMEOUT,
                "the trainer start")
  procs[1].signal(signal.SIGTERM)
  stopped = [p.wait(TIMEOUT) for p in procs]
  saved = tl.checkpoint_steps(env.workdir("two_sigterm"))
  port = tl.free_port()
  procs = [_start(env, "two_sigterm", _two_process_flags(port, i), log=f"two_sigterm_resumed_{i}")
           for i in range(2)]
  return stopped, saved, [p.wait(TIMEOUT) for p in procs]


def _covering_seed(config, times: int = 2) -> tuple[int, list[tuple[str, int]]]:
  """The first seed whose mixture draws every (dataset, patch size) ``times`` times in
  ``config.total_steps`` steps, and its draws."""
  d = config.data.datasets
  weights = {n: float(d[n].weight) for n in d}
  sizes = {n: tuple(d[n].patch_sizes) for n in d}
  pairs = {(n, p) for n in d for p in sizes[n]}
  for seed in range(10_000):
    picks = [mixture.choose(seed, s, weights, sizes) for s in range(config.total_steps)]
    counts = Counter(picks)
    if set(counts) == pairs and min(counts.values()) >= times:
      return seed, picks
  raise AssertionError("no seed draws every bucket twice")


def _compiles(env: Env, runs: tl.Scenarios) -> tuple[int, list, tl.Run]:
  seed, picks = _covering_seed(env.config("compiles"))
  runs.result("reference")          # the init and PLANTED 30 m programs are in the cache now
  with runs.slots(1):
    return seed, picks, _start(env, "compiles", config=f"compiles-{seed}").wait(TIMEOUT)


def _killed(env: Env, runs: tl.Scenarios) -> tuple[tl.Run, tl.Run]:
  runs.result("reference")          # its compiled programs are in the cache now
  with runs.slots(1):               # the killed run, then its resumption
    return _killed_runs(env)


def _killed_runs(env: Env) -> tuple[tl.Run, tl.Run]:
  workdir = env.workdir("killed")
  proc = _start(env, "killed")
  tl.wait_until(lambda: 4 in tl.checkpoint_steps(workdir), proc, TIMEOUT,
                "the checkpoint of step 4")
  proc.signal(signal.SIGKILL)
  killed = proc.wait(60)
  return killed, _start(env, "killed", log="killed_resumed").wait(TIMEOUT)


def _sigterm(env: Env, runs: tl.Scenarios) -> tuple[tl.Run, list[int], tl.Run]:
  runs.result("reference")
  with runs.slots(1):               # the stopped run, then its resumption
    return _sigterm_runs(env)


def _sigterm_runs(env: Env) -> tuple[tl.Run, list[int], tl.Run]:
  proc = _start(env, "sigterm")
  # The handler is installed before the trainer logs its mesh: it stops after step 1.
  tl.wait_until(lambda: "mesh {" in proc.stdout_text(), proc, TIMEOUT, "the trainer start")
  proc.signal(signal.SIGTERM)
  stopped = proc.wait(TIMEOUT)
  saved = tl.checkpoint_steps(env.workdir("sigterm"))
  return stopped, saved, _start(env, "sigterm", log="sigterm_resumed").wait(TIMEOUT)


def _nonfinite(env: Env, runs: tl.Scenarios) -> tl.Run:
  runs.result("reference")
  with runs.slots(1):
    return _start(env, "nonfinite", mode=("blowup", "5")).wait(TIMEOUT)   # inf loss at step 5


def _rerun(env: Env, runs: tl.Scenarios) -> tl.Run:
  runs.result("reference")
  with runs.slots(1):
    return _start(env, "reference", log="rerun", config="evals").wait(TIMEOUT)


# Subprocesses at a time: on a small machine a burst of compiling processes only slows them all
# and the tests running beside them (another pytest worker, this module's in-process tests).
MAX_PROCESSES = 2
# In start order; the runs each test needs.
SCENARIOS = {"reference": _reference, "sharded": _sharded, "two_processes": _two_processes,
             "rounding": _rounding,
             "compiles": _compiles, "killed": _killed, "sigterm": _sigterm,
             "nonfinite": _nonfinite, "rerun": _rerun,
             "two_sigterm": _two_processes_one_sigterm}
NEEDS = {
    "test_sharded_equals_single_device": ("reference", "sharded", "rounding"),
    "test_two_processes_equal_one_process": ("reference", "two_processes", "rounding"),
    "test_one_compile_per_bucket": ("reference", "compiles"),
    "test_evaluations_and_console": ("reference",),
    "test_kill_and_resume_equals_uninterrupted": ("reference", "killed"),
    "test_rerun_of_a_finished_run": ("reference", "rerun"),
    "test_sigterm_saves_and_exits_cleanly": ("reference", "sigterm"),
    "test_nonfinite_loss_stops_and_keeps_last_checkpoint": ("reference", "nonfinite"),
    "test_sigterm_to_one_of_two_processes_stops_both": ("two_processes", "two_sigterm"),
}


@pytest.fixture(scope="module", autouse=True)
def runs(request, env):
  """Starts, at the module's first test, every subprocess run its selected tests need (their
  threads at once, their processes ``MAX_PROCESSES`` at a time, in ``SCENARIOS`` order)."""
  selected = {item.name for item in request.session.items
              if getattr(item, "module", None) is request.module}
  needed = {run for name in selected for run in NEEDS.get(name, ())}
  scenarios = tl.Scenarios(len(needed), MAX_PROCESSES)
  for name, fn in SCENARIOS.items():
    if name in needed:
      scenarios.submit(name, fn, env, scenarios)
  yield scenarios
  scenarios.close()
  if tl.Proc.finished:
    print("\ntrainer runs (wall s / CPU s): " + ", ".join(
        f"{name} {wall:.0f}/{cpu:.0f}" for name, wall, cpu in tl.Proc.finished))


@pytest.fixture(scope="module")
def reference(runs) -> tl.Run:
  run = _ok(runs.result("reference"))
  step, loss, fingerprint = tl.final(run)
  assert step == 8 and np.isfinite(loss) and run.summary["num_compiles"] == 1
  assert run.summary["metrics"]["loss/planted"] == pytest.approx(loss, rel=REL)
  # The lines printed for users say the same.
  assert f"final: step=8 loss={loss:.6f} fingerprint={fingerprint}" in run.stdout
  assert "compiles: 1 for 1 buckets" in run.stdout
  return run


# --- 7, 8. in process: unused projectors, EMA teacher, skipped non-finite steps -----------
# (The in-process tests come first in this file: they run while the first subprocesses do.)

TOTAL, EMA_START = 10, 0.9


@pytest.fixture(scope="module")
def steps(env):
  """Three ``train_step``s on PLANTED batches (s2 + s1) of a model with all 11 projectors,
  from a state whose teacher, AdamW moments and counts were perturbed (so that "unchanged"
  and "follows the EMA" are not trivially true), then a step whose loss is inf."""
  config = env.config()
  config.model.overrides = {k: v for k, v in config.model.overrides.items()
                            if k != "modalities"}
  config.total_steps = TOTAL
  config.ema.start, config.ema.end = EMA_START, 1.0
  config.nonfinite = "skip"
  data = trainer.build_data(config)
  optimize = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)   # faster compiles
  try:
    return _run_steps(config, data, np.random.default_rng(0))
  finally:
    jax.config.update("jax_disable_most_optimizations", optimize)


def _run_steps(config, data, rng):
  def noise(x, positive=False):
    n = rng.normal(size=x.shape).astype(x.dtype) * 0.1
    return jnp.asarray(np.abs(n) if positive else np.asarray(x) + n)

  s0 = jax.jit(functools.partial(train.init_state, config))()
  adam, plateau, ema = s0.opt_state
  adam = adam._replace(count=jax.tree.map(lambda c: c + 3, adam.count),
                       mu=jax.tree.map(noise, adam.mu),
                       nu=jax.tree.map(functools.partial(noise, positive=True), adam.nu))
  ema = ema._replace(teacher=jax.tree.map(noise, ema.teacher))
  s0 = s0.replace(opt_state=(adam, plateau, ema))
  step_fn = jax.jit(functools.partial(train.PretrainTask(config).train_step, patch_size=30))
  state, states, batches, metrics = s0, [tl.host(s0)], [], []
  for i in range(4):
    name, patch, batch = next(data)
    assert (name, patch) == ("planted", 30)
    batch = loader.model_inputs(batch)
    side = trainer._side(patch, config.data.datasets[name], batch)
    masks = train.host_masks(config, i, len(batch["s2"]), side)
    if i == 3:   # finite parameters, an inf loss: the step is skipped
      state = state.replace(params=tl.blow_up(state.params))
    state, m = step_fn(state, batch, masks)
    states.append(tl.host(state))
    batches.append(batch)
    metrics.append(tl.host(m))
  return config, states, batches, metrics


def _by_path(tree) -> dict[str, np.ndarray]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_unused_projectors_untouched(steps):
  """Projectors of modalities absent from the batch: parameters, AdamW moments and per-leaf
  counts bitwise unchanged; used leaves all updated; the teacher follows every encoder leaf,
  used or not: t <- m t + (1 - m) p."""
  _, states, batches, metrics = steps
  before, after, batch = states[0], states[1], batches[0]
  assert bool(metrics[0]["finite"])
  present = set(mods.modality_keys(batch))
  assert present == {"s2", "s1"}
  unused_projectors = {mods.get(m).param_name for m in mods.MODALITIES if m not in present}
  for m in ("aerial", "spot", "naip", "s1-asc", "l8", "aerial-flair"):
    assert mods.get(m).param_name in unused_projectors
  used = _by_path(train.used_tree(before.params, tuple(batch)))
  p0, p1 = _by_path(before.params), _by_path(after.params)
  (a0, _, e0), (a1, _, e1) = before.opt_state, after.opt_state
  mu0, mu1, nu0, nu1 = (_by_path(x) for x in (a0.mu, a1.mu, a0.nu, a1.nu))
  c0, c1 = _by_path(a0.count), _by_path(a1.count)
  t0, t1 = _by_path(e0.teacher), _by_path(e1.teacher)
  m = np.float32(optim.ema_momentum_schedule(TOTAL, EMA_START, 1.0)(0))
  seen = set()
  for k in p0:
    parts = k.split("/")
    unused = parts[0] == "encoder" and parts[1] in unused_projectors
    assert used[k] == (not unused), k
    if unused:
      seen.add(parts[1])
      for x0, x1 in ((p0, p1), (mu0, mu1), (nu0, nu1), (c0, c1)):
        np.testing.assert_array_equal(x1[k], x0[k], err_msg=k)
    else:
      assert int(c1[k]) == int(c0[k]) + 1, k
      assert not np.array_equal(p1[k], p0[k]), k
      assert not np.array_equal(mu1[k], mu0[k]), k
    if parts[0] == "encoder":
      tk = k[len("encoder/"):]
      want = m * t0[tk] + (1 - m) * p0[k]
      np.testing.assert_allclose(t1[tk], want, rtol=1e-6, atol=1e-7, err_msg=k)
      assert not np.array_equal(t1[tk], t0[tk]), k
  assert seen == unused_projectors


def test_ema_schedule_and_teacher_recursion(steps):
  sched = optim.ema_momentum_schedule(1000, 0.996, 1.0)
  assert float(sched(0)) == pytest.approx(0.996, abs=1e-7)
  assert float(sched(500)) == pytest.approx(0.998, abs=1e-7)
  assert float(sched(1000)) == pytest.approx(1.0, abs=1e-7)
  assert float(sched(2000)) == pytest.approx(1.0, abs=1e-7)
  _, states, _, _ = steps
  # The teacher after k = 3 steps against t_{i+1} = m_i t_i + (1 - m_i) p_i in float64, with
  # m_i = start + i (1 - start) / total and p_i the student before step i (a used leaf and an
  # unused one).
  for leaf in ("projector_s2/in_fc_0/kernel", "projector_aerial/fc_0/kernel"):
    t = np.asarray(_by_path(optim.teacher_params(states[0].opt_state))[leaf], np.float64)
    for i in range(3):
      mi = EMA_START + i * (1.0 - EMA_START) / TOTAL
      p = np.asarray(_by_path(states[i].params["encoder"])[leaf], np.float64)
      t = mi * t + (1 - mi) * p
    got = _by_path(optim.teacher_params(states[3].opt_state))[leaf]
    np.testing.assert_allclose(got, t, rtol=1e-5, atol=1e-7, err_msg=leaf)
  assert int(states[3].opt_state[2].count) == 3


def test_nonfinite_step_skipped(steps):
  """``nonfinite="skip"``: a step with an inf loss leaves params and optimiser state as they
  were (the parameters it saw), and only counts the step."""
  _, states, _, metrics = steps
  assert not bool(metrics[3]["finite"]) and not np.isfinite(metrics[3]["loss"])
  before, after = tl.host(states[3].replace(params=tl.blow_up(states[3].params))), states[4]
  assert int(after.step) == int(before.step) + 1
  for x, y in zip(jax.tree.leaves((after.params, after.opt_state)),
                  jax.tree.leaves((before.params, before.opt_state)), strict=True):
    np.testing.assert_array_equal(x, y)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after.params))


# --- Resume that survives: damaged checkpoints, another model -----------------------------


def _tiny_state(i: int) -> TrainState:
  return TrainState(jnp.int32(i), {"w": jnp.arange(1000, dtype=jnp.float32) + i},
                    {"m": jnp.ones(3) * i}, jax.random.key(i))


@pytest.mark.parametrize("damage", ["arrays", "iterator"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, damage):
  """A truncated array file, or a truncated data-iterator state, in the newest checkpoint:
  the step is moved to ``corrupt-<step>`` and the previous one restored."""
  config = ml_collections.ConfigDict(dict(checkpoint=dict(keep=5, use_async=False)))
  with ckpt.checkpoint_manager(str(tmp_path), config) as manager:
    for i in (1, 2):
      manager.save(i, args=ocp.args.Composite(state=ocp.args.StandardSave(_tiny_state(i)),
                                              data=ocp.args.JsonSave({"step": i})))
  step_dir = tmp_path / "checkpoints" / "2"
  if damage == "arrays":
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    big = max(files, key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[:100])
  else:
    (step_dir / "data" / "metadata").write_text('{"step": ')
  data = {}
  with ckpt.checkpoint_manager(str(tmp_path), config) as manager:
    step, state = ckpt.restore_latest(manager, jax.eval_shape(lambda: _tiny_state(0)),
                                      data.update)
  assert step == 1 and data == {"step": 1}
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.arange(1000) + 1.0)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "corrupt-2"]


def test_checkpoint_of_another_state_layout_is_refused_not_moved(tmp_path):
  """A checkpoint whose state has other leaves (another version's optimiser state) or shapes:
  a ValueError naming them; the checkpoint stays where it is."""
  config = ml_collections.ConfigDict(dict(checkpoint=dict(keep=5, use_async=False)))
  with ckpt.checkpoint_manager(str(tmp_path), config) as manager:
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(_tiny_state(1)),
                                            data=ocp.args.JsonSave({"step": 1})))
  other_leaves = TrainState(jnp.int32(0), {"w": jnp.zeros(1000)}, {"m": jnp.ones(3),
                                                                  "plateau": jnp.ones(())},
                            jax.random.key(0))
  other_shape = TrainState(jnp.int32(0), {"w": jnp.zeros(999)}, {"m": jnp.ones(3)},
                           jax.random.key(0))
  with ckpt.checkpoint_manager(str(tmp_path), config) as manager:
    with pytest.raises(ValueError, match=r"1 leaves differ: opt_state/plateau: saved absent"):
      ckpt.restore_latest(manager, jax.eval_shape(lambda: other_leaves), lambda d: None)
    with pytest.raises(ValueError, match=r"params/w: saved \(1000,\), now \(999,\)"):
      ckpt.restore_latest(manager, jax.eval_shape(lambda: other_shape), lambda d: None)
    step, _ = ckpt.restore_latest(manager, jax.eval_shape(lambda: _tiny_state(0)),
                                  lambda d: None)
  assert step == 1
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_resume_with_another_model_names_the_keys(env, tmp_path):
  config = env.config()
  ckpt.write_config(str(tmp_path), config)
  other = env.config()
  other.total_steps = 20
  assert ckpt.check_config(str(tmp_path), other) == ["total_steps"]
  other.model.overrides = dict(other.model.overrides, dim=128)
  other.model.predictor.depth = 2
  with pytest.raises(ValueError, match=r"model.overrides.dim: saved 64, now 128; "
                                       r"model.predictor.depth: saved 1, now 2"):
    ckpt.check_config(str(tmp_path), other)


def test_plateau_lowers_the_lr_after_patience_evaluations():
  """torch's ReduceLROnPlateau: x factor once more than ``patience`` evaluations did not
  improve on the best; the scale multiplies the updates and sits in the pretraining
  optimiser's state (checkpointed with it)."""
  tx = optim.plateau_scaling(0.1, patience=2)
  state = tx.init({"w": jnp.ones(3)})
  scales = []
  for value in (1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95):
    state = optim.plateau_update(state, value, 0.1, 2)
    scales.append(float(schedules.plateau_scale(state)))
  assert scales == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.1])
  updates, _ = tx.update({"w": jnp.full(3, 2.0)}, state)
  np.testing.assert_allclose(updates["w"], 0.2, rtol=1e-6)
  config = tl.trimmed_config("base", "unused")
  opt_state = optim.pretrain_optimizer(config).init({"encoder": {"w": jnp.ones(2)}})
  assert float(schedules.plateau_scale(opt_state)) == 1.0
  scales = []
  for _ in range(config.optim.plateau_patience + 2):    # the first sets the best
    opt_state = optim.plateau_update(opt_state, 1.0, config.optim.plateau_factor,
                                     config.optim.plateau_patience)
    scales.append(float(schedules.plateau_scale(opt_state)))
  assert scales == pytest.approx([1.0] * (config.optim.plateau_patience + 1) + [0.1])


def test_evaluations_and_console(env, reference):
  """The reference run (``evals`` variant) validates and runs the k-NN monitor after steps 4
  and 8: finite values in summary.json, TensorBoard and its console, which stays short."""
  m = reference.summary["metrics"]
  assert np.isfinite(m["val/loss"]) and m["val/loss"] == m["val/planted/loss"]
  assert m["val/planted/loss"] == pytest.approx(
      m["val/planted/jepa"] + m["val/planted/contrastive"], rel=1e-5)   # contrastive weight 1
  assert m["val/planted/examples"] == 2
  assert 0 <= m["knn/knn_pastis/f1_weighted"] <= 1 and 0 <= m["knn/knn_pastis/accuracy"] <= 1
  assert m["knn/knn_pastis/n_train"] == 4 and m["knn/knn_pastis/n_val"] == 2
  evals = re.findall(r"^eval (\d+): val/loss=(\S+) val/planted=\S+ knn/knn_pastis accuracy=\S+ "
                     r"f1_weighted=\S+ \(", reference.stdout, re.M)
  assert [int(step) for step, _ in evals] == [4, 8], reference.stdout
  assert float(evals[1][1]) == pytest.approx(m["val/loss"], abs=1e-4)
  assert float(evals[0][1]) != float(evals[1][1])      # evaluated with the trained params
  tags = set()
  for path in env.workdir("reference").glob("events.out.tfevents.*"):
    for record in tf.data.TFRecordDataset(str(path)):
      tags |= {v.tag for v in event_pb2.Event.FromString(record.numpy()).summary.value}
  assert {"loss", "loss/planted", "val/loss", "knn/knn_pastis/accuracy"} <= tags, tags
  # The console: start, 8 progress lines, 1 compile, 2 evaluations, 2 checkpoints, 2 final.
  lines = (reference.stdout + reference.stderr).splitlines()
  assert len(lines) <= 40, "\n".join(lines)
  assert sum(x.startswith("step ") for x in lines) == 8
  assert sum(x.startswith("compiled planted/30 in ") for x in lines) == 1
  assert lines[0].startswith("start: mesh {'data': 1, 'fsdp': 1} over 1 devices")


def _losses(run: tl.Run) -> dict[int, float]:
  return {s: v["loss"] for s, v in tl.logged_scalars(run.stdout).items() if "loss" in v}


def _deviations(run: tl.Run, reference: tl.Run, steps: int = 8) -> dict[int, float]:
  """Relative deviation of ``run``'s logged loss from the reference's at every step."""
  got, want = _losses(run), _losses(reference)
  assert sorted(want) == list(range(1, steps + 1)), want
  assert sorted(got) == sorted(want), got
  return {s: abs(got[s] - want[s]) / abs(want[s]) for s in want}


def _assert_same_losses(run: tl.Run, reference: tl.Run, rounding: tl.Run) -> None:
  """Steps 1-2 within REL; step s > 2 within ROUNDING_FACTOR x the largest deviation of the
  ``rounding`` control up to s (at least REL)."""
  dev, control = _deviations(run, reference), _deviations(_ok(rounding), reference)
  for s in sorted(dev):
    bound = REL if s <= 2 else max(REL, ROUNDING_FACTOR * max(control[t] for t in control
                                                              if t <= s))
    assert dev[s] <= bound, (s, dev, control)


def _assert_close_states(env: Env, name: str) -> None:
  """Student and teacher parameters of run ``name`` within ROUNDING_FACTOR x the rel-L2 of
  the ``rounding`` control's from the reference's, same step."""
  config = env.config()
  a, b, c = (tl.restore(env.workdir(n), config)[0] for n in (name, "reference", "rounding"))
  assert int(a.step) == int(b.step) == int(c.step)
  for tree in (lambda s: s.params, lambda s: optim.teacher_params(s.opt_state)):
    control = tl.rel_l2(tree(c), tree(b))
    assert tl.rel_l2(tree(a), tree(b)) <= max(REL, ROUNDING_FACTOR * control), control
  print(f"{name} vs single device: params rel-L2 {tl.rel_l2(a.params, b.params):.2g} "
        f"(rounding control {tl.rel_l2(c.params, b.params):.2g})")


# --- 1. sharded == single device ----------------------------------------------------------


def test_sharded_equals_single_device(env, runs, reference):
  """(data=2, fsdp=4) over 8 CPU devices, FSDP on every leaf of >= 1024 elements, against
  the single-device run: the losses of steps 1-2 within REL, later ones and the final parameters
  within ROUNDING_FACTOR x the rounding control's deviation (see ROUNDING_FACTOR)."""
  run = _ok(runs.result("sharded"))
  # The batch: one distinct row per device, over all 8 devices.
  line = next(x for x in run.stdout.splitlines() if x.startswith("batch-sharding "))
  info = json.loads(line.split(" ", 1)[1])
  assert info["mesh"] == {"data": 2, "fsdp": 4} and info["devices"] == 8
  assert sorted(d for d, _, _ in info["rows"]) == list(range(8))
  assert sorted((start, stop) for _, start, stop in info["rows"]) == [(i, i + 1)
                                                                      for i in range(8)]
  assert "mesh {'data': 2, 'fsdp': 4} over 8 devices" in run.stdout
  # The saved train state really was sharded: the large leaves split over "fsdp".
  specs = tl.saved_partition_specs(env.workdir("sharded"), 8)
  split = {k for k, spec in specs.items() if "fsdp" in spec}
  assert "params.encoder.combiner.block_0.mlp.fc1.kernel" in split
  assert "params.predictor.proj_out.bias" not in split and len(split) < len(specs)
  _assert_same_losses(run, reference, runs.result("rounding"))
  _assert_close_states(env, "sharded")


# --- 2. two processes == one process ------------------------------------------------------


def test_two_processes_equal_one_process(env, runs, reference):
  """2 processes x 1 CPU device (gloo collectives, each reading the global batch and keeping
  its rows; the batch and the large leaves split over the 2 processes) against 1 process: the
  same losses and final parameters (REL, then the rounding control's bound). (The fingerprints
  differ: the gradient sums are reduced in another order.)"""
  two = runs.result("two_processes")
  for r in two:
    _ok(r)
    assert "mesh {'data': 1, 'fsdp': 2} over 2 devices, 2 processes" in r.stdout
  specs = tl.saved_partition_specs(env.workdir("two_processes"), 8)
  assert "fsdp" in specs["params.encoder.combiner.block_0.mlp.fc1.kernel"]
  step, loss, fingerprint = tl.final(two[0])       # process 0 writes the summary
  ref_step, _, ref_fingerprint = tl.final(reference)
  # Both processes print the same final line (the fingerprint gathers across them).
  assert two[0].stdout.splitlines()[-1] == two[1].stdout.splitlines()[-1]
  assert two[0].stdout.splitlines()[-1] == f"final: step=8 loss={loss:.6f} " \
                                           f"fingerprint={fingerprint}"
  assert step == ref_step == 8
  _assert_same_losses(two[0], reference, runs.result("rounding"))
  _assert_close_states(env, "two_processes")
  print(f"2 processes: fingerprint {fingerprint}, 1 process: {ref_fingerprint}")


# --- 3. one compile per bucket ------------------------------------------------------------


def test_one_compile_per_bucket(env, runs):
  """2 datasets x 2 patch sizes, each drawn twice in 8 steps: 4 compiles for 4 buckets."""
  seed, picks, run = runs.result("compiles")
  assert env.config(f"compiles-{seed}").data.seed == seed and env.config().seed == 32
  pairs = {(n, p) for n, sizes in tl.COMPILE_PATCHES.items() for p in sizes}
  assert len(pairs) == 4 and set(picks) == pairs and min(Counter(picks).values()) >= 2
  _ok(run)
  assert tl.compiles(run) == (len(pairs), len(pairs))
  assert run.summary["compiles"] == {f"{n}/{p}": 1 for n, p in pairs}
  assert f"compiles: {len(pairs)} for {len(pairs)} buckets" in run.stdout
  # The per-dataset losses logged at every step show the datasets the mixture drew.
  logged = tl.logged_scalars(run.stdout)
  for step, (name, _) in enumerate(picks, start=1):
    assert [k for k in logged[step] if k.startswith("loss/")] == [f"loss/{name}"], step


# --- 4. kill -9 and resume == uninterrupted -----------------------------------------------


def test_kill_and_resume_equals_uninterrupted(runs, reference):
  killed, resumed = runs.result("killed")
  assert killed.returncode == -signal.SIGKILL, killed.describe()
  assert killed.summary is None
  _ok(resumed)
  found = re.findall(r"^resumed from checkpoint at step (\d+)$", resumed.stdout, re.M)
  assert found and int(found[0]) in (4, 8), resumed.stdout   # 8: killed before it exited
  step, loss, fingerprint = tl.final(resumed)
  ref_step, ref_loss, ref_fingerprint = tl.final(reference)
  assert (step, fingerprint) == (ref_step, ref_fingerprint)
  assert loss == ref_loss or int(found[0]) == 8


def test_rerun_of_a_finished_run(runs, reference):
  """Starting again a run whose last checkpoint is at ``total_steps`` changes nothing."""
  run = _ok(runs.result("rerun"))
  assert "resumed from checkpoint at step 8" in run.stdout
  assert tl.compiles(run) == (0, 0)
  step, loss, fingerprint = tl.final(run)
  assert (step, fingerprint) == (8, tl.final(reference)[2])
  assert np.isnan(loss) and run.summary["final_loss"] is None       # no step ran


# --- 5. SIGTERM: save and exit cleanly ----------------------------------------------------


def test_sigterm_saves_and_exits_cleanly(env, runs, reference):
  stopped, saved, resumed = runs.result("sigterm")
  _ok(stopped)
  assert "stopped by signal at step 1; checkpoint saved" in stopped.stdout
  assert stopped.summary is None
  assert saved == [1]
  state, data = tl.restore(env.workdir("sigterm"), env.config(), 1)
  assert int(state.step) == 1 and data["step"] == 1
  # Resuming from step 1 ends where the uninterrupted run does.
  _ok(resumed)
  assert "resumed from checkpoint at step 1" in resumed.stdout
  assert tl.final(resumed) == tl.final(reference)


# --- 6. non-finite losses -----------------------------------------------------------------


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(env, runs, reference):
  """``nonfinite="stop"``: an inf loss at step 5 stops the run with an error naming the step;
  the checkpoint of step 4 is intact. (``skip``: ``test_nonfinite_step_skipped``.)"""
  run = runs.result("nonfinite")
  assert run.returncode != 0, run.describe()
  assert "NonFiniteLossError: non-finite loss at step 5 (planted, patch 30 m)" in run.stderr
  assert "last good checkpoint: step 4" in run.stderr
  assert run.summary is None
  assert tl.checkpoint_steps(env.workdir("nonfinite")) == [4]
  config = env.config()
  state, data = tl.restore(env.workdir("nonfinite"), config, 4)
  assert int(state.step) == 4 and data["step"] == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  # It is the uninterrupted run's checkpoint of step 4, bit for bit.
  want, _ = tl.restore(env.workdir("reference"), config, 4)
  # The reference also evaluated at step 4: its plateau state has seen a validation loss.
  want = want.replace(opt_state=(want.opt_state[0], state.opt_state[1], want.opt_state[2]))
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(x, y)


def test_sigterm_to_one_of_two_processes_stops_both(env, runs):
  """SIGTERM to process 1 alone: the stop is agreed across processes, so both save the same
  step, print the same line and exit 0 (no deadlock in the collective save); resumed, the run
  ends where the uninterrupted 2-process run does, bit for bit."""
  stopped, saved, resumed = runs.result("two_sigterm")
  lines = []
  for r in stopped:
    _ok(r)
    assert r.summary is None
    lines.append(re.findall(r"^stopped by signal at step (\d+); checkpoint saved$", r.stdout,
                            re.M))
  assert lines[0] == lines[1] and len(lines[0]) == 1, lines
  step = int(lines[0][0])
  assert 1 <= step < 8 and saved == sorted({step, *(s for s in (4,) if s < step)}), saved
  for r in resumed:
    _ok(r)
    assert f"resumed from checkpoint at step {step}" in r.stdout
  want = _ok(runs.result("two_processes")[0])
  assert tl.final(resumed[0]) == tl.final(want)
