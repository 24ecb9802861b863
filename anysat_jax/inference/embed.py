"""Feature extraction for your own rasters: ``python -m anysat_jax.embed``.

Each ``--input MOD=PATH`` is a GeoTIFF, an ``.h5`` dataset or an ``.npy`` array holding one
modality: an image (C, H, W) or a time series (T, C, H, W) (a GeoTIFF or a 3-D array stores a
series date by date as T*C bands). Every modality must cover the same ground extent (pixels x
the registry's metres per pixel); ``--crop MOD=PX`` cuts an explicit centre crop. Inputs are
normalised per channel, (x - mean) / std, with ``--stats DATASET`` (the package's statistics),
``--stats_json FILE`` ({modality: {"mean": [...], "std": [...]}}), or passed unchanged with
``--no_normalize``. Examples::

  # The TreeSatAI demo tile: tile vectors as a table (.npz, or .parquet with pyarrow).
  python -m anysat_jax.embed --weights AnySat.pth --stats treesatai_ts --patch_size 20 \\
    --input aerial=tile.tif --crop aerial=300 \\
    --input s2=tile.h5 --h5_key s2=sen-2-data --h5_dates_key s2=sen-2-products \\
    --input s1-asc=tile.h5 --h5_key s1-asc=sen-1-asc-data \\
    --h5_dates_key s1-asc=sen-1-asc-products --out tile.parquet

  # A large Sentinel-2 scene, 3 dates stacked as 30 bands: a 10 m dense feature GeoTIFF from
  # 1.2 km windows overlapping by 240 m, blended with a cosine taper.
  python -m anysat_jax.embed --weights ckpt_dir --stats pastis_hd --patch_size 40 \\
    --input s2=scene.tif --dates s2=2020-04-01,2020-06-15,2020-09-01 \\
    --output dense --tile_m 1200 --overlap_m 240 --taper cosine --out scene_features.tif

Larger inputs than one model call are cut into square windows of ``--tile_m`` metres sliding by
``tile_m - overlap_m`` over all modalities jointly (the last row and column are flush with the
scene's far edge, on the grid of every modality's pixels and of the dense cells). AnySat attends
over the whole window, so a window's features depend on its context: tiled features are not the
features of one call on the whole scene. Dense maps are blended where windows overlap: each
window is weighted by a ramp (``--taper``) over the overlap on every side that has a neighbour,
and the sum is divided by the summed weights, so a cell seen by one window only keeps that
window's value. ``tile`` and ``patch`` outputs give one row per window (per patch) with its
origin.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from tqdm import tqdm

from anysat_jax.core import modalities as mods
from anysat_jax.inference.api import AnySat
from anysat_jax.io import geotiff
from anysat_jax.models.validation import patches_per_side, validate_inputs

log = logging.getLogger(__name__)

OUTPUTS = ("tile", "patch", "dense")
TAPERS = ("linear", "cosine")
DENSE_BANDS = ("all", "first", "last")
_DATE = re.compile(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?!\d)")
_TABLE_SUFFIXES = (".npz", ".parquet")
_TIFF_SUFFIXES = (".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Raster:
  """One modality as read from disk.

  Attributes:
    data: float32 image (C, H, W) or time series (T, C, H, W).
    dates: (T,) day of year, time series only.
    georef: the file's georeference (GeoTIFF inputs), for the pixel (0, 0) of ``data``.
  """

  data: np.ndarray
  dates: np.ndarray | None = None
  georef: geotiff.GeoRef | None = None


@dataclasses.dataclass(frozen=True)
class Embedding:
  """Features of a scene.

  Attributes:
    output: ``tile``, ``patch`` or ``dense``.
    features: tile (N, E), one row per window; patch (N, n, n, E); dense (H', W', D) blended
      over the windows, covering H' x W' cells of ``cell_m`` from the scene's top-left corner,
      D = 2E (patch token then sub-patch token) or E (``dense_bands``).
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


