"""Launchers (dry runs print exactly what would run) and the GPU benchmark's smoke mode."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys

import pytest

from launch import gpu_local, slurm, tpu_pod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDE = "--config.total_steps=10"


def _refuse(*args, **kwargs):
  raise AssertionError(f"a dry run tried to execute {args}")


def _dry(main, argv, capsys) -> list[str]:
  """The lines a dry run prints (it must not start any process)."""
  with pytest.MonkeyPatch.context() as m:
    m.setattr(subprocess, "run", _refuse)
    m.setattr(subprocess, "Popen", _refuse)
    assert main([*argv, "--dry-run", "--", OVERRIDE]) == 0
  return capsys.readouterr().out.strip().split("\n")


def _remote(line: str) -> str:
  """The ``--command=`` of a gcloud ssh line, as the worker's shell receives it."""
  return next(a for a in shlex.split(line) if a.startswith("--command="))[len("--command="):]


def test_tpu_pod_up(capsys):
  lines = _dry(tpu_pod.main, ["up", "--name=pod1", "--project=my-proj", "--zone=us-central2-b",
                              "--accelerator_type=v4-32", "--workdir=/mnt/shared/run",
                              "--config=configs/geoplex.py", "--env=LIBTPU_INIT_ARGS=--xla_x"],
               capsys)
  create, tar, scp, install, start, logs = lines
  where = "--project=my-proj --zone=us-central2-b"
  assert create.startswith(f"gcloud compute tpus tpu-vm describe pod1 {where} ")
  assert (f"|| gcloud compute tpus tpu-vm create pod1 {where} --accelerator-type=v4-32 "
          "--version=tpu-ubuntu2204-base") in create
  assert tar.startswith("tar -czf /tmp/anysat-jax-pod1.tar.gz ") and tar.endswith(f"-C {REPO} .")
  assert scp == (f"gcloud compute tpus tpu-vm scp /tmp/anysat-jax-pod1.tar.gz "
                 f"pod1:anysat-jax.tar.gz {where} --worker=all")
  for line in (install, start):
    assert line.startswith(f"gcloud compute tpus tpu-vm ssh pod1 {where} --worker=all --command=")
  assert "uv pip install --python .venv/bin/python -e . 'jax[tpu]>=0.10.2,<0.11'" in \
      _remote(install)
  cmd = _remote(start)
  assert cmd.startswith("cd anysat-jax || exit 1; JAX_COORDINATOR_ADDRESS=$(curl ")
  assert ("):8476 nohup env LIBTPU_INIT_ARGS=--xla_x .venv/bin/python -m anysat_jax.main "
          f"--config=configs/geoplex.py --workdir=/mnt/shared/run {OVERRIDE} > run.log 2>&1 "
          "< /dev/null & echo $! > run.pid") in cmd
  assert logs == (f"gcloud compute tpus tpu-vm ssh pod1 {where} --worker=0 "
                  "--command='tail -n +1 -F anysat-jax/run.log'")


@pytest.mark.parametrize("action,want", [
    ("stop", "--worker=all --command='kill -TERM $(cat anysat-jax/run.pid)'"),
    ("delete", "gcloud compute tpus tpu-vm delete pod1 --project=p --zone=z --quiet"),
])
def test_tpu_pod_stop_and_delete(action, want, capsys):
  (line,) = _dry(tpu_pod.main, [action, "--name=pod1", "--project=p", "--zone=z"], capsys)
  assert line.endswith(want)


def test_tpu_pod_spot_and_runtime_by_family(capsys):
  (line,) = _dry(tpu_pod.main, ["create", "--name=n", "--project=p", "--zone=z", "--spot",
                                "--accelerator_type=v5p-64"], capsys)
  assert line.endswith("--accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot")


def test_gpu_local_one_host(capsys):
  (line,) = _dry(gpu_local.main, ["--workdir=runs/x", "--python=py"], capsys)
  assert line == (f"cd {REPO} && py -m anysat_jax.main --config=configs/geoplex.py "
                  f"--workdir=runs/x {OVERRIDE}")


def test_gpu_local_several_hosts(capsys):
  lines = _dry(gpu_local.main, ["--hosts=gpu0,gpu1,gpu2", "--workdir=/shared/x", "--python=py",
                                "--env=XLA_PYTHON_CLIENT_MEM_FRACTION=.9"], capsys)
  assert len(lines) == 3
  for i, (host, line) in enumerate(zip(("gpu0", "gpu1", "gpu2"), lines, strict=True)):
    ssh, h, cmd = shlex.split(line)
    assert (ssh, h) == ("ssh", host)
    assert cmd == (f"cd {REPO} && env XLA_PYTHON_CLIENT_MEM_FRACTION=.9 py -m anysat_jax.main "
                   "--config=configs/geoplex.py --workdir=/shared/x "
                   "--config.distributed.coordinator_address=gpu0:8476 "
                   f"--config.distributed.num_processes=3 --config.distributed.process_id={i} "
                   f"{OVERRIDE}")


def test_gpu_local_needs_a_reachable_coordinator():
  with pytest.raises(SystemExit, match="coordinator_address"):
    gpu_local.main(["--hosts=localhost,gpu1", "--workdir=/x", "--dry-run"])


def test_slurm_script(capsys, tmp_path):
  lines = _dry(slurm.main, ["--nodes=4", "--gpus_per_node=8", "--partition=gpu",
                            "--account=proj", "--time=12:00:00", f"--workdir={tmp_path}",
                            "--python=py"], capsys)
  script = tmp_path / "anysat.sbatch"
  assert lines[0] == f"mkdir -p {tmp_path}"
  assert lines[1] == f"cat > {script} <<'SBATCH'"
  assert lines[-2:] == ["SBATCH", f"sbatch {script}"]
  body = lines[2:-2]
  for want in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=12:00:00",
               f"#SBATCH --output={tmp_path}/slurm-%j.out", "#SBATCH --signal=TERM@300",
               "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"):
    assert want in body
  assert body[-1] == (f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 py -m anysat_jax.main "
                      f"--config=configs/geoplex.py --workdir={tmp_path} {OVERRIDE}")
  assert not script.exists()


def test_slurm_submits_the_printed_script(tmp_path, monkeypatch):
  """Run for real with a stand-in ``sbatch``: the written script is the printed one."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "sbatch"
  fake.write_text(f"#!/bin/bash\ncp \"$1\" {tmp_path}/submitted\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  workdir = tmp_path / "run"
  argv = ["--nodes=2", f"--workdir={workdir}", "--python=py"]
  assert slurm.main(argv) == 0
  printed = subprocess.run([sys.executable, "-m", "launch.slurm", *argv, "--dry-run"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
  body = printed.split("<<'SBATCH'\n")[1].split("SBATCH\nsbatch")[0]
  assert (tmp_path / "submitted").read_text() == body
  assert (workdir / "anysat.sbatch").read_text() == body


def test_gpu_bench_smoke():
  """The benchmark's smoke mode (tiny model, one bucket, CPU) prints its table."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "anysat_jax.gpu_bench", "--smoke"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert lines[0].startswith("device: cpu")
  train = next(x for x in lines if x.startswith("train step flair p20"))
  infer = next(x for x in lines if x.startswith("inference  treesatai mono-date p10"))
  for row in (train, infer):
    ms, gflop = float(row.split()[-6]), float(row.split()[-3])
    assert ms > 0 and gflop > 0
