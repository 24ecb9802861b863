"""Input checks, run on shapes and values before any compute.

Every error is a ``ValueError`` whose message names the modality (or input key) and the problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anysat_jax.core import modalities as mods
from anysat_jax.models.config import EncoderConfig
from anysat_jax.models.encoder import OUTPUTS
from anysat_jax.models.spatial_encoder import pe_grid_side

MAX_DAY = 366
NONFINITE = ("mask", "raise")
# The combiner's relative-position bucket table, (S + N) x (S + M N) int32 for N patches of M
# modalities and S leading tokens, must fit this budget (a 128 x 128 patch grid of 3
# modalities takes 3 GiB).
MAX_TABLE_BYTES = 16 * 2**30


def _gib(n: float) -> str:
  return f"{n / 2**40:.2f} TiB" if n >= 2**40 else f"{n / 2**30:.2f} GiB"


def table_bytes(patches: int, grids: int, special: int = 1) -> int:
  """Bytes of the combiner's relative-position table for ``patches`` patches per modality."""
  return 4 * (special + patches) * (special + grids * patches)


def count_nonfinite(x: Any) -> int | None:
  """NaN/Inf values of a concrete array (None for a tracer)."""
  if isinstance(x, jax.core.Tracer):
    return None
  xp = jnp if isinstance(x, jax.Array) else np     # count where the array lives
  return int(x.size - xp.count_nonzero(xp.isfinite(x)))


def _is_concrete(x: Any) -> bool:
  try:
    np.asarray(x)
    return True
  except Exception:  # tracers cannot be read
    return False