def day_of_year(item: str | bytes | float) -> float:
  """Day of year (1 January = 1) of ``2020-01-02``, ``20200102`` or a name holding such a date
  (e.g. ``S2A_MSIL2A_20200102T102421_...``: the first one); a number up to 3 digits is taken as
  a day of year."""
  if isinstance(item, bytes):
    item = item.decode()
  if not isinstance(item, str):
    return float(item)
  s = item.strip()
  if re.fullmatch(r"\d{1,3}(\.\d*)?", s):
    return float(s)
  match = _DATE.search(s)
  if match is None:
    raise ValueError(f"not a date (YYYY-MM-DD, YYYYMMDD) nor a day of year: {s!r}")
  return float(datetime.date(*map(int, match.groups())).timetuple().tm_yday)


def parse_dates(spec: str) -> np.ndarray:
  """(T,) float32 days of year from a file (one date per line) or a comma-separated list."""
  if os.path.isfile(spec):
    with open(spec) as f:
      items = [line for line in f if line.strip()]
  else:
    items = spec.split(",")
  return np.array([day_of_year(i) for i in items], np.float32)


def read_input(modality: str, path: str, dates: np.ndarray | None = None,
               h5_key: str | None = None, h5_dates_key: str | None = None) -> Raster:
  """Reads one modality from a GeoTIFF, ``.h5`` (dataset ``h5_key``, dates from the dataset
  ``h5_dates_key``: numbers or strings holding dates) or ``.npy`` file, with checks."""
  m = mods.get(modality)
  suffix = os.path.splitext(path)[1].lower()
  georef = None
  if suffix not in (".h5", ".hdf5") and (h5_key or h5_dates_key):
    raise ValueError(f"{modality}: --h5_key / --h5_dates_key given but {path} is not .h5")
  if suffix in _TIFF_SUFFIXES:
    x, georef = geotiff.read(path)
  elif suffix in (".h5", ".hdf5"):
    import h5py

    with h5py.File(path, "r") as f:
      for key in (h5_key, h5_dates_key):
        if key is not None and key not in f:
          raise ValueError(f"{modality}: {path} has no dataset {key!r} (it has: {', '.join(f)})")
      if h5_key is None:
        raise ValueError(f"{modality}: {path} is an HDF5 file; name its dataset with --h5_key "
                         f"{modality}=KEY (it has: {', '.join(f)})")
      x = np.asarray(f[h5_key], np.float32)
      if h5_dates_key is not None:
        if dates is not None:
          raise ValueError(f"{modality}: dates given twice (--dates and --h5_dates_key)")
        dates = np.array([day_of_year(d) for d in f[h5_dates_key][()]], np.float32)
  elif suffix == ".npy":
    x = np.load(path, allow_pickle=False).astype(np.float32)
  else:
    raise ValueError(f"{modality}: {path}: unknown input format {suffix!r} (expected .tif, .h5 "
                     "or .npy)")
  if georef is not None and georef.metric and not (
      math.isclose(georef.dx, m.gsd, rel_tol=1e-3) and math.isclose(georef.dy, m.gsd,
                                                                     rel_tol=1e-3)):
    raise ValueError(f"{modality}: {path} has {georef.dx:g} x {georef.dy:g} m pixels but the "
                     f"model reads {modality} at {m.gsd:g} m; resample it first")
  if m.temporal and x.ndim == 3:
    if x.shape[0] % m.channels:
      raise ValueError(f"{modality}: {x.shape[0]} bands in {path} are not a whole number of "
                       f"dates of {m.channels} channels ({', '.join(m.bands)}); a series is "
                       "stored date by date as T*C bands")
    x = x.reshape(-1, m.channels, *x.shape[1:])
  layout = "(T, C, H, W) or (T*C, H, W)" if m.temporal else "(C, H, W)"
  if x.ndim != (4 if m.temporal else 3) or x.shape[-3] != m.channels:
    raise ValueError(f"{modality}: expected {layout} with C = {m.channels} "
                     f"({', '.join(m.bands)}), got shape {x.shape} from {path}")
  if not m.temporal:
    if dates is not None:
      raise ValueError(f"{modality}: a single image takes no dates")
    return Raster(x, None, georef)
  if dates is None:
    raise ValueError(f"{modality}: a time series needs dates (--dates {modality}=... or "
                     "--h5_dates_key)")
  if len(dates) != x.shape[0]:
    raise ValueError(f"{modality}: {len(dates)} dates for {x.shape[0]} acquisitions in {path}")
  return Raster(x, np.asarray(dates, np.float32), georef)


