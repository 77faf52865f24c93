"""Real multi-process runs on localhost: jax.distributed with gloo CPU collectives,
started by launch/local.py, against single-process runs of the same model."""
import os
import subprocess
import sys

import numpy as np
import pytest

from runner_helpers import final_params, run_cmd, story_file, train_cmd, train_losses  # noqa: F401

LAUNCH = [sys.executable, "launch/local.py"]


def _single_process_env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def test_two_processes_train_like_one(story_file, tmp_path):
  """2 processes x 2 CPU devices == 1 process x 4 devices: same global batch, same
  per-step losses; and the 2-process checkpoint restores in a 1-process run."""
  steps = ["--steps=6", "--ckpt_every=3", "--eval_every=3", "--batch_size=8", "--mesh=data:4"]
  # The launcher's own deadline stops both processes (and prints both outputs) well before
  # run_cmd's. No persistent XLA cache: process 0 alone writes it, and this run once hung with
  # process 1 waiting for process 0 at a barrier; serialising an executable is where
  # jaxlib 0.10.2 has crashed (see conftest.py), and these programs are this test's own anyway.
  uncached = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
  multi = run_cmd(LAUNCH + ["--processes=2", "--devices_per_process=2", f"--log_dir={tmp_path / 'logs'}",
                            "--timeout=420", "--"] + train_cmd(story_file, tmp_path / "multi", *steps),
                  env=uncached)
  assert multi.returncode == 0, (multi.stdout[-3000:], multi.stderr[-3000:])
  single = run_cmd(train_cmd(story_file, tmp_path / "single", *steps), env=_single_process_env(4))
  assert single.returncode == 0, single.stderr[-3000:]

  a, b = train_losses(tmp_path / "multi"), train_losses(tmp_path / "single")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5)
  assert a[6] < a[1]                                            # it did train

  (s1, pa), (s2, pb) = final_params(tmp_path / "multi"), final_params(tmp_path / "single")
  assert s1 == s2 == 6
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=1e-6, err_msg=k)

  # restore the 2-process checkpoint in one process, on one device
  ev = run_cmd([sys.executable, "-m", "experiments.run", "--mode=eval", f"--output_dir={tmp_path / 'multi'}",
                "--data=tinystories", f"--tinystories_train={story_file / 'train.txt'}",
                f"--data_dir={story_file / 'cache'}", "--eval_batches=2", "--eval_batch_size=4",
                "--max_new_tokens=4"], env=_single_process_env(1))
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert '"step": 6' in ev.stdout


def _launch_error(tmp_path, story_file, *extra, processes=2):
  out = run_cmd(LAUNCH + [f"--processes={processes}", "--devices_per_process=2", f"--log_dir={tmp_path}",
                          "--"] + train_cmd(story_file, tmp_path / "run", *extra))
  assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
  return out.stderr


def test_mesh_must_cover_every_process_device(story_file, tmp_path):
  err = _launch_error(tmp_path, story_file, "--mesh=data:2", "--steps=2")
  assert "mesh data:2,fsdp:1,tensor:1 uses 2 devices but the 2 processes have 4" in err


def test_batch_must_split_over_processes(story_file, tmp_path):
  err = _launch_error(tmp_path, story_file, "--batch_size=5", "--steps=2", "--mesh=data:2,tensor:2")
  assert "--batch_size=5 does not split over 2 processes" in err


def test_unreachable_coordinator_fails_fast_with_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "experiments.run", "--mode=train", "--num_processes=2",
                        "--process_id=1", "--coordinator_address=127.0.0.1:1", "--distributed_timeout=3",
                        f"--output_dir={tmp_path}"], capture_output=True, text=True, timeout=60)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: could not join the run at 127.0.0.1:1 within 3s")


def test_incomplete_distributed_flags(tmp_path):
  out = subprocess.run([sys.executable, "-m", "experiments.run", "--mode=train", "--num_processes=2",
                        f"--output_dir={tmp_path}"], capture_output=True, text=True, timeout=60)
  assert out.returncode == 2
  assert "--num_processes=2 also needs --coordinator_address and --process_id" in out.stderr


def test_slurm_environment_is_detected(tmp_path):
  """No coordinator flags: the topology comes from SLURM's variables (simulated
  here on localhost: one node, two tasks)."""
  import random
  job = random.randint(1, 4000)
  procs = []
  for i in range(2):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
               SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES="1", JAX_PLATFORMS="cpu")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "experiments.run", "--mode=bench_train", "--variant=mla",
         "--local_device_count=2", "--batch_size=4", "--seq_len=16", "--bench_steps=2", "--bench_warmup=1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  for out in outs:
    assert "connected to 3 peer ranks" in out        # 4 devices in all: the mesh defaulted to data:4
    assert "mla: median step" in out
