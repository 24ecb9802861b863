"""Checkpoints of training runs: the orbax manager, and restoring what another run saved.

Layout: ``<workdir>/checkpoints/<step>/{state,data}`` (the ``TrainState`` and the data
iterator's JSON state) and ``<workdir>/checkpoints/config.json`` (the resolved config of the run
that wrote them, see ``trainers.loop``).

Encoder initialisation of a fine-tuning run (``config.init``, ``load_encoder``):
  scratch    random, from ``model.size``, ``model.overrides`` and ``model.projectors``;
  pretrain   ``path`` = a pretraining workdir: the EMA teacher of its latest (or ``init.step``)
             checkpoint (``optim.teacher_params``), whose shapes must match those ``model``
             settings;
  converted  ``path`` = a converted directory (``python -m anysat_jax.convert``) or an official
             ``.pth`` / ``.npz`` / ``.safetensors`` state dict; the encoder config is read from it.
Only the projectors of ``data.datasets[dataset].modalities`` are kept (spec B.1), and with
``model.date_period`` set, every L-TAE projector uses that period (366 days when fine-tuning).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils

from anysat_jax.checkpoints import convert
from anysat_jax.core import modalities as mods
from anysat_jax.core import options
from anysat_jax.models.config import EncoderConfig, encoder_config, override, run_overrides
from anysat_jax.tasks import optim

Params = Any


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Orbax manager of ``workdir/checkpoints`` (``config.checkpoint.keep`` / ``use_async``)."""
  options_ = ocp.CheckpointManagerOptions(
      max_to_keep=config.checkpoint.keep, enable_async_checkpointing=config.checkpoint.use_async,
      create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options_)


