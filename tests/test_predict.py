"""``python -m anysat_jax.predict`` (``inference.predict``, ``inference.predict_cli``) on
fine-tuning workdirs.

A PASTIS segmentation demo (linear probing, S2 only, 2 steps, one monitored evaluation, so
``best/`` exists) is run in process into a module workdir; a classification workdir is written
directly from the task's initial state (``--checkpoint last``). Predictions are checked
against the task's own logits on the same tile.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tifffile

from anysat_jax.checkpoints import manager as ckpt
from anysat_jax.core.dates import day_of_year
from anysat_jax.inference import predict, predict_cli
from anysat_jax.io import geotiff
from anysat_jax.tasks.finetune import FinetuneTask
from anysat_jax.trainers import finetune
from configs import common

REPO = pathlib.Path(__file__).resolve().parents[1]
PASTIS = REPO / "input_pipeline/samples/PASTIS"
REF = geotiff.GeoRef(600000.0, 6500000.0, 10.0, 10.0)


def _config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _s2_dates(patch: int) -> list[str]:
  with open(PASTIS / "metadata.geojson") as f:
    feature = next(x for x in json.load(f)["features"] if x["properties"]["ID_PATCH"] == patch)
  d = feature["properties"]["dates-S2"]
  d = json.loads(d) if isinstance(d, str) else d
  return [str(v) for _, v in sorted(d.items(), key=lambda kv: int(kv[0]))]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> pathlib.Path:
  """A 2-step PASTIS linear-probing demo run (S2 only) with a best checkpoint."""
  root = tmp_path_factory.mktemp("predict")
  c = _config("pastis_semseg", "lp_demo")
  c.data.data_dir = str(root / "tfds")
  c.total_steps = 2
  common.set_evals(c, ("val",), every_steps=2, num_figures=0)
  c.checkpoint.every_steps = 2
  c.checkpoint.use_async = False
  finetune.run(c, str(root / "run"), {"requested": False})
  return root / "run"


def _scene(tmp_path: pathlib.Path, bands: int = 30, name: str = "s2.tif"
           ) -> tuple[pathlib.Path, np.ndarray]:
  """A 64 x 32 px S2 GeoTIFF (3 dates x 10 bands): sample 10186 on top, nodata (NaN) below."""
  x = np.load(PASTIS / "DATA_S2/S2_10186.npy").astype(np.float32)       # (3, 10, 32, 32)
  scene = np.full((30, 64, 32), np.nan, np.float32)
  scene[:, :32] = x.reshape(30, 32, 32)
  path = tmp_path / name
  geotiff.write(path, scene[:bands], REF, nodata=float("nan"))
  return path, x


def _args(run: pathlib.Path, path: pathlib.Path, *extra: str) -> list[str]:
  """Flags predicting the S2 scene ``path`` in 320 m windows."""
  return ["--workdir", str(run), "--input", f"s2={path}",
          "--dates", "s2=" + ",".join(_s2_dates(10186)), "--tile_m", "320", *extra]


def test_segmentation_map_matches_the_task_logits(seg_run, tmp_path):
  path, x = _scene(tmp_path)
  out, probs = tmp_path / "map.tif", tmp_path / "probs.tif"
  assert predict_cli.main(_args(seg_run, path, "--out", str(out), "--probs", str(probs))) == 0
  with tifffile.TiffFile(out) as tif:
    page = tif.pages.first
    classes = page.asarray()
    assert page.dtype == np.uint8 and page.is_tiled and float(page.tags.valueof(42113)) == 255
  _, ref = geotiff.read(out)
  assert (ref.x0, ref.y0, ref.dx, ref.dy) == (REF.x0, REF.y0, 10.0, 10.0)   # the input grid
  p, _ = geotiff.read(probs)
  assert classes.shape == (64, 32) and p.shape == (20, 64, 32)

  # The task's logits on the top tile, normalised with the run's statistics, computed directly.
  run = predict.load_run(str(seg_run))
  assert run.step == 2
  mean, std = run.stats["s2"]
  batch = {"s2": ((x - mean[:, None, None]) / std[:, None, None])[None],
           "s2_dates": np.array([[day_of_year(d) for d in _s2_dates(10186)]], np.float32),
           "label": np.zeros((1, 32, 32), np.int32)}
  logits = np.asarray(jax.jit(run.task.logits)(run.params, batch))[0]
  np.testing.assert_array_equal(classes[:32], logits.argmax(-1))
  want = predict.probabilities(logits)
  got = np.moveaxis(p[:, :32], 0, -1)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
  np.testing.assert_allclose(p[:, :32].sum(0), 1.0, atol=1e-5)
  # The bottom tile had no valid input: nodata in both maps.
  assert (classes[32:] == 255).all() and np.isnan(p[:, 32:]).all()

  # An existing output is kept without --overwrite.
  assert predict_cli.main(_args(seg_run, path, "--out", str(out))) == 2
  np.testing.assert_array_equal(tifffile.imread(out), classes)


def test_bad_inputs_give_clear_errors(seg_run, tmp_path):
  path, _ = _scene(tmp_path)
  out = str(tmp_path / "map.tif")
  run = lambda *a: predict_cli.run(predict_cli.parse_args(["--workdir", str(seg_run), *a]))
  s1 = tmp_path / "s1.npy"
  np.save(s1, np.load(PASTIS / "DATA_S1A/S1A_10186.npy").astype(np.float32))
  with pytest.raises(ValueError, match="trained on s2: missing --input for s2; s1 not used"):
    run("--input", f"s1={s1}", "--dates", "s1=1,2,3", "--out", out)
  bad, _ = _scene(tmp_path, bands=29, name="s2_29.tif")
  with pytest.raises(ValueError, match="s2: .*29"):
    run(*_args(seg_run, bad, "--out", out)[2:])
  with pytest.raises(ValueError, match="is the input"):
    run(*_args(seg_run, path, "--out", str(path), "--overwrite")[2:])
  with pytest.raises(ValueError, match="writes .tif or .tiff"):
    run(*_args(seg_run, path, "--out", str(tmp_path / "map.npz"))[2:])
  with pytest.raises(FileNotFoundError, match="fine-tuning run"):
    predict.load_run(str(tmp_path))


def test_classification_run_writes_its_table(tmp_path):
  c = _config("pastis_cls", "demo")          # multilabel (bce)
  common.set_dataset(c, modalities=("s2",))
  c.data.data_dir = str(tmp_path / "tfds")
  _, enc_cfg = ckpt.load_encoder(c)
  task = FinetuneTask(c, enc_cfg, predict._NO_STEPS)
  state = jax.jit(task.init_state)(None)
  workdir = str(tmp_path / "run")
  ckpt.write_config(workdir, c)
  with ckpt.checkpoint_manager(workdir, c) as manager:
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave({})))
  x = np.load(PASTIS / "DATA_S2/S2_10186.npy").astype(np.float32)
  scene = np.concatenate([x, x[..., ::-1, :]], axis=-2)                # (3, 10, 64, 32)
  np.save(tmp_path / "s2.npy", scene)
  out = tmp_path / "classes.npz"
  cols = predict_cli.run(predict_cli.parse_args(
      ["--workdir", workdir, "--checkpoint", "last", "--input", f"s2={tmp_path / 's2.npy'}",
       "--dates", "s2=" + ",".join(_s2_dates(10186)), "--tile_m", "320", "--out", str(out)]))
  table = np.load(out)
  assert list(table["row_m"]) == [0.0, 320.0] and list(table["col_m"]) == [0.0, 0.0]
  np.testing.assert_array_equal(table["class"], cols["class"])
  run = predict.load_run(workdir, "last")
  mean, std = run.stats["s2"]
  norm = (scene - mean[:, None, None]) / std[:, None, None]
  dates = np.array([[day_of_year(d) for d in _s2_dates(10186)]] * 2, np.float32)
  batch = {"s2": np.stack([norm[..., :32, :], norm[..., 32:, :]]), "s2_dates": dates,
           "label": np.zeros((2, 18), np.float32)}
  logits = np.asarray(jax.jit(run.task.logits)(run.params, batch))
  want = predict.probabilities(logits, multilabel=True)
  got = table["probabilities"]
  assert got.shape == (2, 18)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
  np.testing.assert_array_equal(table["class"], want.argmax(-1))
  np.testing.assert_allclose(table["probability"], want.max(-1), rtol=1e-6)
  with pytest.raises(ValueError, match="--probs is for segmentation runs"):
    predict_cli.run(predict_cli.parse_args(
        ["--workdir", workdir, "--input", f"s2={tmp_path / 's2.npy'}", "--dates", "s2=1,2,3",
         "--out", str(tmp_path / "t.npz"), "--probs", str(tmp_path / "p.tif")]))
