"""``anysat_jax/tools/reference_timing.py``, the official model's timing script, against a fake
official checkout: a small ``hubconf.py`` whose model checks what it is given (input names,
shapes, dtypes, patch size, output, model size, train/eval mode, grad mode, threads) and logs
each call and backward pass, with a minimal fake ``torch`` when this Python has none. Also
``bench --reference``'s options and ``reference_compare.run_reference`` on the script's output."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from anysat_jax.tools import reference_compare, reference_timing

SCRIPT = pathlib.Path(reference_timing.__file__)
NEEDS_FAKE_TORCH = importlib.util.find_spec("torch") is None

# Just enough of torch for reference_timing and the fake hubconf: shapes and dtypes without
# data, grad mode, and a graph that backward() walks to the leaves' hooks.
FAKE_TORCH = '''
__version__ = "0.0-fake"
float32, int64 = "float32", "int64"
_grad, _threads = [True], [1]

def is_grad_enabled():
  return _grad[-1]

class no_grad:
  def __enter__(self):
    _grad.append(False)
  def __exit__(self, *exc):
    _grad.pop()

def set_num_threads(n):
  _threads[0] = n

def get_num_threads():
  return _threads[0]

def manual_seed(seed):
  pass

class Generator:
  def manual_seed(self, seed):
    self.seed = seed
    return self

class Tensor:
  def __init__(self, shape, dtype=float32, requires_grad=False, parents=()):
    self.shape, self.dtype, self.parents = tuple(shape), dtype, parents
    self.requires_grad = requires_grad
    self.grad, self.hooks = None, []
  def _op(self, shape, *others):
    parents = (self, *others)
    return Tensor(shape, self.dtype, is_grad_enabled() and any(p.requires_grad for p in parents),
                  parents)
  def __mul__(self, other):
    return self._op(other.shape if len(other.shape) > len(self.shape) else self.shape, other)
  def __pow__(self, power):
    return self._op(self.shape)
  def mean(self):
    return self._op(())
  def sort(self, dim=-1):
    class Sorted:
      values, indices = Tensor(self.shape, self.dtype), Tensor(self.shape, int64)
    return Sorted
  def register_hook(self, hook):
    self.hooks.append(hook)
  def backward(self):
    if not self.requires_grad or self.shape != ():
      raise RuntimeError("backward of a tensor that does not require grad or is not a scalar")
    todo = [self]
    while todo:
      t = todo.pop()
      if t.requires_grad and not t.parents:
        t.grad = Tensor(t.shape)
        for hook in t.hooks:
          hook(t.grad)
      todo.extend(t.parents)

def _shape(size):
  return tuple(size[0]) if len(size) == 1 and isinstance(size[0], tuple) else tuple(size)

def randn(*size, generator=None, dtype=float32):
  assert isinstance(generator, Generator)
  return Tensor(_shape(size), dtype)

def randint(low, high, size, generator=None):
  assert isinstance(generator, Generator) and (low, high) == (0, 365)
  return Tensor(size, int64)

def ones(*size, requires_grad=False):
  return Tensor(_shape(size), float32, requires_grad)
'''

# A stand-in for the official hubconf.py (works with the fake torch and with real torch).
FAKE_HUBCONF = '''
import json, os, time
import torch

DIMS = {"tiny": 256, "small": 512, "base": 768}
AERIAL = int(os.environ.get("FAKE_ANYSAT_AERIAL", "300"))

def _log(**record):
  with open(os.environ["FAKE_ANYSAT_LOG"], "a") as f:
    f.write(json.dumps(dict(pid=os.getpid(), **record)) + "\\n")

class AnySat:
  def __init__(self, model_size="base", flash_attn=True):
    assert model_size in DIMS and flash_attn is False, (model_size, flash_attn)
    self.size, self.training = model_size, True
    self.weight = torch.ones((), requires_grad=True)
    self.weight.register_hook(lambda grad: _log(event="backward"))
    _log(event="init", size=model_size, threads=torch.get_num_threads())

  def train(self, mode=True):
    self.training = mode
    return self

  def eval(self):
    return self.train(False)

  def zero_grad(self, set_to_none=True):
    self.weight.grad = None

  def __call__(self, x, patch_size, output="patch"):
    b = 8
    expected = {"aerial": (b, 4, AERIAL, AERIAL), "s1-asc": (b, 10, 2, 6, 6),
                "s1-asc_dates": (b, 10), "s2": (b, 10, 10, 6, 6), "s2_dates": (b, 10)}
    shapes = {k: tuple(v.shape) for k, v in x.items()}
    assert shapes == expected, f"inputs {shapes} != {expected}"
    for k, v in x.items():
      want = torch.int64 if k.endswith("_dates") else torch.float32
      assert v.dtype == want, f"{k}: dtype {v.dtype}, not {want}"
    assert (patch_size, output) == (20, "tile"), (patch_size, output)
    _log(event="call", training=self.training, grad=torch.is_grad_enabled())
    time.sleep(0.002)
    return self.weight * torch.ones((b, DIMS[self.size]))
'''


@pytest.fixture
def official(tmp_path, monkeypatch):
  """A fake official checkout; the scripts' children see the fake torch through PYTHONPATH."""
  ref = tmp_path / "official"
  ref.mkdir()
  (ref / "hubconf.py").write_text(FAKE_HUBCONF)
  if NEEDS_FAKE_TORCH:
    (tmp_path / "fake_torch").mkdir()
    (tmp_path / "fake_torch" / "torch.py").write_text(FAKE_TORCH)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake_torch"))
  else:
    monkeypatch.delenv("PYTHONPATH", raising=False)
  monkeypatch.setenv("FAKE_ANYSAT_LOG", str(tmp_path / "calls.jsonl"))
  monkeypatch.delenv("FAKE_ANYSAT_AERIAL", raising=False)
  return ref


