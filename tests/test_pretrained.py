"""Released weights by name, end to end without a network: a tiny checkpoint in the official
``.pth`` format sits in a local Hugging Face hub cache (the layout ``hf_hub_download`` fills),
``HF_HUB_OFFLINE=1``; ``AnySat.from_pretrained("base")`` converts it once, caches the converted
copy with checksums and loads it."""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
import pytest

from anysat_jax.checkpoints import convert
from anysat_jax.inference import pretrained
from anysat_jax.inference.api import AnySat
from anysat_jax.io.torch_pickle.writer import save_pth

TINY = dict(dim=64, depth=1, num_heads=4, spatial_depth=1, spatial_heads=4)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def source():
  """(a tiny model, its state dict in the official layout)."""
  model = AnySat("tiny", seed=3, modalities=("aerial", "s2"), **TINY)
  return model, convert.params_to_state_dict(model.params, model.config)


def _hub_cache(root, sd, tamper=False):
  """A hub cache holding models/AnySat.pth of g-astruc/AnySat at revision main."""
  repo = root / "models--g-astruc--AnySat"
  (repo / "blobs").mkdir(parents=True)
  tmp = root / "AnySat.pth"
  save_pth(tmp, {"state_dict": sd, "epoch": 7})
  digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
  if tamper:
    data = bytearray(tmp.read_bytes())
    data[-100] ^= 1
    tmp.write_bytes(bytes(data))
  os.replace(tmp, repo / "blobs" / digest)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(COMMIT)
  snap = repo / "snapshots" / COMMIT / "models"
  snap.mkdir(parents=True)
  (snap / "AnySat.pth").symlink_to(os.path.join("..", "..", "..", "blobs", digest))
  return digest


@pytest.fixture
def env(tmp_path, monkeypatch):
  monkeypatch.setenv("ANYSAT_JAX_CACHE", str(tmp_path / "anysat"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return tmp_path


def _same(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def test_by_name_converts_once_caches_and_checks(source, env, monkeypatch, caplog):
  model, sd = source
  digest = _hub_cache(env / "hub", sd)
  got = AnySat.from_pretrained("base")
  assert got.config == model.config and _same(got.params, model.params)
  folder = env / "anysat" / "base"
  manifest = json.loads((folder / pretrained.MANIFEST).read_text())
  assert manifest["source_sha256"] == digest and "config.json" in manifest["files"]
  assert manifest["url"] == "https://huggingface.co/g-astruc/AnySat/resolve/main/models/AnySat.pth"

  # Second load: the converted copy, no conversion.
  def no_conversion(*a, **k):
    raise AssertionError("converted again")
  monkeypatch.setattr(convert, "read_state_dict", no_conversion)
  assert _same(AnySat.from_pretrained("base").params, model.params)

  # The head-axis release: same file, the converter's override.
  monkeypatch.undo()
  monkeypatch.setenv("ANYSAT_JAX_CACHE", str(env / "anysat"))
  monkeypatch.setenv("HF_HUB_CACHE", str(env / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  head = AnySat.from_pretrained("base-head-axis")
  assert head.config.combiner_attention == "head_axis" and _same(head.params, model.params)

  # A damaged converted copy fails its checksums and is rebuilt from the source.
  with open(folder / "config.json", "a") as f:
    f.write(" ")
  again = AnySat.from_pretrained("base")
  assert "does not match its checksums; converting again" in caplog.text
  assert _same(again.params, model.params) and pretrained._valid(str(folder))


def test_download_checksum_mismatch_is_refused(source, env):
  _hub_cache(env / "hub", source[1], tamper=True)
  with pytest.raises(ValueError, match=r"SHA-256 [0-9a-f]{64} differs from the hub's"):
    AnySat.from_pretrained("base")
  assert not (env / "anysat" / "base").exists()


def test_offline_without_the_file_says_where_to_put_it(source, env):
  manual = env / "anysat" / "downloads" / "AnySat.pth"
  with pytest.raises(FileNotFoundError, match=(
      rf"cannot get https://huggingface.co/g-astruc/AnySat/resolve/main/models/AnySat.pth "
      rf"\(offline mode, HF_HUB_OFFLINE is set\)\. Download that file on a machine with network "
      rf"access and put it at {manual}")):
    AnySat.from_pretrained("base")
  # Put there by hand, it is used.
  manual.parent.mkdir(parents=True)
  save_pth(manual, {"state_dict": source[1]})
  assert _same(AnySat.from_pretrained("base").params, source[0].params)


def test_unknown_name_and_paths(source, tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint not found: large"):
    AnySat.from_pretrained("large")
  with pytest.raises(ValueError, match="unknown release 'large'; known: base, base-head-axis"):
    pretrained.resolve("large")