def center_crop(raster: Raster, height: int, width: int) -> Raster:
  """The central ``height`` x ``width`` pixels (offsets rounded down), georeference moved."""
  h, w = raster.data.shape[-2:]
  if not (0 < height <= h and 0 < width <= w):
    raise ValueError(f"cannot crop {height}x{width} px out of {h}x{w} px")
  r0, c0 = (h - height) // 2, (w - width) // 2
  georef = raster.georef.window(r0, c0) if raster.georef is not None else None
  return dataclasses.replace(raster, data=raster.data[..., r0:r0 + height, c0:c0 + width],
                             georef=georef)


def normalize(arrays: Mapping[str, np.ndarray], stats: Mapping[str, tuple[Any, Any]]
              ) -> dict[str, np.ndarray]:
  """(x - mean_c) / std_c over the channel axis (-3) of every modality; stats (mean, std) (C,)."""
  out = {}
  for name, x in arrays.items():
    if name not in stats:
      raise ValueError(f"{name}: no normalisation statistics (have: {', '.join(stats)})")
    mean, std = (np.asarray(v, np.float32) for v in stats[name])
    if mean.shape != (x.shape[-3],) or std.shape != (x.shape[-3],):
      raise ValueError(f"{name}: statistics for {mean.size} channels, the data has "
                       f"{x.shape[-3]}")
    out[name] = (x - mean[:, None, None]) / std[:, None, None]
  return out


def _frac(value: float) -> Fraction:
  return Fraction(str(value))


def _lcm(values: Sequence[Fraction]) -> Fraction:
  """Smallest positive multiple of every value."""
  return Fraction(math.lcm(*(v.numerator for v in values)),
                  math.gcd(*(v.denominator for v in values)))


def _extent(arrays: Mapping[str, np.ndarray]) -> tuple[Fraction, Fraction]:
  """(height, width) in metres shared by the patch-grid modalities; an error names a mismatch."""
  extent, first = None, None
  for name, x in arrays.items():
    m = mods.get(name)
    if m.context_token:
      continue
    h, w = x.shape[-2:]
    here = (h * _frac(m.gsd), w * _frac(m.gsd))
    text = f"{name}: {h}x{w} px x {m.gsd:g} m = {float(here[0]):g} x {float(here[1]):g} m"
    if extent is None:
      extent, first = here, text
    elif here != extent:
      raise ValueError(f"{text} but {first}; all inputs must cover the same ground extent "
                       "(crop them, e.g. --crop MOD=PX, or resample)")
  if extent is None:
    raise ValueError("at least one modality other than modis is needed")
  return extent


