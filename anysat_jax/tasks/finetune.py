"""Fine-tuning and linear probing: the task built once (model, loss, metric, optimiser,
schedule) and its pure steps.

``FinetuneTask(config, enc_cfg, steps)``: the encoder (``enc_cfg``, see
``checkpoints.manager.load_encoder``) plus a LayerNorm + Linear head (``heads.DownstreamModel``:
tile classification, or a dense head on ``head.dense_modality`` for segmentation and change
detection). ``train_mode``: ``finetune`` trains everything; ``linear_probe`` the head alone
(``heads.trainable_mask``): the optimiser holds state for the head only and the encoder leaves
are carried over unchanged, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from anysat_jax.core import options
from anysat_jax.evaluators import metrics
from anysat_jax.models import heads
from anysat_jax.models.config import EncoderConfig
from anysat_jax.models.encoder import AnySatEncoder
from anysat_jax.tasks import optim, schedules
from anysat_jax.tasks.losses import downstream as ld
from anysat_jax.tasks.state import TrainState
from input_pipeline import loader
from input_pipeline.dataset_spec import LabelSpec
from input_pipeline.datasets import registry

Params = Any


def task_loss(name: str, label: LabelSpec, logits: jax.Array, labels: jax.Array,
              mask: jax.Array | None = None) -> jax.Array:
  """Scalar float32 loss of one batch (``options.LOSSES``).

  Args:
    logits: (B, K) or (B, H, W, K).
    labels: multi-hot or one-hot float (B, K), or int (B,) / (B, H, W).
    mask: (B,) ``example_mask`` or None.
  """
  if name == "bce":
    return ld.bce_loss(logits, labels, mask)
  if labels.ndim == logits.ndim:      # one-hot targets
    return ld.cross_entropy_onehot(logits, labels, mask)
  if name == "ce":
    return ld.cross_entropy(logits, labels, mask=mask)
  if name == "ce_ignore":
    return ld.cross_entropy(logits, labels, ignore_index=-1, mask=mask)
  return ld.cross_entropy(logits, labels, mask=mask,
                          class_weights=ld.last_class_void_weights(label.num_classes))


class FinetuneTask:
  """What the steps close over (static): model, label spec, loss, metric, optimiser, schedule,
  the trainable mask and the patch size (metres)."""

  def __init__(self, config: ml_collections.ConfigDict, enc_cfg: EncoderConfig,
               steps: schedules.Steps):
    options.check("train_mode", config.train_mode, options.TRAIN_MODES)
    options.check("loss", config.loss, options.LOSSES)
    self.label = registry.get_spec(config.dataset).label
    self.dense = self.label.kind == "segmentation"
    if self.dense and not config.head.dense_modality:
      raise ValueError(f"{config.dataset}: segmentation needs head.dense_modality")
    head = (heads.DenseHead(self.label.num_classes, config.head.proj_size) if self.dense
            else heads.ClassificationHead(self.label.num_classes))
    self.model = heads.DownstreamModel(AnySatEncoder(enc_cfg), head,
                                       "dense" if self.dense else "tile",
                                       config.head.dense_modality if self.dense else None)
    patch_sizes = tuple(config.data.datasets[config.dataset].patch_sizes)
    if len(patch_sizes) != 1:
      raise ValueError(f"fine-tuning uses one patch size, got patch_sizes={patch_sizes}")
    self.patch_size = int(patch_sizes[0])
    self.loss_name = config.loss
    self.metric = metrics.metric_for(config.dataset)
    self.seed = int(config.seed)
    shapes = jax.eval_shape(self._init_params, None)
    self.trainable = heads.trainable_mask(shapes, config.train_mode)   # Python bools
    self.tx = optim.finetune_optimizer(config, steps, self.trainable)
    self.lr = schedules.finetune_lr(config, steps)

  def _head_input(self) -> jax.Array:
    width = self.model.encoder.config.dim
    return jnp.zeros((1, 1, 1, 2 * width) if self.dense else (1, width), jnp.float32)

  def _init_params(self, encoder_params: Params | None) -> Params:
    k_enc, k_head = jax.random.split(jax.random.key(self.seed, impl="rbg"))
    if encoder_params is None:
      encoder_params = self.model.encoder.init(k_enc, method=AnySatEncoder.init_all)["params"]
    return {"encoder": encoder_params,
            "head": self.model.head.init(k_head, self._head_input())["params"]}

  def init_state(self, encoder_params: Params | None) -> TrainState:
    """Step 0: the given (or random) encoder params, a random head, fresh optimiser state.
    Traceable (``jax.eval_shape`` / ``jax.jit``)."""
    params = self._init_params(encoder_params)
    return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params),
                      jax.random.key(self.seed))

  def logits(self, params: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
    """(B, K) or, dense, (B, H, W, K) at the label's resolution."""
    logits = self.model.apply({"params": params}, loader.model_inputs(batch), self.patch_size)
    if self.dense:
      logits = heads.resize_logits(logits, batch["label"].shape[1:3])
    return logits

  def train_step(self, state: TrainState, batch: dict[str, jax.Array]
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on a batch (model inputs and ``label``); frozen leaves are carried over
    unchanged and get no gradient. A non-finite loss keeps params and optimiser state.
    Metrics: ``loss``, ``lr``, ``finite``."""
    def loss_fn(params):
      params = jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), self.trainable,
                            params)
      return task_loss(self.loss_name, self.label, self.logits(params, batch), batch["label"])

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params, value=loss)
    new = optax.apply_updates(state.params, updates)
    params = jax.tree.map(lambda t, n, o: n if t else o, self.trainable, new, state.params)
    finite = jnp.isfinite(loss)
    params, opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                                     (params, opt_state), (state.params, state.opt_state))
    out = dict(loss=loss, finite=finite,
               lr=self.lr(state.step) * schedules.plateau_scale(opt_state))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

  def eval_step(self, metric_state: metrics.Counts, params: Params,
                batch: dict[str, jax.Array]) -> tuple[metrics.Counts, jax.Array, jax.Array]:
    """Accumulates one evaluation batch (with ``example_mask``): (metric state, batch loss over
    the real rows, argmax predictions (B,) or (B, H, W))."""
    logits = self.logits(params, batch)
    mask = batch["example_mask"]
    loss = task_loss(self.loss_name, self.label, logits, batch["label"], mask)
    return (self.metric.update(metric_state, logits, batch["label"], mask), loss,
            jnp.argmax(logits, -1))
