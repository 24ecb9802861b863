"""Pretraining losses: the JEPA regression loss and the multi-positive contrastive loss.

Both are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

JEPA_KINDS = ("smooth_l1", "l2")


def jepa_loss(pred: jax.Array, target: jax.Array, valid: jax.Array | None = None,
              kind: str = "smooth_l1", beta: float = 1.0) -> jax.Array:
  """Mean elementwise loss over the valid target tokens, scalar float32.

  Args:
    pred, target: (T, B, K, E) predicted and teacher tokens.
    valid: bool (T, B, K) or None (all valid); the mean runs over valid tokens x E.
    kind: ``smooth_l1`` (Huber: 0.5 d^2 / beta if |d| < beta, else |d| - 0.5 beta; the
      reference, beta 1) or ``l2`` (d^2, the paper's Eq. 5).
    beta: Smooth-L1 threshold, > 0.
  """
  d = pred.astype(jnp.float32) - target.astype(jnp.float32)
  if kind == "smooth_l1":
    ad = jnp.abs(d)
    err = jnp.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta)
  elif kind == "l2":
    err = d * d
  else:
    raise ValueError(f"JEPA loss kind must be one of {JEPA_KINDS}, got {kind!r}")
  if valid is None:
    return jnp.mean(err)
  w = valid.astype(jnp.float32)[..., None]
  return jnp.sum(err * w) / jnp.maximum(jnp.sum(w) * d.shape[-1], 1.0)


def target_tokens(teacher_patch_tokens: jax.Array, tgt_idx: jax.Array,
                  eps: float = 1e-5) -> jax.Array:
  """JEPA targets: teacher patch tokens normalised per token (LayerNorm without affine), gathered
  at every target block; stop-gradient.

  Args:
    teacher_patch_tokens: (B, N, E) teacher output without its class token.
    tgt_idx: int (T, B, K) raster patch indices.
  Returns:
    float32 (T, B, K, E).
  """
  h = teacher_patch_tokens.astype(jnp.float32)
  mean = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
  h = (h - mean) * jax.lax.rsqrt(var + eps)
  out = h[jnp.arange(h.shape[0])[None, :, None], tgt_idx]
  return jax.lax.stop_gradient(out)


def _masked_logsumexp(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """log sum exp over ``mask``ed entries; 0 where none is (finite values and gradients)."""
  x = jnp.where(mask, x, -jnp.inf)
  peak = jnp.max(x, axis=axis, keepdims=True)
  peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
  total = jnp.sum(jnp.where(mask, jnp.exp(x - peak), 0.0), axis=axis)
  any_ = jnp.any(mask, axis=axis)
  return jnp.where(any_, jnp.log(jnp.where(any_, total, 1.0)) + jnp.squeeze(peak, axis), 0.0)


def contrastive_loss(tokens: jax.Array, valid: jax.Array | None = None,
                     tau: float = 0.1) -> jax.Array:
  """Multi-positive InfoNCE (MIL-NCE) between the modalities' patch tokens, scalar float32.

  For every anchor token (m, b, n), with s = cosine similarity / tau:
    log sum_{(m', b') != (m, b), n'} exp s(anchor, f[m', b', n'])
      - log sum_{m' != m} exp s(anchor, f[m', b, n]),
  summed over anchors and divided by M * B * N. Negatives are every token of another modality
  (any tile, positives included) and of the same modality in other tiles; the anchor's own
  (modality, tile) block is excluded. Cosine similarity is <u, v> / max(|u| |v|, 1e-8).

  Validity (intended behaviour): invalid tokens are neither anchors nor candidates; an anchor
  with no valid positive contributes its denominator term only; the normaliser stays M * B * N.
  With M = 1 there are no positives and the loss is defined as 0.

  Args:
    tokens: (M, B, N, E) per-modality patch tokens (student, before the combiner).
    valid: bool (M, B, N) or None (all valid).
    tau: temperature.
  """
  m, b, n, e = tokens.shape
  if m == 1:
    return jnp.zeros((), jnp.float32)
  f = tokens.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(f * f, axis=-1))                                  # (M, B, N)
  flat, flat_norm = f.reshape(m * b * n, e), norm.reshape(m * b * n)
  cand_valid = jnp.ones((m * b * n,), bool) if valid is None else valid.reshape(-1)
  own_block = jnp.arange(m * b * n) // n                                   # (m', b') of each column
  den = []
  for i in range(m):                                 # one anchor modality at a time: (B N, M B N)
    sim = (f[i].reshape(b * n, e) @ flat.T) / jnp.maximum(
        norm[i].reshape(b * n, 1) * flat_norm[None, :], 1e-8)
    row_block = i * b + jnp.arange(b * n)[:, None] // n
    den.append(_masked_logsumexp(sim / tau, (own_block[None, :] != row_block)
                                 & cand_valid[None, :], axis=1))
  pos = jnp.einsum("mbne,kbne->mkbn", f, f) / jnp.maximum(norm[:, None] * norm[None, :], 1e-8)
  pos_mask = ~jnp.eye(m, dtype=bool)[:, :, None, None]
  if valid is not None:
    pos_mask = pos_mask & valid[None, :]
  num = _masked_logsumexp(pos / tau, pos_mask, axis=1)                    # (M, B, N)
  term = jnp.stack(den).reshape(m, b, n) - num
  if valid is not None:
    term = jnp.where(valid, term, 0.0)
  return jnp.sum(term) / (m * b * n)
