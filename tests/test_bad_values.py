"""Bad values in the input pipeline are refused before any compute, with an error naming the
file (and dataset, modality, example): normalisation statistics, non-real arrays from a reader,
labels out of range, NaN label fractions. Host only, no dataset build."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil

import ml_collections
import numpy as np
import pytest

from input_pipeline import normalization, processing
from input_pipeline.dataset_spec import DataError, LabelSpec, check_example
from input_pipeline.datasets import pastis_hd, planted, registry, treesatai_ts
from input_pipeline.samples import generate

REPO = pathlib.Path(__file__).resolve().parents[1]
PASTIS = REPO / "input_pipeline" / "samples" / "PASTIS"


# ---------------------------------------------------------------------------------------------
# Normalisation statistics.

GOOD = {"mean": [1.0, 2.0], "std": [3.0, 4.0], "source": "test"}


@pytest.mark.parametrize("field, value, match", [
    ("std", [3.0, 0.0], r"std must be > 0"),
    ("std", [3.0, -1.0], r"std must be > 0"),
    ("std", [3.0, float("nan")], r"std has non-finite"),
    ("mean", [float("inf"), 0.0], r"mean has non-finite"),
    ("std", [3.0, "4"], r"std must be a non-empty list of numbers"),
    ("std", [3.0], r"mean has 2 channels, std 1"),
    ("std", None, r"missing field\(s\) \['std'\]"),
])
def test_bad_statistics_file(tmp_path, field, value, match):
  """Each bad statistics file is refused when read, naming the file and the modality."""
  entry = dict(GOOD)
  if value is None:
    del entry[field]
  else:
    entry[field] = value
  path = tmp_path / normalization.STATS_FILE
  path.write_text(json.dumps({"s2": entry}))  # json writes NaN / Infinity literals.
  with pytest.raises(ValueError, match=match) as e:
    normalization.read_stats(str(path))
  assert f"{path}: s2:" in str(e.value)
  with pytest.raises(ValueError, match=match):   # Also through the loader's entry point.
    normalization.load_stats("planted", "s2", str(path))
  path.write_text(json.dumps({"s2": GOOD}))
  st = normalization.read_stats(str(path))["s2"]
  np.testing.assert_array_equal(st.std, np.float32([3, 4]))


def test_statistics_of_another_channel_count(tmp_path):
  """Statistics with fewer channels than the data stop the pipeline's construction."""
  path = tmp_path / normalization.STATS_FILE
  path.write_text(json.dumps({"s2": GOOD}))
  dcfg = ml_collections.ConfigDict(dict(modalities=("s2",), buckets={"s2": 4}, crop={}))
  first = {"s2": np.zeros((3, 10, 8, 8), np.float32), "s2_dates": np.arange(3, dtype=np.int32),
           "label": np.int32(0), "name": "x"}
  with pytest.raises(ValueError, match=r"planted/s2: normalisation statistics .* have 2 "
                                       r"channels, the data 10"):
    processing.build_processor("planted", dcfg, first, str(path))


# ---------------------------------------------------------------------------------------------
# Arrays that are not real numbers.


@pytest.fixture()
def pastis(tmp_path) -> tuple[pathlib.Path, str]:
  """A writable copy of the PASTIS sample and the id of its first training patch."""
  root = tmp_path / "PASTIS"
  shutil.copytree(PASTIS, root)
  pid, _ = next(pastis_hd.read(str(root), "train", modalities=("s2",)))
  return root, pid


@pytest.mark.parametrize("kind", ["complex", "str"])
def test_reader_refuses_non_real_arrays(pastis, kind):
  """A complex (imaginary part dropped by a cast) or string (parsed by a cast) array."""
  root, pid = pastis
  path = root / "DATA_S2" / f"S2_{pid}.npy"
  x = np.load(path)
  np.save(path, x + 1j if kind == "complex" else x.astype(str))
  with pytest.raises(DataError, match=r"dtype .*, expected real numbers") as e:
    dict(pastis_hd.read(str(root), "train", modalities=("s2",)))
  assert str(path) in str(e.value) and repr(pid) in str(e.value)


def test_npz_reader_refuses_complex_arrays(tmp_path):
  """PLANTED's .npz arrays: a complex S2 series names its file."""
  generate.generate("planted", str(tmp_path), seed=0, num=1)
  sid = json.loads((tmp_path / "train" / "labels2.json").read_text()).popitem()[0]
  path = tmp_path / "train" / sid / f"{sid}_s2.npz"
  np.savez(path, arr_0=np.load(path)["arr_0"] * (1 + 1j))
  with pytest.raises(DataError, match=r"dtype complex64, expected real numbers") as e:
    dict(planted.read(str(tmp_path), "train"))
  assert str(path) in str(e.value)


