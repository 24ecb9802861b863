"""Checkpoint converter: key layout of the released model, round trips, CLI, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import PARITY_DIR, TESTDATA

from anysat_jax import AnySat
from anysat_jax.checkpoints import convert
from anysat_jax.io.torch_pickle.writer import save_pth
from anysat_jax.models.config import encoder_config
from anysat_jax.tools.parity import rel_l2


def _layout(size: str) -> tuple[dict[str, tuple[int, ...]], dict]:
  d = json.loads((TESTDATA / f"anysat_{size}_state_dict.json").read_text())
  return {k["name"]: tuple(k["shape"]) for k in d["keys"]}, d


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_released_key_layout_maps_one_to_one(size):
  """Every key of the official layout maps to exactly one Flax parameter of the right shape
  (checked on shapes alone: ``jax.eval_shape`` of the model, no weights allocated)."""
  shapes, meta = _layout(size)
  config = encoder_config(size)
  assert convert.check_layout(shapes, config) == meta["total_params"]
  mapping = convert.key_map(config)
  assert len(mapping) == len(shapes) == meta["num_tensors"]
  assert len({p for _, p, _ in mapping}) == len(mapping)         # one parameter per key
  model_leaves = convert._flatten(convert.param_shapes(config))
  assert sum(int(np.prod(s.shape)) for s in model_leaves.values()) == meta["total_params"]


def test_base_layout_errors_name_the_key():
  shapes, _ = _layout("base")
  config = encoder_config("base")
  missing = dict(shapes)
  del missing["blocks.3.attn.qkv.weight"]
  with pytest.raises(convert.CheckpointError, match=r"missing keys: blocks\.3\.attn\.qkv\.weight"):
    convert.check_layout(missing, config)
  unknown = {**shapes, "blocks.7.attn.qkv.weight": (2304, 768)}
  with pytest.raises(convert.CheckpointError, match=r"unknown keys: blocks\.7\.attn\.qkv"):
    convert.check_layout(unknown, config)
  wrong = {**shapes, "projector_s2.patch_embed.in_norm.weight": (767,)}
  with pytest.raises(convert.CheckpointError, match=r"projector_s2\.patch_embed\.in_norm\.weight"):
    convert.check_layout(wrong, config)


def _fixture_state_dict():
  return convert.read_state_dict(PARITY_DIR / "weights_v64.npz")


def test_state_dict_round_trip():
  sd = _fixture_state_dict()
  config = convert.infer_config(sd)
  back = convert.params_to_state_dict(convert.state_dict_to_params(sd, config), config)
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k].reshape(np.shape(v)), v, err_msg=k)


def test_infer_config_reads_the_architecture():
  config = convert.infer_config(_fixture_state_dict())
  assert (config.dim, config.depth, config.num_heads) == (64, 2, 4)
  assert (config.spatial_depth, config.spatial_heads) == (2, 4)
  assert config.projector("s2").in_norm and not config.projector("s1").in_norm
  assert config.projector("s2").widths == (8, 32, 64, 128, 64)
  assert config.projector("l7").reduce_scale == 3 and config.projector("modis").reduce_scale == 12


def _flat_bytes(params) -> dict[str, tuple]:
  from flax import traverse_util
  flat = traverse_util.flatten_dict(params, sep="/")
  return {k: (np.asarray(v).dtype, np.asarray(v).shape, np.asarray(v).tobytes())
          for k, v in flat.items()}


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "pth"])
def test_cli_converts_every_format_to_the_same_params(tmp_path, fmt):
  """The CLI's output and ``from_pretrained`` of the source hold, bit for bit, the params of the
  state dict (whose outputs ``test_converted_model_reproduces_the_reference`` checks)."""
  sd = _fixture_state_dict()
  src = tmp_path / f"weights.{fmt}"
  if fmt == "npz":
    np.savez(src, **sd)
  elif fmt == "safetensors":
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(src))
  else:
    save_pth(src, {"state_dict": sd, "epoch": 3})
  out = tmp_path / "converted"
  assert convert.main([str(src), str(out)]) == 0
  assert (out / "config.json").exists()
  config = convert.infer_config(sd)
  want = _flat_bytes(convert.state_dict_to_params(sd, config))
  for model in (AnySat.from_pretrained(out), AnySat.from_pretrained(src)):
    assert model.config == config
    assert _flat_bytes(model.params) == want
  head_axis = AnySat.from_pretrained(out, combiner_attention="head_axis")
  assert head_axis.config.combiner_attention == "head_axis"


def test_converted_model_reproduces_the_reference(tmp_path):
  src = tmp_path / "weights.npz"
  np.savez(src, **_fixture_state_dict())
  out = tmp_path / "converted"
  assert convert.main([str(src), str(out)]) == 0
  z = np.load(PARITY_DIR / "case_e_sen1floods11.npz")
  inputs = {k: z["input/" + k] for k in ("s2", "s2_dates", "s1", "s1_dates")}
  model = AnySat.from_pretrained(out)
  assert rel_l2(np.asarray(model(inputs, 20, "tile")), z["output/p20_tile"]) < 1e-4


def test_read_state_dict_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.pth"):
    convert.read_state_dict(tmp_path / "nothere.pth")
  bad = tmp_path / "weights.bin2"
  bad.write_bytes(b"x")
  with pytest.raises(ValueError, match="unknown checkpoint format"):
    convert.read_state_dict(bad)
  with pytest.raises(FileNotFoundError, match="config.json"):
    AnySat.from_pretrained(tmp_path)
