"""Fine-tuning, linear probing and evaluation (``trainers.finetune``, ``tasks.finetune``,
``evaluators``, ``configs/*_*.py``).

Runs are in process (``finetune.run``) on trimmed experiment configs (``_trimmed``: the demo's
tiny model, no temporal dropout, warmup + cosine, evaluation on the training split), except one
demo preset run end to end through ``python -m anysat_jax.main``. Every dataset is prepared once
per session from the shipped or generated samples. Checked per task family: the training loss
falls and the final loss on the training tiles is near 0 with the task metric near its maximum
(linear probing of a random encoder on the real flood chip: as far as a linear head can go);
linear probing leaves every encoder leaf bit for bit unchanged; initialisation from a converted
checkpoint and from a pretraining workdir (its EMA teacher) puts exactly those weights in;
metrics.json and the figures are written; resuming continues a stopped run.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from PIL import Image

from anysat_jax.checkpoints import convert
from anysat_jax.checkpoints import manager as ckpt
from anysat_jax.evaluators import metrics
from anysat_jax.tasks import optim, schedules
from anysat_jax.tasks.finetune import FinetuneTask
from anysat_jax.tasks.state import TrainState
from anysat_jax.trainers import finetune
from configs import common

REPO = pathlib.Path(__file__).resolve().parents[1]
WEIGHTS_V64 = REPO / "tests/testdata/parity/weights_v64.npz"
# The v64 fixture's widths (all 11 projectors), for a pretraining state of the same shapes.
V64 = dict(dim=64, depth=2, num_heads=4, spatial_depth=2, spatial_heads=4)
CONFIGS = ("treesatai_ts_cls", "pastis_cls", "pastis_semseg", "flair_semseg", "planted_cls",
           "bradd_change", "sickle_semseg", "timesen2crop_cls", "sen1floods11_semseg")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))


def _config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _trimmed(name: str, arg: str, data_dir: str, *, steps: int, lr: float,
             **dataset_fields) -> ml_collections.ConfigDict:
  """A demo config that overfits its evaluation split: no temporal dropout, warmup (10 %) +
  cosine, one evaluation at the end, on ``dataset_fields["split"]`` (default train)."""
  c = _config(name, arg)
  c.data.data_dir = data_dir
  c.total_steps = steps
  c.log_every = max(1, steps // 5)
  c.optim.lr = lr
  c.optim.schedule = "warmup_cosine"
  common.set_evals(c, (dataset_fields.get("split", "train"),), every_steps=steps, num_figures=2)
  c.checkpoint.every_steps = steps
  c.checkpoint.use_async = False
  common.set_dataset(c, temporal_dropout=0.0, **dataset_fields)
  return c


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path,
         stop: bool = False) -> dict:
  finetune.run(config, str(workdir), {"requested": stop})
  with open(workdir / "metrics.json") as f:
    return json.load(f)


def _logged(workdir: pathlib.Path, tag: str) -> list[float]:
  """Values of a scalar in the run's TensorBoard events, in step order."""
  import tensorflow as tf
  values = []
  for path in glob.glob(str(workdir / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      values += [(event.step, float(tf.make_ndarray(v.tensor))) for v in event.summary.value
                 if v.tag == tag]
  return [v for _, v in sorted(values)]


def _check_overfit(workdir: pathlib.Path, out: dict, metric: str, at_least: float,
                   loss_below: float, split: str = "train") -> None:
  """The logged training loss falls; on the evaluated training tiles (evaluation ``split``)
  the loss is below ``loss_below`` and the monitored metric at least ``at_least``; the run's
  summary.json holds the same final results."""
  losses = _logged(workdir, "train/loss")
  assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0], losses
  result = out["evals"][split]
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["steps"] == out["step"] and np.isfinite(summary["final_loss"])
  assert summary["metrics"][f"{split}/{metric}"] == pytest.approx(result[metric])
  assert result["loss"] < loss_below, result
  assert result[metric] >= at_least, result
  assert out["monitor"] == metric


def _params(workdir: pathlib.Path, step: int | None = None) -> dict:
  return ckpt.restore_raw(str(workdir), step)[1]["params"]


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


def _assert_bitwise_equal(a, b) -> None:
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
    assert fa[k].tobytes() == fb[k].tobytes(), k


def _png_size(path: pathlib.Path) -> tuple[int, int]:
  with Image.open(path) as im:
    assert im.format == "PNG"
    return im.size


# ---------------------------------------------------------------------------------------------
# Configs, steps and schedules (no training).


def test_configs_hold_the_paper_settings():
  expected = {  # name: (experiment, train mode, lr, weight decay, batch, patch, epochs, loss)
      "treesatai_ts_cls": ("TSAITS_AnySat_FT", "finetune", 5e-5, 0.0, 256, 10, 200, "bce"),
      "pastis_cls": ("Pastis_AnySat_FT", "finetune", 5e-5, 0.0, 4, 40, 200, "bce"),
      "pastis_semseg": ("Pastis_AnySat_FT_SemSeg", "finetune", 5e-5, 0.0, 4, 40, 200,
                        "ce_weighted"),
      "flair_semseg": ("FLAIR_AnySat_FT_SemSeg", "finetune", 5e-5, 1e-2, 32, 10, 200,
                       "ce_weighted"),
      "planted_cls": ("Planted_AnySat_FT", "finetune", 5e-5, 1e-4, 64, 30, 200, "ce"),
      "bradd_change": ("BraDD_AnySat_FT", "finetune", 5e-5, 0.0, 8, 40, 200, "ce_ignore"),
      "sickle_semseg": ("Sickle_AnySat_FT", "finetune", 5e-5, 0.0, 12, 10, 200, "ce_ignore"),
      "timesen2crop_cls": ("TS2C_AnySat_FT", "finetune", 5e-5, 0.0, 2048, 10, 100, "ce_ignore"),
      "sen1floods11_semseg": ("Sen1Floods_AnySat_LP", "linear_probe", 2e-4, 0.0, 4, 80, 200,
                              "ce_ignore"),
  }
  assert sorted(expected) == sorted(CONFIGS)
  for name, (exp, mode, lr, wd, batch, patch, epochs, loss) in expected.items():
    c = _config(name)
    d = c.data.datasets[c.dataset]
    assert (c.experiment, c.train_mode, c.optim.lr, c.optim.weight_decay, d.batch_size,
            tuple(d.patch_sizes), c.epochs, c.loss) == (exp, mode, lr, wd, batch, (patch,),
                                                        epochs, loss), name
    assert metrics.metric_for(c.experiment).monitor == metrics.metric_for(c.dataset).monitor
    demo = _config(name, "demo")
    assert demo.init.kind == "scratch" and demo.model.overrides.dim == 64
    assert demo.total_steps <= 60 and demo.train_mode == mode
    kind = ("change_detection" if name == "bradd_change" else
            "segmentation" if c.head.dense_modality else "classification")
    for cfg in (c, demo):
      assert {e.type for e in cfg.evals.values()} == {kind}, name
      assert cfg.eval.monitor in cfg.evals and cfg.evals[cfg.eval.monitor].every_steps != 0
      assert all(e.every_steps == 0 for n, e in cfg.evals.items() if n != cfg.eval.monitor)
      assert all(e.split == n for n, e in cfg.evals.items())
  lp = {"pastis_semseg": ("Pastis_AnySat_LP_SemSeg", 5e-5, ("s2",)),
        "bradd_change": ("BraDD_AnySat_LP", 2e-4, ("s1",)),
        "sickle_semseg": ("Sickle_AnySat_LP", 5e-5, ("l8", "s2", "s1")),
        "timesen2crop_cls": ("TS2C_AnySat_LP", 2e-4, ("s2",))}
  for name, (exp, lr, modalities) in lp.items():
    for arg in ("lp", "lp_demo"):
      c = _config(name, arg)
      assert (c.experiment, c.train_mode) == (exp, "linear_probe")
      assert tuple(c.data.datasets[c.dataset].modalities) == modalities
    assert _config(name, "lp").optim.lr == lr
  assert _config("pastis_semseg").eval.monitor == "val"
  assert _config("pastis_semseg", "demo").evals.val.every_steps == 20
  assert _config("timesen2crop_cls", "lp").epochs == 200
  assert _config("planted_cls").data.datasets.planted.temporal_dropout.alos == 0.1
  assert _config("flair_semseg").head.proj_size == 10
  for name, arg in (("flair_semseg", "lp"), ("pastis_cls", "lp_demo"), ("bradd_change", "x")):
    with pytest.raises(ValueError, match="unknown variant"):
      _config(name, arg)


def test_steps_and_learning_rate_schedules():
  c = _config("pastis_semseg")                   # 200 epochs, warmup 20, batch 4
  steps = schedules.steps_for(c, num_train=1455)
  assert (steps.per_epoch, steps.total, steps.eval_every, steps.min_steps) == (
      363, 72600, 363, 50 * 363)
  c.optim.schedule = "warmup_cosine"
  lr = schedules.finetune_lr(c, steps)
  assert steps.warmup == 7260
  assert float(lr(0)) == 0.0 and np.isclose(float(lr(7260)), 5e-5)
  assert np.isclose(float(lr(3630)), 2.5e-5) and float(lr(72600)) < 1e-12
  c.total_steps = 100
  steps = schedules.steps_for(c, num_train=1455, eval_every=7)
  assert (steps.total, steps.eval_every, steps.warmup) == (100, 7, 10)

  # ReduceLROnPlateau on the epoch-mean training loss: x 0.1 once more than `patience` epochs
  # did not improve (torch's rule).
  c.optim.schedule, c.optim.plateau_patience = "plateau", 2
  steps = schedules.Steps(per_epoch=3, total=100, eval_every=3, warmup=0, min_steps=0)
  params = {"encoder": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
  tx = optim.finetune_optimizer(c, steps, {"encoder": {"w": True}, "head": {"w": True}})
  state = tx.init(params)
  update = jax.jit(lambda s: tx.update(params, s, params, value=jnp.float32(1.0))[1])
  scales = []
  for _ in range(12):                          # a constant loss never improves after epoch 1
    state = update(state)
    scales.append(float(schedules.plateau_scale(state)))
  assert scales[:11] == [1.0] * 11 and np.isclose(scales[11], 0.1), scales


# ---------------------------------------------------------------------------------------------
# Overfitting, one run per task family.


def test_finetune_multilabel_treesatai_overfits(data_dir, tmp_path):
  c = _trimmed("treesatai_ts_cls", "demo", data_dir, steps=30, lr=5e-3)
  out = _run(c, tmp_path)
  _check_overfit(tmp_path, out, "F1_Score_weighted", 1.0, 0.05)
  assert out["evals"]["train"]["F1_per_class"][0] == 1.0      # Abies
  assert not os.listdir(tmp_path / "figures")                  # multilabel: no figure


def test_finetune_semantic_segmentation_pastis_overfits(data_dir, tmp_path):
  # The generated SPOT images are drawn from the labels, so their sub-patches (10 m, the label
  # grid) separate the 20 classes within a few dozen steps; the 3-date, 40 m S2 sample alone
  # needs hundreds.
  c = _trimmed("pastis_semseg", "demo", data_dir, steps=80, lr=5e-3, split="val",
               batch_size=2, modalities=("spot",), buckets={})
  c.head.dense_modality = "spot"
  out = _run(c, tmp_path)
  _check_overfit(tmp_path, out, "mIoU", 0.9, 0.1, split="val")
  val = out["evals"]["val"]
  assert val["acc"] > 0.95 and val["IoU_per_class"][19] is None        # void dropped
  assert np.asarray(val["confusion"]).shape == (20, 20)
  assert np.asarray(val["confusion"]).sum() == 2 * 32 * 32
  panels = sorted((tmp_path / "figures").glob("val_tile*.png"))
  assert len(panels) == 2
  for p in panels:
    assert _png_size(p) == (3 * 256 + 200, 256 + 24)
  assert _png_size(tmp_path / "figures/val_confusion.png") == (800, 800)


def test_finetune_change_detection_bradd_overfits(data_dir, tmp_path):
  # 24 px crops (the label is cropped with the single s1 input): a quarter of the cost.
  c = _trimmed("bradd_change", "demo", data_dir, steps=100, lr=2e-3, crop={"s1": 24})
  out = _run(c, tmp_path)
  _check_overfit(tmp_path, out, "IoU", 0.85, 0.1)
  assert len(list((tmp_path / "figures").glob("train_tile*.png"))) == 2


def test_linear_probe_flood_segmentation_keeps_the_encoder(data_dir, tmp_path):
  # Sen1Floods11 has one shipped chip (test split); 128 px random crops of s2 (s1 left out:
  # the loader draws each modality's training crop independently). The frozen encoder is
  # random, so the head is a linear classifier of random features: a per-pixel logistic
  # regression on the raw bands itself stops at ~94 % accuracy (cross-entropy ~0.14) on this
  # chip. L-TAE widths of 64: at dim 64 the default first width of 8 leaves 2 channels per
  # GroupNorm group, and the features keep little of the spectrum.
  c = _trimmed("sen1floods11_semseg", "demo", data_dir, steps=40, lr=1e-2, split="test",
               modalities=("s2",), crop={"s2": 128})
  c.model.projectors = {"s2": {"mlp_in": (64, 64, 64, 128, 64)}}
  out = _run(c, tmp_path)
  losses = _logged(tmp_path, "train/loss")
  test = out["evals"]["test"]
  assert losses[-1] < 0.6 * losses[0] and test["loss"] < 0.45, (losses, test)
  assert test["mIoU"] > 0.65 and test["mAcc"] > 0.85, test

  _, enc_cfg = ckpt.load_encoder(c)
  task = FinetuneTask(c, enc_cfg, schedules.steps_for(c, 1))
  initial = jax.jit(lambda: task.init_state(None))().params
  final = _params(tmp_path)
  _assert_bitwise_equal(final["encoder"], initial["encoder"])
  moved = [k for k, v in _flat(final["head"]).items()
           if not np.array_equal(v, _flat(initial["head"])[k])]
  assert sorted(moved) == ["linear/bias", "linear/kernel", "norm/bias", "norm/scale"]
  # The optimiser holds the head's moments only.
  opt = ckpt.restore_raw(str(tmp_path))[1]["opt_state"]
  sizes = [np.size(x) for x in jax.tree.leaves(opt)]
  head_size = sum(np.size(x) for x in jax.tree.leaves(final["head"]))
  assert sum(sizes) < 3 * head_size + 100


def test_demo_preset_runs_from_the_command_line(data_dir, tmp_path):
  """``timesen2crop_cls.py:demo`` through ``anysat_jax.main``; its monitored evaluation
  pointed at the training split, without temporal dropout, it fits the 12 training pixels
  (multiclass)."""
  cmd = [sys.executable, "-m", "anysat_jax.main",
         "--config=configs/timesen2crop_cls.py:demo", f"--workdir={tmp_path}",
         f"--config.data.data_dir={data_dir}", "--config.evals.val.split=train",
         "--config.data.datasets.timesen2crop.temporal_dropout=0.0"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "metrics.json") as f:
    out = json.load(f)
  assert (out["experiment"], out["step"], out["monitor"]) == ("TS2C_AnySat_FT", 60, "OA")
  _check_overfit(tmp_path, out, "OA", 1.0, 0.1, split="val")
  assert {n: e["split"] for n, e in out["evals"].items()} == {"val": "train", "test": "test"}
  for name in ("val", "test"):
    assert _png_size(tmp_path / f"figures/{name}_confusion.png") == (800, 800)
  assert "val: val/F1_Score_macro=" in proc.stdout
  assert "final: step=60 loss=" in proc.stdout
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["60", "config.json"]


# ---------------------------------------------------------------------------------------------
# Initialisation from checkpoints.


def _v64_params() -> dict:
  sd = convert.read_state_dict(WEIGHTS_V64)
  return convert.state_dict_to_params(sd, convert.infer_config(sd))


def test_init_from_converted_checkpoint(data_dir, tmp_path):
  convert.main([str(WEIGHTS_V64), str(tmp_path / "v64")])
  full = _v64_params()
  for path in (tmp_path / "v64", WEIGHTS_V64):
    c = _config("planted_cls", "demo")
    c.init.kind, c.init.path = "converted", str(path)
    params, cfg = ckpt.load_encoder(c)
    assert sorted(cfg.modality_names) == sorted(c.data.datasets.planted.modalities)
    assert all(p.date_period == 366.0 for _, p in cfg.projectors)
    want = {k: v for k, v in full.items()
            if not k.startswith("projector_") or k in (
                "projector_s2", "projector_s1", "projector_l7", "projector_alos",
                "projector_modis")}
    _assert_bitwise_equal(params, want)
    assert (cfg.dim, cfg.depth, cfg.spatial_depth) == (64, 2, 2)
  c.init.path = ""
  with pytest.raises(ValueError, match="init.path"):
    ckpt.load_encoder(c)


def _pretraining_workdir(workdir: pathlib.Path, student: dict, teacher: dict) -> None:
  """A pretraining TrainState saved as ``trainer.pretrain`` saves it, student and EMA teacher
  distinct (predictor and mask token are stand-ins: fine-tuning never reads them)."""
  spec = importlib.util.spec_from_file_location("_geoplex", REPO / "configs/geoplex.py")
  geoplex = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(geoplex)
  config = geoplex.get_config("demo")
  config.checkpoint.use_async = False
  params = {"encoder": student, "predictor": {"w": jnp.zeros((3,))}, "mask_token": jnp.zeros(64)}
  opt_state = jax.jit(optim.pretrain_optimizer(config).init)(params)
  opt_state = (*opt_state[:-1], opt_state[-1]._replace(teacher=teacher))   # EMA state last
  state = TrainState(jnp.array(7, jnp.int32), params, opt_state, jax.random.key(0))
  with ckpt.checkpoint_manager(str(workdir), config) as manager:
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave({"step": 7})))


