"""The optimisers of both tasks (``pretrain_optimizer``, ``finetune_optimizer``) and their
pieces: PyTorch-style AdamW that skips unused parameters, and the EMA teacher as an Optax
transformation.

Typical use over ``params = {"encoder": ..., "predictor": ..., "mask_token": ...}``::

  tx = optax.chain(adamw_skip_unused(5e-5),
                   ema_teacher(ema_momentum_schedule(total_steps), select="encoder"))
  updates, opt_state = tx.update(grads, opt_state, params, used=used)   # used: static bools
  params = optax.apply_updates(params, updates)
  teacher = teacher_params(opt_state)

``optax.chain`` hands every member the same pre-update ``params``, so the teacher follows the
student's weights from before this step's update, as the reference (EMA in
``on_after_backward``, before ``optimizer.step``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from anysat_jax.tasks import schedules


class EmaTeacherState(NamedTuple):
  """count: int32 () EMA updates done; teacher: the EMA copy of the selected params."""

  count: jax.Array
  teacher: Any


def ema_momentum_schedule(total_steps: int, start: float = 0.996,
                          end: float = 1.0) -> optax.Schedule:
  """m_i = start + i (end - start) / total_steps for update i = 0, 1, ..., constant after."""
  return optax.linear_schedule(start, end, total_steps)


def ema_teacher(momentum: float | optax.Schedule,
                select: str | Callable[[Any], Any] | None = None
                ) -> optax.GradientTransformationExtraArgs:
  """Keeps ``teacher <- m teacher + (1 - m) select(params)`` in the optimiser state.

  Passes ``updates`` through unchanged and ignores extra args (e.g. ``used``), so every selected
  leaf is averaged at every step whether or not it received a gradient. ``params`` must be given
  and are the params *before* this step's update (see the module docstring).

  Args:
    momentum: m, or a schedule of the update count (``ema_momentum_schedule``).
    select: key of the params dict to track, a function params -> subtree, or None (all).
  """
  if isinstance(select, str):
    key = select
    select = lambda p: p[key]
  elif select is None:
    select = lambda p: p

  def init_fn(params):
    # A real copy: the teacher must not alias (possibly donated) parameter buffers.
    return EmaTeacherState(jnp.zeros([], jnp.int32),
                           jax.tree.map(lambda x: jnp.array(x, copy=True), select(params)))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("ema_teacher needs the current params: call update(..., params)")
    m = momentum(state.count) if callable(momentum) else momentum
    teacher = jax.tree.map(lambda t, p: (m * t + (1.0 - m) * p).astype(t.dtype),
                           state.teacher, select(params))
    return updates, EmaTeacherState(optax.safe_int32_increment(state.count), teacher)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def teacher_params(opt_state: Any) -> Any:
  """The teacher params held by the (single) ``ema_teacher`` state inside ``opt_state``."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaTeacherState))
           if isinstance(s, EmaTeacherState)]
  if len(found) != 1:
    raise ValueError(f"expected one EmaTeacherState in the optimiser state, found {len(found)}")
  return found[0].teacher


class AdamWSkipState(NamedTuple):
  """step: int32 () calls so far (drives a learning-rate schedule); count: per-leaf int32 ()
  steps the leaf took part in (its bias corrections); mu, nu: first and second moments."""

  step: jax.Array
  count: Any
  mu: Any
  nu: Any


def _pick(used: Any, new: jax.Array, old: jax.Array) -> jax.Array:
  if isinstance(used, (bool, np.bool_)):
    return new if used else old
  return jnp.where(used, new, old)


