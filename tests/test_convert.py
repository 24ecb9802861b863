"""Checkpoint converter: key layout of the released model, round trips, CLI, errors."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

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


# ---------------------------------------------------------------------------------------------
# Bad checkpoints and outputs: one error line (exit status 2), checked before any model is built;
# the output folder is replaced atomically and only when asked.


def _cli(capsys, *args) -> tuple[int, str]:
  """Runs the CLI; returns its exit status and its stderr, which must be at most one line."""
  status = convert.main([str(a) for a in args])
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) <= 1 and "Traceback" not in err, err
  return status, err.strip()


def test_absurd_block_index_is_refused_before_building(tmp_path, capsys):
  """``blocks.3000.*`` once built a 3000-block model (87 s, 824 MB) before failing."""
  sd = {k.replace("blocks.2.", "blocks.3000."): v for k, v in _fixture_state_dict().items()}
  with pytest.raises(convert.CheckpointError, match=r"blocks\.<i> indices are not 0\.\.3000"):
    convert.infer_config(sd)
  gap = _fixture_state_dict()            # The cross block copied to blocks.3: blocks.2 is then
  gap.update({k.replace("blocks.2.", "blocks.3."): v for k, v in gap.items()   # a regular block
              if k.startswith("blocks.2.")})                                  # with wrong keys.
  with pytest.raises(convert.CheckpointError,
                     match=r"missing keys: blocks\.2\.attn\.qkv\.bias, blocks\.2\.attn\.qkv\.weight"
                           r"\n  unknown keys: blocks\.2\.attn\.q_learned, "):
    convert.infer_config(gap)
  np.savez(tmp_path / "absurd.npz", **sd)
  status, err = _cli(capsys, tmp_path / "absurd.npz", tmp_path / "out")
  assert status == 2 and err.startswith(f"error: {tmp_path}/absurd.npz: blocks.<i> indices")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing_cls_token", "no_blocks", "zero_width_table",
                                  "indivisible_heads", "object_array", "complex", "int",
                                  "not_a_zip"])
def test_malformed_state_dict_gives_one_error_line(tmp_path, capsys, case):
  sd = _fixture_state_dict()
  table = "blocks.2.attn.rpe_k.lookup_table_weight"
  if case == "missing_cls_token":
    del sd["cls_token"]
    want = "missing key cls_token"
  elif case == "no_blocks":
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    want = r"missing keys blocks\.0\.\*"
  elif case == "zero_width_table":
    sd[table] = np.zeros((1, 0, sd[table].shape[2]), np.float32)
    want = rf"{table}: shape \(1, 0, \d+\), expected 3 non-empty axes"
  elif case == "indivisible_heads":
    sd[table] = np.zeros((1, 7, sd[table].shape[2]), np.float32)
    want = r"width 64 \(cls_token\) is not a multiple of the head widths 7"
  elif case == "object_array":
    sd["cls_token"] = np.array([None, "x"], object)
    want = r"cannot read npz: ValueError: Object arrays cannot be loaded"
  elif case == "not_a_zip":
    want = r"cannot read npz: BadZipFile: File is not a zip file"
  else:
    sd["cls_token"] = sd["cls_token"].astype(np.complex64 if case == "complex" else np.int32)
    want = r"weights must be floating point; not so: cls_token \((complex64|int32)\)"
  src = tmp_path / f"{case}.npz"
  np.savez(src, **sd)  # np.savez pickles object arrays; np.load must refuse them.
  if case == "not_a_zip":
    src.write_bytes(b"PK\x03\x04 broken")
  status, err = _cli(capsys, src, tmp_path / "out")
  assert status == 2 and err.startswith(f"error: {src}: ") and re.search(want, err), err
  assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_or_foreign_folder_is_refused(tmp_path, capsys):
  src = tmp_path / "weights.npz"
  np.savez(src, **_fixture_state_dict())
  (tmp_path / "out.txt").write_text("mine")
  status, err = _cli(capsys, src, tmp_path / "out.txt", "--overwrite")
  assert status == 2 and "out.txt exists and is not a directory" in err
  assert (tmp_path / "out.txt").read_text() == "mine"
  folder = tmp_path / "results"
  folder.mkdir()
  (folder / "notes.md").write_text("mine")
  status, err = _cli(capsys, src, folder)
  assert status == 2 and "not empty; pass --overwrite" in err
  status, err = _cli(capsys, src, folder, "--overwrite")
  assert status == 2 and "holds other files than a conversion (notes.md)" in err
  assert sorted(p.name for p in folder.iterdir()) == ["notes.md"]


def _tree_bytes(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


def test_overwrite_is_atomic_and_nonfinite_needs_a_flag(tmp_path, capsys, monkeypatch):
  sd = _fixture_state_dict()
  good, bad = tmp_path / "good.npz", tmp_path / "nan.npz"
  np.savez(good, **sd)
  key = "blocks.0.mlp.fc1.bias"
  nan = {**sd, key: np.where(np.arange(sd[key].size) % 5 == 0, np.nan, sd[key])}
  nan[key][1] = np.inf
  np.savez(bad, **nan)
  out = tmp_path / "out"
  assert _cli(capsys, good, out)[0] == 0
  before = _tree_bytes(out)

  status, err = _cli(capsys, good, out)                                    # Exists: refused.
  assert status == 2 and "pass --overwrite" in err
  status, err = _cli(capsys, bad, out, "--overwrite")                      # NaN: refused.
  n_bad = int(np.sum(~np.isfinite(nan[key])))
  assert status == 2 and f"non-finite weights (NaN or Inf) in {key} ({n_bad} of " in err
  assert "--allow_nonfinite" in err

  def full_disk(config):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(convert, "config_to_json", full_disk)  # Fails after params/ is written.
  status, err = _cli(capsys, bad, out, "--overwrite", "--allow_nonfinite")
  assert status == 2 and "No space left on device" in err
  monkeypatch.undo()
  assert _tree_bytes(out) == before                     # The earlier conversion is untouched,
  assert sorted(p.name for p in tmp_path.iterdir()) == ["good.npz", "nan.npz", "out"]  # no temp.

  assert _cli(capsys, bad, out, "--overwrite", "--allow_nonfinite")[0] == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["good.npz", "nan.npz", "out"]
  params, _ = convert.load(out)
  got = np.asarray(params["combiner"]["block_0"]["mlp"]["fc1"]["bias"])
  np.testing.assert_array_equal(got, nan[key].astype(np.float32))     # NaN and Inf kept as is.


def test_module_cli_prints_one_line_and_no_runpy_warning(tmp_path):
  run = subprocess.run([sys.executable, "-m", "anysat_jax.convert", str(tmp_path / "no.npz"),
                        str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])})
  assert run.returncode == 2
  assert run.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path}/no.npz"]
