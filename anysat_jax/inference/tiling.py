"""Sliding windows over a scene and the blending of their maps (numpy only).

Windows are squares of ``tile`` metres sliding by ``tile - overlap`` over all modalities
jointly; the last row and column are flush with the scene's far edge, on the grid of every
modality's pixels and of the output cells. Maps of overlapping windows (features, or a
predictor's logits) are blended by ``Blender``: each window is weighted by a ramp over the
overlap on every side that has a neighbour and the sum is divided by the summed weights, so a
cell seen by one window only keeps that window's value. Metres are exact ``Fraction``s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np

from anysat_jax.core import modalities as mods

TAPERS = ("linear", "cosine")


def frac(value: float) -> Fraction:
  """The decimal value as written (0.2 is 1/5, not the nearest binary float)."""
  return Fraction(str(value))


def lcm(values: Sequence[Fraction]) -> Fraction:
  """Smallest positive multiple of every value."""
  return Fraction(math.lcm(*(v.numerator for v in values)),
                  math.gcd(*(v.denominator for v in values)))


def extent(shapes: Mapping[str, Sequence[int]]) -> tuple[Fraction, Fraction]:
  """(height, width) in metres shared by the patch-grid modalities of ``{name: shape}`` (pixels
  on the last two axes); an error names a mismatch."""
  out, first = None, None
  for name, shape in shapes.items():
    m = mods.get(name)
    if m.context_token:
      continue
    h, w = shape[-2:]
    here = (h * frac(m.gsd), w * frac(m.gsd))
    text = f"{name}: {h}x{w} px x {m.gsd:g} m = {float(here[0]):g} x {float(here[1]):g} m"
    if out is None:
      out, first = here, text
    elif here != out:
      raise ValueError(f"{text} but {first}; all inputs must cover the same ground extent "
                       "(crop them, e.g. --crop MOD=PX, or resample)")
  if out is None:
    raise ValueError("at least one modality other than modis is needed")
  return out


def origins(length: Fraction, tile: Fraction, stride: Fraction, unit: Fraction
            ) -> list[Fraction]:
  """Window starts along one axis: every ``stride``, then one flush with the end (on the
  ``unit`` grid, so up to one unit may stay uncovered)."""
  last = (length - tile) // unit * unit
  starts = [k * stride for k in range(int(last // stride) + 1)]
  return starts if starts[-1] == last else [*starts, last]


def ramp(n: int, overlap: int, before: bool, after: bool, taper: str) -> np.ndarray:
  """(n,) blending weights: up over the first ``overlap`` cells if ``before``, down over the
  last ones if ``after``; linear or cosine, sampled at cell centres (so always > 0)."""
  w = np.ones(n, np.float32)
  if overlap:
    r = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
    if taper == "cosine":
      r = 0.5 - 0.5 * np.cos(np.pi * r)
    if before:
      w[:overlap] = r
    if after:
      w[n - overlap:] = np.minimum(w[n - overlap:], r[::-1])
  return w


@dataclasses.dataclass(frozen=True)
class Windows:
  """The windows of a scene.

  Attributes:
    tile: window side, m.
    overlap: overlap of neighbours, m.
    ys, xs: window starts along rows (going south) and columns, m from the top-left corner.
    cell: side of one output cell, m (windows and overlaps are whole numbers of cells).
  """

  tile: Fraction
  overlap: Fraction
  ys: tuple[Fraction, ...]
  xs: tuple[Fraction, ...]
  cell: Fraction

  @property
  def origins(self) -> list[tuple[Fraction, Fraction]]:
    """(row, col) starts, m, in row-major order."""
    return [(y, x) for y in self.ys for x in self.xs]

  @property
  def grid(self) -> tuple[int, int]:
    """(rows, cols) of output cells covered by the windows."""
    return (int((self.ys[-1] + self.tile) / self.cell),
            int((self.xs[-1] + self.tile) / self.cell))


def plan(shapes: Mapping[str, Sequence[int]], patch_size: int, tile_m: float | None,
         overlap_m: float = 0) -> tuple[Fraction, Fraction, Fraction]:
  """Checks a scene of ``{name: shape}`` against windows of ``tile_m`` (None: the whole square
  scene) overlapping by ``overlap_m``; returns (height, width, tile) in m."""
  height, width = extent(shapes)
  patch, overlap = Fraction(patch_size), frac(overlap_m)
  if tile_m is None:
    if height != width:
      raise ValueError(f"the scene is {float(height):g} x {float(width):g} m, not square; give "
                       "a window size (tile_m) to cut it into square windows")
    if height % patch:
      raise ValueError(f"the scene side {float(height):g} m is not a multiple of the patch "
                       f"size {patch_size} m; crop the inputs or give a window size (tile_m)")
    tile = height
  else:
    tile = frac(tile_m)
    context = [n for n in shapes if mods.get(n).context_token]
    if context:
      raise ValueError(f"{', '.join(context)}: a whole-tile context token cannot be cut into "
                       "windows; encode without tile_m")
  if tile <= 0 or tile % patch or tile > min(height, width):
    raise ValueError(f"window {float(tile):g} m must be a positive multiple of the patch size "
                     f"{patch_size} m and fit the scene ({float(height):g} x {float(width):g} m)")
  if overlap < 0 or overlap >= tile or overlap % patch:
    raise ValueError(f"overlap {float(overlap):g} m must be a multiple of the patch size "
                     f"{patch_size} m, at least 0 and less than the window {float(tile):g} m")
  for name in shapes:
    g = frac(mods.get(name).gsd)
    if not mods.get(name).context_token and (tile / g).denominator != 1:
      raise ValueError(f"{name}: a {float(tile):g} m window is {float(tile / g):g} px of "
                       f"{float(g):g} m, not a whole number of pixels")
  return height, width, tile


def windows(shapes: Mapping[str, Sequence[int]], tile: Fraction, overlap_m: float,
            cell: Fraction, snap_to_cells: bool) -> Windows:
  """The windows of a scene checked by ``plan``, on the grid of every modality's pixels (and
  of the output cells when ``snap_to_cells``)."""
  height, width = extent(shapes)
  gsds = [frac(mods.get(n).gsd) for n in shapes if not mods.get(n).context_token]
  unit = lcm([*gsds, *([cell] if snap_to_cells else [])])
  overlap = frac(overlap_m)
  stride = tile - overlap
  ys, xs = (tuple(origins(length, tile, stride, unit)) for length in (height, width))
  return Windows(tile, overlap, ys, xs, cell)


class Blender:
  """Ramp-weighted mean of window maps (side, side, D) on a grid of cells, streamed by rows.

  Windows are added in row-major order of their origins; ``add`` returns the rows (k, W, D)
  that no later window touches (or None), ``finish`` the rest, so memory holds one row of
  windows. A window added without values (no valid input) has weight 0; cells that no window
  with values covers are NaN.
  """

  def __init__(self, win: Windows, depth: int, taper: str = "linear"):
    if taper not in TAPERS:
      raise ValueError(f"taper must be one of {TAPERS}, got {taper!r}")
    self.win, self.taper = win, taper
    self.height, self.width = win.grid
    self.side, self.ov = int(win.tile / win.cell), int(win.overlap / win.cell)
    self.acc = np.zeros((self.side, self.width, depth), np.float32)
    self.wsum = np.zeros((self.side, self.width), np.float32)
    self.lo = 0                  # grid row of self.acc[0]

  def _emit(self, upto: int) -> np.ndarray:
    """Final rows [lo, upto); shifts the buffers."""
    k = upto - self.lo
    with np.errstate(invalid="ignore", divide="ignore"):
      out = self.acc[:k] / self.wsum[:k, :, None]
    self.acc = np.concatenate([self.acc[k:], np.zeros_like(self.acc[:k])])
    self.wsum = np.concatenate([self.wsum[k:], np.zeros_like(self.wsum[:k])])
    self.lo = upto
    return out

  def add(self, row_m: Fraction, col_m: Fraction, values: np.ndarray | None
          ) -> np.ndarray | None:
    """Adds the window at (row_m, col_m) m; returns the rows it made final, or None."""
    r, c = int(row_m / self.win.cell), int(col_m / self.win.cell)
    if r < self.lo:
      raise ValueError(f"window at row {r} after row {self.lo}: add windows in row-major order")
    out = self._emit(r) if r > self.lo else None
    if values is not None:
      wy = ramp(self.side, self.ov, row_m > 0, row_m < self.win.ys[-1], self.taper)
      wx = ramp(self.side, self.ov, col_m > 0, col_m < self.win.xs[-1], self.taper)
      w = wy[:, None] * wx[None, :]
      self.acc[:, c:c + self.side] += w[..., None] * values
      self.wsum[:, c:c + self.side] += w
    return out

  def finish(self) -> np.ndarray:
    """The remaining rows."""
    return self._emit(self.height)