def _script(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        timeout=60)


def _log(ref: pathlib.Path) -> list[dict]:
  path = ref.parent / "calls.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_scenarios_reach_the_model_in_their_modes_one_process_each(official, tmp_path):
  out = tmp_path / "ref.json"
  p = _script("--only", "treesat_tiny_train_fwd_bwd", "--only", "treesat_base_eval",
              "--runs", "3", "--warmup", "1", "--threads", "3", "--ref", str(official),
              "--out", str(out))
  assert p.returncode == 0, p.stdout + p.stderr
  results = json.loads(out.read_text())["results"]
  assert set(results) == set(reference_timing.SCENARIOS)
  for r in results.values():
    assert r["median_s"] > 0.001 and r["peak_rss_mib"] > 0 and len(r["times_s"]) == 3
    assert r["threads"] == 3
  log = _log(official)
  pids = {r["pid"] for r in log}
  assert len(pids) == 2                                    # a child process per scenario
  by_pid = {pid: [r for r in log if r["pid"] == pid] for pid in pids}
  seen = {}
  for records in by_pid.values():
    init, calls = records[0], [r for r in records if r["event"] == "call"]
    backwards = [r for r in records if r["event"] == "backward"]
    assert init["event"] == "init" and init["threads"] == 3 and len(calls) == 4
    seen[init["size"]] = (calls, backwards)
  tiny_calls, tiny_backwards = seen["tiny"]                # train mode, with grad, backward
  assert all(c["training"] and c["grad"] for c in tiny_calls) and len(tiny_backwards) == 4
  base_calls, base_backwards = seen["base"]                # eval mode, no_grad, no backward
  assert not any(c["training"] or c["grad"] for c in base_calls) and base_backwards == []


def test_a_failing_scenario_is_an_error_in_the_json_and_the_exit_status(official, tmp_path,
                                                                       monkeypatch):
  monkeypatch.setenv("FAKE_ANYSAT_AERIAL", "256")          # the model now expects other shapes
  out = tmp_path / "ref.json"
  p = _script("--only", "treesat_base_eval", "--runs", "1", "--ref", str(official),
              "--out", str(out))
  assert p.returncode == 1
  error = json.loads(out.read_text())["results"]["treesat_base_eval"]["error"]
  assert "AssertionError" in error and "(8, 4, 256, 256)" in error
  with pytest.raises(RuntimeError, match="AssertionError"):
    reference_compare.run_reference(sys.executable, str(SCRIPT), str(official),
                                    "treesat_base_eval", 1)


def test_missing_hubconf_is_a_clear_error(official, tmp_path):
  p = _script("--ref", str(tmp_path), "--runs", "1", "--out", str(tmp_path / "x.json"))
  assert p.returncode == 2 and "hubconf.py" in p.stderr and "gastruc/AnySat" in p.stderr
  assert not (tmp_path / "x.json").exists() and _log(official) == []


def test_reference_compare_runs_and_parses_the_script(official):
  r = reference_compare.run_reference(sys.executable, reference_compare.SCRIPT, str(official),
                                      "treesat_tiny_train_fwd_bwd", 2)
  assert r["s"] > 0.001 and r["rss"] > 0
  assert sum(x["event"] == "call" for x in _log(official)) == 3


def _parse(*argv: str) -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  reference_compare.add_options(parser)
  args = parser.parse_args(argv)
  reference_compare.check_options(parser, args)
  return args


def test_bench_reference_options(official, capsys):
  args = _parse("--reference", "--torch_python", sys.executable, "--reference_dir", str(official))
  assert args.reference_script == reference_compare.SCRIPT == str(SCRIPT)
  for argv, named in ((["--torch_python", sys.executable], "--reference_dir"),
                      (["--reference_dir", str(official)], "--torch_python"),
                      (["--torch_python", sys.executable, "--reference_dir", str(official.parent)],
                       "hubconf.py")):
    with pytest.raises(SystemExit):
      _parse("--reference", *argv)
    assert named in capsys.readouterr().err
  assert not _parse().reference                            # without --reference: no checks


def test_script_imports_only_the_standard_library_and_torch_in_functions():
  tree = ast.parse(SCRIPT.read_text())
  top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
  top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
  assert top <= set(sys.stdlib_module_names) | {"__future__"}, top
  everywhere = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
  everywhere |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
  assert everywhere - top == {"torch"}
