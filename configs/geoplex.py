"""GeoPlex pretraining (JEPA + contrastive) of AnySat on five datasets.

  python -m anysat_jax.main --config=configs/geoplex.py --workdir=runs/geoplex
  python -m anysat_jax.main --config=configs/geoplex.py:demo --workdir=runs/demo
  python -m anysat_jax.recipe --config=configs/geoplex.py   # its data and mask draws, simulated

Variants:
  (default)  the paper's recipe: base model, TreeSatAI-TS, PASTIS-HD, FLAIR, PLANTED and
             S2NAIP-Urban with the official weights, per-device batch sizes, patch sizes and
             epoch mixture, AdamW lr 5e-5 and weight decay 0.05, EMA 0.996 -> 1, 200 epochs of
             2244 steps (8 devices).
             Point ``config.data.datasets.<name>.manual_dir`` at each downloaded dataset.
  demo       a tiny model on the shipped (and generated) samples: 2-core CPU, a few minutes.
"""

from __future__ import annotations

import ml_collections

from configs.common import GEOPLEX, TINY, add_run_settings, default_dataset_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.seed = 32
  c.total_steps = 200 * 2244
  c.log_every = 50
  c.nonfinite = "stop"           # or "skip": keep the previous parameters and go on
  c.profile_steps = 0            # > 0: write a profiler trace of that many steps

  c.model = ml_collections.ConfigDict()
  c.model.size = "base"
  c.model.predictor = dict(dim=768, depth=4, num_heads=16)
  # The reference's teacher runs in training mode: its L-TAE dropouts act (False: eval mode).
  c.model.teacher_dropout = True

  # ---- Precision and memory (GPU / TPU) --------------------------------------------------
  # bf16 matmuls, rematerialised blocks, L-TAE and spatial encoder in rematerialised chunks of
  # 16384 rows, so that a step at the paper's batches fits an 80 GB card (launch/README.md;
  # ``python -m anysat_jax.bench --compiled``). The demo variant replaces these overrides.
  c.model.overrides = dict(dtype="bfloat16", remat=True, chunk_tokens=16384,
                           attention_impl="dot_product_attention")
  # ----------------------------------------------------------------------------------------
  # Per-modality projector settings, e.g. {"s1": {"dropout": 0.0, "attn_dropout": 0.0}}.
  c.model.projectors = {}

  c.masking = dict(num_targets=4, target_scale=(0.2, 0.8), target_aspect=(0.75, 1.5),
                   context_scale=(0.85, 1.0), context_fraction=0.15, modality_ratio=0.5,
                   temporal_keep=0.5)
  c.loss = dict(jepa="smooth_l1", contrastive_weight=1.0, tau=0.1)
  # The learning rate x plateau_factor once more than plateau_patience evaluations of the
  # validation loss (every eval_every steps) did not improve (official: ReduceLROnPlateau on
  # val/loss, factor 0.1, patience 10 epochs).
  c.optim = dict(lr=5e-5, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, schedule="constant",
                 warmup_steps=0, plateau_factor=0.1, plateau_patience=10)
  c.ema = dict(start=0.996, end=1.0)

  add_run_settings(c, datasets=GEOPLEX, checkpoint_keep=3)
  # Every eval_every steps (one official epoch): the validation loss (drives the plateau
  # schedule) and k-NN monitors of the EMA teacher's tile features (trainers/pretrain_evals.py).
  c.eval_every = 2244
  c.evals = dict(
      val=dict(type="pretrain_loss", split="val", batch_size=8, max_batches=4),
      knn_treesatai=_knn("treesatai_ts", ("s2", "s1-asc"), patch=20),
      knn_pastis=_knn("pastis_hd_cls", ("s2", "s1"), patch=40))
  c.data.shard_by_process = True
  # Official epochs (spec A.3): weighted draws among the datasets not yet used up in the epoch;
  # an epoch is one tenth of S2NAIP-Urban in its batches. Batch sizes: the paper's per device.
  c.data.mixture = dict(kind="epoch", epoch_steps=ml_collections.config_dict.placeholder(int),
                        epoch_reference="s2naip_urban", epoch_reduce=10)
  for d in c.data.datasets.values():
    # Folder of the downloaded dataset; unset: build from the shipped / generated sample.
    d.manual_dir = ml_collections.config_dict.placeholder(str)

  if arg == "demo":
    _demo(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} (known: demo)")
  return c


def _knn(dataset: str, modalities: tuple[str, ...], patch: int, max_examples: int = 256,
         batch_size: int = 16) -> dict:
  """A k-NN monitor (k=20, cosine) of a labelled dataset's train and val examples; set its
  ``manual_dir`` to the downloaded dataset (unset: the shipped sample)."""
  d = default_dataset_config(dataset)
  d.modalities, d.patch_sizes, d.crop = modalities, (patch,), {}
  return dict(type="knn", dataset=dataset, data=d, k=20, max_examples=max_examples,
              batch_size=batch_size, manual_dir=ml_collections.config_dict.placeholder(str))


def _demo(c: ml_collections.ConfigDict) -> None:
  """Tiny model, tiny batches, one patch size per dataset: 5 compiled buckets."""
  c.total_steps = 60
  c.log_every = 10
  c.model.size = "tiny"
  c.model.overrides = dict(TINY)
  c.model.predictor = dict(dim=64, depth=1, num_heads=4)
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.0
  c.ema.start = 0.9
  c.checkpoint.every_steps = 20
  c.data.read_threads = 1
  c.data.prefetch_batches = 1
  sizes = {"treesatai_ts": (1, (20,)), "pastis_hd": (2, (80,)), "flair": (1, (20,)),
           "planted": (4, (30,)), "s2naip_urban": (2, (160,))}
  buckets = {"treesatai_ts": {"s2": 16, "s1-asc": 8}, "pastis_hd": {"s2": 4, "s1": 4},
             "flair": {}, "planted": {"s2": 8, "s1": 8, "l7": 8, "alos": 4, "modis": 8},
             "s2naip_urban": {"s2": 8, "s1": 4, "l8": 4}}
  # The samples hold a few examples each; draws are i.i.d. by weight (see docs/recipe.md).
  c.data.mixture.kind = "iid"
  for name, (batch, patches) in sizes.items():
    d = c.data.datasets[name]
    d.batch_size, d.per_device_batch = batch, None           # Global batches.
    d.patch_sizes = patches
    d.buckets = buckets[name]
  # The shipped FLAIR Sentinel-2 sample is a 32 px synthetic stand-in that does not cover the
  # aerial extent; the demo uses the real 512 px aerial patches alone.
  c.data.datasets.flair.modalities = ("aerial-flair",)
  # Evaluations at steps 30 and 60; the TreeSatAI sample has no val tile: PASTIS alone.
  c.eval_every = 30
  c.evals.val.batch_size, c.evals.val.max_batches = 2, 1
  del c.evals["knn_treesatai"]
  c.evals.knn_pastis.data.patch_sizes = (80,)
  c.evals.knn_pastis.batch_size = 4
