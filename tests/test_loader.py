"""The Grain input pipeline end to end on the shipped / generated samples: normalisation,
bucketing, static shapes, the GeoPlex mixture, checkpointing, bad data and sharding."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import pathlib

import grain
import h5py
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tifffile

from configs.common import GEOPLEX, default_dataset_config
from input_pipeline import builders, loader, mixture, naming, normalization, prepare, transforms
from input_pipeline.dataset_spec import DataError
from input_pipeline.datasets import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO / "input_pipeline" / "samples"
TSAI = "Abies_alba_1_1005_WEFL_NLF"
# Small batches: the samples hold 1-12 training examples.
BATCH = {"treesatai_ts": 4, "pastis_hd": 2, "flair": 2, "planted": 2, "s2naip_urban": 2,
         "timesen2crop": 4}


def _doy(yyyymmdd: int | str) -> int:
  return datetime.datetime.strptime(str(yyyymmdd), "%Y%m%d").timetuple().tm_yday


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """Every dataset of BATCH prepared once (samples, generated where none ships) with stats."""
  d = str(tmp_path_factory.mktemp("tfds"))
  for name in BATCH:
    prepare.ensure_prepared(name, d)
  return d


def _config(data_dir: str, names=tuple(BATCH), **overrides) -> ml_collections.ConfigDict:
  """Global batches of BATCH; i.i.d. mixture (the TreeSatAI sample holds no full batch of 4)."""
  cfg = ml_collections.ConfigDict(dict(data_dir=data_dir, seed=3, skip_bad=False,
                                       read_threads=2, prefetch_batches=1,
                                       mixture=dict(kind="iid")))
  cfg.datasets = ml_collections.ConfigDict()
  for n in names:
    cfg.datasets[n] = default_dataset_config(n)
    cfg.datasets[n].batch_size, cfg.datasets[n].per_device_batch = BATCH[n], None
  cfg.update(overrides)
  return cfg


@contextlib.contextmanager
def _iterate(ds: grain.IterDataset):
  it = iter(ds)
  try:
    yield it
  finally:
    it.close()


def _batches(cfg, name, n, **kwargs) -> list[dict]:
  with _iterate(loader.dataset_pipeline(cfg, name, shard_index=0, shard_count=1,
                                        **kwargs)) as it:
    return [b for _, b in zip(range(n), it, strict=False)]


def _signature(batch: dict) -> dict:
  return {k: (v.shape, v.dtype) for k, v in batch.items()}


def test_ensure_prepared_is_idempotent(data_dir):
  info = os.path.join(data_dir, "planted", naming.VERSION, "dataset_info.json")
  before = os.stat(info).st_mtime_ns
  assert prepare.ensure_prepared("planted", data_dir) == "planted"
  assert os.stat(info).st_mtime_ns == before
  stats = normalization.read_stats(normalization.stats_file(data_dir, "planted"))
  assert set(stats) == {"s2", "s1", "l7", "alos", "modis"}
  assert os.path.isdir(os.path.join(data_dir, "raw", "planted"))


def test_package_stats_and_precedence(data_dir):
  shipped = normalization.package_stats()
  assert set(shipped) >= set(BATCH) | {"sen1floods11", "bradd_s1ts", "sickle"}
  tsai = shipped["treesatai_ts"]
  assert {m: s.source for m, s in tsai.items()} == {
      "aerial": normalization.OFFICIAL, "s2": normalization.OFFICIAL,
      "s1": normalization.OFFICIAL, "s1-asc": normalization.SHIPPED}
  assert tsai["s2"].mean[0] == np.float32(4304.32958984375)
  assert shipped["planted"]["s2"].source == normalization.GENERATED
  path = normalization.stats_file(data_dir, "treesatai_ts")
  # Official constants win over the prepared data's own statistics; otherwise the file is used.
  assert normalization.load_stats("treesatai_ts", "s2", path).source == normalization.OFFICIAL
  s1 = normalization.load_stats("treesatai_ts", "s1-asc", path)
  assert s1.source.startswith("computed on split 'train'")


def test_compute_stats_official_rule():
  rng = np.random.default_rng(0)
  exs = [{"s2": rng.normal(size=(t, 2, 3, 3)).astype(np.float32)} for t in (2, 5)]
  exs[1]["s2_valid"] = np.ones((5, 2, 3, 3), np.uint8)
  exs[1]["s2_valid"][0] = 0  # Date 0 excluded.
  got = normalization.compute_stats(exs, ["s2"])["s2"]
  per = [exs[0]["s2"], exs[1]["s2"][1:]]
  want_mean = np.mean([x.transpose(1, 0, 2, 3).reshape(2, -1).mean(1) for x in per], 0)
  want_std = np.mean([x.transpose(1, 0, 2, 3).reshape(2, -1).std(1, ddof=1) for x in per], 0)
  np.testing.assert_allclose(got.mean, want_mean, rtol=1e-5)
  np.testing.assert_allclose(got.std, want_std, rtol=1e-5)


def test_treesatai_values_end_to_end(data_dir):
  """Evaluation batch of the real tile: normalised values, centre crop, dates, date masks."""
  cfg = _config(data_dir, ["treesatai_ts"])
  (batch,) = _batches(cfg, "treesatai_ts", 1, training=False)
  assert list(batch["name"]) == [TSAI] * 4 and list(batch["example_mask"]) == [1, 0, 0, 0]
  stats = json.load(open(normalization.PACKAGE_FILE))["treesatai_ts"]
  with h5py.File(SAMPLES / "TreeSatAI-TS" / "sentinel" / f"{TSAI}.h5") as f:
    s2_raw = f["sen-2-data"][()]
    s2_dates = [_doy(p.decode().split("_")[2][:8]) for p in f["sen-2-products"][()]]
  t, c, y, x = 37, 4, 2, 5
  want = (s2_raw[t, c, y, x] - np.float32(stats["s2"]["mean"][c])) / np.float32(
      stats["s2"]["std"][c])
  np.testing.assert_allclose(batch["s2"][0, t, c, y, x], want, rtol=1e-6)
  assert batch["s2"].shape == (4, 160, 10, 6, 6) and len(s2_dates) == 146
  np.testing.assert_array_equal(batch["s2_dates"][0], s2_dates + [0] * 14)
  np.testing.assert_array_equal(batch["s2_mask"][0], [1] * 146 + [0] * 14)
  assert not batch["s2"][0, 146:].any()
  # s1-asc: statistics computed on the sample (the file next to the prepared data).
  s1_stats = normalization.read_stats(normalization.stats_file(data_dir, "treesatai_ts"))
  s1_raw = np.load(SAMPLES / "TreeSatAI-TS" / "s1-asc" / f"{TSAI}.npy")[:, :2]
  want = (s1_raw[59] - s1_stats["s1-asc"].mean[:, None, None]) / s1_stats["s1-asc"].std[
      :, None, None]
  np.testing.assert_allclose(batch["s1-asc"][0, 59], want, rtol=1e-5)
  np.testing.assert_array_equal(batch["s1-asc_mask"][0], [1] * 60 + [0] * 4)
  # Aerial: the demo's deterministic crop [2:302] at evaluation.
  tif = np.moveaxis(tifffile.imread(SAMPLES / "TreeSatAI-TS" / "aerial" / f"{TSAI}.tif"), -1, 0)
  mean = np.float32(stats["aerial"]["mean"])[:, None, None]
  std = np.float32(stats["aerial"]["std"])[:, None, None]
  np.testing.assert_allclose(batch["aerial"][0], (tif[:, 2:302, 2:302] - mean) / std, rtol=1e-6)


def test_training_crop_and_bucket_subsampling(data_dir):
  """A random 300 px aerial window; s2 longer than its bucket → sorted random subset."""
  cfg = _config(data_dir, ["treesatai_ts"])
  cfg.datasets.treesatai_ts.buckets.s2 = 50
  (batch,) = _batches(cfg, "treesatai_ts", 1)
  (full,) = _batches(cfg, "treesatai_ts", 1, training=False)
  assert batch["aerial"].shape == (4, 4, 300, 300)
  with h5py.File(SAMPLES / "TreeSatAI-TS" / "sentinel" / f"{TSAI}.h5") as f:
    dates = np.array([_doy(p.decode().split("_")[2][:8]) for p in f["sen-2-products"][()]])
  np.testing.assert_array_equal(full["s2_dates"][0], dates[(np.arange(50) * 146) // 50])
  assert "example_mask" not in batch
  for i in range(4):
    d = batch["s2_dates"][i]
    assert batch["s2_mask"][i].all() and np.all(np.diff(d) > 0) and set(d) <= set(dates)
  assert len({tuple(d) for d in batch["s2_dates"]}) > 1  # Different subsets per example.


def test_pastis_padding_dates_and_labels(data_dir):
  cfg = _config(data_dir, ["pastis_hd"])
  batches = _batches(cfg, "pastis_hd", 3, training=False)
  meta = {str(f["properties"]["ID_PATCH"]): f["properties"]
          for f in json.load(open(SAMPLES / "PASTIS" / "metadata.geojson"))["features"]}
  for batch in batches:
    for i, name in enumerate(batch["name"]):
      want = [_doy(d) for d in meta[name]["dates-S2"].values()]
      np.testing.assert_array_equal(batch["s2_dates"][i], want + [0] * 17)
      np.testing.assert_array_equal(batch["s2_mask"][i], [1, 1, 1] + [0] * 17)
      target = np.load(SAMPLES / "PASTIS" / "ANNOTATIONS" / f"TARGET_{name}.npy")[0]
      np.testing.assert_array_equal(batch["label"][i], target)
      raw = np.load(SAMPLES / "PASTIS" / "DATA_S2" / f"S2_{name}.npy")
      st = normalization.read_stats(normalization.stats_file(data_dir, "pastis_hd"))["s2"]
      np.testing.assert_allclose(batch["s2"][i, 2, 7], (raw[2, 7] - st.mean[7]) / st.std[7],
                                 rtol=1e-5)
  assert batches[0]["spot"].shape == (2, 3, 320, 320)


@pytest.mark.parametrize("name", list(BATCH))
def test_static_shapes_over_two_epochs(data_dir, name):
  cfg = _config(data_dir, [name])
  n = len(builders.data_sources(name, data_dir)["train"])
  steps = 2 * math.ceil(n / BATCH[name]) + 1
  batches = _batches(cfg, name, steps)
  assert len(batches) == steps
  assert all(_signature(b) == _signature(batches[0]) for b in batches)
  for m, t_b in cfg.datasets[name].buckets.items():
    assert batches[0][m].shape[1] == t_b and batches[0][m + "_mask"].dtype == np.float32
  # Every epoch of the (shuffled, repeated) stream is a permutation of the examples.
  names = np.concatenate([b["name"] for b in batches])[: 2 * n]
  assert sorted(names[:n]) == sorted(names[n:]) == sorted(set(names))


def test_mixture_shapes_per_dataset_and_patch_size(data_dir):
  cfg = _config(data_dir, GEOPLEX)
  signatures: dict[tuple[str, int], list] = {}
  it = mixture.mixture(cfg, shard_index=0, shard_count=1)
  try:
    for _ in range(30):
      name, patch, batch = next(it)
      assert patch in cfg.datasets[name].patch_sizes
      signatures.setdefault((name, patch), []).append(_signature(batch))
  finally:
    it.close()
  assert len(signatures) >= 5
  assert all(s == sigs[0] for sigs in signatures.values() for s in sigs)


def _assert_same(a, b):
  assert a[:2] == b[:2] and a[2].keys() == b[2].keys()
  for k in a[2]:
    np.testing.assert_array_equal(a[2][k], b[2][k], err_msg=k)


@pytest.mark.parametrize("kind", ["iid", "epoch"])
def test_restore_continues_exactly(data_dir, tmp_path, kind):
  names = ["pastis_hd", "planted", "timesen2crop"] + (["treesatai_ts"] if kind == "iid" else [])
  # Epoch mode: epochs of 4 steps, so the 16 steps cross epoch boundaries before and after the
  # checkpoint.
  cfg = _config(data_dir, names, mixture=dict(kind=kind, epoch_steps=4))
  it = mixture.mixture(cfg, shard_index=0, shard_count=1)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
  mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(9)]
  assert it.epoch == (0 if kind == "iid" else 3)
  it.close()
  for restore in ("set_state", "orbax"):
    it2 = mixture.mixture(cfg, shard_index=0, shard_count=1)
    if restore == "set_state":
      it2.set_state(state)
    else:
      mngr.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    assert it2.step == 7
    for want in expected:
      _assert_same(next(it2), want)
    it2.close()
  mngr.close()


def _corrupting(data_dir, monkeypatch, bad: dict[int, callable]):
  """Makes ``builders.data_sources`` return timesen2crop's train split with examples replaced."""
  real = builders.data_sources

  class Corrupted:
    def __init__(self, source):
      self._source = source

    def __len__(self):
      return len(self._source)

    def __getitem__(self, i):
      ex = dict(self._source[i])
      return bad[i](ex) if i in bad else ex

  monkeypatch.setattr(loader.builders, "data_sources",
                      lambda name, d: {"train": Corrupted(real(name, d)["train"])})
  return [real("timesen2crop", data_dir)["train"][i]["name"].decode() for i in sorted(bad)]