def _origins(length: Fraction, tile: Fraction, stride: Fraction, unit: Fraction
             ) -> list[Fraction]:
  """Window starts along one axis: every ``stride``, then one flush with the end (on the
  ``unit`` grid, so up to one unit may stay uncovered)."""
  last = (length - tile) // unit * unit
  starts = [k * stride for k in range(int(last // stride) + 1)]
  return starts if starts[-1] == last else [*starts, last]


def _ramp(n: int, overlap: int, before: bool, after: bool, taper: str) -> np.ndarray:
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


def _window_batch(arrays: Mapping[str, np.ndarray], dates: Mapping[str, np.ndarray],
                  windows: Sequence[tuple[Fraction, Fraction]], tile: Fraction
                  ) -> dict[str, np.ndarray]:
  """The model batch (B = len(windows)) of the windows' pixels, with dates (B, T)."""
  batch = {}
  for name, x in arrays.items():
    m = mods.get(name)
    if m.context_token:
      batch[name] = np.broadcast_to(x, (len(windows), *x.shape))
    else:
      g = _frac(m.gsd)
      px = int(tile / g)
      cuts = [(int(oy / g), int(ox / g)) for oy, ox in windows]
      batch[name] = np.stack([x[..., r:r + px, c:c + px] for r, c in cuts])
    if m.temporal:
      if name not in dates:
        raise ValueError(f"{name}: a time series needs its dates (T,)")
      batch[name + mods.DATES_SUFFIX] = np.broadcast_to(
          np.asarray(dates[name], np.float32), (len(windows), x.shape[0]))
  return batch


def embed_arrays(model: AnySat, arrays: Mapping[str, np.ndarray],
                 dates: Mapping[str, np.ndarray], patch_size: int, output: str = "tile",
                 output_modality: str | None = None, *, tile_m: float | None = None,
                 overlap_m: float = 0, taper: str = "linear", dense_bands: str = "all",
                 batch: int = 8, progress: bool = False) -> Embedding:
  """Encodes a scene, whole or in sliding windows; see the module docstring.

  Args:
    model: the encoder.
    arrays: normalised inputs in the model's modality order: images (C, H, W), series
      (T, C, H, W); all covering the same ground extent.
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
    progress: show a progress bar.
  """
  if output not in OUTPUTS:
    raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
  if taper not in TAPERS or dense_bands not in DENSE_BANDS:
    raise ValueError(f"taper must be one of {TAPERS} and dense_bands one of {DENSE_BANDS}, got "
                     f"{taper!r}, {dense_bands!r}")
  if batch < 1:
    raise ValueError(f"batch must be at least 1, got {batch}")
  if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) \
      or patch_size <= 0 or patch_size % 10:
    raise ValueError(f"patch size must be a positive multiple of 10 m, got {patch_size!r}")
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  height, width = _extent(arrays)
  patch, overlap = Fraction(patch_size), _frac(overlap_m)
  if tile_m is None:
    if height != width:
      raise ValueError(f"the scene is {float(height):g} x {float(width):g} m, not square; give "
                       "a window size (tile_m) to cut it into square windows")
    tile = height
  else:
    tile = _frac(tile_m)
    context = [n for n in arrays if mods.get(n).context_token]
    if context:
      raise ValueError(f"{', '.join(context)}: a whole-tile context token cannot be cut into "
                       "windows; encode without tile_m")
  if tile_m is None and tile % patch:
    raise ValueError(f"the scene side {float(tile):g} m is not a multiple of the patch size "
                     f"{patch_size} m; crop the inputs or give a window size (tile_m)")
  if tile <= 0 or tile % patch or tile > min(height, width):
    raise ValueError(f"window {float(tile):g} m must be a positive multiple of the patch size "
                     f"{patch_size} m and fit the scene ({float(height):g} x {float(width):g} m)")
  if overlap < 0 or overlap >= tile or overlap % patch:
    raise ValueError(f"overlap {float(overlap):g} m must be a multiple of the patch size "
                     f"{patch_size} m, at least 0 and less than the window {float(tile):g} m")
  gsds = {n: _frac(mods.get(n).gsd) for n in arrays if not mods.get(n).context_token}
  for name, g in gsds.items():
    if (tile / g).denominator != 1:
      raise ValueError(f"{name}: a {float(tile):g} m window is {float(tile / g):g} px of "
                       f"{float(g):g} m, not a whole number of pixels")
  first = _window_batch(arrays, dates, [(Fraction(0), Fraction(0))], tile)
  try:
    validate_inputs(first, patch_size, model.config, output, output_modality)
  except ValueError as e:
    raise ValueError(f"{e} (windows of {float(tile):g} m)") from None

  cell = tile if output == "tile" else patch
  if output == "dense":
    om = output_modality or next(iter(arrays))
    n, k2 = patches_per_side(om, int(tile / gsds[om]), patch_size // 10,
                             model.config.projector(om).reduce_scale)
    cell = tile / (n * math.isqrt(k2))
  unit = _lcm([*gsds.values(), *([cell] if output == "dense" else [])])
  stride = tile - overlap
  ys, xs = (_origins(length, tile, stride, unit) for length in (height, width))
  windows = [(oy, ox) for oy in ys for ox in xs]

  size = min(batch, len(windows))
  side, ov = int(tile / cell), int(overlap / cell)
  acc = wsum = None
  rows = []
  with tqdm(total=len(windows), desc="windows", unit="window", disable=not progress) as bar:
    for start in range(0, len(windows), size):
      chunk = windows[start:start + size]
      padded = [*chunk, *[chunk[-1]] * (size - len(chunk))]  # one compiled shape for all calls
      y = model(_window_batch(arrays, dates, padded, tile), patch_size, output, output_modality,
                raster_dense=True)
      y = np.asarray(y)[:len(chunk)]
      if output != "dense":
        rows.append(y)
      else:
        e = y.shape[-1] // 2
        y = {"all": y, "first": y[..., :e], "last": y[..., e:]}[dense_bands]
        if acc is None:
          shape = (int((ys[-1] + tile) / cell), int((xs[-1] + tile) / cell))
          acc, wsum = np.zeros((*shape, y.shape[-1]), np.float32), np.zeros(shape, np.float32)
        for (oy, ox), f in zip(chunk, y, strict=True):
          wy = _ramp(side, ov, oy > 0, oy < ys[-1], taper)
          wx = _ramp(side, ov, ox > 0, ox < xs[-1], taper)
          r, c = int(oy / cell), int(ox / cell)
          acc[r:r + side, c:c + side] += (wy[:, None] * wx[None, :])[..., None] * f
          wsum[r:r + side, c:c + side] += wy[:, None] * wx[None, :]
      bar.update(len(chunk))
  features = acc / wsum[..., None] if output == "dense" else np.concatenate(rows)
  origins = np.array([(float(oy), float(ox)) for oy, ox in windows], np.float64)
  return Embedding(output, features, origins, float(tile), float(cell))


def _pairs(items: Sequence[str] | None, flag: str, known: Sequence[str] | None = None
           ) -> dict[str, str]:
  """``MOD=VALUE`` flags as a dict, checked."""
  out: dict[str, str] = {}
  for item in items or ():
    name, sep, value = item.partition("=")
    if not sep or not value:
      raise ValueError(f"{flag} {item!r}: expected MOD=VALUE")
    mods.get(name)
    if name in out:
      raise ValueError(f"{flag} given twice for {name}")
    if known is not None and name not in known:
      raise ValueError(f"{flag} {item!r}: {name} is not an --input ({', '.join(known)})")
    out[name] = value
  return out


def _crop_size(name: str, spec: str) -> tuple[int, int]:
  try:
    h, _, w = spec.lower().partition("x")
    return int(h), int(w or h)
  except ValueError:
    raise ValueError(f"--crop {name}={spec}: expected PX or HxW pixels") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.embed", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", action="append", required=True, metavar="MOD=PATH",
                      help="a modality's file (.tif, .h5, .npy); repeat for each modality, in "
                      "the model's order (the first sets the patch grid and dense default)")
  parser.add_argument("--dates", action="append", metavar="MOD=DATES",
                      help="dates of a time series: d1,d2,... or a file, one per line; each "
                      "YYYY-MM-DD, YYYYMMDD or a day of year")
  parser.add_argument("--h5_key", action="append", metavar="MOD=KEY", help="HDF5 dataset")
  parser.add_argument("--h5_dates_key", action="append", metavar="MOD=KEY",
                      help="HDF5 dataset of dates (days of year, or strings holding dates)")
  parser.add_argument("--crop", action="append", metavar="MOD=PX",
                      help="centre crop to PX x PX (or HxW) pixels before anything else")
  parser.add_argument("--weights", help="converted checkpoint directory or official "
                      ".pth/.npz/.safetensors")
  parser.add_argument("--size", default="base", choices=("tiny", "small", "base"),
                      help="random-init model size when no --weights (features meaningless)")
  parser.add_argument("--seed", type=int, default=0, help="random-init seed")
  parser.add_argument("--patch_size", type=int, required=True, help="patch side, metres")
  parser.add_argument("--output", default="tile", choices=OUTPUTS)
  parser.add_argument("--output_modality", help="modality of the dense map (default: first)")
  norm = parser.add_mutually_exclusive_group(required=True)
  norm.add_argument("--stats", metavar="DATASET",
                    help="the package's statistics of a dataset (e.g. treesatai_ts)")
  norm.add_argument("--stats_json", metavar="FILE",
                    help='{modality: {"mean": [...], "std": [...]}} in raw units')
  norm.add_argument("--no_normalize", action="store_true",
                    help="inputs are already normalised: pass them unchanged")
  parser.add_argument("--tile_m", type=float, help="window side, metres (default: whole scene)")
  parser.add_argument("--overlap_m", type=float, default=0.0, help="window overlap, metres")
  parser.add_argument("--taper", default="linear", choices=TAPERS, help="dense blending ramp")
  parser.add_argument("--bands", default="all", choices=DENSE_BANDS,
                      help="dense bands: all 2E, first E (patch token), last E (sub-patch token)")
  parser.add_argument("--batch", type=int, default=8, help="windows per model call")
  parser.add_argument("--name", help="scene name in the table (default: first input's stem)")
  parser.add_argument("--out", required=True,
                      help="tile/patch: .npz or .parquet table; dense: .tif GeoTIFF")
  return parser.parse_args(argv)


def load_model(args: argparse.Namespace) -> AnySat:
  """The checkpoint of ``--weights``, or a loudly flagged random initialisation."""
  if args.weights:
    return AnySat.from_pretrained(args.weights)
  log.warning("=" * 78)
  log.warning("NO --weights: RANDOMLY INITIALISED %s MODEL (seed %d). THE FEATURES ARE "
              "MEANINGLESS;", args.size.upper(), args.seed)
  log.warning("use them only to test a pipeline. Give --weights for real features.")
  log.warning("=" * 78)
  inputs = _pairs(args.input, "--input")
  return AnySat(args.size, seed=args.seed, modalities=tuple(inputs))


def _load_stats(args: argparse.Namespace, names: Sequence[str]
                ) -> tuple[dict[str, tuple[Any, Any]] | None, dict[str, str]]:
  """(stats per modality or None, a description of the normalisation per modality)."""
  if args.no_normalize:
    log.warning("--no_normalize: the values go to the model as read; they must already be "
                "normalised per channel like the pretraining data, (x - mean) / std")
    return None, dict.fromkeys(names, "none (inputs used as given)")
  if args.stats_json:
    with open(args.stats_json) as f:
      table = json.load(f)
    missing = [n for n in names if n not in table]
    if missing:
      raise ValueError(f"{args.stats_json}: no statistics for {', '.join(missing)}")
    log.info("normalising with %s", args.stats_json)
    return ({n: (table[n]["mean"], table[n]["std"]) for n in names},
            dict.fromkeys(names, args.stats_json))
  from input_pipeline.normalization import OFFICIAL, load_stats

  stats, sources = {}, {}
  for n in names:
    s = load_stats(args.stats, n)
    stats[n], sources[n] = (s.mean, s.std), f"{args.stats}: {s.source}"
    official = s.source == OFFICIAL
    log.log(logging.INFO if official else logging.WARNING,
            "%s: normalised with %s statistics (%s)%s", n, args.stats, s.source,
            "" if official else "; a stand-in, not real dataset statistics")
  return stats, sources


def _table(emb: Embedding, name: str, georef: geotiff.GeoRef | None, gsd: float
           ) -> dict[str, np.ndarray]:
  """Columns: one row per window (tile) or per patch (patch), with its ground cell."""
  f = emb.features
  if emb.output == "patch":
    n, e = f.shape[1], f.shape[-1]
    i, j = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    window = np.repeat(np.arange(len(f)), n * n)
    rows = emb.origins_m[window] + np.stack([i, j], -1) * emb.cell_m
    f = f.reshape(-1, e)
  else:
    window, rows = np.arange(len(f)), emb.origins_m
  if georef is not None:
    x, y = georef.xy(rows[:, 0] / gsd, rows[:, 1] / gsd)
  else:
    x = y = np.full(len(f), np.nan)
  return {"name": np.full(len(f), name), "window": window, "row_m": rows[:, 0],
          "col_m": rows[:, 1], "size_m": np.full(len(f), emb.cell_m), "x": x, "y": y,
          "feature": f.astype(np.float32)}


def _write_table(path: str, columns: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
  if path.lower().endswith(".npz"):
    np.savez(path, **columns, meta=json.dumps(meta))
    return
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    raise ValueError("writing .parquet needs pyarrow; write .npz instead") from None
  f = columns["feature"]
  table = pa.table({**columns, "feature": pa.FixedSizeListArray.from_arrays(
      pa.array(f.ravel()), f.shape[1])})
  pq.write_table(table.replace_schema_metadata({"anysat": json.dumps(meta)}), path)


def run(model: AnySat, args: argparse.Namespace) -> Embedding:
  """Reads the inputs, normalises, encodes and writes ``args.out``; returns the features."""
  inputs = _pairs(args.input, "--input")
  names = list(inputs)
  dates = {n: parse_dates(s) for n, s in _pairs(args.dates, "--dates", names).items()}
  h5_keys = _pairs(args.h5_key, "--h5_key", names)
  h5_dates = _pairs(args.h5_dates_key, "--h5_dates_key", names)
  crops = {n: _crop_size(n, s) for n, s in _pairs(args.crop, "--crop", names).items()}
  suffixes = _TIFF_SUFFIXES if args.output == "dense" else _TABLE_SUFFIXES
  if not args.out.lower().endswith(suffixes):
    raise ValueError(f"--output {args.output} writes {' or '.join(suffixes)}, not {args.out}")

  rasters = {}
  for n, path in inputs.items():
    r = read_input(n, path, dates.get(n), h5_keys.get(n), h5_dates.get(n))
    rasters[n] = center_crop(r, *crops[n]) if n in crops else r
    log.info("%s: %s -> %s%s", n, path, "x".join(map(str, rasters[n].data.shape)),
             f" (centre crop of {'x'.join(map(str, r.data.shape))})" if n in crops else "")
  arrays = {n: r.data for n, r in rasters.items()}
  stats, sources = _load_stats(args, names)
  if stats is not None:
    arrays = normalize(arrays, stats)
  emb = embed_arrays(model, arrays, {n: r.dates for n, r in rasters.items() if r.dates is not None},
                     args.patch_size, args.output, args.output_modality, tile_m=args.tile_m,
                     overlap_m=args.overlap_m, taper=args.taper, dense_bands=args.bands,
                     batch=args.batch, progress=True)

  # The georeference: the dense modality's file if it has one, else the first GeoTIFF input.
  om = args.output_modality or names[0]
  ref = next((n for n in (om, *names) if rasters[n].georef is not None), None)
  georef = rasters[ref].georef if ref is not None else None
  gsd = mods.get(ref).gsd if ref is not None else 1.0
  name = args.name or os.path.splitext(os.path.basename(inputs[names[0]]))[0]
  meta = {"name": name, "output": args.output, "patch_size_m": args.patch_size,
          "tile_m": emb.tile_m, "overlap_m": args.overlap_m, "cell_m": emb.cell_m,
          "inputs": {n: {"path": inputs[n], "shape": list(rasters[n].data.shape)} for n in names},
          "normalization": sources, "crs": georef.geokeys if georef is not None else None,
          "weights": args.weights or f"RANDOM INIT ({args.size}, seed {args.seed})"}
  if georef is None:
    log.warning("no georeferenced (GeoTIFF) input: the output has no georeference")
  if args.output == "dense":
    meta["bands"] = args.bands
    out_ref = georef.window(0, 0, emb.cell_m / gsd) if georef is not None else None
    geotiff.write(args.out, np.moveaxis(emb.features, -1, 0), out_ref,
                  {"anysat": json.dumps(meta)})
    h, w, d = emb.features.shape
    log.info("wrote a %dx%d dense map of %d bands at %g m to %s", h, w, d, emb.cell_m, args.out)
  else:
    columns = _table(emb, name, georef, gsd)
    _write_table(args.out, columns, meta)
    log.info("wrote %d %s vectors of %d to %s", len(columns["feature"]), args.output,
             columns["feature"].shape[1], args.out)
  return emb


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  logging.basicConfig(format="%(levelname)s: %(message)s")
  log.setLevel(logging.INFO)
  args = parse_args(argv)
  try:
    run(load_model(args), args)
  except (ValueError, OSError) as e:
    log.error("%s", e)
    return 2
  return 0

