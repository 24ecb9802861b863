"""PNG figures for evaluation: segmentation panels, confusion matrices, dataset colour maps.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state). Sizes are exact in
pixels: a panel is (3 panel_px + legend_px) x (panel_px + title_px) pixels (width x height).
"""

from __future__ import annotations

import os
import types
from collections.abc import Sequence

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

Color = str | tuple[float, float, float]

_TAB20 = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896",
          "#9467bd", "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7",
          "#bcbd22", "#dbdb8d", "#17becf", "#9edae5")

# Dataset (registry name) -> one colour per class, in label order.
COLORMAPS: types.MappingProxyType[str, tuple[str, ...]] = types.MappingProxyType({
    # PASTIS / U-TAE convention: background black, crops tab20[1..18], void (19) white.
    "pastis_hd": ("#000000", *_TAB20[1:19], "#ffffff"),
    # FLAIR official lookup table for classes 1-12; "other" (12) black.
    "flair": ("#db0e9a", "#938e7b", "#f80c00", "#a97101", "#1553ae", "#194a26", "#46e483",
              "#f3a60d", "#660082", "#55ff00", "#fff30d", "#e4df7c", "#000000"),
    "bradd_s1ts": ("#d9d9d9", "#d62728"),      # no change, deforestation
    "sen1floods11": ("#c8b48c", "#1553ae"),    # dry, water
    "sickle": ("#2ca02c", "#bfbfbf"),          # paddy, non-paddy
})


def colorize(labels: np.ndarray, colors: Sequence[Color], ignore_index: int | None = None,
             ignore_color: Color = "#ffffff") -> np.ndarray:
  """uint8 (H, W, 3) image of an int (H, W) label map; ``ignore_index`` and labels outside
  [0, len(colors)) are drawn in ``ignore_color``."""
  lut = np.array([mcolors.to_rgb(c) for c in (*colors, ignore_color)])
  lut = np.round(lut * 255).astype(np.uint8)
  labels = np.asarray(labels)
  invalid = (labels < 0) | (labels >= len(colors))
  if ignore_index is not None:
    invalid |= labels == ignore_index
  return lut[np.where(invalid, len(colors), labels)]


def rgb_from_bands(x: np.ndarray, bands: tuple[int, int, int],
                   percentiles: tuple[float, float] = (2.0, 98.0)) -> np.ndarray:
  """Displayable float32 (H, W, 3) in [0, 1] from a (C, H, W) image (one date of a series).

  Each of the channels ``bands`` (red, green, blue indices) is stretched linearly between its
  own ``percentiles`` and clipped; NaNs and flat channels become 0.
  """
  rgb = np.asarray(x, np.float64)[list(bands)]
  lo, hi = np.nanpercentile(rgb, percentiles, axis=(1, 2), keepdims=True)
  span = np.where(hi > lo, hi - lo, 1.0)
  out = np.where(hi > lo, np.clip((rgb - lo) / span, 0.0, 1.0), 0.0)
  return np.nan_to_num(out).transpose(1, 2, 0).astype(np.float32)


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> None:
  FigureCanvasAgg(fig)
  fig.savefig(os.fspath(path), dpi=dpi, format="png")


def save_segmentation_panel(path: str | os.PathLike, rgb: np.ndarray, pred: np.ndarray,
                            truth: np.ndarray, class_names: Sequence[str],
                            colors: Sequence[Color], ignore_index: int | None = None, *,
                            ignore_color: Color = "#ffffff", panel_px: int = 256,
                            legend_px: int = 200, title_px: int = 24, dpi: int = 100) -> None:
  """Writes input | prediction | ground truth side by side with a class legend on the right.

  Args:
    path: output PNG, (3 panel_px + legend_px) x (panel_px + title_px) pixels.
    rgb: float (H, W, 3) in [0, 1] (e.g. ``rgb_from_bands``).
    pred, truth: int (H, W) label maps (same grid as ``rgb``; square maps fill their panel).
    class_names, colors: one per class.
    ignore_index: label drawn in ``ignore_color`` (and listed as "ignored" when it is not a
      class index).
  """
  if len(class_names) != len(colors):
    raise ValueError(f"{len(class_names)} class names but {len(colors)} colours")
  width, height = 3 * panel_px + legend_px, panel_px + title_px
  fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
  images = (("input", np.clip(rgb, 0.0, 1.0)),
            ("prediction", colorize(pred, colors, ignore_index, ignore_color)),
            ("ground truth", colorize(truth, colors, ignore_index, ignore_color)))
  for i, (title, image) in enumerate(images):
    ax = fig.add_axes((i * panel_px / width, 0.0, panel_px / width, panel_px / height))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9, pad=4)
  handles = [Patch(facecolor=c, edgecolor="black", linewidth=0.5, label=n)
             for n, c in zip(class_names, colors, strict=True)]
  if ignore_index is not None and not 0 <= ignore_index < len(colors):
    handles.append(Patch(facecolor=ignore_color, edgecolor="black", linewidth=0.5,
                         label="ignored"))
  fig.legend(handles=handles, loc="center left", bbox_to_anchor=(3 * panel_px / width, 0.5),
             fontsize=6, frameon=False, handlelength=1.0, labelspacing=0.25)
  _save(fig, path, dpi)


def save_confusion_matrix(path: str | os.PathLike, matrix: np.ndarray,
                          class_names: Sequence[str], normalize: bool = True, *,
                          size_px: int = 800, dpi: int = 100) -> None:
  """Writes a (K, K) confusion matrix (rows = truth, cols = prediction) as a heat map.

  Args:
    path: output PNG, size_px x size_px pixels.
    matrix: (K, K) counts.
    class_names: K names.
    normalize: divide each row by its total (recall per class; empty rows stay 0).
  """
  m = np.asarray(matrix, np.float64)
  k = m.shape[0]
  if m.shape != (k, k) or len(class_names) != k:
    raise ValueError(f"matrix {m.shape} and {len(class_names)} class names do not match")
  if normalize:
    rows = m.sum(1, keepdims=True)
    m = m / np.where(rows > 0, rows, 1.0)
  fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
  ax = fig.add_subplot()
  im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None,
                 interpolation="nearest")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  fontsize = max(4.0, min(9.0, 160.0 / k))
  ax.set_xticks(range(k), class_names, rotation=90, fontsize=fontsize)
  ax.set_yticks(range(k), class_names, fontsize=fontsize)
  ax.set_xlabel("prediction")
  ax.set_ylabel("truth")
  if k <= 20:
    threshold = 0.5 * (m.max() if m.size else 0.0)
    for (r, c), v in np.ndenumerate(m):
      ax.text(c, r, f"{v:.2f}" if normalize else f"{v:.0f}", ha="center", va="center",
              fontsize=fontsize * 0.8, color="white" if v > threshold else "black")
  fig.tight_layout()
  _save(fig, path, dpi)
