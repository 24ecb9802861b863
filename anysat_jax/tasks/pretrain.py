"""JEPA + contrastive pretraining: the task built once from the config, and its pure step.

``PretrainTask(config).train_step(state, batch, masks, patch_size) -> (state, metrics)`` runs,
for one (dataset, patch size) bucket: the EMA teacher on the full batch, the student on the
temporally masked batch with its context patches and modality masking, the predictor of the
target blocks, the JEPA loss on the layer-normed teacher tokens plus the multi-positive
contrastive loss, then AdamW (unused projectors skipped) and the teacher's EMA, both in one
Optax chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from anysat_jax.core import modalities as mods
from anysat_jax.core import options
from anysat_jax.models import xla_options
from anysat_jax.models.config import EncoderConfig, encoder_config, run_overrides
from anysat_jax.models.encoder import AnySatEncoder
from anysat_jax.models.jepa import PredictorConfig, Student
from anysat_jax.tasks import masking, optim, schedules
from anysat_jax.tasks.losses import pretrain as losses
from anysat_jax.tasks.state import TrainState


def model_configs(config: ml_collections.ConfigDict) -> tuple[EncoderConfig, PredictorConfig]:
  enc = encoder_config(config.model.size, **run_overrides(config.model.get("overrides", {}),
                                                         config.model.get("projectors", {})))
  pred = PredictorConfig(**dict(config.model.predictor))
  return enc, pred


def mask_config(config: ml_collections.ConfigDict) -> masking.MaskConfig:
  return masking.MaskConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                               for k, v in dict(config.masking).items()})


def used_tree(params: Any, batch_keys: tuple[str, ...]) -> Any:
  """Static bools: projectors of absent modalities are unused, and so is a pad value without a
  ``<mod>_valid`` value mask in the batch (it receives no gradient)."""
  present = set(mods.modality_keys(batch_keys))

  def leaf(path, _):
    names = [getattr(k, "key", str(k)) for k in path]
    if len(names) > 1 and names[0] == "encoder" and names[1].startswith("projector_"):
      name = next(m for m in mods.MODALITIES if mods.get(m).param_name == names[1])
      if name not in present:
        return False
      if names[-1] == "pad_value":
        return name + mods.VALID_SUFFIX in batch_keys
    return True

  return jax.tree_util.tree_map_with_path(leaf, params)


class PretrainTask:
  """What the pretraining steps close over, built once from the run config: the student, the
  teacher encoder, the optimiser and its schedule, the masking and loss settings."""

  def __init__(self, config: ml_collections.ConfigDict):
    options.check("nonfinite", config.nonfinite, options.NONFINITE)
    self.enc_cfg, self.pred_cfg = model_configs(config)
    self.student = Student(self.enc_cfg, self.pred_cfg)
    self.teacher = AnySatEncoder(self.enc_cfg)
    self.tx = optim.pretrain_optimizer(config)
    self.lr = schedules.pretrain_lr(config)
    self.mask_cfg = mask_config(config)
    self.jepa_kind = config.loss.jepa
    self.contrastive_weight = float(config.loss.contrastive_weight)
    self.tau = float(config.loss.tau)
    self.seed = int(config.seed)
    # The reference's teacher runs in training mode (L-TAE dropout on); False: eval mode.
    self.teacher_dropout = bool(config.model.get("teacher_dropout", True))

  def init_state(self) -> TrainState:
    """Step 0 (traceable: ``jax.eval_shape`` / ``jax.jit``)."""
    # rbg keys need far less scratch memory than threefry to initialise 100M parameters.
    params = self.student.init(jax.random.key(self.seed, impl="rbg"),
                               method=Student.init_all)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params),
                      jax.random.key(self.seed))

  def train_step(self, state: TrainState, batch: dict[str, jax.Array],
                 masks: dict[str, jax.Array], patch_size: int) -> tuple[TrainState, dict]:
    """One optimisation step on a batch of one (dataset, patch size) bucket.

    Args:
      state: the train state.
      batch: model inputs (see ``encoder``), batch-major, with ``<mod>_mask`` date masks.
      masks: ``ctx_idx`` (B, K_ctx), ``tgt_idx`` / ``tgt_valid`` (B, T, K_tgt) (batch first,
        so that they shard like the batch; see ``host_masks``).
      patch_size: metres (static).
    Returns:
      the new state and scalar metrics (``loss``, ``jepa``, ``contrastive``, ``finite``,
      ``lr``). A non-finite step keeps params and optimiser state (only ``step`` and ``key``
      move on): the loop learns it from ``finite`` when it next fetches the metrics.
    """
    key, k_time, k_mod, k_drop, k_tdrop = jax.random.split(
        jax.random.fold_in(state.key, state.step), 5)
    teacher = optim.teacher_params(state.opt_state)
    z_teacher, _ = self.teacher.apply({"params": teacher}, batch, patch_size,
                                      method=AnySatEncoder.features, rngs={"dropout": k_tdrop},
                                      deterministic=not self.teacher_dropout)
    student_in, mask_args = self._student_args(batch, masks, k_time, k_mod)

    def loss_fn(params):
      out = self.student.apply({"params": params}, student_in, patch_size, *mask_args,
                               deterministic=False, rngs={"dropout": k_drop})
      jepa, con = self._losses(out, z_teacher, masks)
      return jepa + self.contrastive_weight * con, (jepa, con)

    (loss, (jepa, con)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    used = used_tree(state.params, tuple(batch))
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params, used=used)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss)
    params, opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                                     (params, opt_state), (state.params, state.opt_state))
    new = TrainState(state.step + 1, params, opt_state, key)
    metrics = dict(loss=loss, jepa=jepa, contrastive=con, finite=finite,
                   lr=self.lr(state.step) * schedules.plateau_scale(state.opt_state))
    return new, metrics

  def val_loss(self, params: tuple[Any, Any], batch: dict[str, jax.Array],
               masks: dict[str, jax.Array], *, patch_size: int) -> tuple[jax.Array, dict]:
    """The pretraining loss in evaluation mode (no dropout), a deterministic function of its
    inputs: the ``loss_fn`` of ``evaluators.pretrain_loss``.

    params: (student params, EMA teacher params). masks: ``ctx_idx``, ``tgt_idx``,
    ``tgt_valid`` (batch first) and ``seed`` int32 (), the only source of the temporal and
    modality masks. Returns the total loss and ``{"jepa", "contrastive"}``.
    """
    student, teacher = params
    k_time, k_mod = jax.random.split(jax.random.key(masks["seed"]))
    z_teacher, _ = self.teacher.apply({"params": teacher}, batch, patch_size,
                                      method=AnySatEncoder.features)
    student_in, mask_args = self._student_args(batch, masks, k_time, k_mod)
    out = self.student.apply({"params": student}, student_in, patch_size, *mask_args)
    jepa, con = self._losses(out, z_teacher, masks)
    return jepa + self.contrastive_weight * con, {"jepa": jepa, "contrastive": con}

  def _student_args(self, batch: dict[str, jax.Array], masks: dict[str, jax.Array],
                    k_time: jax.Array, k_mod: jax.Array) -> tuple[dict[str, jax.Array], tuple]:
    """The student's inputs: the temporally masked batch, and the arguments after
    ``patch_size``: ``ctx_idx``, ``tgt_idx`` / ``tgt_valid`` (target-major), the modality mask
    of the context tokens."""
    ctx_idx = masks["ctx_idx"]
    tgt_idx, tgt_valid = (masks[k].transpose(1, 0, 2) for k in ("tgt_idx", "tgt_valid"))
    student_in = masking.apply_temporal_mask(
        batch, masking.sample_temporal_masks(k_time, batch, self.mask_cfg.temporal_keep))
    num_grid = sum(not mods.get(m).context_token for m in mods.modality_keys(batch))
    b, k_ctx = ctx_idx.shape
    visible = masking.modality_mask(k_mod, num_grid, k_ctx, b, self.mask_cfg.modality_ratio)
    return student_in, (ctx_idx, tgt_idx, tgt_valid, visible)

  def _losses(self, out: Any, z_teacher: jax.Array, masks: dict[str, jax.Array]
              ) -> tuple[jax.Array, jax.Array]:
    """(JEPA loss against the teacher's tokens at the targets, MIL-NCE loss over the valid
    patches) of a student output."""
    tgt_idx, tgt_valid = (masks[k].transpose(1, 0, 2) for k in ("tgt_idx", "tgt_valid"))
    target = losses.target_tokens(z_teacher[:, 1:], tgt_idx)
    jepa = losses.jepa_loss(out.pred, target, tgt_valid, kind=self.jepa_kind)
    return jepa, losses.contrastive_loss(out.tokens, out.valid, tau=self.tau)

  def jit_step(self, state_sharding: Any, on_trace: Callable[[int], None]) -> Callable:
    """``train_step`` jit-compiled once per (batch signature, patch size), the state donated
    and laid out by ``state_sharding`` (None: as jax places it); ``on_trace(patch)`` is called
    each time jax traces (i.e. compiles) it. Call as ``fn(state, batch, masks, patch_size=P)``.
    """
    def step(state, batch, masks, patch_size):
      on_trace(patch_size)
      return self.train_step(state, batch, masks, patch_size)

    return jax.jit(step, static_argnames=("patch_size",), donate_argnums=(0,),
                   out_shardings=(state_sharding, None), compiler_options=xla_options.training())


def init_state(config: ml_collections.ConfigDict) -> TrainState:
  """Step 0 of ``config``'s run (traceable)."""
  return PretrainTask(config).init_state()


