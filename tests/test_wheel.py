"""The wheel: built from the sources, installed into a fresh venv outside the checkout, it holds
the shipped samples, the normalisation statistics, the configs and the licence, and its
commands run.

The venv reuses this environment's dependencies through a ``.pth`` line naming this
interpreter's site-packages; ``.pth`` files inside that directory (such as an editable install's
finder pointing at a checkout) are not run from a plain path line, which the test checks by
importing the packages from the venv and finding them inside it.
"""

from __future__ import annotations

import filecmp
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import venv

import numpy as np
import pytest

from anysat_jax.inference import embed_cli
from anysat_jax.tools.parity import rel_l2

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = pathlib.Path("input_pipeline", "samples")
TIF = SAMPLES / "TreeSatAI-TS" / "aerial" / "Abies_alba_1_1005_WEFL_NLF.tif"
SOURCES = ("anysat_jax", "input_pipeline", "configs", "pyproject.toml", "README.md", "LICENSE")


def _run(cmd, cwd, env=None, timeout=180):
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
  return proc


def _data_files(root: pathlib.Path) -> set[str]:
  return {p.relative_to(root).as_posix() for p in root.rglob("*")
          if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(venv python, its site-packages, an environment without this checkout on any path)."""
  tmp = tmp_path_factory.mktemp("wheel")
  # Build from a clean copy: an in-tree build would leave build/ and *.egg-info in the checkout
  # and reuse stale files from an earlier build/.
  src = tmp / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
  for name in SOURCES:
    (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(
        REPO / name, src / name, **({"ignore": ignore} if (REPO / name).is_dir() else {}))
  dist = tmp / "dist"
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "--no-index", "-w", str(dist), str(src)], cwd=tmp)
  (wheel,) = dist.glob("anysat_jax-*.whl")

  env_dir = tmp / "venv"
  venv.EnvBuilder(with_pip=False).create(env_dir)
  python = env_dir / "bin" / "python"
  site = pathlib.Path(_run([str(python), "-c", "import sysconfig; "
                            "print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip())
  (site / "_parent_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  # --ignore-installed: an editable install of this checkout in the running environment would
  # otherwise count as installed and the wheel would be skipped.
  _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
        "--ignore-installed", "--no-index", str(wheel)], cwd=tmp)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  work = tmp / "elsewhere"
  work.mkdir()
  return python, site, env, work


def test_wheel_holds_samples_statistics_and_configs(installed):
  _, site, _, _ = installed
  want = _data_files(REPO / SAMPLES)
  assert want and _data_files(site / SAMPLES) == want
  for rel in [*(SAMPLES / f for f in want), pathlib.Path("input_pipeline", "normalization.json")]:
    assert filecmp.cmp(REPO / rel, site / rel, shallow=False), rel
  configs = {p.name for p in (REPO / "configs").glob("*.py")}
  assert {"__init__.py", "common.py", "geoplex.py"} <= configs
  assert {p.name for p in (site / "configs").glob("*.py")} == configs
  (info,) = site.glob("anysat_jax-*.dist-info")
  assert filecmp.cmp(REPO / "LICENSE", info / "licenses" / "LICENSE", shallow=False)
  metadata = (info / "METADATA").read_text().splitlines()
  assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata


def test_installed_package_imports_and_resolves_configs(installed):
  """Imported from the venv (not the checkout), with ``configs/...`` found in the package."""
  python, site, env, work = installed
  script = """if True:
    import importlib.util, json
    import anysat_jax, configs, input_pipeline
    from anysat_jax.core import paths
    from input_pipeline import normalization
    path, _, arg = paths.resolve_config_path("configs/geoplex.py:demo").partition(":")
    spec = importlib.util.spec_from_file_location("geoplex_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    print(json.dumps({"files": [m.__file__ for m in (anysat_jax, configs, input_pipeline)],
                      "config": path, "arg": arg, "stats": normalization.PACKAGE_FILE,
                      "datasets": sorted(config.data.datasets)}))
  """
  out = json.loads(_run([str(python), "-c", script], cwd=work, env=env).stdout.splitlines()[-1])
  for f in [*out["files"], out["config"], out["stats"]]:
    assert pathlib.Path(f).resolve().is_relative_to(site.resolve()), f
  assert out["config"].endswith(os.path.join("configs", "geoplex.py")) and out["arg"] == "demo"
  assert "treesatai_ts" in out["datasets"]


def test_embed_from_the_installed_package(installed, tmp_path):
  """``python -m anysat_jax.embed`` on a shipped sample from the installed package gives the
  features of the checkout's code on the checkout's file."""
  python, site, env, work = installed
  args = ["--crop", "aerial=100", "--patch_size", "20", "--size", "tiny", "--seed", "0",
          "--stats", "treesatai_ts"]
  out = tmp_path / "installed.npz"
  proc = _run([str(python), "-m", "anysat_jax.embed", "--input", f"aerial={site / TIF}", *args,
               "--out", str(out)], cwd=work, env=env)
  assert "wrote 1 tile vectors" in proc.stderr
  ref = tmp_path / "checkout.npz"
  assert embed_cli.main(["--input", f"aerial={REPO / TIF}", *args, "--out", str(ref)]) == 0
  got, want = np.load(out), np.load(ref)
  assert got["feature"].shape == want["feature"].shape == (1, 256)
  assert np.isfinite(got["feature"]).all() and got["feature"].std() > 0
  assert rel_l2(got["feature"], want["feature"]) < 1e-6
  meta = json.loads(str(got["meta"]))
  assert meta["normalization"] == json.loads(str(want["meta"]))["normalization"]
