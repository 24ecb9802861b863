"""``python -m anysat_jax.bench --compiled`` on the demo config's smallest bucket."""

from __future__ import annotations

import re

import pytest

from anysat_jax.tools import bench, compiled_bench

LINE = re.compile(r"^compiled (\S+) p(\d+) b(\d+) (\S+) temp_gib (\d+\.\d+) tflop (\d+\.\d+)$")


def test_compiled_report_lines(capsys):
  assert bench.main(["--compiled", "--config", bench.CONFIG_FILE + ":demo",
                     "--buckets", "treesatai_ts:20"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2, lines
  row = LINE.match(lines[0])
  assert row, lines[0]
  name, patch, batch, dtype, temp, tflop = row.groups()
  config = compiled_bench.load_config(bench.CONFIG_FILE, "demo")
  d = config.data.datasets.treesatai_ts
  assert (name, int(patch), int(batch), dtype) == ("treesatai_ts", 20, d.batch_size, "float32")
  assert 0 < float(temp) < 1 and 0 < float(tflop)
  assert lines[1] == f"compiled: worst temp_gib {temp}"


def test_unknown_bucket_is_an_error():
  config = compiled_bench.load_config(bench.CONFIG_FILE, "demo")
  with pytest.raises(SystemExit, match="unknown buckets.*flair:10"):
    compiled_bench.report(config, ["flair:10"])
