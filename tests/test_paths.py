"""Config paths resolved inside the installed ``configs`` package (``core.paths``)."""

import os

from anysat_jax.core import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configs_dir_is_the_package_beside_anysat_jax():
  assert paths.configs_dir() == os.path.join(REPO, "configs")


def test_resolve_outside_a_checkout(tmp_path):
  want = os.path.join(REPO, "configs", "geoplex.py")
  assert paths.resolve_config_path("configs/geoplex.py:demo", str(tmp_path)) == want + ":demo"
  assert paths.resolve_config_path("configs/geoplex.py", str(tmp_path)) == want
  assert paths.resolve_config_path("./configs/../configs/pastis_semseg.py:lp",
                                   str(tmp_path)) == os.path.join(REPO, "configs",
                                                                  "pastis_semseg.py:lp")


def test_existing_unknown_and_absolute_paths_are_kept(tmp_path):
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "geoplex.py").write_text("def get_config(): ...\n")
  # A file of the working directory wins over the package's.
  assert paths.resolve_config_path("configs/geoplex.py:demo", str(tmp_path)) == \
      "configs/geoplex.py:demo"
  # Not in the package, or not under configs/: left for the loader to report as given.
  for spec in ("configs/nope.py:demo", "my/geoplex.py", "geoplex.py", "/abs/configs/x.py", ""):
    assert paths.resolve_config_path(spec, str(tmp_path / "elsewhere")) == spec


def test_resolve_argv(tmp_path):
  want = os.path.join(REPO, "configs", "geoplex.py")
  argv = ["main", "--config=configs/geoplex.py:demo", "--config.seed=3", "--workdir", "w"]
  assert paths.resolve_config_argv(argv, cwd=str(tmp_path)) == [
      "main", f"--config={want}:demo", "--config.seed=3", "--workdir", "w"]
  argv = ["main", "--config", "configs/geoplex.py", "--", "--config=configs/geoplex.py"]
  assert paths.resolve_config_argv(argv, cwd=str(tmp_path)) == [
      "main", "--config", want, "--", "--config=configs/geoplex.py"]