def _nan(ex):
  ex["s2"] = ex["s2"].copy()
  ex["s2"][1, 3] = np.nan
  return ex


def _late(ex):
  ex["s2_dates"] = ex["s2_dates"] + 400
  return ex


def _no_s2(ex):
  return {k: v for k, v in ex.items() if not k.startswith("s2")}


def _big(ex):
  ex["s2"] = np.zeros(ex["s2"].shape[:2] + (2, 2), np.float32)
  return ex


def test_bad_data_raises_naming_the_example(data_dir, monkeypatch):
  (bad_name,) = _corrupting(data_dir, monkeypatch, {5: _nan})
  cfg = _config(data_dir, ["timesen2crop"])
  with pytest.raises(DataError, match=rf"timesen2crop: s2: contains NaN.*'{bad_name}'"):
    _batches(cfg, "timesen2crop", 4, training=False)


def test_skip_bad_counts(data_dir, monkeypatch):
  bad_names = _corrupting(data_dir, monkeypatch, {3: _late, 6: _no_s2, 9: _big, 10: _nan})
  cfg = _config(data_dir, ["timesen2crop"], skip_bad=True)
  with _iterate(loader.dataset_pipeline(cfg, "timesen2crop", training=False, shard_index=0,
                                        shard_count=1)) as it:
    batches = list(it)
    assert loader.skipped(it) == 4 and it.get_state()["skipped"] == 4
  names = [n for b in batches for n, keep in zip(b["name"], b["example_mask"], strict=True)
           if keep]
  assert len(names) == 8 and not set(names) & set(bad_names)
  it = mixture.mixture(cfg, shard_index=0, shard_count=1)
  for _ in range(6):
    next(it)
  assert it.skipped["timesen2crop"] >= 4
  it.close()