def adamw_skip_unused(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999,
                      eps: float = 1e-8, weight_decay: float = 0.05
                      ) -> optax.GradientTransformationExtraArgs:
  """``torch.optim.AdamW`` in which unused parameters are skipped entirely, as PyTorch skips
  parameters whose ``.grad`` is None.

  ``update(grads, state, params, used=None)``: ``used`` is a pytree of bools with the params'
  structure, or a prefix of it (``{"encoder": {...}, "predictor": True}``); None means all used.
  Python / NumPy bools are resolved at trace time (compile one step per pattern), arrays with
  ``jnp.where``. For a used leaf with its own step count t (incremented first):

    p <- p - lr wd p;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)

  returned as the additive update. An unused leaf gets a zero update and keeps m, v and t. The
  learning rate (a schedule is evaluated at the global call count ``step``) is common to all.
  For a learning rate changed from outside (ReduceLROnPlateau) use
  ``optax.inject_hyperparams(adamw_skip_unused, static_args=("b1", "b2", "eps",
  "weight_decay"))``: b1, b2 must stay Python floats (bias corrections via ``math.log``).
  """
  log_b1, log_b2 = math.log(b1), math.log(b2)

  def init_fn(params):
    return AdamWSkipState(jnp.zeros([], jnp.int32),
                          jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
                          jax.tree.map(jnp.zeros_like, params),
                          jax.tree.map(jnp.zeros_like, params))

  def update_fn(grads, state, params=None, used=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("adamw_skip_unused needs the params for its weight decay")
    lr = learning_rate(state.step) if callable(learning_rate) else learning_rate
    used = jax.tree.map(lambda _: True, grads) if used is None else jax.tree.broadcast(used, grads)

    def leaf(g, p, count, mu, nu, u):
      g = g.astype(mu.dtype)
      count_new = count + 1
      mu_new = b1 * mu + (1 - b1) * g
      nu_new = b2 * nu + (1 - b2) * g * g
      t = count_new.astype(jnp.float32)
      bc1, bc2 = -jnp.expm1(t * log_b1), -jnp.expm1(t * log_b2)   # 1 - b^t, accurate in fp32
      step = (lr / bc1) * mu_new / (jnp.sqrt(nu_new) / jnp.sqrt(bc2) + eps)
      upd = (-lr * weight_decay * p - step).astype(p.dtype)
      return (_pick(u, upd, jnp.zeros_like(upd)), _pick(u, count_new, count),
              _pick(u, mu_new, mu), _pick(u, nu_new, nu))

    treedef = jax.tree.structure(grads)
    out = treedef.flatten_up_to(
        jax.tree.map(leaf, grads, params, state.count, state.mu, state.nu, used))
    updates, count, mu, nu = (treedef.unflatten(x) for x in zip(*out, strict=True))
    return updates, AdamWSkipState(optax.safe_int32_increment(state.step), count, mu, nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def plateau_scaling(factor: float, patience: int) -> optax.GradientTransformationExtraArgs:
  """Multiplies the updates by the ``scale`` of an ``optax.contrib.ReduceLROnPlateauState``
  kept in the optimiser state. The state moves only through ``plateau_update`` (fed a
  validation loss, not every step): torch's ReduceLROnPlateau semantics, x ``factor`` once
  more than ``patience`` evaluations did not improve (relative threshold 1e-4)."""
  inner = _plateau(factor, patience)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda u: (state.scale * u).astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _plateau(factor: float, patience: int) -> optax.GradientTransformationExtraArgs:
  # torch reduces once more than `patience` evaluations did not improve, optax at `patience`.
  return optax.contrib.reduce_on_plateau(factor=factor, patience=patience + 1)


def plateau_update(opt_state: Any, value: float | jax.Array, factor: float,
                   patience: int) -> Any:
  """``opt_state`` with its (single) plateau state advanced by one evaluation of ``value``
  (the validation loss); ``schedules.plateau_scale`` reads the resulting factor."""
  plateau = optax.contrib.ReduceLROnPlateauState
  inner = _plateau(factor, patience)
  found = []

  def step(s):
    if not isinstance(s, plateau):
      return s
    found.append(s)
    return inner.update({}, s, value=jnp.asarray(value, jnp.float32))[1]

  out = jax.tree.map(step, opt_state, is_leaf=lambda s: isinstance(s, plateau))
  if len(found) != 1:
    raise ValueError(f"expected one plateau state in the optimiser state, found {len(found)}")
  return out


def pretrain_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """AdamW skipping unused parameters, its updates scaled by the validation-loss plateau
  (``plateau_scaling``: ``optim.plateau_factor``, ``optim.plateau_patience``), then the EMA
  teacher of ``params["encoder"]``; ``update(..., params, used=...)``."""
  o = config.optim
  return optax.chain(
      adamw_skip_unused(schedules.pretrain_lr(config), o.b1, o.b2, o.eps, o.weight_decay),
      plateau_scaling(o.plateau_factor, o.plateau_patience),
      ema_teacher(ema_momentum_schedule(config.total_steps, config.ema.start, config.ema.end),
                  select="encoder"))


def finetune_optimizer(config: ml_collections.ConfigDict, steps: schedules.Steps,
                       trainable: Any) -> optax.GradientTransformationExtraArgs:
  """AdamW (``torch.optim.AdamW`` semantics) on the ``trainable`` leaves (a bool pytree), zero
  updates and no state for the others; ``update(..., value=loss)`` feeds ``reduce_on_plateau``
  (``optim.schedule="plateau"``: x ``plateau_factor`` once more than ``plateau_patience``
  epochs of mean training loss did not improve, torch semantics, relative threshold 1e-4)."""
  o = config.optim
  adamw = optax.adamw(schedules.finetune_lr(config, steps), o.b1, o.b2, o.eps,
                      weight_decay=o.weight_decay)
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
  tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
  if o.schedule == "plateau":
    # torch reduces once more than `patience` epochs did not improve, optax at `patience`.
    tx = optax.chain(tx, optax.contrib.reduce_on_plateau(
        factor=o.plateau_factor, patience=o.plateau_patience + 1,
        accumulation_size=steps.per_epoch))
  return tx
