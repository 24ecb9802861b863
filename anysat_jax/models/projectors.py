"""Per-modality projectors: pixels -> sub-patch tokens of width E.

Both return tokens grouped by patch, (B * N, K, E): rows are batch-major then patches in raster
order (row ``b * N + pr * n + pc``), K tokens per patch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from anysat_jax.core.modalities import Modality
from anysat_jax.models import layers
from anysat_jax.models.config import ProjectorConfig
from anysat_jax.models.pos_embed import temporal_denominators


class VHRProjector(nn.Module):
  """Single-date very-high-resolution images (aerial, aerial-flair, spot, naip).

  A strided k x k convolution (no bias) makes one token per conv cell, then a per-token MLP
  E -> 2E -> E with LayerNorm (eps 1e-5) and ReLU. A patch of s x s 10 m cells holds
  K = (s g)^2 tokens (g conv cells per 10 m) in the reference's *blocked* order: the s x s cells
  outermost, the g x g conv cells inside each cell innermost. ``dtype``: matmul operand dtype
  (results in float32).
  """

  modality: Modality
  cfg: ProjectorConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, scale: int) -> jax.Array:
    """x: (B, C, H, W) normalised pixels; scale s = patch size // 10 m. Returns (B*N, K, E)."""
    m, k = self.modality, self.modality.kernel
    b, c, h, w = x.shape
    dim = self.cfg.widths[0]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, c, dim))
    g = m.cells_per_10m()
    n = (h // k) // (g * scale)
    # Conv with stride = kernel is one matmul over non-overlapping k x k windows. Only the conv
    # cells of whole patches are used; the windows are gathered in the blocked token order
    # (b, pr, pc, a, b', c, d) (row = (pr, a, c), column = (pc, b', d)) before the matmul, so
    # its result needs no transpose.
    px = n * scale * g * k
    x = x[:, :, :px, :px].reshape(b, c, n, scale, g, k, n, scale, g, k)
    x = jnp.einsum("bCpacKqedL,KLCD->bpqaecdD", x.astype(self.dtype),
                   kernel.astype(self.dtype), preferred_element_type=jnp.float32)
    x = x.reshape(b * n * n, (scale * g) ** 2, dim)
    for j, width in enumerate(self.cfg.widths[1:]):
      x = layers.dense(width, self.dtype, f"fc_{j}", f32_out=True)(x)
      x = nn.relu(layers.layer_norm(1e-5, name=f"ln_{j}")(x))
    return x


class LTAEProjector(nn.Module):
  """Time series: a per-pixel lightweight temporal attention encoder (L-TAE).

  Per pixel and date: 5 x (Linear, GroupNorm(4), ReLU, dropout) widths C -> E/8 -> E/2 -> E ->
  2E -> E; s2 only: GroupNorm(16) over channels and dates; + sinusoidal date encoding (period Tp
  days); 16-head attention with a learned master query pooling the dates (dropout on its
  weights); Linear + GroupNorm(4) + ReLU, dropout; GroupNorm(16). The (B, E, H, W) map is cut
  into patches of ``max(1, s // reduce_scale)`` pixels per side. Dropout (``cfg.dropout``,
  ``cfg.attn_dropout``) acts only when called with ``deterministic=False`` (a ``dropout`` rng).

  It computes in float32 whatever the model's ``dtype``: its GroupNorms over few channels (two
  per group in the first layer at E = 64) amplify bfloat16 rounding beyond 1e-2.
  ``chunk_tokens`` > 0: the pixels run in rematerialised chunks (``layers.chunked_map``).
  """

  modality: Modality
  cfg: ProjectorConfig
  chunk_tokens: int = 0

  def setup(self):
    cfg = self.cfg
    self.pad_value = self.param("pad_value", nn.initializers.zeros, ())
    # List attributes name their modules in_fc_0, in_fc_1, ...
    self.in_fc = [nn.Dense(w) for w in cfg.widths]
    self.in_gn = [layers.GroupNorm(4) for _ in cfg.widths]
    if cfg.in_norm:
      self.in_norm = layers.GroupNorm(cfg.n_head, reduce_axis=-2)
    self.key_proj = nn.Dense(cfg.n_head * cfg.d_k)
    self.master_query = self.param("master_query", nn.initializers.normal(1.0),
                                   (cfg.n_head, cfg.d_k))
    self.out_fc = [nn.Dense(w) for w in cfg.out_widths]
    self.out_gn = [layers.GroupNorm(4) for _ in cfg.out_widths]
    self.out_norm = layers.GroupNorm(cfg.n_head)
    self.dropout = nn.Dropout(cfg.dropout)
    self.attn_dropout = nn.Dropout(cfg.attn_dropout)

  def __call__(self, x: jax.Array, dates: jax.Array, scale: int,
               date_mask: jax.Array | None = None, valid: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    """Encodes a time series into patch tokens.

    Args:
      x: (B, T, C, H, W) normalised values.
      dates: (B, T) day of year (days).
      scale: s = patch size // 10 m.
      date_mask: optional (B, T), 1 for real dates, 0 for padding (ignored entirely).
      valid: optional 0/1 array broadcastable to x; 0 entries take the learned pad value.
      deterministic: False applies dropout (needs a ``dropout`` rng).
    Returns:
      (B * N, K, E) tokens, K = max(1, s // reduce_scale)^2.
    """
    if valid is not None:
      x = jnp.where(jnp.broadcast_to(valid, x.shape) != 0, x, self.pad_value.astype(x.dtype))
    b, t, c, h, w = x.shape
    seq = x.transpose(0, 3, 4, 1, 2).reshape(b * h * w, t, c)      # pixels (b, i, j) row-major
    per_pixel = lambda a: jnp.broadcast_to(a[:, None, None], (b, h, w, t)).reshape(-1, t)
    mask = jnp.ones((b * h * w, t), bool) if date_mask is None else per_pixel(date_mask != 0)
    out = layers.chunked_map(
        self, lambda mdl, *a: mdl.pixels(*a, masked=date_mask is not None,
                                         deterministic=deterministic),
        (seq, per_pixel(dates), mask), t, self.chunk_tokens)
    e = out.shape[-1]
    s_m = max(1, scale // self.cfg.reduce_scale)
    n = h // s_m
    out = out.reshape(b, h, w, e)[:, :n * s_m, :n * s_m].reshape(b, n, s_m, n, s_m, e)
    return out.transpose(0, 1, 3, 2, 4, 5).reshape(b * n * n, s_m * s_m, e)

  def pixels(self, seq: jax.Array, dates: jax.Array, mask: jax.Array, masked: bool,
             deterministic: bool) -> jax.Array:
    """Per-pixel encoder: seq (P, T, C), dates (P, T), mask bool (P, T) -> (P, E).

    ``masked``: False ignores ``mask`` (no date mask given: every date counts).
    """
    cfg = self.cfg
    drop = lambda a: self.dropout(a, deterministic=deterministic)
    for fc, gn in zip(self.in_fc, self.in_gn, strict=True):
      seq = drop(nn.relu(gn(fc(seq))))
    where = mask if masked else None
    if cfg.in_norm:
      seq = self.in_norm(seq, where)
    seq = seq + self._date_encoding(dates, seq.shape[-1])
    # Attention of a learned master query over the dates; values are the sequence itself.
    keys = self.key_proj(seq)
    keys = keys.reshape(*keys.shape[:-1], cfg.n_head, cfg.d_k)
    logits = jnp.einsum("ptnk,nk->pnt", keys, self.master_query.astype(keys.dtype))
    logits = logits / jnp.sqrt(jnp.asarray(cfg.d_k, logits.dtype))
    if where is not None:
      logits = jnp.where(where[:, None, :], logits, jnp.finfo(logits.dtype).min)
    attn = layers.softmax(logits)
    attn = self.attn_dropout(attn, deterministic=deterministic)
    p, _, e = seq.shape
    values = seq.reshape(p, -1, cfg.n_head, e // cfg.n_head)
    out = jnp.einsum("pnt,ptnc->pnc", attn, values).reshape(p, e)
    for fc, gn in zip(self.out_fc, self.out_gn, strict=True):
      out = nn.relu(gn(fc(out)))
    return self.out_norm(drop(out))

  def _date_encoding(self, dates: jax.Array, dim: int) -> jax.Array:
    """(..., T) days -> (..., T, dim): interleaved sin/cos of d = dim/n_head frequencies, tiled."""
    n_head = self.cfg.n_head
    d = dim // n_head
    den = jnp.asarray(temporal_denominators(d, self.cfg.date_period))
    arg = dates.astype(jnp.float32)[..., None] / den
    even = (jnp.arange(d) % 2) == 0
    pe = jnp.where(even, jnp.sin(arg), jnp.cos(arg))
    return jnp.tile(pe, (1,) * (pe.ndim - 1) + (n_head,))
