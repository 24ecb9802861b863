"""Figures: PNGs written with the documented pixel sizes, colours where they belong; what the
dense evaluators draw, and the evaluator registry."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from PIL import Image

from anysat_jax.core import options
from anysat_jax.evaluators import change_detection, figures, registry, segmentation

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RGB3 = ("#ff0000", "#00ff00", "#0000ff")


def _read_png(path):
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  with Image.open(path) as im:
    assert im.format == "PNG"
    return np.asarray(im.convert("RGB"))


def test_colormaps():
  sizes = {"pastis_hd": 20, "flair": 13, "bradd_s1ts": 2, "sen1floods11": 2, "sickle": 2}
  assert {k: len(v) for k, v in figures.COLORMAPS.items()} == sizes
  pastis = figures.COLORMAPS["pastis_hd"]
  assert pastis[0] == "#000000" and pastis[19] == "#ffffff"       # background, void
  assert len(set(pastis)) == 20 and len(set(figures.COLORMAPS["flair"])) == 13


def test_colorize():
  labels = np.array([[0, 1], [-1, 2], [7, 1]])
  img = figures.colorize(labels, RGB3, ignore_index=-1, ignore_color="#808080")
  assert img.dtype == np.uint8 and img.shape == (3, 2, 3)
  np.testing.assert_array_equal(img[0], [[255, 0, 0], [0, 255, 0]])
  np.testing.assert_array_equal(img[1], [[128, 128, 128], [0, 0, 255]])
  np.testing.assert_array_equal(img[2, 0], [128, 128, 128])       # out of range: ignore colour


def test_rgb_from_bands():
  x = np.zeros((4, 1, 101), np.float32)
  x[2, 0] = np.arange(101)           # red: 2nd / 98th percentiles are 2 and 98
  x[1, 0] = 5.0                      # green: flat -> 0
  x[0, 0] = np.arange(101)[::-1]     # blue: reversed ramp
  rgb = figures.rgb_from_bands(x, bands=(2, 1, 0))
  assert rgb.shape == (1, 101, 3) and rgb.dtype == np.float32
  # (50 - 2) / (98 - 2) = 0.5; 0 and 100 clip to 0 and 1.
  np.testing.assert_allclose(rgb[0, [0, 50, 100], 0], [0, 0.5, 1], atol=1e-6)
  assert np.all(rgb[..., 1] == 0)
  np.testing.assert_allclose(rgb[0, 2, 2], 1.0, atol=1e-6)       # blue value 98


def test_segmentation_panel(tmp_path):
  p, legend, title = 64, 120, 20
  pred = np.zeros((8, 8), int)
  pred[:, 4:] = 1                     # left half class 0, right half class 1
  truth = np.full((8, 8), 2)
  truth[:4, :4] = -1                  # ignored quadrant
  rgb = np.random.default_rng(0).uniform(size=(8, 8, 3))
  path = tmp_path / "panel.png"
  figures.save_segmentation_panel(path, rgb, pred, truth, ("a", "b", "c"), RGB3, ignore_index=-1,
                                  ignore_color="#ffff00", panel_px=p, legend_px=legend,
                                  title_px=title)
  img = _read_png(path)
  assert img.shape == (p + title, 3 * p + legend, 3)
  row = title + p // 2                # image centre row (panels fill the bottom p rows)
  np.testing.assert_array_equal(img[row, p + p // 4], [255, 0, 0])          # pred class 0
  np.testing.assert_array_equal(img[row, p + 3 * p // 4], [0, 255, 0])      # pred class 1
  np.testing.assert_array_equal(img[row + p // 4, 2 * p + p // 4], [0, 0, 255])   # truth 2
  np.testing.assert_array_equal(img[title + p // 4, 2 * p + p // 4], [255, 255, 0])  # ignored
  with pytest.raises(ValueError, match="class names"):
    figures.save_segmentation_panel(path, rgb, pred, truth, ("a",), RGB3)


def test_confusion_matrix(tmp_path):
  m = np.array([[5, 1, 0], [0, 0, 0], [2, 2, 4]])
  for normalize in (True, False):
    path = tmp_path / f"cm_{normalize}.png"
    figures.save_confusion_matrix(path, m, ("x", "y", "z"), normalize=normalize, size_px=300)
    img = _read_png(path)
    assert img.shape == (300, 300, 3)
    assert img.std() > 0
  with pytest.raises(ValueError, match="do not match"):
    figures.save_confusion_matrix(tmp_path / "bad.png", m, ("x", "y"))


def test_dense_panels_pick_the_documented_date():
  """Segmentation panels show the first date, change detection the last real date."""
  tile = {"s1": np.zeros((4, 3, 2, 2)), "s1_mask": np.array([1, 1, 1, 0])}
  assert segmentation._last_date(tile, "s1") == 2
  assert segmentation._last_date({"s1": np.zeros((4, 3, 2, 2))}, "s1") == 3
  assert segmentation.SegmentationEvaluator.date_index == 0
  assert change_detection.ChangeDetectionEvaluator.date_index == -1
  assert segmentation.rgb_bands("s2") == (2, 1, 0)          # B4, B3, B2
  assert segmentation.rgb_bands("aerial") == (3, 1, 2)      # NIR, G, B, R: R, G, B
  assert segmentation.rgb_bands("s1") == (0, 1, 2)          # false colour: VV, VH, VV/VH


def test_registry_refuses_unknown_evaluations():
  config = ml_collections.ConfigDict(dict(
      evals={"val": dict(type="segmentation", split="val", every_steps=0)},
      eval=dict(monitor="test")))
  with pytest.raises(ValueError, match="eval.monitor='test' is not one of config.evals"):
    registry.build(config, None, None, None)
  config.eval.monitor = "val"
  config.evals.val.type = "detection"
  with pytest.raises(ValueError, match="evals.val.type must be one of"):
    registry.build(config, None, None, None)
  assert tuple(registry.EVALUATORS) == options.EVALUATORS
