"""Feature extraction for your own rasters: ``python -m anysat_jax.embed``.

Each ``--input MOD=PATH`` is a GeoTIFF, an ``.h5`` dataset or an ``.npy`` array holding one
modality: an image (C, H, W) or a time series (T, C, H, W) (a GeoTIFF or a 3-D array stores a
series date by date as T*C bands). ``--bands MOD=2,3,4,...`` picks the file's bands (1-based,
in file order) feeding the registry's channels. Every modality must cover the same ground
extent (pixels x the registry's metres per pixel); ``--crop MOD=PX`` cuts an explicit centre
crop. Inputs are normalised per channel, (x - mean) / std, with ``--stats DATASET`` (the
package's statistics), ``--stats_json FILE`` ({modality: {"mean": [...], "std": [...]}}), or
passed unchanged with ``--no_normalize``. The file's nodata value and NaNs are missing values
(masked, or refused with ``--missing raise``). Examples::

  # The TreeSatAI demo tile: tile vectors as a table (.npz, or .parquet with pyarrow).
  python -m anysat_jax.embed --weights base --stats treesatai_ts --patch_size 20 \\
    --input aerial=tile.tif --crop aerial=300 \\
    --input s2=tile.h5 --h5_key s2=sen-2-data --h5_dates_key s2=sen-2-products \\
    --input s1-asc=tile.h5 --h5_key s1-asc=sen-1-asc-data \\
    --h5_dates_key s1-asc=sen-1-asc-products --out tile.parquet

  # A 13-band Sentinel-2 scene (B1..B12 with B8A last), 3 dates stacked as 39 bands: a 10 m
  # dense feature GeoTIFF from 1.2 km windows overlapping by 240 m, blended with a cosine taper.
  python -m anysat_jax.embed --weights base --stats pastis_hd --patch_size 40 \\
    --input s2=scene.tif --bands s2=2,3,4,5,6,7,8,13,11,12 \\
    --dates s2=2020-04-01,2020-06-15,2020-09-01 \\
    --output dense --tile_m 1200 --overlap_m 240 --taper cosine --out scene_features.tif

Windows of ``--tile_m`` metres slide by ``tile_m - overlap_m`` over all modalities jointly.
Inputs are read window by window and dense maps stream to a compressed, tiled GeoTIFF
(``--cog``: cloud-optimized, with overviews), by rasterio when installed, else by tifffile
(``--raster_backend``): memory holds one batch of windows and one row of windows of the map,
not the scene. An
existing ``--out`` is replaced only with ``--overwrite``, atomically; an ``--out`` that is one
of the inputs is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from anysat_jax.inference import cli_inputs, embed, tiling
from anysat_jax.inference.api import AnySat
from anysat_jax.io import atomic, cog, geotiff, raster_backend, tables
from input_pipeline.normalization import OFFICIAL, load_stats

log = logging.getLogger("anysat_jax.embed")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.embed", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add = parser.add_argument
  cli_inputs.add_input_args(
      parser, "a modality's file (.tif, .h5, .npy); repeat for each modality, in the model's "
      "order (the first sets the patch grid and dense default)")
  add("--weights", help="released weights by name (base, base-head-axis), a converted "
      "checkpoint directory or an official .pth/.npz/.safetensors")
  add("--size", default="base", choices=("tiny", "small", "base"),
      help="random-init model size when no --weights (features meaningless)")
  add("--seed", type=int, default=0, help="random-init seed")
  add("--patch_size", type=int, required=True, help="patch side, metres")
  add("--output", default="tile", choices=embed.OUTPUTS)
  add("--output_modality", help="modality of the dense map (default: first)")
  norm = parser.add_mutually_exclusive_group(required=True)
  norm.add_argument("--stats", metavar="DATASET",
                    help="the package's statistics of a dataset (e.g. treesatai_ts)")
  norm.add_argument("--stats_json", metavar="FILE",
                    help='{modality: {"mean": [...], "std": [...]}} in raw units')
  norm.add_argument("--no_normalize", action="store_true",
                    help="inputs are already normalised: pass them unchanged")
  add("--missing", default="mask", choices=embed.MISSING,
      help="nodata and NaN/Inf values: mask them (the model's pad value) or refuse the input")
  add("--tile_m", type=float, help="window side, metres (default: whole scene)")
  add("--overlap_m", type=float, default=0.0, help="window overlap, metres")
  add("--taper", default="linear", choices=tiling.TAPERS, help="dense blending ramp")
  add("--dense_bands", default="all", choices=embed.DENSE_BANDS,
      help="dense bands: all 2E, first E (patch token), last E (sub-patch token)")
  add("--compression", default="deflate", choices=geotiff.COMPRESSIONS,
      help="dense GeoTIFF compression (zstd needs imagecodecs)")
  add("--cog", action="store_true",
      help="dense: write a cloud-optimized GeoTIFF (internal overviews, IFDs before the data)")
  add("--batch", type=int, default=8, help="windows per model call")
  add("--name", help="scene name in the table (default: first input's stem)")
  add("--out", required=True, help="tile/patch: .npz or .parquet table; dense: .tif GeoTIFF")
  add("--overwrite", action="store_true", help="replace an existing --out")
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
  inputs = cli_inputs.pairs(args.input, "--input")
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
    bad = [n for n in names if not (isinstance(table.get(n), dict)
                                    and {"mean", "std"} <= set(table[n]))]
    if bad:
      raise ValueError(f"{args.stats_json}: no mean and std for {', '.join(bad)}")
    log.info("normalising with %s", args.stats_json)
    return ({n: (table[n]["mean"], table[n]["std"]) for n in names},
            dict.fromkeys(names, args.stats_json))
  stats, sources = {}, {}
  for n in names:
    s = load_stats(args.stats, n)
    stats[n], sources[n] = (s.mean, s.std), f"{args.stats}: {s.source}"
    official = s.source == OFFICIAL
    log.log(logging.INFO if official else logging.WARNING,
            "%s: normalised with %s statistics (%s)%s", n, args.stats, s.source,
            "" if official else "; a stand-in, not real dataset statistics")
  return stats, sources


def _table(emb: embed.Embedding, name: str, georef: geotiff.GeoRef | None, gsd: float
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


def run(model: AnySat, args: argparse.Namespace) -> embed.Embedding | None:
  """Reads the inputs, encodes and writes ``args.out``; returns the features of a table
  output (a dense map is streamed to the file, None is returned)."""
  inputs = cli_inputs.pairs(args.input, "--input")
  suffixes = (".tif", ".tiff") if args.output == "dense" else tables.TABLE_SUFFIXES
  if not args.out.lower().endswith(suffixes):
    raise ValueError(f"--output {args.output} writes {' or '.join(suffixes)}, not {args.out}")
  if args.cog and args.output != "dense":
    raise ValueError(f"--cog writes a dense map's GeoTIFF; --output {args.output} writes a table")
  out = atomic.check_output(args.out, list(inputs.values()), args.overwrite)
  found = cli_inputs.read_inputs(args)
  names = list(found)
  stats, sources = _load_stats(args, names)
  scene = embed.prepare(model, {n: r.data for n, r in found.items()},
                        {n: r.dates for n, r in found.items() if r.dates is not None},
                        args.patch_size, args.output, args.output_modality,
                        tile_m=args.tile_m, overlap_m=args.overlap_m, stats=stats,
                        missing=args.missing)
  win = scene.windows
  georef, gsd = cli_inputs.georeference(found, args.output_modality or names[0])
  name = args.name or os.path.splitext(os.path.basename(inputs[names[0]]))[0]
  meta = {"name": name, "output": args.output, "patch_size_m": args.patch_size,
          "tile_m": float(win.tile), "overlap_m": args.overlap_m, "cell_m": float(win.cell),
          "inputs": {n: {"path": inputs[n], "shape": list(found[n].data.shape)} for n in names},
          "normalization": sources, "missing": list(scene.missing),
          "crs": georef.geokeys if georef is not None else None,
          "epsg": georef.epsg if georef is not None else None,
          "weights": args.weights or f"RANDOM INIT ({args.size}, seed {args.seed})"}
  if args.output == "dense":
    meta["dense_bands"] = args.dense_bands
    out_ref = georef.window(0, 0, float(win.cell) / gsd) if georef is not None else None
    depth = scene.depth // (1 if args.dense_bands == "all" else 2)
    h, w = win.grid
    rows = embed.dense_rows(scene, taper=args.taper, dense_bands=args.dense_bands,
                            batch=args.batch, progress=True)
    metadata = {"anysat": json.dumps(meta)}
    if georef is not None and georef.epsg is not None:
      metadata["crs"] = f"EPSG:{georef.epsg}"
    with atomic.replacing(out) as tmp:
      if args.cog:
        overviews = cog.write_cog(tmp, (h, w, depth), rows, out_ref, metadata,
                                  compression=args.compression, nodata=float("nan"))
      else:
        raster_backend.write_rows(tmp, (h, w, depth), rows, out_ref, metadata,
                                  compression=args.compression, nodata=float("nan"),
                                  backend=args.raster_backend)
    log.info("wrote a %dx%d dense map of %d bands at %g m to %s%s", h, w, depth,
             float(win.cell), out,
             f" (cloud-optimized, {overviews} overviews)" if args.cog else "")
    return None
  features = np.concatenate([y for _, y in embed.encode(scene, batch=args.batch,
                                                        progress=True)])
  origins = np.array([(float(oy), float(ox)) for oy, ox in win.origins], np.float64)
  emb = embed.Embedding(args.output, features, origins, float(win.tile), float(win.cell))
  columns = _table(emb, name, georef, gsd)
  tables.write_table(out, columns, meta)
  log.info("wrote %d %s vectors of %d to %s", len(columns["feature"]), args.output,
           columns["feature"].shape[1], out)
  return emb


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  logging.basicConfig(format="%(levelname)s: %(message)s")
  logging.getLogger("anysat_jax").setLevel(logging.INFO)
  args = parse_args(argv)
  try:
    run(load_model(args), args)
  except (ValueError, OSError) as e:
    log.error("%s", e)
    return 2
  return 0
