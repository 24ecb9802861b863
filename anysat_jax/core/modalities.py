"""The modality registry: every sensor AnySat knows, described once.

Everything else (projectors, input validation, the input pipeline, the docs table) reads this
table. Distances are metres, periods are days.
"""

from __future__ import annotations

import dataclasses
import types


@dataclasses.dataclass(frozen=True)
class Modality:
  """One sensor as the encoder sees it.

  Attributes:
    name: registry key, as used in input dicts (e.g. ``"s1-asc"``).
    channels: number of input channels C, in ``bands`` order.
    bands: channel names in the order the projector was trained on.
    gsd: ground sampling distance of the input pixels, metres per pixel.
    temporal: True for time series (B, T, C, H, W) with ``<name>_dates``; False for single
      images (B, C, H, W).
    projector: ``"vhr"`` (strided conv + MLP) or ``"ltae"`` (per-pixel L-TAE).
    kernel: VHR only: conv kernel = stride, pixels (one conv cell).
    subpatch_m: spacing of the spatial encoder's sub-patch tokens, metres (its positional grid).
    date_period: L-TAE only: base period Tp of the temporal encoding, days.
    in_norm: L-TAE only: GroupNorm over (channels, dates) after the input MLP (s2 only).
    reduce_scale: L-TAE only: a patch of ``s = P // 10`` is cut into ``max(1, s // reduce)``
      pixels per side (30 m sensors: 3; MODIS: 12).
    context_token: True for MODIS: one token per tile, no patch grid, no positional encoding.
    units: physical units of the raw values before normalisation.
  """

  name: str
  channels: int
  bands: tuple[str, ...]
  gsd: float
  temporal: bool
  projector: str
  kernel: int = 1
  subpatch_m: float = 10.0
  date_period: float = 367.0
  in_norm: bool = False
  reduce_scale: int = 1
  context_token: bool = False
  units: str = ""

  @property
  def param_name(self) -> str:
    """Name of the projector's Flax sub-module (Flax names cannot hold ``-``)."""
    return "projector_" + self.name.replace("-", "_")

  def cells_per_10m(self) -> int:
    """VHR only: conv cells per 10 m, per side (g in the spec)."""
    return int(10 / self.gsd) // self.kernel


def _vhr(name, bands, gsd, kernel, subpatch_m, units):
  return Modality(name, len(bands), tuple(bands), gsd, False, "vhr", kernel=kernel,
                  subpatch_m=subpatch_m, units=units)


def _ts(name, bands, gsd, subpatch_m, *, period=367.0, in_norm=False, reduce_scale=1,
        context_token=False, units=""):
  return Modality(name, len(bands), tuple(bands), gsd, True, "ltae", subpatch_m=subpatch_m,
                  date_period=period, in_norm=in_norm, reduce_scale=reduce_scale,
                  context_token=context_token, units=units)


_S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")

MODALITIES: types.MappingProxyType[str, Modality] = types.MappingProxyType({
    m.name: m for m in (
        # TreeSatAI's colour-infrared orthophotos, bands in file order (the order the official
        # loader feeds the released weights): NIR, G, B, R.
        _vhr("aerial", ("NIR", "G", "B", "R"), 0.2, 10, 2.0, "8-bit digital numbers"),
        _vhr("aerial-flair", ("R", "G", "B", "NIR", "nDSM"), 0.2, 10, 2.0,
             "8-bit digital numbers"),
        _vhr("spot", ("R", "G", "B"), 1.0, 10, 10.0, "8-bit digital numbers"),
        _vhr("naip", ("R", "G", "B", "NIR"), 1.25, 8, 10.0, "8-bit digital numbers"),
        _ts("s2", _S2_BANDS, 10.0, 10.0, in_norm=True, units="L2A reflectance x 1e4"),
        _ts("s1-asc", ("VV", "VH"), 10.0, 10.0, units="linear backscatter"),
        _ts("s1", ("VV", "VH", "VV/VH"), 10.0, 10.0, units="backscatter (dataset-specific)"),
        _ts("alos", ("HH", "HV", "HH/HV"), 30.0, 30.0, reduce_scale=3,
            units="PALSAR-2 backscatter"),
        _ts("l7", ("B1", "B2", "B3", "B4", "B5", "B7"), 30.0, 30.0, reduce_scale=3,
            units="surface reflectance"),
        _ts("l8", ("B8", "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B9", "B10", "B11"), 10.0,
            10.0, period=366.0, units="Landsat-8 DN / reflectance"),
        _ts("modis", ("B1", "B2", "B3", "B4", "B5", "B6", "B7"), 250.0, 250.0, reduce_scale=12,
            context_token=True, units="surface reflectance"),
    )
})

# Suffixes of auxiliary input keys that belong to a time-series modality.
DATES_SUFFIX = "_dates"
MASK_SUFFIX = "_mask"
VALID_SUFFIX = "_valid"
AUX_SUFFIXES = (DATES_SUFFIX, MASK_SUFFIX, VALID_SUFFIX)


def get(name: str) -> Modality:
  """Returns the registry entry, with an error listing the known names."""
  try:
    return MODALITIES[name]
  except KeyError:
    raise ValueError(
        f"unknown modality {name!r}; known modalities: {', '.join(MODALITIES)}") from None


def modality_keys(inputs) -> list[str]:
  """Modality names of an input dict, in its key order, auxiliary keys removed."""
  return [k for k in inputs if not k.endswith(AUX_SUFFIXES)]


def grid_side(name: str, pixels: int, patch_m: float) -> int:
  """Patches per side of a tile of ``pixels`` pixels of modality ``name`` cut into patches of
  ``patch_m`` metres (the side of the pretraining masks' grid)."""
  return round(pixels * get(name).gsd / patch_m)
