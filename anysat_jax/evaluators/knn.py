"""k-NN representation-quality monitor: how well frozen features separate a labelled dataset.

Every ``eval_every`` pretraining steps the loop embeds fixed train and val samples of a
labelled dataset (e.g. TreeSatAI-TS, PASTIS classification) with the EMA teacher and classifies
each val example by its k nearest train examples. The monitor is pure numpy on the host: the
only model call is the embedding function the loop passes in.

The rule (stated because k-NN variants differ):

- similarity: cosine, <u, v> / (|u| |v|), with |.| floored at 1e-12 (a zero feature is at
  similarity 0 from everything);
- neighbours: the k = min(``k``, N_train) train examples of highest similarity (ties: the lower
  train index first);
- vote: majority. Multi-class: the class most frequent among the k neighbours, ties broken by the
  larger summed similarity, then by the lower class index. Multi-label (TreeSatAI-TS, PASTIS
  classification, whose prepared labels are multi-hot without fractions, so no dominant label
  exists): each class is predicted present iff at least half of the k neighbours have it.

Metrics (``evaluate``): ``accuracy`` (multi-class: top-1; multi-label: exact match of the label
set), ``f1_weighted`` (per-class F1 weighted by the val support of the class, as scikit-learn's
``average="weighted"``; classes absent from the val labels get weight 0) and, for multi-label,
``f1_micro``.

Use from a training loop::

  sets = [knn.monitor_set(config.data.data_dir, name, default_dataset_config(name),
                          max_examples=256, batch_size=16)
          for name in ("treesatai_ts", "pastis_hd_cls")]   # prepared first (ensure_prepared)
  ...
  if step % eval_every == 0:
    def embed(inputs):  # (B, E): the EMA teacher's tile features (class token, output="tile").
      return jitted_encoder(teacher_params, inputs, patch_size=s.patch_size)
    for s in sets:
      for key, value in knn.evaluate(embed, s.train, s.val, kind=s.kind).items():
        log(f"knn/{s.name}/{key}", value)

``monitor_set`` reads the batches once (no JAX); the batches keep one shape, so ``embed``
compiles once per dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from input_pipeline import loader
from input_pipeline.datasets import registry

EmbedFn = Callable[[dict[str, Any]], Any]
KINDS = ("multiclass", "multilabel")


def cosine_neighbours(train: np.ndarray, query: np.ndarray,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices (M, k') and cosine similarities (M, k') of the k' = min(k, N) most similar train
  rows of each query row, most similar first (ties: lower index first).

  train: (N, E), query: (M, E) features of any float dtype; computed in float64.
  """
  def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

  if train.ndim != 2 or query.ndim != 2 or train.shape[1] != query.shape[1]:
    raise ValueError(f"features must be (N, E) and (M, E), got {train.shape} and {query.shape}")
  if len(train) == 0 or k < 1:
    raise ValueError(f"need at least one train example and k >= 1 (N={len(train)}, k={k})")
  sim = unit(query) @ unit(train).T
  k = min(k, len(train))
  idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  return idx, np.take_along_axis(sim, idx, axis=1)


