"""Every input problem raises a ValueError naming the modality and the problem, before any
compute."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from anysat_jax.inference.api import AnySat
from anysat_jax.models.config import encoder_config
from anysat_jax.models.validation import (
    MAX_TABLE_BYTES,
    count_nonfinite,
    table_bytes,
    validate_inputs,
)
from anysat_jax.tools.parity import rel_l2

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


# --- Bad values (NaN/Inf), sizes that cannot fit, array types -----------------------------------


def test_python_list_is_refused_by_name():
  batch = _ok()
  batch["aerial"] = batch["aerial"].tolist()
  with pytest.raises(ValueError, match=r"aerial: expected a numpy or JAX array, got a list"):
    _check(batch)


def test_bfloat16_jax_arrays_are_floating_point():
  batch = {k: jnp.asarray(v, jnp.bfloat16) if k in ("aerial", "s2") else v
           for k, v in _ok().items()}
  _check(batch)
  assert count_nonfinite(batch["s2"].at[0, 0, 0, 0, 0].set(jnp.nan)) == 1


def test_nonfinite_values_refused_on_request():
  batch = _ok()
  batch["s2"][1, 2, 3, :2, 0] = [np.nan, np.inf]
  _check(batch)                                              # default: left to the caller
  with pytest.raises(ValueError, match=r"s2: 2 of 3600 values are NaN or Inf"):
    _check(batch, nonfinite="raise")


def test_token_count_past_the_limit_is_refused_before_compute():
  """An 800 x 800 px S2 + S1 tile at patch 10 m: a 2.98 TiB relative-position table."""
  big = np.zeros((1, 1, 10, 800, 800), np.float32)
  batch = {"s2": big, "s2_dates": np.ones((1, 1)), "s1-asc": big[:, :, :2],
           "s1-asc_dates": np.ones((1, 1))}
  with pytest.raises(ValueError, match=r"s2, s1-asc: a 8000 m tile at patch size 10 m has "
                     r"800x800 = 640000 patches per modality \(2 modalities\); the combiner's "
                     r"relative-position table would take 2\.98 TiB \(limit 16\.00 GiB\); cut the"
                     r" scene into windows of at most 2150 m \(embed: --tile_m 2150\)"):
    _check(batch, 10)
  assert table_bytes(215 ** 2, 2) <= MAX_TABLE_BYTES < table_bytes(216 ** 2, 2)


def test_api_masks_nonfinite_values_like_the_valid_mask(caplog):
  """NaN/Inf pixels give finite features equal to those of the same pixels marked missing in
  ``<mod>_valid`` (values there arbitrary); ``nonfinite="raise"`` refuses them."""
  model = AnySat("tiny", modalities=("s2",), dim=64, depth=1, num_heads=4, spatial_depth=1,
                 spatial_heads=4)
  batch = {"s2": _ok()["s2"][:1], "s2_dates": _ok()["s2_dates"][:1]}
  hole = np.ones(batch["s2"].shape, np.uint8)
  hole[0, 1:3, :, 2:4, 1:5] = 0
  masked = model({**batch, "s2_valid": hole}, 20, "patch")
  poisoned = dict(batch, s2=np.where(hole == 1, batch["s2"], np.nan).astype(np.float32))
  poisoned["s2"][0, 1, 0, 2, 1] = np.inf
  with caplog.at_level(logging.INFO, "anysat_jax"):
    got = model(poisoned, 20, "patch")
  assert "s2: 160 of 1800 values are NaN or Inf; treated as missing (s2_valid)" in caplog.text
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_array_equal(np.asarray(got), np.asarray(masked))
  assert rel_l2(np.asarray(got), np.asarray(model(batch, 20, "patch"))) > 1e-3
  with pytest.raises(ValueError, match="s2: 160 of 1800 values are NaN or Inf"):
    model(poisoned, 20, "patch", nonfinite="raise")