def test_shards_are_disjoint(data_dir):
  cfg = _config(data_dir, ["timesen2crop", "planted"])
  seen, steps = [], []
  for index in (0, 1):
    with _iterate(loader.dataset_pipeline(cfg, "timesen2crop", training=False,
                                          shard_index=index, shard_count=2)) as it:
      batches = list(it)
    assert all(b["s2"].shape[0] == 2 for b in batches)
    seen.append({n for b in batches for n, k in zip(b["name"], b["example_mask"], strict=True)
                 if k})
    it = mixture.mixture(cfg, shard_index=index, shard_count=2)
    steps.append([next(it)[:2] for _ in range(8)])
    it.close()
  all_names = {ex["name"].decode()
               for ex in builders.data_sources("timesen2crop", data_dir)["train"]}
  assert not seen[0] & seen[1] and seen[0] | seen[1] == all_names
  assert steps[0] == steps[1]  # Same (dataset, patch size) at every step on every process.
  with pytest.raises(ValueError, match="pastis_hd: global batch size 2 is not divisible"):
    loader.dataset_pipeline(_config(data_dir, ["pastis_hd"]), "pastis_hd", shard_index=0,
                            shard_count=3)


def test_flair_label_cropped_with_aerial(data_dir):
  name = prepare.ensure_prepared("flair", data_dir, modalities=("aerial-flair",))
  cfg = _config(data_dir, ["flair"])
  cfg.datasets.flair.modalities = ("aerial-flair",)
  cfg.datasets.flair.buckets = {}
  (batch,) = _batches(cfg, "flair", 1)
  raw = builders.data_sources(name, data_dir)["train"][0]
  st = normalization.load_stats("flair", "aerial-flair", normalization.stats_file(data_dir, name))
  assert st.source.startswith("computed on split 'train' of flair_aerial_flair")
  full = transforms.normalize(raw["aerial-flair"], st.mean, st.std)
  assert batch["aerial-flair"].shape == (2, 5, 500, 500) and batch["label"].shape == (2, 500, 500)
  for i in range(2):
    top, left = next((a, b) for a in range(13) for b in range(13)
                     if np.array_equal(full[:, a:a + 500, b:b + 500], batch["aerial-flair"][i]))
    np.testing.assert_array_equal(batch["label"][i], raw["label"][top:top + 500, left:left + 500])