def predict(train_feats: np.ndarray, train_labels: np.ndarray, query: np.ndarray, *, kind: str,
            num_classes: int, k: int = 20) -> np.ndarray:
  """k-NN predictions of the query rows (rule: module doc).

  train_labels: multiclass int (N,) in [0, num_classes); multilabel {0, 1} (N, num_classes).
  Returns multiclass int64 (M,); multilabel int64 (M, num_classes) in {0, 1}.
  """
  idx, sim = cosine_neighbours(train_feats, query, k)
  if kind == "multiclass":
    labels = np.asarray(train_labels).astype(np.int64)
    votes = labels[idx]                                            # (M, k)
    counts = np.zeros((len(query), num_classes))
    sims = np.zeros((len(query), num_classes))
    rows = np.arange(len(query))[:, None]
    np.add.at(counts, (rows, votes), 1.0)
    np.add.at(sims, (rows, votes), sim)
    best = counts == counts.max(axis=1, keepdims=True)
    return np.argmax(np.where(best, sims, -np.inf), axis=1)        # First max: lower class.
  if kind == "multilabel":
    labels = np.asarray(train_labels, np.float64)
    share = labels[idx].mean(axis=1)                               # (M, C) fraction of votes.
    return (share >= 0.5).astype(np.int64)
  raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def f1_per_class(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-class F1 (0 where a class has no true and no predicted positive) and support, both
  (C,), of multi-hot {0, 1} (M, C) truths and predictions."""
  true, pred = np.asarray(true, bool), np.asarray(pred, bool)
  tp = (true & pred).sum(0)
  denom = true.sum(0) + pred.sum(0)
  return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0), true.sum(0)


def scores(true: np.ndarray, pred: np.ndarray, *, kind: str,
           num_classes: int) -> dict[str, float]:
  """``accuracy``, ``f1_weighted`` (and multilabel ``f1_micro``) of predictions (module doc)."""
  true, pred = np.asarray(true), np.asarray(pred)
  if kind == "multiclass":
    eye = np.eye(num_classes, dtype=bool)
    acc = float(np.mean(true == pred))
    true, pred = eye[true.astype(np.int64)], eye[pred.astype(np.int64)]
  else:
    acc = float(np.mean(np.all(true.astype(bool) == pred.astype(bool), axis=1)))
  f1, support = f1_per_class(true, pred)
  out = {"accuracy": acc,
         "f1_weighted": float((f1 * support).sum() / max(support.sum(), 1))}
  if kind == "multilabel":
    t, p = true.astype(bool), pred.astype(bool)
    out["f1_micro"] = float(2.0 * (t & p).sum() / max(t.sum() + p.sum(), 1))
  return out


def embed_batches(embed: EmbedFn, batches: Iterable[Mapping[str, Any]]
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Features (N, E) float32 and labels of the real rows (``example_mask`` 1) of ``batches``."""
  feats, labels = [], []
  for batch in batches:
    keep = np.asarray(batch.get("example_mask", np.ones(len(batch["label"]))), bool)
    f = np.asarray(embed(loader.model_inputs(batch)), np.float32)
    if f.ndim != 2 or len(f) != len(keep):
      raise ValueError(f"embed returned shape {f.shape}, expected ({len(keep)}, E)")
    if not np.isfinite(f[keep]).all():
      raise ValueError("embed returned NaN or inf features")
    feats.append(f[keep])
    labels.append(np.asarray(batch["label"])[keep])
  if not feats:
    raise ValueError("no batches to embed")
  return np.concatenate(feats), np.concatenate(labels)


def evaluate(embed: EmbedFn, train: Iterable[Mapping[str, Any]],
             val: Iterable[Mapping[str, Any]], *, kind: str, num_classes: int | None = None,
             k: int = 20) -> dict[str, float]:
  """k-NN metrics of ``embed``'s features: val batches classified by the train batches.

  embed: model inputs of a batch (``loader.model_inputs``) → (B, E) features.
  train, val: batches with ``label`` (and ``example_mask`` from evaluation pipelines).
  kind: "multiclass" or "multilabel"; num_classes: default the label width (multilabel) or
    1 + the largest label seen (multiclass).
  Returns ``accuracy``, ``f1_weighted`` (multilabel also ``f1_micro``), ``k`` (the k used),
  ``n_train``, ``n_val``.
  """
  x_train, y_train = embed_batches(embed, train)
  x_val, y_val = embed_batches(embed, val)
  if num_classes is None:
    num_classes = (y_train.shape[1] if kind == "multilabel"
                   else int(max(y_train.max(), y_val.max())) + 1)
  pred = predict(x_train, y_train, x_val, kind=kind, num_classes=num_classes, k=k)
  out = scores(y_val, pred, kind=kind, num_classes=num_classes)
  out.update(k=float(min(k, len(x_train))), n_train=float(len(x_train)),
             n_val=float(len(x_val)))
  return out


@dataclasses.dataclass(frozen=True)
class MonitorSet:
  """Fixed train and val batches of one labelled dataset for ``evaluate``."""

  name: str
  kind: str
  num_classes: int
  patch_size: int                 # Metres, for the embedding.
  train: list[dict[str, Any]]
  val: list[dict[str, Any]]


def _split_batches(data_dir: str, name: str, dcfg: ml_collections.ConfigDict, split: str,
                   batch_size: int, max_examples: int) -> list[dict[str, Any]]:
  """Evaluation batches (centred crops, evenly spaced dates) of the first ``max_examples``
  examples of ``split``; rows past them have ``example_mask`` 0."""
  d = ml_collections.ConfigDict(dcfg.to_dict())
  d.split, d.batch_size, d.per_device_batch = split, batch_size, None
  config = ml_collections.ConfigDict(dict(data_dir=data_dir, seed=0, read_threads=2,
                                          prefetch_batches=1, datasets={name: d}))
  batches, seen = [], 0
  for batch in loader.dataset_pipeline(config, name, shard_index=0, shard_count=1,
                                       training=False):
    mask = batch["example_mask"] * (seen + np.arange(batch_size) < max_examples)
    batches.append({**batch, "example_mask": mask.astype(np.float32)})
    seen += int(batch["example_mask"].sum())
    if seen >= max_examples:
      break
  return batches


def monitor_set(data_dir: str, name: str, dcfg: ml_collections.ConfigDict, *,
                batch_size: int = 16, max_examples: int = 512, patch_size: int | None = None,
                splits: Sequence[str] = ("train", "val")) -> MonitorSet:
  """The monitor's batches of the prepared dataset ``name`` (registry name, e.g.
  ``treesatai_ts``, ``pastis_hd_cls``) under ``data_dir``, read once through the input
  pipeline (host only, no JAX).

  dcfg: its dataset config (e.g. ``configs.common.default_dataset_config(name)``); its split
    and batch size are replaced. batch_size: rows per batch (one shape for every batch).
  max_examples: per split, the first ones in the prepared order.
  patch_size: metres; default the first of ``dcfg.patch_sizes``.
  splits: (train split, val split).
  """
  label = registry.get_spec(name).label
  if label.kind not in KINDS:
    raise ValueError(f"{name}: the k-NN monitor needs class labels, not {label.kind!r}")
  train, val = (_split_batches(data_dir, name, dcfg, s, batch_size, max_examples)
                for s in splits)
  patch = int(patch_size if patch_size is not None else dcfg.patch_sizes[0])
  return MonitorSet(name, label.kind, label.num_classes, patch, train, val)

