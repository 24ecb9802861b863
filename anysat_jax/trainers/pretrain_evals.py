"""The pretraining loop's periodic evaluations (``config.evals``, every ``config.eval_every``
steps): the validation loss that drives the plateau schedule, and k-NN monitors of the EMA
teacher's features.

  config.evals = {
      "val": dict(type="pretrain_loss", split="val", batch_size=8, max_batches=4),
      "knn_pastis": dict(type="knn", dataset="pastis_hd_cls", data=<dataset config>, k=20,
                         batch_size=16, max_examples=256, manual_dir=None),
  }

``pretrain_loss`` (``evaluators.pretrain_loss``): the JEPA + contrastive loss per dataset of
``config.data.datasets`` on fixed val batches and masks, student and teacher in evaluation
mode; its ``val/loss`` feeds ``optim.plateau_update``. ``knn`` (``evaluators.knn``): the
teacher's tile features of a labelled dataset's train and val samples, val classified by k-NN
(cosine); metrics are fractions in [0, 1].
"""

from __future__ import annotations

import time

import jax
import ml_collections

from anysat_jax.evaluators import knn, pretrain_loss
from anysat_jax.models import xla_options
from anysat_jax.tasks import optim
from anysat_jax.tasks import pretrain as train
from anysat_jax.tasks.state import TrainState
from anysat_jax.trainers.loop import quiet_libraries
from input_pipeline import prepare

TYPES = ("pretrain_loss", "knn")


class PretrainEvals:
  """The evaluations of ``config.evals``, their data read once (host) at construction."""

  def __init__(self, config: ml_collections.ConfigDict, task: train.PretrainTask):
    self.config, self.task = config, task
    self.val_sets: list[pretrain_loss.ValSet] = []
    self.monitors: list[tuple[str, int, knn.MonitorSet]] = []
    with quiet_libraries():
      self._read(config)
    self._loss = jax.jit(task.val_loss, static_argnames=("patch_size",),
                         compiler_options=xla_options.forward(task.enc_cfg.dtype))
    self._embed = jax.jit(
        lambda teacher, inputs, patch_size: task.teacher.apply(
            {"params": teacher}, inputs, patch_size),
        static_argnames=("patch_size",), compiler_options=xla_options.forward(task.enc_cfg.dtype))

  def _read(self, config: ml_collections.ConfigDict) -> None:
    for name, spec in sorted(config.get("evals", {}).items()):
      if spec.type not in TYPES:
        raise ValueError(f"evals.{name}.type={spec.type!r}: pretraining knows {TYPES}")
      if spec.type == "pretrain_loss":
        self.val_sets += pretrain_loss.val_sets(
            config.data, train.mask_config(config), seed=int(config.seed),
            split=spec.get("split", "val"), batch_size=int(spec.get("batch_size", 8)),
            max_batches=int(spec.get("max_batches", 4)))
      else:
        dcfg = spec.data
        prepare.ensure_prepared(spec.dataset, config.data.data_dir,
                                modalities=tuple(dcfg.modalities),
                                manual_dir=spec.get("manual_dir"))
        self.monitors.append((name, int(spec.get("k", 20)), knn.monitor_set(
            config.data.data_dir, spec.dataset, dcfg, batch_size=int(spec.get("batch_size", 16)),
            max_examples=int(spec.get("max_examples", 256)))))

  def __bool__(self) -> bool:
    return bool(self.val_sets or self.monitors)

  def due(self, step: int) -> bool:
    every = self.config.get("eval_every")
    return bool(self) and bool(every) and (step % every == 0 or step == self.config.total_steps)

  def run(self, state: TrainState) -> dict[str, float]:
    """``val/...`` and ``knn/<name>/...`` metrics of ``state`` (floats; ``eval/seconds``)."""
    t0 = time.time()
    teacher = optim.teacher_params(state.opt_state)
    out: dict[str, float] = {}
    if self.val_sets:
      out.update(pretrain_loss.evaluate(self._loss, (state.params, teacher), self.val_sets))
    for name, k, m in self.monitors:
      embed = lambda inputs, p=m.patch_size: self._embed(teacher, inputs, patch_size=p)
      res = knn.evaluate(embed, m.train, m.val, kind=m.kind, num_classes=m.num_classes, k=k)
      out.update({f"knn/{name}/{key}": v for key, v in res.items()})
    out["eval/seconds"] = time.time() - t0
    return out

  def plateau(self, state: TrainState, metrics: dict[str, float]) -> TrainState:
    """``state`` with the plateau schedule fed ``val/loss`` (unchanged without it)."""
    if "val/loss" not in metrics:
      return state
    o = self.config.optim
    return state.replace(opt_state=optim.plateau_update(
        state.opt_state, metrics["val/loss"], o.plateau_factor, o.plateau_patience))


def console_line(step: int, metrics: dict[str, float]) -> str:
  """``eval <step>: val/loss=... val/<ds>=... knn/<name> accuracy=... f1_weighted=... (N s)``."""
  parts = []
  if "val/loss" in metrics:
    parts.append(f"val/loss={metrics['val/loss']:.4f}")
    parts += [f"{k[:-len('/loss')]}={v:.4f}" for k, v in sorted(metrics.items())
              if k.startswith("val/") and k.endswith("/loss") and k != "val/loss"]
  for key in sorted(k for k in metrics if k.startswith("knn/") and k.endswith("/accuracy")):
    name = key[:-len("/accuracy")]
    parts.append(f"{name} accuracy={metrics[key]:.3f} "
                 f"f1_weighted={metrics[name + '/f1_weighted']:.3f}")
  return f"eval {step}: " + " ".join(parts) + f" ({metrics['eval/seconds']:.1f} s)"