def test_transforms():
  rng = np.random.default_rng(0)
  ex = {"s1": np.arange(10 * 2 * 4 * 4, dtype=np.float32).reshape(10, 2, 4, 4),
        "s1_dates": np.arange(1, 11, dtype=np.int32),
        "label": np.arange(16).reshape(4, 4)}
  out = transforms.temporal_dropout(ex, "s1", rng, p=0.3)
  assert out["s1_dates"].shape == (7,) and np.all(np.diff(out["s1_dates"]) > 0)
  np.testing.assert_array_equal(out["s1"][:, 0, 0, 0], (out["s1_dates"] - 1) * 32)
  assert transforms.temporal_dropout(ex, "s1", rng, max_dates=4)["s1"].shape[0] == 4
  assert transforms.temporal_dropout(ex, "s1", rng, p=0.99)["s1"].shape[0] == 1
  cropped = transforms.crop(ex, "s1", 2, None)
  np.testing.assert_array_equal(cropped["label"], [[5, 6], [9, 10]])
  np.testing.assert_array_equal(cropped["s1"], ex["s1"][..., 1:3, 1:3])
  padded = transforms.to_bucket(ex, "s1", 12, None)
  np.testing.assert_array_equal(padded["s1_mask"], [1] * 10 + [0, 0])
  np.testing.assert_array_equal(padded["s1_dates"][10:], [0, 0])
  np.testing.assert_array_equal(transforms.to_bucket(ex, "s1", 4, None)["s1_dates"], [1, 3, 6, 8])
  even = transforms.choose_dates(146, 145, None)
  assert len(even) == 145 and np.all(np.diff(even) > 0) and even[-1] <= 145


def test_default_configs():
  for name in registry.names():
    c = default_dataset_config(name)
    batch = c.per_device_batch if name in GEOPLEX else c.batch_size
    assert batch > 0 and c.patch_sizes and c.split == "train"
  assert [default_dataset_config(n).per_device_batch for n in GEOPLEX] == [128, 1, 32, 256, 2]
  assert default_dataset_config("pastis_hd").max_dates == 20
  assert dict(default_dataset_config("treesatai_ts").crop) == {"aerial": 300}
  with pytest.raises(ValueError, match="no default"):
    default_dataset_config("nope")
