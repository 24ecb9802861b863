"""Downstream heads (LayerNorm + one Linear, as the reference fine-tuning configs) and the
encoder + head model used for fine-tuning and linear probing.

  model = DownstreamModel(AnySatEncoder(cfg), DenseHead(20), output="dense", dense_modality="s2")
  params = {"encoder": pretrained_encoder_params, "head": head_params}   # exactly these keys
  logits = model.apply({"params": params}, batch, patch_size=40)          # (B, H, W, 20)

All logits are channels-last: classification (B, K); segmentation (B, H, W, K).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from anysat_jax.models.encoder import AnySatEncoder

TRAINING_MODES = ("finetune", "linear_probe")


def _torch_linear(features: int, fan_in: int, name: str) -> nn.Dense:
  """``nn.Dense`` initialised like ``torch.nn.Linear``: kernel and bias U(-1/sqrt(fan_in), ..)."""
  bound = fan_in ** -0.5

  def bias_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nn.Dense(features, kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in",
                                                                          "uniform"),
                  bias_init=bias_init, name=name)


def _layer_norm() -> nn.LayerNorm:
  """``torch.nn.LayerNorm`` semantics: eps 1e-5, two-pass variance."""
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm")


class ClassificationHead(nn.Module):
  """Tile-token classifier: LayerNorm -> Linear; (B, E) -> logits (B, num_classes).

  Multilabel vs multiclass is decided by the loss and metric only.
  """

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _layer_norm()(x)
    return _torch_linear(self.num_classes, x.shape[-1], "linear")(x)


class DenseHead(nn.Module):
  """Per-pixel classifier on the encoder's ``dense`` features.

  (B, H, W, 2E) -> LayerNorm -> Linear(2E -> K q^2) -> logits (B, H q, W q, K), q = proj_size.
  Each feature pixel (one sub-patch) emits a q x q block of logits; head channel
  (a q + b) K + k is class k of block pixel (a, b) (the reference FLAIR layout, class fastest).
  """

  num_classes: int
  proj_size: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    q, k = self.proj_size, self.num_classes
    x = _layer_norm()(x)
    x = _torch_linear(k * q * q, x.shape[-1], "linear")(x)
    x = x.reshape(b, h, w, q, q, k).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * q, w * q, k)


def resize_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resampling of (B, H, W, K) logits to (B, *size, K), half-pixel centres without
  antialiasing (``torch`` ``interpolate(mode="bilinear", align_corners=False)``).

  Only for a label grid that differs from the head's output (the paper's "bilinear resampling
  if needed"); no released experiment needs it, and the logits are returned as they are when the
  size already matches.
  """
  b, h, w, k = logits.shape
  if (h, w) == tuple(size):
    return logits
  return jax.image.resize(logits, (b, *size, k), "bilinear", antialias=False)


class DownstreamModel(nn.Module):
  """Encoder followed by a head; parameters ``{"encoder": ..., "head": ...}``.

  The encoder attribute adopts an ``AnySatEncoder`` instance, so its parameter tree is exactly
  the standalone encoder's (pretrained or converted encoder params drop in under "encoder").

  Attributes:
    encoder: the encoder module.
    head: e.g. ``ClassificationHead`` (with ``output="tile"``) or ``DenseHead`` (``"dense"``).
    output: the encoder output fed to the head (see ``AnySatEncoder.__call__``).
    dense_modality: modality of the dense map; required for ``output="dense"`` (under ``jit``
      dict keys are sorted, so "the first modality" would not be the caller's first).
  """

  encoder: AnySatEncoder
  head: nn.Module
  output: str = "tile"
  dense_modality: str | None = None

  def __call__(self, inputs: dict[str, jax.Array], patch_size: int) -> jax.Array:
    """Logits for a batch; ``patch_size`` (metres) must be a Python int (static under jit)."""
    if self.output == "dense" and self.dense_modality is None:
      raise ValueError("DownstreamModel with output='dense' needs dense_modality")
    features = self.encoder(inputs, patch_size, self.output, self.dense_modality)
    return self.head(features)


def trainable_mask(params: dict[str, Any], mode: str) -> dict[str, Any]:
  """Bool pytree shaped like ``params`` (``{"encoder": ..., "head": ...}``): which leaves train.

  ``finetune``: every leaf. ``linear_probe``: everything but the encoder. Freeze the rest with
  e.g. ``optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
  jax.tree.map(lambda t: "train" if t else "frozen", mask))`` (``optax.masked`` alone would
  pass the frozen gradients through unchanged).
  """
  if mode not in TRAINING_MODES:
    raise ValueError(f"mode must be one of {TRAINING_MODES}, got {mode!r}")
  return {key: _fill(subtree, mode == "finetune" or key != "encoder")
          for key, subtree in params.items()}


def _fill(tree: Any, value: bool) -> Any:
  return jax.tree.map(lambda _: value, tree)
