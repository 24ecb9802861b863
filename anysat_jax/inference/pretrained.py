"""Released weights by name: downloaded once from the Hugging Face hub, converted torch-free,
cached as a converted checkpoint.

``resolve("base")`` returns a converted checkpoint directory (``checkpoints.convert.save``):
``<cache>/<name>``, with ``<cache>`` = ``$ANYSAT_JAX_CACHE``, else
``$XDG_CACHE_HOME/anysat_jax``, else ``~/.cache/anysat_jax``. The official ``.pth`` comes
through ``huggingface_hub`` (its cache, ``$HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` reads only
that cache), or from ``<cache>/downloads/<file>`` when placed there by hand. Checksums: the
download's SHA-256 must equal the hub's (the name of the cached blob), and the converted copy's
files must equal the SHA-256 sums recorded when it was written, else it is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import huggingface_hub

from anysat_jax.checkpoints import convert

log = logging.getLogger(__name__)

MANIFEST = "anysat_source.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = ("1", "on", "true", "yes")


@dataclasses.dataclass(frozen=True)
class Release:
  """One released checkpoint: the hub file and the converter's overrides."""

  repo_id: str
  filename: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  revision: str | None = None

  @property
  def url(self) -> str:
    return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision or 'main'}/" \
           f"{self.filename}"


RELEASES: dict[str, Release] = {
    "base": Release("g-astruc/AnySat", "models/AnySat.pth"),
    "base-head-axis": Release("g-astruc/AnySat", "models/AnySat.pth",
                              {"combiner_attention": "head_axis"}),
}


class WeightsUnavailableError(FileNotFoundError):
  """The released file is neither cached nor downloadable; the message says where to put it."""


def cache_dir() -> str:
  """Where converted releases live (see the module docstring)."""
  if os.environ.get("ANYSAT_JAX_CACHE"):
    return os.environ["ANYSAT_JAX_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "anysat_jax")


def manual_path(release: Release) -> str:
  """Where a hand-downloaded copy of the release's file is looked for."""
  return os.path.join(cache_dir(), "downloads", os.path.basename(release.filename))


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _files(folder: str) -> dict[str, str]:
  """{relative path: SHA-256} of every file under ``folder`` except the manifest."""
  out = {}
  for root, _, names in os.walk(folder):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), folder)
      if rel != MANIFEST:
        out[rel] = sha256(os.path.join(root, n))
  return out


def _download(release: Release) -> str:
  """The release's file: hand-placed, else from the hub (or its cache), SHA-256 checked."""
  manual = manual_path(release)
  if os.path.isfile(manual):
    log.warning("using %s (placed by hand; SHA-256 %s, not checked against the hub)", manual,
                sha256(manual))
    return manual
  offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
  try:
    path = huggingface_hub.hf_hub_download(
        release.repo_id, release.filename, revision=release.revision,
        cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline)
  except Exception as e:  # offline, no network, hub errors: all end in the same advice
    raise WeightsUnavailableError(
        f"cannot get {release.url} ({'offline mode, HF_HUB_OFFLINE is set' if offline else e})."
        f" Download that file on a machine with network access and put it at {manual} (or "
        "pass its path: AnySat.from_pretrained('/path/to/AnySat.pth'))") from None
  blob = os.path.basename(os.path.realpath(path))
  if _SHA256.fullmatch(blob):               # the hub names LFS blobs by their SHA-256
    got = sha256(path)
    if got != blob:
      raise ValueError(f"{path}: SHA-256 {got} differs from the hub's {blob}; the download is "
                       "damaged: delete it and try again")
  else:
    log.warning("%s: no SHA-256 from the hub to check against", path)
  return path


def _valid(folder: str) -> bool:
  try:
    with open(os.path.join(folder, MANIFEST)) as f:
      manifest = json.load(f)
    return manifest["files"] == _files(folder)
  except (OSError, ValueError, KeyError, TypeError):
    return False


def resolve(name: str) -> str:
  """The converted checkpoint directory of a release name (downloaded and converted once)."""
  if name not in RELEASES:
    raise ValueError(f"unknown release {name!r}; known: {', '.join(RELEASES)}")
  release = RELEASES[name]
  out = os.path.join(cache_dir(), name)
  if _valid(out):
    return out
  if os.path.exists(out):
    log.warning("%s: the converted copy does not match its checksums; converting again", out)
  src = _download(release)
  log.info("converting %s (%s) to %s", release.url, src, out)
  sd = convert.read_state_dict(src)
  config = convert.infer_config(sd, **release.overrides)
  params = convert.state_dict_to_params(sd, config)
  os.makedirs(cache_dir(), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir())
  try:
    convert.save(params, config, tmp)
    manifest = {"release": name, "url": release.url, "source_sha256": sha256(src),
                "files": _files(tmp)}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out
