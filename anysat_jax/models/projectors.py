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
    hc, wc = h // k, w // k
    # Conv with stride = kernel is one matmul over non-overlapping k x k windows.
    x = x[:, :, :hc * k, :wc * k].reshape(b, c, hc, k, wc, k)
    x = jnp.einsum("bcikjl,klcd->bijd", x.astype(self.dtype), kernel.astype(self.dtype),
                   preferred_element_type=jnp.float32)
    g = m.cells_per_10m()
    n = hc // (g * scale)
    x = x[:, :n * scale * g, :n * scale * g]
    x = x.reshape(b, n, scale, g, n, scale, g, dim)
    # (b, pr, a, c, pc, b', d, E) -> (b, pr, pc, a, b', c, d, E): blocked token order.
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b * n * n, (scale * g) ** 2, dim)
    for j, width in enumerate(self.cfg.widths[1:]):
      x = layers.dense(width, self.dtype, f"fc_{j}", f32_out=True)(x)
      x = nn.relu(layers.layer_norm(1e-5, name=f"ln_{j}")(x))
    return x


class LTAEProjector(nn.Module):
  """Time series: a per-pixel lightweight temporal attention encoder (L-TAE).

  Per pixel and date: 5 x (Linear, GroupNorm(4), ReLU) widths C -> E/8 -> E/2 -> E -> 2E -> E;
  s2 only: GroupNorm(16) over channels and dates; + sinusoidal date encoding (period Tp days);
  16-head attention with a learned master query pooling the dates; Linear + GroupNorm(4) + ReLU;
  GroupNorm(16). The (B, E, H, W) map is cut into patches of ``max(1, s // reduce_scale)``
  pixels per side.

  It computes in float32 whatever the model's ``dtype``: its GroupNorms over few channels (two
  per group in the first layer at E = 64) amplify bfloat16 rounding beyond 1e-2.
  """

  modality: Modality
  cfg: ProjectorConfig

  @nn.compact
  def __call__(self, x: jax.Array, dates: jax.Array, scale: int,
               date_mask: jax.Array | None = None,
               valid: jax.Array | None = None) -> jax.Array:
    """Encodes a time series into patch tokens.

    Args:
      x: (B, T, C, H, W) normalised values.
      dates: (B, T) day of year (days).
      scale: s = patch size // 10 m.
      date_mask: optional (B, T), 1 for real dates, 0 for padding (ignored entirely).
      valid: optional 0/1 array broadcastable to x; 0 entries take the learned pad value.
    Returns:
      (B * N, K, E) tokens, K = max(1, s // reduce_scale)^2.
    """
    cfg = self.cfg
    pad = self.param("pad_value", nn.initializers.zeros, ())
    if valid is not None:
      x = jnp.where(jnp.broadcast_to(valid, x.shape) != 0, x, pad.astype(x.dtype))
    b, t, c, h, w = x.shape
    seq = x.transpose(0, 3, 4, 1, 2)                               # (B, H, W, T, C)
    for j, width in enumerate(cfg.widths):
      seq = nn.Dense(width, name=f"in_fc_{j}")(seq)
      seq = nn.relu(layers.GroupNorm(4, name=f"in_gn_{j}")(seq))
    where = None if date_mask is None else date_mask[:, None, None, :]
    if cfg.in_norm:
      seq = layers.GroupNorm(cfg.n_head, reduce_axis=-2, name="in_norm")(seq, where)
    seq = seq + self._date_encoding(dates, seq.shape[-1])[:, None, None]
    # Attention of a learned master query over the dates; values are the sequence itself.
    keys = nn.Dense(cfg.n_head * cfg.d_k, name="key_proj")(seq)
    keys = keys.reshape(*keys.shape[:-1], cfg.n_head, cfg.d_k)
    query = self.param("master_query", nn.initializers.normal(1.0), (cfg.n_head, cfg.d_k))
    logits = jnp.einsum("bhwtnk,nk->bhwnt", keys, query.astype(keys.dtype))
    logits = logits / jnp.sqrt(jnp.asarray(cfg.d_k, logits.dtype))
    if where is not None:
      logits = jnp.where(where[..., None, :] != 0, logits, jnp.finfo(logits.dtype).min)
    attn = jax.nn.softmax(logits, axis=-1)
    e = seq.shape[-1]
    values = seq.reshape(*seq.shape[:-1], cfg.n_head, e // cfg.n_head)
    out = jnp.einsum("bhwnt,bhwtnc->bhwnc", attn, values).reshape(b, h, w, e)
    for j, width in enumerate(cfg.out_widths):
      out = nn.Dense(width, name=f"out_fc_{j}")(out)
      out = nn.relu(layers.GroupNorm(4, name=f"out_gn_{j}")(out))
    out = layers.GroupNorm(cfg.n_head, name="out_norm")(out)      # (B, H, W, E)
    e = out.shape[-1]
    s_m = max(1, scale // cfg.reduce_scale)
    n = h // s_m
    out = out[:, :n * s_m, :n * s_m].reshape(b, n, s_m, n, s_m, e)
    return out.transpose(0, 1, 3, 2, 4, 5).reshape(b * n * n, s_m * s_m, e)

  def _date_encoding(self, dates: jax.Array, dim: int) -> jax.Array:
    """(B, T) days -> (B, T, dim): interleaved sin/cos of d = dim/n_head frequencies, tiled."""
    n_head = self.cfg.n_head
    d = dim // n_head
    den = jnp.asarray(temporal_denominators(d, self.cfg.date_period))
    arg = dates.astype(jnp.float32)[..., None] / den
    even = (jnp.arange(d) % 2) == 0
    pe = jnp.where(even, jnp.sin(arg), jnp.cos(arg))
    return jnp.tile(pe, (1, 1, n_head))
