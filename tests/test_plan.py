"""The capacity planner: its memory figures against arrays actually placed on
simulated meshes, the MLRA paper's formula, and the runner's --mode=plan."""
import csv
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import random_model, small_config
from mla_jax import plan, presets, sharding
from mla_jax.config import RunOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _device0_bytes(tree) -> int:
  """Bytes of every array of `tree` held on device 0."""
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


@pytest.mark.parametrize("variant,mesh,fmt", [
    ("mla", "context:2,tensor:2", "bfloat16"), ("mlra4", "data:2,context:2,tensor:2", "int8"),
    ("gqa", "fsdp:2,tensor:2", "float32"), ("tpa", "context:4,tensor:2", "fp8")])
def test_memory_figures_equal_the_placed_arrays(variant, mesh, fmt):
  config = small_config(variant, vocab=64, num_heads=8)
  spec = sharding.MeshSpec.parse(mesh)
  m = sharding.make_mesh(spec, config)
  model = sharding.shard_module(random_model(config), m)
  assert plan.weight_bytes(config, spec, np.float32) == _device0_bytes(nnx.state(model, nnx.Param))
  rows, length = spec.data * spec.fsdp, 16 * spec.context         # one sequence per device row
  cache = sharding.place_cache(config, m, batch=rows, max_len=length, fmt=fmt)
  assert plan.cache_bytes_per_token(config, spec, fmt) * length == _device0_bytes(cache)


def test_the_papers_shapes_per_device():
  """MLRA paper (d_c 512, rope 64, bf16): MLA holds 1152 / CP bytes per token per
  layer on each device at any TP; MLRA-4 at TP 4 x CP 2 one 128-wide block and
  the rope key, of half the tokens: (128 + 64) x 2 / 2 = 192."""
  mla, mlra4 = presets.mlra_paper("mla"), presets.mlra_paper("mlra4")
  for tp in (1, 2, 4, 8):
    for cp in (1, 2, 4, 8):
      assert plan.cache_bytes_per_token(mla, f"context:{cp},tensor:{tp}", "bfloat16") == 1152 / cp
  assert plan.cache_bytes_per_token(mlra4, "context:2,tensor:4", "bfloat16") == 192
  assert plan.cache_bytes_per_token(mla, "context:2", "fp8") == 656 / 2


def test_a_plan_fits_what_it_says_and_reads_its_collectives():
  config = small_config("mla", vocab=64, num_heads=8)
  options = RunOptions(cache_dtype="bfloat16", decode_impl="absorbed")
  kw = dict(device_bytes=4e6, batch=8, context=64, options=options, hbm_bytes_per_s=1e12, link_bytes_per_s=1e11)
  one = plan.plan("mla", config, "data:2,tensor:2", **kw)
  split = plan.plan("mla", config, "data:2,context:2,tensor:2", **kw)        # the same rows, half the tokens
  for p, dp in ((one, 2), (split, 2)):
    tokens = p.max_tokens // dp                              # of the sequences on one device's rows
    assert p.weight_bytes + p.cache_bytes_per_token * tokens <= 4e6 < (
        p.weight_bytes + p.cache_bytes_per_token * (tokens + 1))
    assert p.max_batch == p.max_tokens // 64
  assert split.cache_bytes_per_token == one.cache_bytes_per_token / 2
  assert "all-gather x1" in split.collectives and "all-gather" not in one.collectives
  assert split.read_bytes == one.read_bytes - one.cache_bytes_per_token / 2 * 4 * 64   # half of 4 rows x 64 tokens
  assert split.step_time_s == pytest.approx(split.read_bytes / 1e12 + split.collective_bytes / 1e11)
  bad = plan.plan("gqa", small_config("gqa"), "tensor:4", **kw)
  assert bad.weight_bytes is None and "cannot shard" in bad.note


def _run(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}    # the runner sets its own device count
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


SMALL = ("--family=flags", "--variants=mla,mlra4", "--d_model=64", "--num_heads=4", "--head_dim=16",
         "--kv_lora_rank=32", "--rope_head_dim=8", "--q_lora_rank=32", "--mlp_dim=128", "--vocab_size=64")


def test_plan_command(tmp_path):
  out = _run("--mode=plan", *SMALL, "--tps=1,4", "--cps=1,2", "--plan_devices=8", "--device_memory_gb=0.01",
             "--batch=4", "--context=256", f"--output_dir={tmp_path}")
  assert out.returncode == 0, out.stderr
  assert "Capacity plan" in out.stdout
  with open(tmp_path / "plan_flags.csv") as f:
    rows = {(r["variant"], r["mesh"]): r for r in csv.DictReader(f)}
  assert float(rows[("mla", "data:4,context:2,tensor:1")]["cache_bytes_per_token"]) == pytest.approx(
      float(rows[("mla", "data:8,context:1,tensor:1")]["cache_bytes_per_token"]) / 2)
  assert "all-gather x1" in rows[("mlra4", "data:1,context:2,tensor:4")]["collectives"]


@pytest.mark.parametrize("args,msg", [
    (("--plan_devices=6", "--tps=4", "--cps=4"), "no --tps x --cps layout divides --plan_devices=6"),
    (("--device_memory_gb=0",), "--device_memory_gb, --hbm_gbps and --link_gbps must be > 0")])
def test_plan_bad_flags(args, msg):
  out = _run("--mode=plan", *SMALL, *args)
  assert out.returncode == 2 and msg in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


def test_plan_a_run_directory(tmp_path):
  """The run written by the previous version (tests/data/v1), copied: only its metadata is read."""
  import shutil
  run = shutil.copytree(os.path.join(ROOT, "tests", "data", "v1", "run"), tmp_path / "run")
  out = _run("--mode=plan", f"--plan_run_dir={run}", "--tps=1,2", "--cps=1,2", "--plan_devices=4",
             "--batch=2", "--context=64")
  assert out.returncode == 0, out.stderr
  lines = [line for line in out.stdout.splitlines() if "context:2,tensor:2" in line]
  assert len(lines) == 1 and "all-gather x1" in lines[0]
  out = _run("--mode=plan", f"--plan_run_dir={tmp_path / 'nowhere'}")
  assert out.returncode == 2 and "is not a directory" in out.stderr