def test_init_from_pretraining_teacher_linear_probe_and_resume(data_dir, tmp_path):
  teacher = _v64_params()
  student = jax.tree.map(lambda x: x + 1.0, teacher)
  _pretraining_workdir(tmp_path / "pretrain", student, teacher)
  c = _trimmed("timesen2crop_cls", "lp_demo", data_dir, steps=40, lr=1e-1)
  c.init.kind, c.init.path = "pretrain", str(tmp_path / "pretrain")
  c.model.overrides = V64
  params, _ = ckpt.load_encoder(c)
  want = {k: v for k, v in teacher.items()
          if not k.startswith("projector_") or k == "projector_s2"}
  _assert_bitwise_equal(params, want)

  # A run stopped by SIGTERM after its first step, then resumed to the end.
  work = tmp_path / "ft"
  finetune.run(c, str(work), {"requested": True})
  assert not (work / "metrics.json").exists()
  assert ckpt.restore_raw(str(work))[0] == 1
  out = _run(c, work)
  assert out["step"] == 40
  # 12 points, 64 frozen random features: all classified right, the loss far below its
  # start (~2.3) but a linear head under a cosine schedule does not drive it to 0.
  _check_overfit(work, out, "OA", 1.0, 0.5)
  final, first = _params(work), _params(work, 1)
  _assert_bitwise_equal(final["encoder"], want)
  assert not np.array_equal(final["head"]["linear"]["kernel"], first["head"]["linear"]["kernel"])

  c.model.overrides = dict(V64, depth=1)
  with pytest.raises(convert.CheckpointError, match="combiner/block_1"):
    ckpt.load_encoder(c)