def _flat_shapes(tree: Params) -> dict[str, tuple[int, ...]]:
  return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def restore_raw(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, state tree) of a training workdir's checkpoint (latest if ``step`` is None), as
  saved, NamedTuples as dicts, leaves as host NumPy arrays (no target, so any run's state)."""
  directory = checkpoint_dir(workdir)
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  path = os.path.join(directory, str(step), "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return step, ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def pretrain_teacher(workdir: str, step: int | None = None) -> Params:
  """The EMA teacher encoder params of a pretraining workdir's checkpoint."""
  _, state = restore_raw(workdir, step)
  fields = set(optim.EmaTeacherState._fields)
  typed = jax.tree.map(
      lambda s: optim.EmaTeacherState(**s) if isinstance(s, dict) and set(s) == fields else s,
      state["opt_state"], is_leaf=lambda s: isinstance(s, dict) and set(s) == fields)
  return optim.teacher_params(typed)


def load_encoder(config: ml_collections.ConfigDict) -> tuple[Params | None, EncoderConfig]:
  """(encoder params or None for ``scratch``, encoder config) per ``config.init``, with the
  projectors of the dataset's modalities only and ``model.date_period`` applied."""
  kind, path = config.init.kind, config.init.path
  options.check("init.kind", kind, options.INIT_KINDS)
  modalities = tuple(config.data.datasets[config.dataset].modalities)
  overrides = run_overrides(config.model.overrides, config.model.projectors)
  model_cfg = lambda names=None: encoder_config(config.model.size, modalities=names, **overrides)
  if kind == "scratch":
    params, cfg = None, model_cfg(modalities)
  elif not path:
    raise ValueError(f"init.kind={kind!r} needs init.path (set --config.init.path=...)")
  elif kind == "pretrain":
    step = None if config.init.step < 0 else int(config.init.step)
    params, cfg = pretrain_teacher(path, step), model_cfg()
    want, got = _flat_shapes(convert.param_shapes(cfg)), _flat_shapes(params)
    if want != got:
      diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
      raise convert.CheckpointError(
          f"{path}: the teacher does not match model.size={config.model.size!r} with "
          f"overrides {overrides}: {', '.join(diff[:10])}")
  elif os.path.isdir(path):
    params, cfg = convert.load(path)
  else:
    sd = convert.read_state_dict(path)
    cfg = convert.infer_config(sd)
    params = convert.state_dict_to_params(sd, cfg)
  missing = [m for m in modalities if m not in cfg.modality_names]
  if missing:
    raise convert.CheckpointError(f"{path}: no projector for {missing} (it has "
                                  f"{', '.join(cfg.modality_names)})")
  cfg = dataclasses.replace(cfg, projectors=tuple(p for p in cfg.projectors if p[0] in modalities))
  if params is not None:
    dropped = {mods.get(n).param_name for n in mods.MODALITIES if n not in modalities}
    params = {k: v for k, v in params.items() if k not in dropped}
  if config.model.date_period:
    cfg = override(cfg, **{f"projectors.{name}.T": float(config.model.date_period)
                           for name in cfg.modality_names if mods.get(name).projector == "ltae"})
  return params, cfg


# ---------------------------------------------------------------------------------------------
# Resuming: the config check and the fall-back past damaged steps.

# Config keys that decide the saved state's shapes: a resume that changes them is refused.
STATE_KEYS = ("task", "dataset", "train_mode", "model", "head")


def _flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  flat = traverse_util.flatten_dict(tree, sep=".") if tree else {}
  return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def config_path(workdir: str) -> str:
  return os.path.join(checkpoint_dir(workdir), "config.json")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the resolved config beside the checkpoints (atomically; process 0)."""
  if jax.process_index() != 0:
    return
  path = config_path(workdir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  os.replace(tmp, path)


def check_config(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """Compares ``config`` with the one saved beside the checkpoints (none saved: nothing to
  compare). Raises ValueError naming the differing keys that change the state's shapes
  (``STATE_KEYS``); returns the other differing keys (logged by the caller)."""
  path = config_path(workdir)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    saved = _flat_config(json.load(f))
  now = _flat_config(json.loads(config.to_json_best_effort()))
  diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  fatal = [k for k in diff if k.split(".")[0] in STATE_KEYS]
  if fatal:
    detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in fatal[:10])
    raise ValueError(f"{checkpoint_dir(workdir)} holds checkpoints of another model: {detail} "
                     "(use another --workdir, or the saved settings)")
  return diff


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...] | None]:
  """{"a/b/0/c": shape} of a state tree or its saved metadata (NamedTuple fields, dict keys
  and sequence indices alike, as orbax saves them)."""
  name = lambda k: str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))

  def shape(leaf: Any) -> tuple[int, ...] | None:
    if not hasattr(leaf, "shape") or jax.dtypes.issubdtype(getattr(leaf, "dtype", None),
                                                           jax.dtypes.prng_key):
      return None      # typed PRNG keys are saved as their raw uint32 data
    return tuple(leaf.shape)

  return {"/".join(map(name, path)): shape(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_layout(manager: ocp.CheckpointManager, step: int, target: Any) -> None:
  """Raises ValueError if the saved state of ``step`` has other leaves or shapes than
  ``target`` (a checkpoint of another version of the train state: not damage, so it is not
  moved aside). Unreadable metadata is left to the restore (damage)."""
  path = os.path.join(str(manager.directory), str(step), "state")
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      saved = _leaf_shapes(ckptr.metadata(path).item_metadata.tree)
  except Exception:   # noqa: BLE001  (missing or damaged metadata: the restore decides)
    return
  want = _leaf_shapes(target)
  diff = sorted(k for k in set(saved) | set(want)
                if k not in saved or k not in want
                or None not in (saved[k], want[k]) and saved[k] != want[k])
  if diff:
    detail = "; ".join(f"{k}: saved {saved.get(k, 'absent')}, now {want.get(k, 'absent')}"
                       for k in diff[:6])
    raise ValueError(
        f"checkpoint of step {step} in {manager.directory} holds another train state layout "
        f"({len(diff)} leaves differ: {detail}); it was written by another version or model: "
        "resume with that version, or use another --workdir")


def restore_latest(manager: ocp.CheckpointManager, target: Any,
                   set_data: Callable[[Any], None]) -> tuple[int, Any] | None:
  """(step, state) of the newest checkpoint that restores, or None; ``set_data`` receives its
  data-iterator state (and may raise on a bad one).

  A step that fails to restore (truncated array file, damaged iterator state) is logged and
  moved aside to ``checkpoints/corrupt-<step>`` (by process 0, all processes wait), and the
  previous step is tried. A step whose saved leaves or shapes differ from ``target``'s raises
  ValueError (``check_layout``) and nothing is moved.
  """
  directory = str(manager.directory)
  while (step := manager.latest_step()) is not None:
    check_layout(manager, step, target)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
      set_data(restored.data)
      return step, restored.state
    except Exception as e:     # noqa: BLE001  (any damage: orbax, tensorstore, JSON errors)
      logging.error("checkpoint of step %d does not restore (%s: %s); moving it to "
                    "corrupt-%d and trying the previous one", step, type(e).__name__, e, step)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"restore-{step}")
      if jax.process_index() == 0:
        os.replace(os.path.join(directory, str(step)),
                   os.path.join(directory, f"corrupt-{step}"))
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"corrupt-{step}")
      manager.reload()
  return None
