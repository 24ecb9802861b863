"""Downstream losses (the reference's ``bce``, ``CrossEntropy``, ``CrossEntropyIgnore`` and
``CrossEntropyWeighted``), scalar float32 whatever the input dtype.

Logits are channels-last: (B, K) per tile or (B, H, W, K) per pixel. ``mask`` is the loader's
``example_mask`` (B,) (0 = padded row), broadcast over each example's pixels. A batch with no
counted element gives 0 (and zero gradients) instead of the reference's NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _example_weights(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
  """float32 weights of ``shape`` from a (B,) mask (ones if None)."""
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (len(shape) - 1)), shape)


def _weighted_mean(loss: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w l) / sum(w); 0 when sum(w) = 0."""
  total = jnp.sum(weights)
  return jnp.sum(loss * weights) / jnp.where(total > 0, total, 1.0)


def bce_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Binary cross-entropy with logits, mean over B x C (multilabel classification).

  Args:
    logits: (B, C).
    labels: float (B, C) multi-hot (soft targets allowed).
    mask: (B,) or None.
  """
  logits = logits.astype(jnp.float32)
  loss = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
  return _weighted_mean(loss, _example_weights(mask, loss.shape))


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int | None = None,
                  class_weights: jax.Array | None = None,
                  mask: jax.Array | None = None) -> jax.Array:
  """Softmax cross-entropy with integer labels: sum_i w_i l_i / sum_i w_i.

  w_i = class_weights[label_i] (1 if None), 0 where label_i == ignore_index or the example is
  masked. No weights: mean over the non-ignored samples / pixels (``CrossEntropyIgnore`` with
  ``ignore_index=-1``); ``last_class_void_weights`` gives ``CrossEntropyWeighted``.

  Args:
    logits: (..., K), e.g. (B, K) or (B, H, W, K).
    labels: int (...) in [0, K) or ``ignore_index``.
    ignore_index: label value excluded from the loss, or None.
    class_weights: float (K,) or None.
    mask: (B,) or None.
  """
  logits = logits.astype(jnp.float32)
  weights = _example_weights(mask, labels.shape)
  if ignore_index is not None:
    valid = labels != ignore_index
    weights = weights * valid
    labels = jnp.where(valid, labels, 0)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights, jnp.float32)[labels]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return _weighted_mean(loss, weights)


def cross_entropy_onehot(logits: jax.Array, labels: jax.Array,
                         mask: jax.Array | None = None) -> jax.Array:
  """Softmax cross-entropy with one-hot / probability targets, mean over samples
  (``CrossEntropy`` on PLANTED's one-hot labels).

  Args:
    logits: (..., K).
    labels: float (..., K), rows summing to 1.
    mask: (B,) or None.
  """
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy(logits, labels.astype(jnp.float32))
  return _weighted_mean(loss, _example_weights(mask, loss.shape))


def last_class_void_weights(num_classes: int) -> jax.Array:
  """float32 (K,) class weights of ``CrossEntropyWeighted``: 1, last class (void/other) 0."""
  return jnp.ones((num_classes,), jnp.float32).at[-1].set(0.0)
