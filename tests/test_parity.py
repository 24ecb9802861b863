"""The encoder reproduces the official PyTorch model's outputs (fixtures in testdata/parity)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import PARITY_DIR

from anysat_jax.tools import parity

TOL = 1e-4
CASES = sorted(p.name for p in PARITY_DIR.glob("case_*.npz"))


def test_fixture_set_is_present():
  assert len(CASES) >= 9, f"parity fixtures missing from {PARITY_DIR}"


@pytest.mark.parametrize("case", CASES)
def test_case_matches_reference(case):
  model, inputs, variants, z = parity.load_case(str(PARITY_DIR / case))
  meta = json.loads(str(z["meta"]))
  assert model.config.combiner_attention == meta.get("combiner_attention", "token")
  errors = {}
  for name, v in variants.items():
    y = np.asarray(model(inputs, int(v["patch_size_m"]), v["output"],
                         v.get("output_modality") or None))
    errors[name] = parity.rel_l2(y, z["output/" + name])
  assert max(errors.values()) < TOL, errors


def test_head_axis_mode_differs_from_token_mode():
  """The switch matters: the head-axis fixture is far from the token-mode model's output."""
  model, inputs, variants, z = parity.load_case(str(PARITY_DIR / "case_h_headaxis_treesat.npz"))
  token, *_ = parity.load_case(str(PARITY_DIR / "case_a_treesat.npz"))
  y = np.asarray(token(inputs, 10, "tile"))
  assert parity.rel_l2(y, z["output/p10_tile"]) > 0.1


def test_intermediates_match_reference():
  """Projector, spatial-encoder and token-assembly outputs of case c2 (MODIS) match the debug
  arrays, so a failure localises to a stage."""
  model, inputs, _, z = parity.load_case(str(PARITY_DIR / "case_c2_planted_modis.npz"))
  from anysat_jax.models.encoder import AnySatEncoder
  params = {"params": model.params}
  for name in ("s2", "s1", "l7", "alos", "modis"):
    tokens = model.module.apply(params, inputs, name, 3, method=AnySatEncoder.project)
    assert parity.rel_l2(np.asarray(tokens), z[f"debug/p30_tile/projector/{name}"]) < TOL
    cls, _ = model.module.apply(params, inputs, name, 3, method=AnySatEncoder.encode_patches)
    assert parity.rel_l2(np.asarray(cls), z[f"debug/p30_tile/spatial_cls/{name}"]) < TOL


def test_parity_cli_on_fixture_dir(capsys):
  # One small case keeps this fast; the per-case tests above cover the rest.
  import shutil
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    for f in ("case_d_ts2c_pixel.npz", "case_e_sen1floods11.npz", "weights_v64.npz"):
      shutil.copy(PARITY_DIR / f, d)
    assert parity.main([d]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1].startswith("worst rel_l2 ") and out[-1].endswith(" over 9 variants")
  assert float(out[-1].split()[2]) < TOL


def _write_fixture_set(directory, corrupt: bool = False):
  """A fixture set in the official format for another config (dim 96, 1 + 3 blocks, 2 and 8
  heads, three projectors), with our own outputs as the reference."""
  import jax

  from anysat_jax import AnySat
  from anysat_jax.checkpoints import convert
  model = AnySat("tiny", seed=3, dim=96, depth=1, num_heads=2, spatial_depth=3, spatial_heads=8,
                 modalities=("spot", "s2", "s1"))
  sd = convert.params_to_state_dict(model.params, model.config)
  wmeta = {"kind": "weights"}
  np.savez(directory / "weights_x.npz", meta=json.dumps(wmeta),
           **{"param/" + k: v for k, v in sd.items()})
  rng = np.random.default_rng(0)
  inputs = {"spot": rng.normal(size=(2, 3, 60, 60)).astype(np.float32),
            "s2": rng.normal(size=(2, 4, 10, 6, 6)).astype(np.float32),
            "s2_dates": np.sort(rng.integers(0, 365, (2, 4))),
            "s1": rng.normal(size=(2, 3, 3, 6, 6)).astype(np.float32),
            "s1_dates": np.sort(rng.integers(0, 365, (2, 3)))}
  variants, outputs = {}, {}
  for p, out, om in ((20, "tile", None), (30, "patch", None), (20, "dense", "s1")):
    name = f"p{p}_{out}"
    with jax.default_matmul_precision("highest"):
      y = np.asarray(model(inputs, p, out, om))
    outputs["output/" + name] = y * (1.01 if corrupt and out == "patch" else 1.0)
    variants[name] = {"patch_size_m": p, "output": out, "output_modality": om}
  meta = {"weights_file": "weights_x.npz", "inputs": {k: {} for k in inputs},
          "variants": variants, "combiner_attention": "token",
          "hubconf_overrides": {"embed_dim": 96, "depth": 1, "num_heads": 2,
                                "spatial_encoder.depth": 3, "projectors.s2.dropout": 0.2}}
  np.savez(directory / "case_x.npz", meta=json.dumps(meta), **outputs,
           **{"input/" + k: v for k, v in inputs.items()})


def test_parity_cli_works_for_another_config(tmp_path, capsys):
  _write_fixture_set(tmp_path)
  assert parity.main([str(tmp_path)]) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1].endswith("over 3 variants")


def test_parity_cli_fails_on_a_wrong_output(tmp_path, capsys):
  _write_fixture_set(tmp_path, corrupt=True)
  assert parity.main([str(tmp_path)]) == 1
  lines = capsys.readouterr().out.strip().splitlines()
  assert any("p30_patch" in line and "FAIL" in line for line in lines)
