"""JEPA + contrastive pretraining: the train state and one pure train step.

``train_step(state, batch, masks) -> (state, metrics)`` runs, for one (dataset, patch size)
bucket: the EMA teacher on the full batch, the student on the temporally masked batch with its
context patches and modality masking, the predictor of the target blocks, the JEPA loss on the
layer-normed teacher tokens plus the multi-positive contrastive loss, then AdamW (unused
projectors skipped) and the teacher's EMA, both in one Optax chain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from anysat_jax.core import modalities as mods
from anysat_jax.models.config import EncoderConfig, encoder_config
from anysat_jax.models.encoder import AnySatEncoder
from anysat_jax.models.jepa import PredictorConfig, Student
from anysat_jax.tasks import masking, optim
from anysat_jax.tasks.losses import pretrain as losses


@flax.struct.dataclass
class TrainState:
  """step: int32 (); params: student {"encoder", "predictor", "mask_token"}; opt_state: the
  Optax chain state (AdamW moments, EMA teacher); key: PRNG key of the in-step randomness."""

  step: jax.Array
  params: Any
  opt_state: Any
  key: jax.Array


def model_configs(config: ml_collections.ConfigDict) -> tuple[EncoderConfig, PredictorConfig]:
  enc = encoder_config(config.model.size, **dict(config.model.get("overrides", {})))
  pred = PredictorConfig(**dict(config.model.predictor))
  return enc, pred


def mask_config(config: ml_collections.ConfigDict) -> masking.MaskConfig:
  return masking.MaskConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                               for k, v in dict(config.masking).items()})


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  o = config.optim
  if o.schedule == "constant":
    return optax.constant_schedule(o.lr)
  if o.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, config.total_steps)
  raise ValueError(f"unknown optim.schedule {o.schedule!r} (constant, warmup_cosine)")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  o = config.optim
  return optax.chain(
      optim.adamw_skip_unused(learning_rate(config), o.b1, o.b2, o.eps, o.weight_decay),
      optim.ema_teacher(optim.ema_momentum_schedule(config.total_steps, config.ema.start,
                                                    config.ema.end), select="encoder"))


def init_state(config: ml_collections.ConfigDict) -> TrainState:
  enc, pred = model_configs(config)
  student = Student(enc, pred)
  # rbg keys need far less scratch memory than threefry to initialise 100M parameters.
  params = student.init(jax.random.key(config.seed, impl="rbg"),
                        method=Student.init_all)["params"]
  return TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(config).init(params),
                    jax.random.key(config.seed))


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


def train_step(state: TrainState, batch: dict[str, jax.Array], masks: dict[str, jax.Array], *,
               config: ml_collections.ConfigDict, patch_size: int) -> tuple[TrainState, dict]:
  """One optimisation step on a batch of one (dataset, patch size) bucket.

  Args:
    state: the train state.
    batch: model inputs (see ``encoder``), batch-major, with ``<mod>_mask`` date masks.
    masks: ``ctx_idx`` (B, K_ctx), ``tgt_idx`` / ``tgt_valid`` (B, T, K_tgt) (batch first, so
      that they shard like the batch; see ``host_masks``).
    config: the run config (static).
    patch_size: metres (static).
  Returns:
    the new state and scalar metrics (``loss``, ``jepa``, ``contrastive``, ``finite``, ``lr``).
  """
  enc_cfg, pred_cfg = model_configs(config)
  student, teacher_model = Student(enc_cfg, pred_cfg), AnySatEncoder(enc_cfg)
  tx = make_optimizer(config)
  key, k_time, k_mod, k_drop, k_tdrop = jax.random.split(
      jax.random.fold_in(state.key, state.step), 5)
  teacher = optim.teacher_params(state.opt_state)
  ctx_idx = masks["ctx_idx"]
  tgt_idx, tgt_valid = (masks[k].transpose(1, 0, 2) for k in ("tgt_idx", "tgt_valid"))

  # The reference's teacher runs in training mode (L-TAE dropout on); teacher_dropout=False: eval.
  z_teacher, _ = teacher_model.apply({"params": teacher}, batch, patch_size,
                                     method=AnySatEncoder.features, rngs={"dropout": k_tdrop},
                                     deterministic=not config.model.get("teacher_dropout", True))
  target = losses.target_tokens(z_teacher[:, 1:], tgt_idx)
  mcfg = mask_config(config)
  student_in = masking.apply_temporal_mask(
      batch, masking.sample_temporal_masks(k_time, batch, mcfg.temporal_keep))
  num_grid = sum(not mods.get(m).context_token for m in mods.modality_keys(batch))
  b, k_ctx = ctx_idx.shape
  visible = masking.modality_mask(k_mod, num_grid, k_ctx, b, mcfg.modality_ratio)

  def loss_fn(params):
    out = student.apply({"params": params}, student_in, patch_size, ctx_idx, tgt_idx,
                        tgt_valid, visible, deterministic=False, rngs={"dropout": k_drop})
    jepa = losses.jepa_loss(out.pred, target, tgt_valid, kind=config.loss.jepa)
    con = losses.contrastive_loss(out.tokens, out.valid, tau=config.loss.tau)
    return jepa + config.loss.contrastive_weight * con, (jepa, con)

  (loss, (jepa, con)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  used = used_tree(state.params, tuple(batch))
  updates, opt_state = tx.update(grads, state.opt_state, state.params, used=used)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss)
  if config.nonfinite == "skip":
    params, opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                                     (params, opt_state), (state.params, state.opt_state))
  new = TrainState(state.step + 1, params, opt_state, key)
  metrics = dict(loss=loss, jepa=jepa, contrastive=con, finite=finite,
                 lr=learning_rate(config)(state.step))
  return new, metrics


def host_masks(config: ml_collections.ConfigDict, step: int, batch_size: int,
               side: int) -> dict[str, np.ndarray]:
  """Block masks of one step, batch first (``ctx_idx`` (B, K_ctx), ``tgt_idx`` / ``tgt_valid``
  (B, T, K_tgt)); a function of (seed, step) only, so a resumed run draws the same masks."""
  rng = np.random.default_rng([int(config.seed), int(step)])
  m = masking.sample_block_masks(rng, batch_size, side, mask_config(config))
  return {"ctx_idx": m["ctx_idx"], "tgt_idx": m["tgt_idx"].transpose(1, 0, 2),
          "tgt_valid": m["tgt_valid"].transpose(1, 0, 2)}


def fingerprint(state: TrainState) -> str:
  """Hex digest of the student and teacher parameter bytes (to compare runs exactly).

  Multi-process: leaves sharded over several processes (FSDP) are gathered first, a collective
  that every process must reach."""
  from jax.experimental import multihost_utils
  h = hashlib.sha256()
  for tree in (state.params, optim.teacher_params(state.opt_state)):
    for leaf in jax.tree.leaves(tree):
      if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = multihost_utils.process_allgather(leaf, tiled=True)
      h.update(np.asarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()[:16]


def jit_train_step(config: ml_collections.ConfigDict, state_sharding: Any,
                   on_trace: Callable[[int], None]) -> Callable:
  """``train_step`` jit-compiled once per (batch signature, patch size); ``on_trace(patch)`` is
  called each time jax traces (i.e. compiles) it."""
  def step(state, batch, masks, patch_size):
    on_trace(patch_size)
    return train_step(state, batch, masks, config=config, patch_size=patch_size)

  return jax.jit(step, static_argnames=("patch_size",), donate_argnums=(0,),
                 out_shardings=(state_sharding, None))
