"""The pretraining recipe, checked on the host with the recipe tool (no data, no model): the
official epoch mixture shares, no context/target leak, per-sample temporal keep, independent
random streams and per-process masks."""

from __future__ import annotations

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
from input_pipeline import mixture

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
