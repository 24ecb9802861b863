"""The pretraining recipe, checked on the host with the recipe tool (no data, no model): the
official epoch mixture shares, no context/target leak, per-sample temporal keep, independent
random streams and per-process masks; the mixture's draws and the batch-size rules."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from anysat_jax.core import streams
from anysat_jax.tasks import masking
from anysat_jax.tasks import pretrain as train
from anysat_jax.tools import recipe
from configs import geoplex
from configs.common import GEOPLEX, default_dataset_config
from input_pipeline import loader, mixture

REPO = pathlib.Path(__file__).resolve().parents[1]
# Spec A.3: shares of steps with the real sizes on 8 devices.
OFFICIAL_SHARES = {"treesatai_ts": 1.6, "pastis_hd": 8.1, "flair": 8.6, "planted": 23.4,
                   "s2naip_urban": 58.3}
EPOCH = 2244                                    # Steps per epoch on 8 devices.


@pytest.fixture(scope="module")
def report() -> dict[str, list[str]]:
  """The tool's lines for configs/geoplex.py with the paper's sizes over 4 epochs, by kind."""
  lines = recipe.simulate(geoplex.get_config(), 4 * EPOCH, recipe.PAPER_SIZES, devices=8)
  out: dict[str, list[str]] = {}
  for line in lines:
    out.setdefault(line.split()[0], []).append(line)
  return out


def test_shares_match_the_official_simulation(report):
  shares = {line.split()[1]: 100 * float(line.split()[2]) for line in report["share"]}
  assert set(shares) == set(OFFICIAL_SHARES)
  for name, official in OFFICIAL_SHARES.items():
    assert abs(shares[name] - official) <= 1.5, (name, shares[name], official)
  assert report["recipe:"] == [f"recipe: {4 * EPOCH} steps simulated"]


def test_iid_mixture_is_not_the_official_one():
  """The i.i.d. option draws by raw weight (TreeSatAI-TS ~11 %): the share test can fail."""
  config = geoplex.get_config()
  config.data.mixture.kind = "iid"
  draws = mixture.sampler(config.data, recipe.PAPER_SIZES, {n: 1 for n in recipe.PAPER_SIZES})
  names = [draws.draw()[0] for _ in range(3000)]
  assert abs(names.count("treesatai_ts") / 3000 - 1 / 9) < 0.02
  assert abs(names.count("s2naip_urban") / 3000 - 4 / 9) < 0.03


def test_no_leak_and_half_of_real_dates_on_every_bucket(report):
  config = geoplex.get_config()
  buckets = {(n, p) for n, d in config.data.datasets.items() for p in d.patch_sizes}
  assert len(report["masks"]) == len(buckets) == 11
  for line in report["masks"]:
    f = line.split()
    name, patch = f[1], int(f[2][1:])
    assert (name, patch) in buckets and f[3::2] == ["ctx", "tgt", "leak", "tkeep"], line
    k_ctx, k_tgt = masking.mask_sizes(recipe.grid_side(name, config.data.datasets[name], patch),
                                      train.mask_config(config))
    assert float(f[4]) == k_ctx and 0 < float(f[6]) <= k_tgt
    assert float(f[8]) == 0.0, line
    assert abs(float(f[10]) - 0.5) <= 0.05, line


def test_grid_sides_of_the_geoplex_buckets():
  d = geoplex.get_config().data.datasets
  sides = {(n, p): recipe.grid_side(n, d[n], p) for n in d for p in d[n].patch_sizes}
  assert sides == {("treesatai_ts", 10): 6, ("treesatai_ts", 20): 3, ("pastis_hd", 40): 32,
                   ("pastis_hd", 80): 16, ("pastis_hd", 160): 8, ("flair", 10): 10,
                   ("flair", 20): 5, ("planted", 30): 4, ("s2naip_urban", 40): 16,
                   ("s2naip_urban", 80): 8, ("s2naip_urban", 160): 4}


def test_dataset_choice_and_masks_are_independent():
  """Over 2,000 steps, the dataset drawn at a step does not correlate with the first target
  block of that step's first sample; with one shared generator, as before, it did."""
  config = geoplex.get_config()
  d = config.data.datasets
  weights = {n: float(d[n].weight) for n in d}
  sizes = {n: tuple(d[n].patch_sizes) for n in d}
  cfg = train.mask_config(config)
  steps = range(2000)
  choice = np.array([mixture.choose(32, s, weights, sizes)[0] == "s2naip_urban" for s in steps])
  first = np.array([masking.block_masks(32, s, range(1), 8, cfg)["tgt_valid"][0, 0].sum()
                    for s in steps])
  assert abs(np.corrcoef(choice, first)[0, 1]) < 0.1
  # The same measure on draws from one generator per step finds the dependence.
  shared = np.array([np.random.default_rng([32, s]).random() for s in steps])
  assert abs(np.corrcoef(shared < 4 / 9, shared)[0, 1]) > 0.5
  assert streams.MIXTURE != streams.BLOCK_MASKS


