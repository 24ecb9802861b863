"""The raster inputs of the ``embed`` and ``predict`` commands: their flags, reading and
georeference (numpy).

``--input MOD=PATH`` (a GeoTIFF, an ``.h5`` dataset or an ``.npy`` array holding one modality),
``--bands MOD=2,3,4,...`` (1-based file bands feeding the registry's channels), ``--dates``,
``--h5_key``, ``--h5_dates_key``, ``--crop`` (see ``io.rasters``) and ``--raster_backend``
(GeoTIFF reading and writing, ``io.raster_backend``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence

from anysat_jax.core import modalities as mods
from anysat_jax.io import geotiff, raster_backend, rasters

log = logging.getLogger("anysat_jax.inference")


def pairs(items: Sequence[str] | None, flag: str, known: Sequence[str] | None = None
          ) -> dict[str, str]:
  """``MOD=VALUE`` flags as a dict, checked (known modality, once each, among ``known``)."""
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


def add_input_args(parser: argparse.ArgumentParser, input_help: str) -> None:
  """Adds ``--input``, ``--bands``, ``--dates``, ``--h5_key``, ``--h5_dates_key``, ``--crop``,
  ``--raster_backend``."""
  add = parser.add_argument
  add("--input", action="append", required=True, metavar="MOD=PATH", help=input_help)
  add("--bands", action="append", metavar="MOD=B1,B2,...",
      help="the file's bands (1-based, file order; ranges like 2-8) feeding the registry's "
      "channels in the registry's order; per date for a series stored as T*C bands")
  add("--dates", action="append", metavar="MOD=DATES",
      help="dates of a time series: d1,d2,... or a file, one per line; each YYYY-MM-DD, "
      "YYYYMMDD or a day of year")
  add("--h5_key", action="append", metavar="MOD=KEY", help="HDF5 dataset")
  add("--h5_dates_key", action="append", metavar="MOD=KEY",
      help="HDF5 dataset of dates (days of year, or strings holding dates)")
  add("--crop", action="append", metavar="MOD=PX",
      help="centre crop to PX x PX (or HxW) pixels before anything else")
  add("--raster_backend", choices=raster_backend.BACKENDS,
      help="GeoTIFF reading and writing (default: rasterio when installed, else tifffile; "
      f"or ${raster_backend.ENV})")


def read_inputs(args: argparse.Namespace) -> dict[str, rasters.Raster]:
  """The ``--input`` rasters, bands selected and cropped, in flag order."""
  inputs = pairs(args.input, "--input")
  names = list(inputs)
  dates = {n: rasters.parse_dates(s) for n, s in pairs(args.dates, "--dates", names).items()}
  bands = {n: rasters.parse_bands(s) for n, s in pairs(args.bands, "--bands", names).items()}
  h5_keys = pairs(args.h5_key, "--h5_key", names)
  h5_dates = pairs(args.h5_dates_key, "--h5_dates_key", names)
  crops = {n: _crop_size(n, s) for n, s in pairs(args.crop, "--crop", names).items()}
  out = {}
  for n, path in inputs.items():
    r = rasters.read_input(n, path, dates.get(n), h5_keys.get(n), h5_dates.get(n), bands.get(n),
                           args.raster_backend)
    out[n] = rasters.center_crop(r, *crops[n]) if n in crops else r
    log.info("%s: %s -> %s%s%s", n, path, "x".join(map(str, out[n].data.shape)),
             f" (centre crop of {'x'.join(map(str, r.data.shape))})" if n in crops else "",
             f", nodata {r.nodata:g}" if r.nodata is not None else "")
  return out


def georeference(found: Mapping[str, rasters.Raster], preferred: str | None
                 ) -> tuple[geotiff.GeoRef | None, float]:
  """(georeference, its pixel size in m): the ``preferred`` modality's file if it has one, else
  the first georeferenced input's; (None, 1.0) when no input is georeferenced (logged)."""
  names = list(found)
  ref = next((n for n in (*([preferred] if preferred else []), *names)
              if found[n].georef is not None), None)
  if ref is None:
    log.warning("no georeferenced (GeoTIFF) input: the output has no georeference")
    return None, 1.0
  return found[ref].georef, mods.get(ref).gsd
