"""Features of scenes of any size: the array API (``embed_arrays``) and its pieces.

AnySat attends over the whole window, so a window's features depend on its context: tiled
features are not the features of one call on the whole scene. Dense maps are blended where
windows overlap (``tiling.Blender``); ``tile`` and ``patch`` outputs give one row per window
(per patch) with its origin. Missing values (NaN, or the file's nodata value, which the readers
turn into NaN) are folded into ``<mod>_valid``: the model replaces them by its learned pad
value; a window without any valid value gets NaN features (nodata) instead of features of
garbage. Memory holds one batch of windows and, for dense maps, one row of windows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from tqdm import tqdm

from anysat_jax.core import modalities as mods
from anysat_jax.inference import tiling
from anysat_jax.inference.api import AnySat
from anysat_jax.models.validation import patches_per_side, validate_inputs

log = logging.getLogger(__name__)

OUTPUTS = ("tile", "patch", "dense")
DENSE_BANDS = ("all", "first", "last")
MISSING = ("mask", "raise")
_BLOCK = 512           # side, px, of the blocks read when counting missing values


@dataclasses.dataclass(frozen=True)
class Embedding:
  """Features of a scene.

  Attributes:
    output: ``tile``, ``patch`` or ``dense``.
    features: tile (N, E), one row per window; patch (N, n, n, E); dense (H', W', D) blended
      over the windows, covering H' x W' cells of ``cell_m`` from the scene's top-left corner,
      D = 2E (patch token then sub-patch token) or E (``dense_bands``). NaN where no valid
      input was seen.
    origins_m: (N, 2) top-left corner (row, col) of each window in metres from the scene's
      top-left corner, rows going south; windows in row-major order.
    tile_m: window side, metres.
    cell_m: ground side of one feature vector: tile_m (tile), the patch size (patch) or the
      dense cell (dense: 2 m for aerial, 10 m for s2, ...).
  """

  output: str
  features: np.ndarray
  origins_m: np.ndarray
  tile_m: float
  cell_m: float


@dataclasses.dataclass(frozen=True)
class Scene:
  """A checked scene, ready to encode: the inputs and settings of ``embed_arrays``, its
  windows, and the modalities with missing values (which get ``<mod>_valid``)."""

  model: AnySat
  arrays: Mapping[str, Any]
  dates: Mapping[str, np.ndarray]
  patch_size: int
  output: str
  output_modality: str | None
  windows: tiling.Windows
  stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None
  missing: tuple[str, ...]

  @property
  def depth(self) -> int:
    """Width of one output vector before ``dense_bands`` (2E for dense, else E)."""
    return self.model.config.dim * (2 if self.output == "dense" else 1)


def normalize(arrays: Mapping[str, np.ndarray], stats: Mapping[str, tuple[Any, Any]]
              ) -> dict[str, np.ndarray]:
  """(x - mean_c) / std_c over the channel axis (-3) of every modality; stats (mean, std) (C,)."""
  out = {}
  for name, x in arrays.items():
    mean, std = _stats(name, stats, x.shape[-3])
    out[name] = (x - mean[:, None, None]) / std[:, None, None]
  return out


def _stats(name: str, stats: Mapping[str, tuple[Any, Any]], channels: int
           ) -> tuple[np.ndarray, np.ndarray]:
  if name not in stats:
    raise ValueError(f"{name}: no normalisation statistics (have: {', '.join(stats)})")
  mean, std = (np.asarray(v, np.float32) for v in stats[name])
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(f"{name}: statistics for {mean.size} channels, the data has {channels}")
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
    raise ValueError(f"{name}: statistics must be finite with std > 0, got mean {mean.tolist()}"
                     f", std {std.tolist()}")
  return mean, std


def count_missing(x: Any) -> int:
  """Non-finite values of an image or series, read in blocks of 512 x 512 px (memory bounded
  by a block, not by the scene's width)."""
  h, w = x.shape[-2:]
  return sum(int(np.count_nonzero(~np.isfinite(x[..., r:r + _BLOCK, c:c + _BLOCK])))
             for r in range(0, h, _BLOCK) for c in range(0, w, _BLOCK))


def _window_batch(scene: Scene, windows: Sequence[tuple[Fraction, Fraction]]
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(the model batch of the windows' pixels, with dates (B, T) and ``<mod>_valid`` for
  modalities with missing values; (B,) True where a window has any valid value)."""
  batch, seen = {}, np.zeros(len(windows), bool)
  px_tile = scene.windows.tile
  for name, x in scene.arrays.items():
    m = mods.get(name)
    if m.context_token:
      x = np.stack([np.asarray(x, np.float32)] * len(windows))
    else:
      g = tiling.frac(m.gsd)
      px = int(px_tile / g)
      x = np.stack([np.asarray(x[..., int(oy / g):int(oy / g) + px, int(ox / g):int(ox / g) + px],
                               np.float32) for oy, ox in windows])
    if scene.stats is not None:
      mean, std = _stats(name, scene.stats, x.shape[-3])
      x = (x - mean[:, None, None]) / std[:, None, None]
    if name in scene.missing:
      valid = np.isfinite(x)
      batch[name + mods.VALID_SUFFIX] = valid.astype(np.uint8)
      x = np.where(valid, x, np.float32(0))
      seen |= valid.reshape(len(windows), -1).any(axis=1)
    else:
      seen[:] = True
    batch[name] = x
    if m.temporal:
      if name not in scene.dates:
        raise ValueError(f"{name}: a time series needs its dates (T,)")
      batch[name + mods.DATES_SUFFIX] = np.broadcast_to(
          np.asarray(scene.dates[name], np.float32), (len(windows), x.shape[1]))
  return batch, seen


def prepare(model: AnySat, arrays: Mapping[str, Any], dates: Mapping[str, np.ndarray],
            patch_size: int, output: str = "tile", output_modality: str | None = None, *,
            tile_m: float | None = None, overlap_m: float = 0,
            stats: Mapping[str, tuple[Any, Any]] | None = None, missing: str = "mask"
            ) -> Scene:
  """Checks a scene and plans its windows (see ``embed_arrays`` for the arguments); counts
  the missing values of every modality (a log line each) or refuses them (``missing="raise"``)."""
  if output not in OUTPUTS:
    raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
  if missing not in MISSING:
    raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
  if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) \
      or patch_size <= 0 or patch_size % 10:
    raise ValueError(f"patch size must be a positive multiple of 10 m, got {patch_size!r}")
  arrays = {k: v if hasattr(v, "shape") and hasattr(v, "__getitem__") else np.asarray(v)
            for k, v in arrays.items()}
  _, _, tile = tiling.plan({k: v.shape for k, v in arrays.items()}, patch_size, tile_m,
                           overlap_m)
  counts = {n: count_missing(x) for n, x in arrays.items()}
  for name, n in counts.items():
    total = math.prod(arrays[name].shape)
    if n and missing == "raise":
      raise ValueError(f"{name}: {n} of {total} values are missing (nodata or NaN/Inf); mask "
                       "them instead with missing='mask' (--missing mask)")
    if n:
      log.info("%s: %d of %d values are missing (nodata or NaN/Inf); masked as missing",
               name, n, total)
  cell = tile if output == "tile" else Fraction(patch_size)
  win = tiling.Windows(tile, Fraction(0), (Fraction(0),), (Fraction(0),), cell)
  scene = Scene(model, arrays, dates, int(patch_size), output, output_modality, win, stats,
                tuple(n for n, c in counts.items() if c))
  first, _ = _window_batch(scene, [(Fraction(0), Fraction(0))])
  try:
    validate_inputs(first, patch_size, model.config, output, output_modality)
  except ValueError as e:
    raise ValueError(f"{e} (windows of {float(tile):g} m)") from None
  if output == "dense":
    om = output_modality or next(iter(arrays))
    n, k2 = patches_per_side(om, int(tile / tiling.frac(mods.get(om).gsd)), patch_size // 10,
                             model.config.projector(om).reduce_scale)
    cell = tile / (n * math.isqrt(k2))
  win = tiling.windows({k: v.shape for k, v in arrays.items()}, tile, overlap_m, cell,
                       snap_to_cells=output == "dense")
  return dataclasses.replace(scene, windows=win)


def encode(scene: Scene, *, batch: int = 8, dense_bands: str = "all", progress: bool = False
           ) -> Iterator[tuple[list[tuple[Fraction, Fraction]], np.ndarray]]:
  """(windows, features) per model call, in row-major window order; windows without a valid
  value get NaN features. ``batch`` windows per call (the last call padded to it)."""
  if batch < 1:
    raise ValueError(f"batch must be at least 1, got {batch}")
  if dense_bands not in DENSE_BANDS:
    raise ValueError(f"dense_bands must be one of {DENSE_BANDS}, got {dense_bands!r}")
  windows = scene.windows.origins
  size = min(batch, len(windows))
  with tqdm(total=len(windows), desc="windows", unit="window", disable=not progress) as bar:
    for start in range(0, len(windows), size):
      chunk = windows[start:start + size]
      padded = [*chunk, *[chunk[-1]] * (size - len(chunk))]  # one compiled shape for all calls
      inputs, seen = _window_batch(scene, padded)
      y = scene.model(inputs, scene.patch_size, scene.output, scene.output_modality,
                      raster_dense=True)
      y = np.array(y, np.float32)[:len(chunk)]
      if scene.output == "dense":
        e = y.shape[-1] // 2
        y = {"all": y, "first": y[..., :e], "last": y[..., e:]}[dense_bands]
      y[~seen[:len(chunk)]] = np.nan
      bar.update(len(chunk))
      yield chunk, y


def dense_rows(scene: Scene, *, taper: str = "linear", dense_bands: str = "all",
               batch: int = 8, progress: bool = False) -> Iterator[np.ndarray]:
  """The blended dense map of a ``dense`` scene as row blocks (k, W', D), top to bottom."""
  depth = scene.depth // (1 if dense_bands == "all" else 2)
  blender = tiling.Blender(scene.windows, depth, taper)
  for chunk, y in encode(scene, batch=batch, dense_bands=dense_bands, progress=progress):
    for (oy, ox), f in zip(chunk, y, strict=True):
      rows = blender.add(oy, ox, None if np.isnan(f).all() else f)
      if rows is not None and len(rows):
        yield rows
  yield blender.finish()


def embed_arrays(model: AnySat, arrays: Mapping[str, Any], dates: Mapping[str, np.ndarray],
                 patch_size: int, output: str = "tile", output_modality: str | None = None, *,
                 tile_m: float | None = None, overlap_m: float = 0, taper: str = "linear",
                 dense_bands: str = "all", batch: int = 8,
                 stats: Mapping[str, tuple[Any, Any]] | None = None, missing: str = "mask",
                 progress: bool = False) -> Embedding:
  """Encodes a scene, whole or in sliding windows.

  Args:
    model: the encoder.
    arrays: inputs in the model's modality order: images (C, H, W), series (T, C, H, W),
      all covering the same ground extent; normalised, or raw with ``stats``. Arrays or lazy
      views (``io.rasters.Bands``); NaN marks a missing value.
    dates: (T,) day of year of every time series.
    patch_size: patch side, metres (multiple of 10).
    output: ``tile``, ``patch`` or ``dense``.
    output_modality: the dense map's modality (default: the first).
    tile_m: window side, metres, a multiple of ``patch_size``; None: one call on the whole
      (square) scene.
    overlap_m: overlap of neighbouring windows, metres, a multiple of ``patch_size``.
    taper: ``linear`` or ``cosine`` blending ramp of dense maps over the overlap.
    dense_bands: ``all`` (2E), ``first`` (the patch token, E) or ``last`` (the sub-patch
      token, E) of the dense map, selected before blending.
    batch: windows per model call (bounds the memory; the last call is padded to this size).
    stats: {modality: (mean (C,), std (C,))} to normalise each window with, or None.
    missing: ``mask`` (missing values folded into ``<mod>_valid``, counted in a log line) or
      ``raise`` (a ValueError naming the modality and the count).
    progress: show a progress bar.
  """
  if taper not in tiling.TAPERS or dense_bands not in DENSE_BANDS:
    raise ValueError(f"taper must be one of {tiling.TAPERS} and dense_bands one of "
                     f"{DENSE_BANDS}, got {taper!r}, {dense_bands!r}")
  scene = prepare(model, arrays, dates, patch_size, output, output_modality, tile_m=tile_m,
                  overlap_m=overlap_m, stats=stats, missing=missing)
  win = scene.windows
  if output == "dense":
    features = np.concatenate(list(dense_rows(scene, taper=taper, dense_bands=dense_bands,
                                              batch=batch, progress=progress)))
  else:
    features = np.concatenate([y for _, y in encode(scene, batch=batch, progress=progress)])
  origins = np.array([(float(oy), float(ox)) for oy, ox in win.origins], np.float64)
  return Embedding(output, features, origins, float(win.tile), float(win.cell))