def test_masks_differ_across_processes(monkeypatch):
  """With ``shard_by_process`` each process draws its own rows of the global batch: process 1's
  masks are rows 4..7 of the one-process draw, not a copy of process 0's."""
  config = geoplex.get_config("demo")
  config.data.shard_by_process = True
  local = {}
  for index in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    local[index] = train.host_masks(config, 5, 4, 8)
  assert not np.array_equal(local[0]["tgt_idx"], local[1]["tgt_idx"])
  config.data.shard_by_process = False
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  whole = train.host_masks(config, 5, 8, 8)
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([local[0][key], local[1][key]]), whole[key])


def test_command_line():
  sizes = ",".join(f"{n}={c}" for n, c in recipe.PAPER_SIZES.items())
  out = subprocess.run([sys.executable, "-m", "anysat_jax.recipe", "--config=configs/geoplex.py",
                        "--steps=50", f"--sizes={sizes}"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert [ln.split()[0] for ln in lines] == ["share"] * 5 + ["masks"] * 11 + ["recipe:"]
  assert lines[-1] == "recipe: 50 steps simulated"


def test_parse_sizes_errors():
  assert recipe.parse_sizes("a=1, b=20", ["a", "b"]) == {"a": 1, "b": 20}
  with pytest.raises(ValueError, match="'a:1' is not name=count"):
    recipe.parse_sizes("a:1", ["a"])
  with pytest.raises(ValueError, match="--sizes must give exactly the config's datasets"):
    recipe.parse_sizes("a=1", ["a", "b"])
  with pytest.raises(ValueError, match="no full global batch"):
    recipe.simulate(geoplex.get_config(), 10, {**recipe.PAPER_SIZES, "pastis_hd": 7}, devices=8)


def test_recipe_demo_config_runs():
  config = geoplex.get_config("demo")
  sizes = {n: 8 for n in config.data.datasets}
  lines = recipe.simulate(config, 40, sizes, devices=1)
  assert lines[-1] == "recipe: 40 steps simulated"
  assert any(ln.startswith("masks flair p20") and ln.endswith("tkeep -") for ln in lines)
  assert isinstance(config, ml_collections.ConfigDict)


# --- the mixture and batch sizes, host only ---------------------------------------------------


def test_mixture_follows_weights():
  weights = {n: default_dataset_config(n).weight for n in GEOPLEX}
  assert weights == {"treesatai_ts": 1, "pastis_hd": 1, "flair": 1, "planted": 2,
                     "s2naip_urban": 4}
  patches = {n: tuple(default_dataset_config(n).patch_sizes) for n in GEOPLEX}
  draws = [mixture.choose(7, s, weights, patches) for s in range(2000)]
  assert draws == [mixture.choose(7, s, dict(reversed(weights.items())), patches)
                   for s in range(2000)]
  for n, w in weights.items():
    assert abs(sum(d == n for d, _ in draws) / 2000 - w / 9) < 0.03, n
  s2naip = [p for d, p in draws if d == "s2naip_urban"]
  for p in (40, 80, 160):
    assert abs(s2naip.count(p) / len(s2naip) - 1 / 3) < 0.06
  assert draws != [mixture.choose(8, s, weights, patches) for s in range(2000)]


def _draws(sampler: mixture.Sampler, n: int) -> list[tuple[str, int]]:
  return [sampler.draw() for _ in range(n)]


def test_epoch_mixture_exhausts_each_dataset_once_per_epoch():
  """Official semantics: an epoch draws each dataset exactly its N // batch batches (here all
  used up before the 20-step cap), weighted among those left; then a new epoch begins."""
  weights = {"a": 1.0, "b": 4.0, "c": 2.0}
  patches = {"a": (10, 20), "b": (40,), "c": (30,)}
  per_epoch = {"a": 3, "b": 5, "c": 4}
  sampler = mixture.Sampler(5, weights, patches, epoch_batches=per_epoch, epoch_steps=20)
  draws = _draws(sampler, 36)
  for e in range(3):
    epoch = [d for d, _ in draws[12 * e:12 * (e + 1)]]
    assert {n: epoch.count(n) for n in weights} == per_epoch
  assert sampler.epoch == 2 and sampler.remaining == {"a": 0, "b": 0, "c": 0}
  # Heavier datasets come first on average: b is used up before a in most epochs.
  capped = mixture.Sampler(5, weights, patches, epoch_batches=per_epoch, epoch_steps=6)
  firsts = _draws(capped, 600)
  assert capped.epoch == 99
  counts = {n: sum(d == n for d, _ in firsts) for n in weights}
  assert counts["b"] > counts["c"] > counts["a"] and counts["b"] <= 500
  assert {p for d, p in firsts if d == "a"} == {10, 20}
  # Deterministic, and its state restores mid-epoch.
  again = mixture.Sampler(5, weights, patches, epoch_batches=per_epoch, epoch_steps=20)
  first = _draws(again, 17)
  state = json.loads(json.dumps(again.get_state()))
  resumed = mixture.Sampler(5, weights, patches, epoch_batches=per_epoch, epoch_steps=20)
  resumed.set_state(state)
  assert first + _draws(resumed, 19) == draws
  with pytest.raises(ValueError, match="b: the split holds no full global batch"):
    mixture.Sampler(5, weights, patches, epoch_batches={"a": 1, "b": 0, "c": 1})


def test_epoch_length_follows_the_reference_dataset():
  sizes, batches = {"s2naip_urban": 359046, "planted": 1075701}, {"s2naip_urban": 16,
                                                                    "planted": 2048}
  mcfg = {"epoch_reference": "s2naip_urban", "epoch_reduce": 10}
  assert mixture.epoch_length(mcfg, sizes, batches) == 2244
  assert mixture.epoch_length({**mcfg, "epoch_steps": 7}, sizes, batches) == 7
  assert mixture.epoch_length({}, sizes, batches) is None
  with pytest.raises(ValueError, match="'flair' is not among"):
    mixture.epoch_length({"epoch_reference": "flair"}, sizes, batches)


def test_global_batch_size_per_device_and_errors():
  d = default_dataset_config("planted")
  assert loader.global_batch_size("planted", d, shard_count=2, num_devices=8) == 2048
  with pytest.raises(ValueError, match="planted: per_device_batch=256 needs the number"):
    loader.global_batch_size("planted", d, shard_count=1)
  d.batch_size = 100
  with pytest.raises(ValueError, match="planted: set exactly one of batch_size"):
    loader.global_batch_size("planted", d, shard_count=1, num_devices=8)
  d.per_device_batch = None
  with pytest.raises(ValueError, match="planted: global batch size 100 does not divide over "
                     "the 8 devices"):
    loader.global_batch_size("planted", d, shard_count=1, num_devices=8)
  assert loader.global_batch_size("planted", d, shard_count=4, num_devices=4) == 100
  with pytest.raises(ValueError, match="planted: global batch size 100 is not divisible by the "
                     "3 processes"):
    loader.global_batch_size("planted", d, shard_count=3)
