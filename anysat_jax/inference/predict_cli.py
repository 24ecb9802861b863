"""``python -m anysat_jax.predict``: class maps and tables from a fine-tuning run.

Every modality the run was trained on is an ``--input MOD=PATH`` (GeoTIFF, ``.h5`` or ``.npy``,
with ``--bands``, ``--dates``, ... as in ``embed``); windows of ``--tile_m`` metres overlapping
by ``--overlap_m`` cover scenes of any size. Example::

  python -m anysat_jax.predict --workdir=runs/pastis_demo \\
    --input s2=S2_10186.tif --dates s2=2018-09-17,2018-09-22,2018-09-27 \\
    --tile_m 320 --out map.tif --probs probs.tif

Segmentation and change-detection runs write a class-map GeoTIFF (``--out``) and optionally
per-class probabilities (``--probs``); classification runs a table (``.npz`` / ``.parquet``).
An existing output is replaced only with ``--overwrite``, atomically; an output that is one of
the inputs is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from anysat_jax.inference import cli_inputs, tiling
from anysat_jax.inference.predict import (
  CHECKPOINTS,
  blended_logits,
  check_modalities,
  classify_table,
  load_run,
  prepare_scene,
  read_config,
  write_maps,
)
from anysat_jax.io import atomic, geotiff, tables
from input_pipeline.datasets import registry

log = logging.getLogger("anysat_jax.predict")


def add_args(parser: argparse.ArgumentParser) -> None:
  """The command's flags besides the inputs'."""
  add = parser.add_argument
  add("--workdir", required=True, help="the fine-tuning run's workdir")
  add("--checkpoint", default="best", choices=CHECKPOINTS,
      help="best: the best monitored evaluation's parameters; last: the latest checkpoint")
  add("--tile_m", type=float, help="window side, metres (default: the whole square scene)")
  add("--overlap_m", type=float, default=0.0, help="window overlap, metres")
  add("--taper", default="linear", choices=tiling.TAPERS, help="logit blending ramp")
  add("--batch", type=int, default=8, help="windows per model call")
  add("--compression", default="deflate", choices=geotiff.COMPRESSIONS)
  add("--name", help="scene name in a table (default: first input's stem)")
  add("--out", required=True, help="class map .tif (dense runs) or table .npz/.parquet")
  add("--probs", help="per-class probability GeoTIFF (dense runs)")
  add("--overwrite", action="store_true", help="replace existing outputs")


def run(args: argparse.Namespace) -> dict[str, np.ndarray] | None:
  """Predicts and writes ``args.out`` (and ``args.probs``); returns a classification run's
  table columns, None for a map."""
  inputs = cli_inputs.pairs(args.input, "--input")
  config = read_config(args.workdir)
  dense = registry.get_spec(config.dataset).label.kind == "segmentation"
  suffixes = (".tif", ".tiff") if dense else tables.TABLE_SUFFIXES
  kind = "segmentation/change-detection" if dense else "classification"
  if not args.out.lower().endswith(suffixes):
    raise ValueError(f"a {kind} run writes {' or '.join(suffixes)}, not {args.out}")
  if args.probs and not dense:
    raise ValueError("--probs is for segmentation runs; a classification table holds them")
  if args.probs and not args.probs.lower().endswith((".tif", ".tiff")):
    raise ValueError(f"--probs writes a .tif GeoTIFF, not {args.probs}")
  outs = [args.out, *([args.probs] if args.probs else [])]
  if len(outs) == 2 and os.path.abspath(outs[0]) == os.path.abspath(outs[1]):
    raise ValueError("--out and --probs are the same file")
  outs = [atomic.check_output(o, list(inputs.values()), args.overwrite) for o in outs]
  check_modalities(config, list(inputs))
  found = cli_inputs.read_inputs(args)
  trained = load_run(args.workdir, args.checkpoint)
  scene = prepare_scene(trained, {n: r.data for n, r in found.items()},
                        {n: r.dates for n, r in found.items() if r.dates is not None},
                        args.tile_m, args.overlap_m)
  task, win = trained.task, scene.windows
  georef, gsd = cli_inputs.georeference(found, task.model.dense_modality)
  meta = {"workdir": os.path.abspath(args.workdir), "checkpoint": args.checkpoint,
          "step": trained.step, "dataset": trained.config.dataset,
          "classes": task.label.num_classes, "tile_m": float(win.tile),
          "overlap_m": args.overlap_m, "missing": list(scene.missing),
          "inputs": {n: inputs[n] for n in found},
          "epsg": georef.epsg if georef is not None else None}
  if not dense:
    name = args.name or os.path.splitext(os.path.basename(inputs[next(iter(inputs))]))[0]
    columns = classify_table(scene, task.label.kind == "multilabel", name, georef, gsd,
                             args.batch, progress=True)
    tables.write_table(outs[0], columns, meta)
    log.info("wrote %d windows' classes to %s", len(columns["class"]), outs[0])
    return columns
  h, w = win.grid
  cell = float(win.cell)
  meta["cell_m"] = cell
  metadata = {"anysat": json.dumps(meta)}
  if georef is not None and georef.epsg is not None:
    metadata["crs"] = f"EPSG:{georef.epsg}"
  out_ref = georef.window(0, 0, cell / gsd) if georef is not None else None
  rows = blended_logits(scene, task.label.num_classes, taper=args.taper, batch=args.batch,
                        progress=True)
  write_maps(rows, (h, w, task.label.num_classes), outs[0], outs[1] if args.probs else None,
             out_ref, metadata, args.compression, args.raster_backend)
  log.info("wrote a %dx%d class map at %g m to %s%s", h, w, cell, outs[0],
           f" and its probabilities to {outs[1]}" if args.probs else "")
  return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli_inputs.add_input_args(parser, "a modality's file (.tif, .h5, .npy); one per modality "
                            "the run was trained on")
  add_args(parser)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  logging.basicConfig(format="%(levelname)s: %(message)s")
  logging.getLogger("anysat_jax").setLevel(logging.INFO)
  args = parse_args(argv)
  try:
    run(args)
  except (ValueError, OSError) as e:
    log.error("%s", e)
    return 2
  return 0
