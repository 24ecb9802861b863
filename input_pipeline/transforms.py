"""Per-example transforms of the input pipeline: pure numpy, deterministic given their ``rng``.

Examples are dicts in the reader layout (``dataset_spec``): time series ``<mod>`` (T, C, H, W)
with ``<mod>_dates`` (T,) and optional ``<mod>_valid`` (uint8, shape of ``<mod>``), images
``<mod>`` (C, H, W), ``label`` and ``name``. Every function returns a new dict (the input is
not modified); ``rng`` is a ``np.random.Generator`` at training and None at evaluation, which
selects the deterministic variant.

- ``normalize``: (x - mean_c) / std_c on the channel axis (-3).
- ``temporal_dropout``: the official dataset-level temporal dropout (spec C.1), fraction style
  (keep floor(T (1 - p)) dates, at least one) or count style (keep k dates if T > k). Unlike the
  original loaders, which returned the kept dates in random order, the kept dates stay in time
  order; the L-TAE's attention and GroupNorm do not depend on the order of the dates.
- ``crop``: a square window of one modality (random at training, centred at evaluation), applied
  jointly to ``label`` when the label is a map of the same height and width.
- ``to_bucket``: pads a series at the end to its bucket length T_b and adds ``<mod>_mask`` (T_b,)
  float32 (1 = real date, 0 = padding; padded values, valid entries and dates are 0). A series
  longer than T_b is first sub-sampled to T_b dates: a random subset in time order at training,
  evenly spaced dates (indices floor(i T / T_b)) at evaluation. Nothing is silently truncated.
"""

from __future__ import annotations

import math

import numpy as np

from anysat_jax.core import modalities as mods
from input_pipeline.dataset_spec import Example


def normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """(..., C, H, W) raw values, (C,) mean and std → float32 (x - mean_c) / std_c."""
  mean = np.asarray(mean, np.float32)[:, None, None]
  std = np.asarray(std, np.float32)[:, None, None]
  return (np.asarray(x, np.float32) - mean) / std


def dates_to_keep(t: int, p: float) -> int:
  """Fraction-style temporal dropout: floor(t (1 - p)) dates, at least 1."""
  if not 0.0 <= p < 1.0:
    raise ValueError(f"temporal dropout must be in [0, 1), got {p}")
  return max(1, math.floor(t * (1.0 - p)))


def choose_dates(t: int, k: int, rng: np.random.Generator | None) -> np.ndarray:
  """Indices of k of t dates (k <= t), increasing: random with ``rng``, else evenly spaced."""
  if not 1 <= k <= t:
    raise ValueError(f"cannot keep {k} of {t} dates")
  if rng is None:
    return (np.arange(k) * t) // k
  return np.sort(rng.choice(t, size=k, replace=False))


def take_dates(ex: Example, mod: str, idx: np.ndarray) -> Example:
  """``ex`` with the series ``mod`` (and its dates and valid mask) restricted to dates ``idx``."""
  out = dict(ex)
  for key in (mod, mod + mods.DATES_SUFFIX, mod + mods.VALID_SUFFIX):
    if key in ex:
      out[key] = ex[key][idx]
  return out


def temporal_dropout(ex: Example, mod: str, rng: np.random.Generator, *, p: float = 0.0,
                     max_dates: int | None = None) -> Example:
  """Keeps a random subset of the dates of ``mod`` in time order (training only).

  p: fraction style, keep floor(T (1 - p)) dates (at least 1); max_dates: count style, keep
  ``max_dates`` dates if T is larger (PASTIS). Both may be given; p is applied first.
  """
  t = ex[mod].shape[0]
  k = dates_to_keep(t, p)
  if max_dates is not None:
    k = min(k, max_dates)
  if k == t:
    return ex
  return take_dates(ex, mod, choose_dates(t, k, rng))


def crop_window(size_hw: tuple[int, int], side: int,
                rng: np.random.Generator | None) -> tuple[int, int]:
  """(top, left) of a side x side window in an (H, W) image: random with ``rng``, else centred."""
  h, w = size_hw
  if side > min(h, w):
    raise ValueError(f"cannot crop {side} x {side} from {h} x {w}")
  if rng is None:
    return (h - side) // 2, (w - side) // 2
  return int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))


def crop(ex: Example, mod: str, side: int, rng: np.random.Generator | None) -> Example:
  """``ex`` with ``mod`` (and ``<mod>_valid``) cropped to side x side pixels, and ``label`` with
  the same window when it is a map of the same (H, W) as ``mod``."""
  h, w = ex[mod].shape[-2:]
  top, left = crop_window((h, w), side, rng)
  window = (Ellipsis, slice(top, top + side), slice(left, left + side))
  out = dict(ex)
  for key in (mod, mod + mods.VALID_SUFFIX):
    if key in ex:
      out[key] = ex[key][window]
  label = ex.get("label")
  if label is not None and np.ndim(label) == 2 and np.shape(label) == (h, w):
    out["label"] = label[window]
  return out


def to_bucket(ex: Example, mod: str, length: int, rng: np.random.Generator | None) -> Example:
  """Pads the series ``mod`` at the end to ``length`` dates and adds ``<mod>_mask``.

  A longer series is first sub-sampled to ``length`` dates (random subset in time order with
  ``rng``, evenly spaced without). Padded values, valid entries and dates are 0.
  """
  t = ex[mod].shape[0]
  if t > length:
    ex = take_dates(ex, mod, choose_dates(t, length, rng))
    t = length
  out = dict(ex)
  for key in (mod, mod + mods.DATES_SUFFIX, mod + mods.VALID_SUFFIX):
    if key in ex:
      x = ex[key]
      out[key] = np.concatenate([x, np.zeros((length - t,) + x.shape[1:], x.dtype)])
  mask = np.zeros(length, np.float32)
  mask[:t] = 1.0
  out[mod + mods.MASK_SUFFIX] = mask
  return out
