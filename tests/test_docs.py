"""The user documentation runs as written.

- ``README.md`` and ``docs/*.md``: the ```python blocks of each file run in order, in one
  namespace per file, from the repository root (README's released weights replaced by random
  ones). A block preceded by ``<!-- docs-test: skip (reason) -->`` is not run; one
  preceded by ``<!-- docs-test: excerpt PATH -->`` must appear verbatim in ``PATH``. The
  ```bash blocks are checked without running them: every ``python -m MODULE`` is importable and
  its ``--help`` lists the flags used, every ``--config=FILE[:ARG]`` under ``configs/`` loads
  and has the ``--config.KEY`` keys set, paths into the repository exist, other programs are on
  the PATH. Relative links between the docs point at existing files and headings.
- ``examples/feature_extraction.ipynb`` executes headlessly (nbclient) and saves valid PNGs.
- ``test_worked_example_dataset``: the worked example of ``docs/adding_a_dataset.md``
  (``input_pipeline/datasets/example_ndvi.py``) is built with ``builders.build``, read back
  through ``loader.dataset_pipeline`` and encoded.
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types

import ml_collections
import numpy as np
import pytest

from anysat_jax.core import modalities as mods
from input_pipeline.datasets import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))
README = REPO / "README.md"
NOTEBOOK = REPO / "examples" / "feature_extraction.ipynb"
NOTEBOOK_FIGURES = ("aerial_dense_pca.png", "patch_similarity.png")
REPO_DIRS = ("anysat_jax", "configs", "docs", "examples", "input_pipeline", "launch", "tests")
CELL_TIMEOUT = 900          # seconds per notebook cell: generous, the machine may be shared
MAX_SKIPPED_BLOCKS = 2      # over all docs
TINY = dict(dim=64, depth=1, num_heads=4, spatial_depth=1, spatial_heads=4)

_FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```",
                    re.M | re.S)
_MARK = re.compile(r"<!--\s*docs-test:\s*(?P<kind>skip|excerpt)\s*(?P<arg>.*?)\s*-->\s*$")


# --- Markdown parsing ---------------------------------------------------------------------------


def blocks(path: pathlib.Path, lang: str) -> list[tuple[int, str, str | None, str]]:
  """(line, code, mark kind, mark argument) of the ```lang blocks of a Markdown file."""
  text = path.read_text()
  out = []
  for m in _FENCE.finditer(text):
    if m["lang"] != lang:
      continue
    before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
    mark = _MARK.search(before)
    code = textwrap.dedent("".join(line[len(m["indent"]):] if line.startswith(m["indent"])
                                   else line for line in m["body"].splitlines(True)))
    out.append((text.count("\n", 0, m.start()) + 1, code,
                mark["kind"] if mark else None, mark["arg"] if mark else None))
  return out


def _slug(heading: str) -> str:
  """GitHub's anchor of a heading."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  text = _FENCE.sub("", path.read_text())
  return {_slug(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


# --- docs/*.md: python blocks -------------------------------------------------------------------


def test_docs_exist():
  names = {p.name for p in DOC_FILES}
  assert {"datasets.md", "training.md", "adding_a_dataset.md", "adding_a_modality.md", "api.md",
          "normalization.md"} <= names, names


def test_few_skipped_blocks():
  skipped = [(p.name, line, arg) for p in DOC_FILES for line, _, kind, arg in blocks(p, "python")
             if kind == "skip"]
  assert len(skipped) <= MAX_SKIPPED_BLOCKS, skipped
  for name, line, reason in skipped:
    assert len(reason) > 10, f"{name}:{line}: give a reason for skipping the block"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_python_blocks_run(doc: pathlib.Path, monkeypatch, tmp_path):
  """The blocks run in order in one namespace, as a reader pasting them into Python would."""
  _run_python_blocks(doc, monkeypatch, tmp_path)


def test_readme_python_blocks_run(monkeypatch, tmp_path):
  """README's blocks, with the released weights (not shipped) replaced by a random base model
  of the same architecture, restricted to the modalities the example uses."""
  import anysat_jax

  def from_pretrained(path, **overrides):
    assert path == "base" and not overrides
    return anysat_jax.AnySat("base", modalities=("aerial", "s2"), seed=0)

  monkeypatch.setattr(anysat_jax.AnySat, "from_pretrained", staticmethod(from_pretrained))
  assert blocks(README, "python")
  _run_python_blocks(README, monkeypatch, tmp_path)


def _run_python_blocks(doc: pathlib.Path, monkeypatch, tmp_path) -> None:
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # their temporary folders go here
  monkeypatch.syspath_prepend(str(REPO))
  # Docs may extend the registries for their session (adding_a_*.md): restore them afterwards.
  monkeypatch.setattr(registry, "DATASETS", registry.DATASETS)
  monkeypatch.setattr(mods, "MODALITIES", mods.MODALITIES)
  namespace: dict = {"__name__": f"docs_{doc.stem}"}
  for line, code, kind, arg in blocks(doc, "python"):
    where = f"{doc.relative_to(REPO)}:{line}"
    if kind == "skip":
      continue
    if kind == "excerpt":
      source = (REPO / arg).read_text()
      assert code in source, f"{where}: the excerpt is not (or no longer) in {arg}"
      continue
    exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the docs are ours


# --- docs/*.md: bash blocks ---------------------------------------------------------------------


def _commands(script: str) -> list[list[str]]:
  """Shell commands of a bash block: continuations joined, split on ``&&``, ``;``, ``&``, ``|``;
  leading ``VAR=value`` assignments and ``env`` dropped; ``[--optional]`` brackets removed."""
  text = re.sub(r"\\\n", " ", script)
  out = []
  for line in text.splitlines():
    line = line.split(" #", 1)[0].strip()
    if not line or line.startswith("#"):
      continue
    for part in re.split(r"\s(?:&&|;|&|\|)\s|\s&$", line):
      tokens = [t.strip("[]") for t in shlex.split(part)]
      while tokens and (re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]) or tokens[0] == "env"):
        tokens.pop(0)
      if tokens:
        out.append(tokens)
  return out


def _bash_commands() -> list[tuple[str, list[str]]]:
  return [(f"{p.name}:{line}", cmd) for p in [README, *DOC_FILES]
          for line, code, _, _ in blocks(p, "bash") for cmd in _commands(code)]


@functools.cache
def _help(module: str) -> str:
  proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                        text=True, timeout=600, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  # argparse exits 0 after --help, absl 1; a crash shows a traceback.
  assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr and proc.stdout.strip(), (
      f"python -m {module} --help failed:\n{proc.stderr[-2000:]}")
  return proc.stdout + proc.stderr


def _load_config(path: pathlib.Path, arg: str | None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"docs_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict | dict) or part not in node:
      return False
    node = node[part]
  return True


def _is_repo_path(token: str) -> bool:
  return "/" in token and token.split("/", 1)[0] in REPO_DIRS


def test_bash_blocks_reference_what_exists(monkeypatch):
  monkeypatch.syspath_prepend(str(REPO))
  commands = _bash_commands()
  assert commands
  modules = sorted({cmd[2] for _, cmd in commands if cmd[:2] == ["python", "-m"]})
  # Every module's --help once, in parallel (each imports jax or tfds).
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    for module, found in zip(modules, pool.map(
        lambda m: importlib.util.find_spec(m) is not None, modules), strict=True):
      assert found, f"python -m {module}: no such module"
    helps = dict(zip(modules, pool.map(_help, modules), strict=True))
  problems = []
  for where, cmd in commands:
    program, args = cmd[0], cmd[1:]
    if program == "python" and args[:1] == ["-c"]:
      compile(args[1], f"{where} (python -c)", "exec")
      continue
    if program == "python" and args[:1] == ["-m"]:
      module, args = args[1], args[2:]
      config = None
      if module == "input_pipeline.prepare":               # DATASET, my_dataset: placeholders
        name = next(a for a in args if not a.startswith("--"))
        if not (name.isupper() or name.startswith("my_") or name in registry.names()):
          problems.append(f"{where}: prepare: no dataset {name!r} in the registry")
      for arg in args:
        flag, _, value = arg.partition("=")
        if not flag.startswith("--"):
          path = arg.rpartition("=")[2]                        # MOD=PATH values too
          if _is_repo_path(path) and not (REPO / path).exists():
            problems.append(f"{where}: {path} does not exist")
          continue
        if _is_repo_path(value) and not (REPO / value.split(":", 1)[0]).exists():
          problems.append(f"{where}: {value} does not exist")
        if flag == "--config":
          file, _, variant = value.partition(":")
          if file.startswith("configs/"):          # ours; my_configs/ are written by the reader
            config = _load_config(REPO / file, variant)
        elif flag.startswith("--config."):
          if config is not None and not _has_key(config, flag[len("--config."):]):
            problems.append(f"{where}: {flag}: no such key in {cmd}")
        elif flag not in helps[module]:
          problems.append(f"{where}: python -m {module} has no flag {flag}")
      continue
    if program in (".", "source", "cd", "export"):             # shell builtins
      continue
    if shutil.which(program) is None and not (pathlib.Path(sys.executable).parent
                                              / program).exists():
      problems.append(f"{where}: program {program!r} not found")
  assert not problems, "\n".join(problems)


def test_links_between_docs():
  problems = []
  for doc in [README, *DOC_FILES]:
    text = _FENCE.sub("", doc.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"^[a-z]+://", target):
        continue
      file, _, anchor = target.partition("#")
      path = (doc.parent / file) if file else doc
      if not path.exists():
        problems.append(f"{doc.name}: link to missing {target}")
      elif anchor and path.suffix == ".md" and anchor not in anchors(path):
        problems.append(f"{doc.name}: no heading #{anchor} in {path.name}")
  assert not problems, "\n".join(problems)


# --- the notebook -------------------------------------------------------------------------------


def _is_png(path: pathlib.Path) -> bool:
  from PIL import Image

  if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
    return False
  with Image.open(path) as img:
    img.verify()
  with Image.open(path) as img:
    return img.format == "PNG" and min(img.size) >= 100


def test_notebook_runs_and_saves_figures(tmp_path, monkeypatch):
  import ipykernel  # noqa: F401  (the kernel the notebook runs in; a requirement)
  import nbclient
  import nbformat
  monkeypatch.setenv("ANYSAT_FIGURE_DIR", str(tmp_path / "figures"))
  monkeypatch.delenv("ANYSAT_WEIGHTS", raising=False)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.output_type == "error"]
  assert not errors, errors
  shapes = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.output_type == "stream")
  assert "dense (1, 30, 30, 128)" in shapes and "patch (1, 3, 3, 64)" in shapes, shapes
  for name in NOTEBOOK_FIGURES:
    path = tmp_path / "figures" / name
    assert path.exists(), f"{name} not saved"
    assert _is_png(path), f"{name} is not a valid PNG"
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) == len(NOTEBOOK_FIGURES)


def test_notebook_is_valid():
  nbformat = pytest.importorskip("nbformat")
  nbformat.validate(nbformat.read(NOTEBOOK, as_version=4))


# --- the worked example of docs/adding_a_dataset.md ---------------------------------------------


def test_worked_example_dataset(tmp_path, monkeypatch):
  from anysat_jax import AnySat
  from input_pipeline import builders, loader, normalization
  from input_pipeline.datasets import example_ndvi

  monkeypatch.setattr(registry, "DATASETS", types.MappingProxyType(
      {**registry.DATASETS, "example_ndvi": "input_pipeline.datasets.example_ndvi:SPEC"}))
  manual_dir, data_dir = str(tmp_path / "fields"), str(tmp_path / "tfds")
  ids = example_ndvi.write_sample(manual_dir, num=(4, 2, 2), seed=0)
  with open(os.path.join(manual_dir, "fields.csv"), newline="") as f:
    labels = {r["id"]: int(r["label"]) for r in csv.DictReader(f)}
  assert sorted(labels) == sorted(ids) and set(labels.values()) == {0, 1}

  # Build: every split, every example checked against the contract.
  spec = registry.get_spec("example_ndvi")
  report = builders.build(spec, manual_dir, data_dir)
  assert report.name == "example_ndvi" and not report.skipped
  assert report.counts == {"train": 4, "val": 2, "test": 2}
  sources = builders.data_sources("example_ndvi", data_dir)
  ex = sources["train"][0]
  assert ex["s2"].dtype == np.float32 and ex["s2"].shape[1:] == (10, 12, 12)
  assert ex["s2_dates"].dtype == np.int32 and ex["s2_dates"].shape == ex["s2"].shape[:1]
  assert ex["spot"].shape == (3, 120, 120) and int(ex["label"]) == labels[ex["name"].decode()]
  stats = normalization.compute_stats(sources["train"], ["s2", "spot"])
  normalization.write_stats(normalization.stats_file(data_dir, "example_ndvi"), stats)

  # Read back through the Grain pipeline: training and evaluation batches.
  config = ml_collections.ConfigDict(dict(data_dir=data_dir, seed=0, read_threads=1,
                                          prefetch_batches=1))
  config.datasets = {"example_ndvi": dict(
      modalities=("s2", "spot"), split="train", batch_size=2, patch_sizes=(20, 40), weight=1.0,
      buckets={"s2": 8}, crop={}, temporal_dropout=0.0, max_dates=None)}
  it = iter(loader.dataset_pipeline(config, "example_ndvi", shard_index=0, shard_count=1))
  batch = next(it)
  it.close()
  assert batch["s2"].shape == (2, 8, 10, 12, 12) and batch["s2"].dtype == np.float32
  assert batch["spot"].shape == (2, 3, 120, 120) and batch["label"].shape == (2,)
  for row, name in enumerate(batch["name"]):
    t = int(batch["s2_mask"][row].sum())
    assert 3 <= t <= 6 and not batch["s2"][row, t:].any() and not batch["s2_dates"][row, t:].any()
    assert batch["label"][row] == labels[name]
  spot_mean = ((sources["train"][0]["spot"] - stats["spot"].mean[:, None, None])
               / stats["spot"].std[:, None, None]).mean()
  assert abs(spot_mean) < 2                                   # normalised, not raw 0-255 values
  config.datasets.example_ndvi.split = "val"
  evaluation = list(loader.dataset_pipeline(config, "example_ndvi", training=False,
                                            shard_index=0, shard_count=1))
  assert len(evaluation) == 1 and evaluation[0]["example_mask"].tolist() == [1.0, 1.0]
  assert sorted(evaluation[0]["name"]) == ["field_val_000", "field_val_001"]

  # One encoder call on the batch.
  model = AnySat("tiny", modalities=("s2", "spot"), **TINY)
  features = np.asarray(model(loader.model_inputs(batch), patch_size=20, output="patch"))
  assert features.shape == (2, 6, 6, 64) and np.isfinite(features).all()
