"""The AnySat encoder: projectors -> shared spatial encoder -> combiner -> outputs.

Inputs use the reference layouts: single-date images (B, C, H, W); time series (B, T, C, H, W)
with ``<mod>_dates`` (B, T) in days, an optional date mask ``<mod>_mask`` (B, T) (1 = real date,
0 = padding) and an optional value mask ``<mod>_valid`` broadcastable to the series (0 = missing
value, replaced by the projector's learned pad value). The modality order of the dict decides
the patch grid (first non-MODIS modality), the default dense modality (first modality) and the
token order of the combiner.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from anysat_jax.core import modalities as mods
from anysat_jax.models import layers
from anysat_jax.models.combiner import Combiner
from anysat_jax.models.config import EncoderConfig
from anysat_jax.models.pos_embed import sincos_grid
from anysat_jax.models.projectors import LTAEProjector, VHRProjector
from anysat_jax.models.spatial_encoder import SpatialEncoder

OUTPUTS = ("tile", "patch", "all", "dense")

# The VHR projectors' backward pass keeps their matmul outputs and recomputes their LayerNorms
# and ReLUs, as the transformer blocks do (``layers.block_remat``); ``scale`` is static.
_VHRProjector = layers.block_remat(VHRProjector, full=False, static_argnums=(2,))


class Embedding(NamedTuple):
  """Per-modality patch tokens before the combiner.

  grids: (B, M, N, E) spatial-encoder patch tokens of the M grid modalities (no positional
    encoding), in input order.
  context: (B, 1, E) MODIS context token, or None.
  sub: (B, N, K, E) sub-patch tokens of the dense modality, or None.
  """

  grids: jax.Array
  context: jax.Array | None
  sub: jax.Array | None


class AnySatEncoder(nn.Module):
  """Pure-functional (linen) AnySat encoder. See ``__call__`` for the outputs (float32 whatever
  the config's matmul ``dtype``)."""

  config: EncoderConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.projectors = {
        name: _VHRProjector(mods.get(name), pcfg, dtype, name=mods.get(name).param_name)
        if mods.get(name).projector == "vhr"
        else LTAEProjector(mods.get(name), pcfg, cfg.chunk_tokens,
                           name=mods.get(name).param_name)
        for name, pcfg in cfg.projectors}
    self.spatial_encoder = SpatialEncoder(cfg.dim, cfg.spatial_depth, cfg.spatial_heads,
                                          cfg.mlp_ratio, dtype, cfg.attention_impl, cfg.remat,
                                          cfg.chunk_tokens, name="spatial_encoder")
    self.combiner = Combiner(cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.combiner_attention,
                             dtype, cfg.attention_impl, cfg.remat, name="combiner")
    self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, cfg.dim))

  def project(self, inputs: dict[str, jax.Array], name: str, scale: int, *,
              deterministic: bool = True) -> jax.Array:
    """One modality's projector: -> sub-patch tokens (B * N_m, K_m, E)."""
    x = inputs[name]
    if mods.get(name).projector == "vhr":
      return self.projectors[name](x, scale)
    return self.projectors[name](x, inputs[name + mods.DATES_SUFFIX], scale,
                                 inputs.get(name + mods.MASK_SUFFIX),
                                 inputs.get(name + mods.VALID_SUFFIX),
                                 deterministic=deterministic)

  def encode_patches(self, inputs: dict[str, jax.Array], name: str, scale: int, *,
                     deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Projector + spatial encoder: (patch tokens (B*N, E), sub-patch tokens (B*N, K, E))."""
    tokens = self.project(inputs, name, scale, deterministic=deterministic)
    return self.spatial_encoder(tokens, scale, mods.get(name).subpatch_m)

  def embed(self, inputs: dict[str, jax.Array], patch_size: int,
            dense_modality: str | None = None, *, deterministic: bool = True) -> Embedding:
    """Projectors + spatial encoder for every modality, in the dict's order.

    ``deterministic=False``: training mode, the L-TAE dropouts act (needs a ``dropout`` rng);
    every other layer is deterministic anyway (the reference's rates are 0)."""
    scale = patch_size // 10
    names = mods.modality_keys(inputs)
    b = inputs[names[0]].shape[0]
    dim = self.config.dim
    grids, context, sub = [], None, None
    for name in names:
      patch_tokens, sub_tokens = self.encode_patches(inputs, name, scale,
                                                     deterministic=deterministic)
      if mods.get(name).context_token:
        context = patch_tokens.reshape(b, 1, dim)
        continue
      num = patch_tokens.shape[0] // b
      grids.append(patch_tokens.reshape(b, num, dim))
      if name == dense_modality:
        sub = sub_tokens.reshape(b, num, -1, dim)
    return Embedding(jnp.stack(grids, axis=1), context, sub)

  def combine(self, grids: jax.Array, context: jax.Array | None, patch_size: int,
              positions: jax.Array | None = None, side: int | None = None,
              visible: jax.Array | None = None,
              mask_token: jax.Array | None = None) -> jax.Array:
    """Combiner over patch tokens: -> (B, 1 + K, E), tile token first.

    Args:
      grids: (B, M, K, E) patch tokens of M modalities, without positional encoding.
      context: (B, 1, E) MODIS context token or None.
      patch_size: metres.
      positions: (B, K) raster indices of the K patches on the ``side`` x ``side`` grid (a
        subset, e.g. the student's context patches), or None for the full grid (K = side**2).
      side: patches per side; needed with ``positions``.
      visible: optional (B, M, K) bool; hidden tokens are replaced by ``mask_token`` (E,)
        after the positional encoding, so they carry no position (the student's modality
        masking).
    """
    scale = patch_size // 10
    b, m, k, dim = grids.shape
    if positions is None:
      side = math.isqrt(k)
      pe = jnp.asarray(sincos_grid(dim, side, scale, 1)[1:], grids.dtype)[None, None]
    else:
      table = jnp.asarray(sincos_grid(dim, side, scale, 1)[1:], grids.dtype)
      pe = table[positions][:, None]                                  # (B, 1, K, E)
    tokens = grids + pe
    if visible is not None:
      tokens = jnp.where(visible[..., None], tokens, mask_token.astype(tokens.dtype))
    tokens = tokens.reshape(b, m * k, dim)
    cls = jnp.broadcast_to(self.cls_token.astype(grids.dtype), (b, 1, dim))
    x = jnp.concatenate([cls, *([] if context is None else [context]), tokens], axis=1)
    return self.combiner(x, side, scale, m, context is not None, positions)

  def features(self, inputs: dict[str, jax.Array], patch_size: int,
               dense_modality: str | None = None, *,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """Runs the network: (tokens (B, 1 + N, E), tile first; sub-patch tokens (B, N, K, E) of
    ``dense_modality`` or None). ``deterministic``: see ``embed``."""
    emb = self.embed(inputs, patch_size, dense_modality, deterministic=deterministic)
    return self.combine(emb.grids, emb.context, patch_size), emb.sub

  def __call__(self, inputs: dict[str, jax.Array], patch_size: int, output: str = "tile",
               output_modality: str | None = None, *, raster_dense: bool = False) -> jax.Array:
    """Encodes a batch of tiles.

    Args:
      inputs: modality arrays and their ``_dates`` / ``_mask`` / ``_valid`` companions.
      patch_size: patch side P in metres; the network uses s = P // 10.
      output: ``tile`` (B, E); ``patch`` (B, n, n, E); ``all`` (B, 1 + n*n, E), tile first;
        ``dense`` (B, n*k, n*k, 2E): the patch token repeated over its k x k sub-patch cells,
        concatenated with the spatial encoder's sub-patch tokens of ``output_modality``
        (default: the first modality).
      output_modality: modality of the dense map.
      raster_dense: aerial only: place sub-patches at their true position inside each patch
        instead of the reference's blocked order (no effect for other modalities).
    """
    if output not in OUTPUTS:
      raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if output == "dense" and not output_modality:
      output_modality = mods.modality_keys(inputs)[0]
    dense_modality = output_modality if output == "dense" else None
    z, sub = self.features(inputs, patch_size, dense_modality)
    return select_output(z, sub, output, dense_modality, patch_size // 10, raster_dense)

  def init_all(self, scale: int = 1) -> jax.Array:
    """Touches every parameter (for ``init``): each projector on a tiny dummy input."""
    outs = []
    for name, _ in self.config.projectors:
      m = mods.get(name)
      if m.projector == "vhr":
        px = m.kernel * m.cells_per_10m() * scale
        x = {name: jnp.zeros((1, m.channels, px, px))}
      else:
        px = max(1, scale // self.projectors[name].cfg.reduce_scale)
        x = {name: jnp.zeros((1, 1, m.channels, px, px)), name + "_dates": jnp.zeros((1, 1))}
      outs.append(self.encode_patches(x, name, scale)[0].sum())
    outs.append(self.combine(jnp.zeros((1, 1, 1, self.config.dim)), None, 10 * scale).sum())
    return sum(outs)


def grid_validity(inputs: dict[str, jax.Array], patch_size: int,
                  config: EncoderConfig) -> jax.Array | None:
  """Which patches hold data: bool (B, M, N) for the M grid (non-MODIS) modalities, in input
  order (the order of ``Embedding.grids``), or None when no modality has a mask (all valid).

  A time-series patch is valid if any value inside it (any date, channel, pixel) is valid: its
  date is real (``<mod>_mask`` != 0) and the value is measured (``<mod>_valid`` != 0). Without
  either mask, and for single-date images, every patch is valid.
  """
  scale = patch_size // 10
  names = [m for m in mods.modality_keys(inputs) if not mods.get(m).context_token]
  b = inputs[names[0]].shape[0]
  out, n = [], None
  for name in names:
    x = inputs[name]
    date_mask = inputs.get(name + mods.MASK_SUFFIX)
    value_mask = inputs.get(name + mods.VALID_SUFFIX)
    if mods.get(name).projector == "vhr" or (date_mask is None and value_mask is None):
      out.append(None)
      continue
    ok = jnp.ones(x.shape[:2] + x.shape[3:], bool)                       # (B, T, H, W)
    if value_mask is not None:
      ok = jnp.any(jnp.broadcast_to(value_mask, x.shape) != 0, axis=2)
    if date_mask is not None:
      ok = ok & (date_mask != 0)[:, :, None, None]
    ok = jnp.any(ok, axis=1)                                              # (B, H, W)
    s_m = max(1, scale // config.projector(name).reduce_scale)
    side = ok.shape[1] // s_m
    ok = ok[:, :side * s_m, :side * s_m].reshape(b, side, s_m, side, s_m)
    out.append(jnp.any(ok, axis=(2, 4)).reshape(b, side * side))
    n = side * side
  if n is None:
    return None
  return jnp.stack([jnp.ones((b, n), bool) if v is None else v for v in out], axis=1)


def select_output(z: jax.Array, sub: jax.Array | None, output: str,
                  dense_modality: str | None = None, scale: int = 1,
                  raster_dense: bool = False) -> jax.Array:
  """Shapes the network's tokens into one output mode (see ``AnySatEncoder.__call__``)."""
  b, length, dim = z.shape
  side = math.isqrt(length - 1)
  if output == "tile":
    return z[:, 0]
  if output == "all":
    return z
  if output == "patch":
    return z[:, 1:].reshape(b, side, side, dim)
  if output != "dense":
    raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
  if sub is None:
    raise ValueError(f"dense output modality {dense_modality!r} is not a patch-grid input "
                     "modality of this batch")
  n_patches, k2 = sub.shape[1:3]
  k = math.isqrt(k2)
  m = mods.get(dense_modality)
  if raster_dense and m.projector == "vhr" and scale > 1 and m.cells_per_10m() > 1:
    g = m.cells_per_10m()
    # Blocked order (a, b', c, d) -> raster (a, c, b', d) inside each patch.
    sub = sub.reshape(b, n_patches, scale, scale, g, g, dim).transpose(0, 1, 2, 4, 3, 5, 6)
  sub = sub.reshape(b, side, side, k, k, dim).transpose(0, 1, 3, 2, 4, 5)
  sub = sub.reshape(b, side * k, side * k, dim)
  pat = z[:, 1:].reshape(b, side, 1, side, 1, dim)
  pat = jnp.broadcast_to(pat, (b, side, k, side, k, dim)).reshape(b, side * k, side * k, dim)
  return jnp.concatenate([pat, sub], axis=-1)