def patches_per_side(name: str, pixels: int, scale: int, reduce_scale: int) -> tuple[int, int]:
  """(patches per side n_m, sub-patch tokens per patch K_m) of one modality."""
  m = mods.get(name)
  if m.projector == "vhr":
    g = m.cells_per_10m()
    return (pixels // m.kernel) // (g * scale), (g * scale) ** 2
  s_m = max(1, scale // reduce_scale)
  return pixels // s_m, s_m * s_m


def validate_inputs(inputs: Mapping[str, Any], patch_size: Any, config: EncoderConfig,
                    output: str = "tile", output_modality: str | None = None, *,
                    nonfinite: str = "mask", max_table_bytes: int = MAX_TABLE_BYTES) -> None:
  """Checks a batch against the model before it runs; raises ``ValueError`` on the first problem.

  Checks: known modality with a projector in the model; rank, channels, square pixels, float
  dtype, non-empty and equal batch sizes; matching ground extents (pixels x metres per pixel,
  MODIS excepted); patch size a positive multiple of 10 m dividing the extent; every modality on
  the same patch grid; dates present, (B, T), within 0..366; masks of the right shape; the
  combiner's relative-position table within ``max_table_bytes``. ``nonfinite="raise"`` refuses
  NaN/Inf data values (``"mask"`` leaves them to the caller, which folds them into
  ``<mod>_valid``).
  """
  if output not in OUTPUTS:
    raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
  if nonfinite not in NONFINITE:
    raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
  names = mods.modality_keys(inputs)
  if not names:
    raise ValueError("no modality in the input dict (keys: " + ", ".join(inputs) + ")")
  for key in inputs:
    base = next((key[: -len(s)] for s in mods.AUX_SUFFIXES if key.endswith(s)), None)
    if base is not None and base not in inputs:
      raise ValueError(f"{key}: given without its modality {base!r}")
  if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) \
      or patch_size <= 0 or patch_size % 10:
    raise ValueError(f"patch size must be a positive multiple of 10 m, got {patch_size!r}")
  scale = int(patch_size) // 10

  batch, extent, extent_from = None, None, None
  for name in names:
    if name not in mods.MODALITIES:
      raise ValueError(f"unknown modality {name!r}; known modalities: {', '.join(mods.MODALITIES)}")
    m = mods.get(name)
    if name not in config.modality_names:
      raise ValueError(f"{name}: this model has no projector for it "
                       f"(it has: {', '.join(config.modality_names)})")
    x = inputs[name]
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      raise ValueError(f"{name}: expected a numpy or JAX array, got a {type(x).__name__}; "
                       "convert it with np.asarray(x, np.float32)")
    shape = tuple(np.shape(x))
    want = 5 if m.temporal else 4
    layout = "(B, T, C, H, W)" if m.temporal else "(B, C, H, W)"
    if len(shape) != want:
      raise ValueError(f"{name}: expected a rank-{want} array {layout}, got shape {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name}: data must be floating point (normalised values), got dtype "
                       f"{x.dtype}")
    if shape[0] == 0:
      raise ValueError(f"{name}: empty batch (shape {shape})")
    if batch is None:
      batch = shape[0]
    elif shape[0] != batch:
      raise ValueError(f"{name}: batch size {shape[0]} differs from {names[0]}'s {batch}")
    c, h, w = shape[-3:]
    if c != m.channels:
      raise ValueError(f"{name}: expected {m.channels} channels ({', '.join(m.bands)}), got {c} "
                       f"(shape {shape})")
    if h != w:
      raise ValueError(f"{name}: tiles must be square, got {h}x{w} pixels")
    if m.temporal:
      _check_time_series(inputs, name, shape)
    bad = count_nonfinite(x) if nonfinite == "raise" else None
    if bad:
      raise ValueError(f"{name}: {bad} of {math.prod(shape)} values are NaN or Inf; mark "
                       f"missing values in {name}{mods.VALID_SUFFIX} instead (or let them be "
                       "masked: nonfinite='mask')")
    if m.context_token:
      continue
    side_m = h * m.gsd
    if extent is None:
      extent, extent_from = side_m, name
    elif not math.isclose(side_m, extent, rel_tol=1e-9, abs_tol=1e-9):
      raise ValueError(f"{name}: covers {side_m:g} m ({h} px x {m.gsd:g} m) but {extent_from} "
                       f"covers {extent:g} m; all modalities must cover the same extent")
  if extent is None:
    raise ValueError("at least one modality other than modis is needed (modis is a context "
                     "token, not a patch grid)")
  ratio = extent / patch_size
  if not math.isclose(ratio, round(ratio), abs_tol=1e-9) or round(ratio) < 1:
    raise ValueError(f"patch size {patch_size} m does not divide the tile extent {extent:g} m")
  n = round(ratio)
  grids = [nm for nm in names if not mods.get(nm).context_token]
  special = 1 + (len(grids) < len(names))
  need = table_bytes(n * n, len(grids), special)
  if need > max_table_bytes:
    fit = n
    while fit > 1 and table_bytes(fit * fit, len(grids), special) > max_table_bytes:
      fit -= 1
    raise ValueError(
        f"{', '.join(grids)}: a {extent:g} m tile at patch size {patch_size} m has {n}x{n} = "
        f"{n * n} patches per modality ({len(grids)} modalities); the combiner's relative-"
        f"position table would take {_gib(need)} (limit {_gib(max_table_bytes)}); cut the "
        f"scene into windows of at most {fit * patch_size:g} m (embed: --tile_m "
        f"{fit * patch_size:g}) or use a larger patch size")

  for name in names:
    m = mods.get(name)
    pcfg = config.projector(name)
    pixels = np.shape(inputs[name])[-1]
    n_m, k_m = patches_per_side(name, pixels, scale, pcfg.reduce_scale)
    if m.context_token:
      if n_m != 1:
        raise ValueError(f"{name}: a context token needs exactly one patch, got {n_m}x{n_m} "
                         f"({pixels} px of {m.gsd:g} m at patch size {patch_size} m)")
    elif n_m != n:
      hint = (f"; {name} pixels are {m.gsd:g} m, so use a patch size that is a multiple of "
              f"{10 * pcfg.reduce_scale} m" if pcfg.reduce_scale > 1 else "")
      raise ValueError(f"{name}: {pixels} px give {n_m}x{n_m} patches of {patch_size} m but the "
                       f"tile has {n}x{n}{hint}")
    side = pe_grid_side(scale, m.subpatch_m)
    if side * side != k_m:
      raise ValueError(f"{name}: patch size {patch_size} m gives {k_m} sub-patch tokens but a "
                       f"{side}x{side} positional grid; this patch size is not supported for "
                       f"{name}")

  if output == "dense":
    om = output_modality or names[0]
    if om not in names:
      raise ValueError(f"output_modality {om!r} is not among the inputs ({', '.join(names)})")
    if mods.get(om).context_token:
      raise ValueError(f"output_modality {om!r} is a context token and has no dense map")
  elif output_modality and output_modality not in names:
    raise ValueError(f"output_modality {output_modality!r} is not among the inputs")


def _check_time_series(inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]) -> None:
  b, t = shape[:2]
  if t == 0:
    raise ValueError(f"{name}: time series with no dates (T = 0)")
  key = name + mods.DATES_SUFFIX
  if key not in inputs:
    raise ValueError(f"{name}: time series needs {key!r} of shape (B, T) = ({b}, {t}), day of "
                     "year 0..366")
  dates = inputs[key]
  if tuple(np.shape(dates)) != (b, t):
    raise ValueError(f"{key}: expected shape (B, T) = ({b}, {t}), got {tuple(np.shape(dates))}")
  if _is_concrete(dates):
    d = np.asarray(dates)
    if not (np.issubdtype(d.dtype, np.number)) or np.issubdtype(d.dtype, np.complexfloating):
      raise ValueError(f"{key}: dates must be numbers (day of year), got dtype {d.dtype}")
    if not np.all(np.isfinite(d)) or d.min() < 0 or d.max() > MAX_DAY:
      raise ValueError(f"{key}: dates must be day of year within 0..{MAX_DAY}, got range "
                       f"{d.min()}..{d.max()}")
  mask_key = name + mods.MASK_SUFFIX
  if mask_key in inputs:
    mask = inputs[mask_key]
    if tuple(np.shape(mask)) != (b, t):
      raise ValueError(f"{mask_key}: date mask must have shape (B, T) = ({b}, {t}), got "
                       f"{tuple(np.shape(mask))}")
    if _is_concrete(mask) and not np.all(np.asarray(mask).astype(bool).any(axis=1)):
      raise ValueError(f"{mask_key}: every sample needs at least one valid date")
  valid_key = name + mods.VALID_SUFFIX
  if valid_key in inputs:
    vshape = tuple(np.shape(inputs[valid_key]))
    try:
      np.broadcast_shapes(vshape, shape)
    except ValueError:
      raise ValueError(f"{valid_key}: value mask of shape {vshape} does not broadcast to the "
                       f"series {shape}") from None
    if len(vshape) > len(shape):
      raise ValueError(f"{valid_key}: value mask of shape {vshape} has more axes than {shape}")