def host_masks(config: ml_collections.ConfigDict, step: int, batch_size: int,
               side: int) -> dict[str, np.ndarray]:
  """Block masks of this process's ``batch_size`` rows of a step, batch first (``ctx_idx``
  (B, K_ctx), ``tgt_idx`` / ``tgt_valid`` (B, T, K_tgt)). With ``data.shard_by_process`` the
  rows are this process's slice of the global batch, else the whole (global) batch; each row's
  masks are a function of (seed, step, global row) only (``masking.block_masks``), so a resumed
  run, or one on another number of processes, draws the same masks."""
  by_process = bool(config.get("data") and config.data.get("shard_by_process"))
  first = jax.process_index() * batch_size if by_process else 0
  m = masking.block_masks(int(config.seed), int(step), range(first, first + batch_size), side,
                          mask_config(config))
  return {"ctx_idx": m["ctx_idx"], "tgt_idx": m["tgt_idx"].transpose(1, 0, 2),
          "tgt_valid": m["tgt_valid"].transpose(1, 0, 2)}


def jit_train_step(config: ml_collections.ConfigDict, state_sharding: Any,
                   on_trace: Callable[[int], None]) -> Callable:
  """``PretrainTask(config).jit_step(state_sharding, on_trace)``."""
  return PretrainTask(config).jit_step(state_sharding, on_trace)
