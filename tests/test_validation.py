"""Every input problem raises a ValueError naming the modality and the problem, before any
compute."""

from __future__ import annotations

import numpy as np
import pytest

from anysat_jax.models.config import encoder_config
from anysat_jax.models.validation import validate_inputs

CONFIG = encoder_config("tiny", dim=64)


def _ok():
  rng = np.random.default_rng(0)
  return {"aerial": rng.normal(size=(2, 4, 300, 300)).astype(np.float32),
          "s2": rng.normal(size=(2, 5, 10, 6, 6)).astype(np.float32),
          "s2_dates": np.array([[1, 30, 60, 90, 120]] * 2)}


def _check(batch, patch=20, **kw):
  validate_inputs(batch, patch, CONFIG, **kw)


def test_valid_batch_passes():
  _check(_ok())
  _check({**_ok(), "s2_mask": np.ones((2, 5))}, 30)
  _check({**_ok(), "modis": np.zeros((2, 3, 7, 1, 1), np.float32),
          "modis_dates": np.ones((2, 3))}, 30, output="dense", output_modality="s2")


@pytest.mark.parametrize("change, patch, pattern", [
    (lambda b: b.update(radar=b["s2"]), 20, r"unknown modality 'radar'"),
    (lambda b: b.update(aerial=b["aerial"][None]), 20, r"aerial: expected a rank-4 array"),
    (lambda b: b.update(s2=b["s2"][:, 0]), 20, r"s2: expected a rank-5 array"),
    (lambda b: b.update(s2=b["s2"][:, :, :9]), 20, r"s2: expected 10 channels"),
    (lambda b: b.update(aerial=b["aerial"][..., :250]), 20, r"aerial: tiles must be square"),
    (lambda b: b.update(aerial=np.zeros((2, 4, 304, 304), np.float32)), 20,
     r"s2: covers 60 m \(6 px x 10 m\) but aerial covers 60\.8 m"),
    (lambda b: None, 25, r"patch size must be a positive multiple of 10 m, got 25"),
    (lambda b: None, 0, r"positive multiple of 10 m"),
    (lambda b: None, 40, r"patch size 40 m does not divide the tile extent 60 m"),
    (lambda b: b.pop("s2_dates"), 20, r"s2: time series needs 's2_dates'"),
    (lambda b: b.update(s2_dates=np.ones((2, 4))), 20, r"s2_dates: expected shape \(B, T\)"),
    (lambda b: b.update(s2_dates=np.full((2, 5), 400)), 20, r"s2_dates: .* within 0\.\.366"),
    (lambda b: b.update(s2_dates=np.full((2, 5), -1)), 20, r"s2_dates: .* within 0\.\.366"),
    (lambda b: b.update(s2_mask=np.ones((2, 4))), 20, r"s2_mask: date mask must have shape"),
    (lambda b: b.update(s2_mask=np.zeros((2, 5))), 20, r"s2_mask: .* at least one valid date"),
    (lambda b: b.update(s2_valid=np.ones((2, 5, 3, 6, 6))), 20, r"s2_valid: .* does not broadcast"),
    (lambda b: b.update(aerial=b["aerial"].astype(np.uint8)), 20,
     r"aerial: data must be floating point"),
    (lambda b: b.update(aerial=b["aerial"][:0], s2=b["s2"][:0], s2_dates=b["s2_dates"][:0]), 20,
     r"aerial: empty batch"),
    (lambda b: b.update(aerial=b["aerial"][:1]), 20, r"s2: batch size 2 differs"),
    (lambda b: b.update(l7=np.zeros((2, 3, 6, 2, 2), np.float32), l7_dates=np.ones((2, 3))),
     20, r"l7: 2 px give 2x2 patches of 20 m but the tile has 3x3.*multiple of 30 m"),
    (lambda b: b.update(l8_dates=np.ones((2, 3))), 20, r"l8_dates: given without its modality"),
    (lambda b: b.update(modis=np.zeros((2, 3, 7, 2, 2), np.float32),
                        modis_dates=np.ones((2, 3))), 20, r"modis: a context token needs exactly"),
])
def test_each_problem_has_a_clear_error(change, patch, pattern):
  batch = _ok()
  change(batch)
  with pytest.raises(ValueError, match=pattern):
    _check(batch, patch)


def test_output_checks():
  with pytest.raises(ValueError, match="output must be one of"):
    _check(_ok(), output="pixels")
  with pytest.raises(ValueError, match="output_modality 's1' is not among the inputs"):
    _check(_ok(), output="dense", output_modality="s1")


def test_projector_missing_from_the_model():
  config = encoder_config("tiny", dim=64, modalities=("s2",))
  with pytest.raises(ValueError, match="aerial: this model has no projector"):
    validate_inputs(_ok(), 20, config)


def test_no_modality():
  with pytest.raises(ValueError, match="no modality"):
    _check({}, 20)