def test_contract_refuses_non_real_arrays():
  """The reader contract, whatever the reader: names dataset, key and example."""
  spec = registry.get_spec("pastis_hd", ("s2",))
  ex = {"name": "p", "s2": np.zeros((2, 10, 4, 4), np.complex64),
        "s2_dates": np.int32([1, 2]), "label": np.zeros((4, 4), np.int32)}
  with pytest.raises(DataError, match=r"pastis_hd_s2: s2: dtype complex64.*example 'p'"):
    check_example(spec, "p", ex)
  ex["s2"] = ex["s2"].real
  check_example(spec, "p", ex)


# ---------------------------------------------------------------------------------------------
# Labels.


@pytest.mark.parametrize("value", [20, -1, 255])
def test_reader_refuses_labels_out_of_range(pastis, value):
  """PASTIS classes are 0-19 (19 = void, the ignore index); anything else names the file."""
  root, pid = pastis
  path = root / "ANNOTATIONS" / f"TARGET_{pid}.npy"
  target = np.load(path).astype(np.int16)  # uint8 in the sample.
  target[0, 0, 0] = value
  np.save(path, target)
  with pytest.raises(DataError, match=rf"values outside \[0, 20\) or the ignore index 19 "
                                      rf"\(e.g. \[{value}\]\)") as e:
    dict(pastis_hd.read(str(root), "train", modalities=("s2",)))
  assert str(path) in str(e.value) and repr(pid) in str(e.value)


def test_reader_refuses_nan_in_class_map(pastis):
  """A NaN in a float class map would be dropped from the PASTIS multi-hot."""
  root, pid = pastis
  path = root / "ANNOTATIONS" / f"TARGET_{pid}.npy"
  target = np.load(path).astype(np.float32)
  target[0, 0, 0] = np.nan
  np.save(path, target)
  with pytest.raises(DataError, match=r"label: 1 NaN or inf values") as e:
    dict(pastis_hd.read(str(root), "train", task="classification", modalities=("s2",)))
  assert str(path) in str(e.value)


@pytest.mark.parametrize("label, y, problem", [
    (LabelSpec("multiclass", 5), np.int32(5), r"1 values outside \[0, 5\) \(e.g. \[5\]\)"),
    (LabelSpec("multiclass", 5), np.int32(-1), r"outside \[0, 5\)"),
    (LabelSpec("segmentation", 2, ignore_index=-1), np.int32([[0, 1], [-1, 2]]),
     r"1 values outside \[0, 2\) or the ignore index -1 \(e.g. \[2\]\)"),
    (LabelSpec("segmentation", 2), np.float32([[0, 1.5]]), r"non-integer"),
    (LabelSpec("multilabel", 3), np.float32([0, np.nan, 1]), r"1 NaN or inf values"),
    (LabelSpec("multilabel", 3), np.float32([0, 0.5, 1]), r"entries not 0 or 1"),
])
def test_contract_refuses_bad_labels(label, y, problem):
  """Build-time check (any reader) and load-time check (prepared data) of label values."""
  spec = dataclasses.replace(registry.get_spec("planted", ("s2",)), label=label)
  ex = {"name": "e", "s2": np.zeros((1, 10, 2, 2), np.float32), "s2_dates": np.int32([3]),
        "label": y}
  with pytest.raises(DataError, match=rf"planted_s2: label: .*{problem}.*; example 'e'"):
    check_example(spec, "e", ex)
  proc = processing.ExampleProcessor(
      dataset="planted", modalities=("s2",), shapes={"s2": (10, 2, 2)},
      label_shape=np.shape(y), label=label, stats={}, buckets={}, crop={}, dropout={},
      max_dates=None)
  out = proc(ex)
  assert isinstance(out, DataError) and re.search(rf"planted: label: .*{problem}", str(out))
  ok = np.ones(np.shape(y), np.asarray(y).dtype)  # Class 1 / all labels present: valid.
  check_example(spec, "e", {**ex, "label": ok})
  assert proc.problem(proc.decode({**ex, "label": ok})) is None


def test_nan_label_fraction(tmp_path):
  """TreeSatAI-TS: a NaN area fraction (valid JSON for Python) names the labels file."""
  (tmp_path / "labels").mkdir()
  (tmp_path / "train_filenames.lst").write_text("a.tif\n")
  labels = tmp_path / treesatai_ts.LABELS_FILE
  labels.write_text(json.dumps({"a.tif": [["Abies", float("nan")], ["Acer", 0.5]]}))
  with pytest.raises(DataError, match=r"genus 'Abies': area fraction nan is not a number in "
                                      r"\[0, 1\]") as e:
    next(treesatai_ts.read(str(tmp_path), "train"))
  assert str(labels) in str(e.value) and "example 'a'" in str(e.value)
  np.testing.assert_array_equal(treesatai_ts.multi_hot([["Acer", 0.5], ["Abies", 0.01]]),
                                np.eye(15, dtype=np.float32)[1])
