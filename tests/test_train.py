"""Training: the step's math, the optimizer, checkpoints across meshes, and the
runner end to end (resume after SIGKILL, kills during saves, bad input)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import small_config
from runner_helpers import final_params, run_cmd, story_file, train_cmd, train_losses  # noqa: F401
from mla_jax import Transformer, sharding
from mla_jax import train as T
from mla_jax.config import CONFIG_VERSION


def _tokens(config, batch=8, seq=12, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq + 1)), jnp.int32)


def _params(state):
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state["params"])}


def test_grad_accumulation_matches_one_big_batch():
  config = small_config("mlra4", vocab=64)
  mesh = sharding.make_mesh("", config)
  out = []
  for accum in (1, 4):
    tc = T.TrainConfig(steps=10, batch_size=8, seq_len=12, grad_accum=accum, warmup_steps=0)
    graphdef, state, shardings = T.create_state(config, tc, mesh)
    step = T.make_train_step(graphdef, tc, shardings, mesh)
    state, m = step(state, _tokens(config))
    out.append((float(m["loss"]), _params(state)))
  assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
  # Adam divides by sqrt(v): a near-zero gradient's rounding noise becomes a
  # parameter change of up to ~lr * 1e-3 (here 3e-6)
  for k in out[0][1]:
    np.testing.assert_allclose(out[0][1][k], out[1][1][k], rtol=1e-4, atol=5e-6, err_msg=k)


def test_loss_falls_on_a_repeated_batch():
  config = small_config("mla", vocab=64)
  mesh = sharding.make_mesh("", config)
  tc = T.TrainConfig(steps=30, batch_size=8, seq_len=12, learning_rate=1e-2, warmup_steps=0)
  graphdef, state, shardings = T.create_state(config, tc, mesh)
  step = T.make_train_step(graphdef, tc, shardings, mesh)
  tokens = _tokens(config)
  losses = []
  for _ in range(30):
    state, m = step(state, tokens)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0]


def test_schedule_and_decay_mask():
  tc = T.TrainConfig(steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
  lr = T.learning_rate_schedule(tc)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
  assert float(lr(100)) == pytest.approx(0.1)
  # zero gradients: only weight decay moves parameters, and only matrices decay
  tx = T.make_optimizer(T.TrainConfig(steps=10, warmup_steps=0, learning_rate=0.1, weight_decay=0.5))
  params = {"w": jnp.ones((2, 2)), "norm": jnp.ones((2,))}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert np.all(np.asarray(new["w"]) < 1.0) and np.all(np.asarray(new["norm"]) == 1.0)


def _decayed(config):
  _, params = T.split_model(Transformer(config, rngs=nnx.Rngs(0)))
  flags = T.decay_mask(params)
  return {"/".join(str(k) for k in path) for path, var in nnx.to_flat_state(flags)
          if (var.get_value() if hasattr(var, "get_value") else var)}


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_reaches_weights_never_norms_or_biases(scan):
  """Listed by hand: the latent norms are stored [blocks, width] and scanned layers
  stack every norm, so a rule by rank would decay them (it did, before issue 22)."""
  gpt2 = small_config("mlra4", flavour="gpt2").replace(scan_layers=scan)
  layer = ["attn/w_dkv", "attn/w_kr", "attn/w_uk", "attn/w_uv", "attn/wo", "attn/wq_a", "attn/wq_b",
           "mlp/w_fc", "mlp/w_proj"]
  prefixes = ["layers"] if scan else ["layers/0", "layers/1"]
  assert _decayed(gpt2) == {"embed", "pos_embed"} | {f"{p}/{w}" for p in prefixes for w in layer}
  llama = small_config("gqa").replace(scan_layers=scan)
  layer = ["attn/wq", "attn/wk", "attn/wv", "attn/wo", "mlp/w_gate", "mlp/w_up", "mlp/w_down"]
  assert _decayed(llama) == {"embed"} | {f"{p}/{w}" for p in prefixes for w in layer}


def test_bad_train_configs():
  with pytest.raises(ValueError, match="batch_size=6 must be divisible by grad_accum=4"):
    T.TrainConfig(batch_size=6, grad_accum=4)
  with pytest.raises(ValueError, match="warmup_steps must be in"):
    T.TrainConfig(steps=10, warmup_steps=20)


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.full)])
def test_checkpoint_restores_onto_a_different_mesh(tmp_path, full):
  config = small_config("mlra4", vocab=64, num_heads=8)
  tc = T.TrainConfig(steps=10, batch_size=8, seq_len=12, warmup_steps=0)
  mesh = sharding.make_mesh("data:2,tensor:2", config)
  graphdef, state, shardings = T.create_state(config, tc, mesh)
  state, _ = T.make_train_step(graphdef, tc, shardings, mesh)(state, _tokens(config))
  ckpt = T.Checkpoints(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(1, state, {"iterator": {"n": 1}}, {"model_config": config.to_dict()})
  ckpt.close()
  saved = _params(state)
  for spec in ("fsdp:2,tensor:4",) + (("tensor:4", "data:8") if full else ()):
    mesh2 = sharding.make_mesh(spec, config)
    _, fresh, shardings2 = T.create_state(config, tc, mesh2)
    abstract = T.abstract_with_shardings(jax.eval_shape(lambda: fresh), shardings2)
    restored, data_state, meta = T.Checkpoints(str(tmp_path / "ckpt")).restore(abstract)
    assert data_state == {"iterator": {"n": 1}} and meta["model_config"] == config.to_dict()
    got = _params(restored)
    for k in saved:
      np.testing.assert_array_equal(got[k], saved[k], err_msg=f"{spec} {k}")
    w = restored["params"]["layers"][0]["attn"]["w_uk"].get_value()
    assert w.sharding.mesh.shape == mesh2.shape
    assert int(restored["step"]) == 1


# ----------------------------------------------------------------------------- the runner


def test_resume_after_sigkill_is_exact(story_file, tmp_path):
  steps = ["--steps=24", "--ckpt_every=6"]
  whole = run_cmd(train_cmd(story_file, tmp_path / "whole", *steps))
  assert whole.returncode == 0, whole.stderr
  assert "data: built" in whole.stdout or "data: reused" in whole.stdout

  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen(train_cmd(story_file, killed_dir, *steps), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = killed_dir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:
    if metrics.exists() and len(train_losses(killed_dir)) >= 14:
      break
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert len(train_losses(killed_dir)) < 24, "the run finished before it could be killed"
  again = run_cmd(train_cmd(story_file, killed_dir, *steps))
  assert again.returncode == 0, again.stderr
  assert "resumed from step" in again.stdout

  assert train_losses(killed_dir) == train_losses(tmp_path / "whole")    # every step, bitwise
  (s1, a), (s2, b) = final_params(tmp_path / "whole"), final_params(killed_dir)
  assert s1 == s2 == 24
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_kill_during_checkpoint_saves_keeps_a_restorable_checkpoint(story_file, tmp_path):
  """Checkpoint every step, asynchronously, and SIGKILL at moments when a save is
  in flight: the latest finished checkpoint must restore and the run must finish."""
  run_dir = tmp_path / "run"
  cmd = train_cmd(story_file, run_dir, "--steps=60", "--ckpt_every=1", "--keep_checkpoints=2")
  caught_mid_save = False
  for delay in (0.0, 0.01, 0.03, 0.05, 0.08):
    before = len(train_losses(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if (run_dir / "metrics.jsonl").exists() and len(train_losses(run_dir)) >= before + 3:
        break
      time.sleep(0.005)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt_dir = run_dir / "checkpoints"
    caught_mid_save |= any("tmp" in name for name in os.listdir(ckpt_dir))
    ckpt = T.Checkpoints(str(ckpt_dir), async_save=False)
    step = ckpt.latest_step()
    assert step is not None
    restored = ckpt.restore_as_saved(step)
    ckpt.close()
    assert int(restored["step"]) == step
    if caught_mid_save:
      break
  assert caught_mid_save, "no kill landed during a save; the test proved nothing"
  done = run_cmd(cmd)
  assert done.returncode == 0, done.stderr
  assert final_params(run_dir)[0] == 60


def _error_line(result):
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert "Traceback" not in result.stderr
  return result.stderr.strip().splitlines()[-1]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(story_file, tmp_path):
  run_dir = tmp_path / "nan"
  out = run_cmd(train_cmd(story_file, run_dir, "--steps=40", "--ckpt_every=1", "--learning_rate=1e5",
                  "--grad_clip=0", "--warmup_steps=0"))
  line = _error_line(out)
  assert any(f"{what} at step" in line for what in
             ("loss became nan", "loss became inf", "parameters became non-finite"))
  assert "the last good checkpoint" in line
  bad_step = int(line.split(" at step ")[1].split(";")[0])
  ckpt = T.Checkpoints(str(run_dir / "checkpoints"), async_save=False)
  step = ckpt.latest_step()
  assert step == bad_step - 1
  restored = ckpt.restore_as_saved(step)
  ckpt.close()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["params"]))


def test_quickstart_flagfile_builds_then_reuses(tmp_path):
  """The README's quickstart flagfile, shortened: the first run builds the data and
  the tokenizer, the second reuses both and resumes the finished run."""
  cmd = [sys.executable, "-m", "experiments.run", "--flagfile=experiments/configs/quickstart.flags",
         f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'run'}", "--steps=6",
         "--warmup_steps=2", "--eval_every=3", "--ckpt_every=3", "--num_train_stories=3000",
         "--num_valid_stories=200", "--max_new_tokens=10", "--noprogress"]
  first = run_cmd(cmd)
  assert first.returncode == 0, first.stderr
  assert "data: built synthetic_stories" in first.stdout
  assert "tokenizer: trained SentencePiece, 2048 tokens" in first.stdout
  assert "sample: Once upon a time" in first.stdout
  assert os.path.exists(tmp_path / "run" / "loss_curve.png")
  second = run_cmd(cmd)
  assert second.returncode == 0, second.stderr
  assert "data: reused" in second.stdout and "tokenizer: reused" in second.stdout
  assert "resumed from step 6" in second.stdout and "validation loss" in second.stdout


def test_gpu_scale_switches_through_the_runner(story_file, tmp_path):
  """--scan_layers, --remat and --attention_impl reach the model; a run resumes with
  another remat policy or attention kernel (they change how it runs, not what it is)."""
  base = ["--variant=gqa", "--num_kv_heads=1", "--steps=4", "--ckpt_every=2", "--scan_layers"]
  first = run_cmd(train_cmd(story_file, tmp_path / "run", *base, "--remat=dots", "--attention_impl=dpa"))
  assert first.returncode == 0, first.stderr
  again = run_cmd(train_cmd(story_file, tmp_path / "run", *base[:-3], "--steps=6", "--ckpt_every=2",
                            "--scan_layers", "--remat=none"))
  assert again.returncode == 0, again.stderr
  assert "resumed from step 4" in again.stdout
  # not restated, --scan_layers would continue the run's own (scanned) model
  unscanned = run_cmd(train_cmd(story_file, tmp_path / "run", *base[:-3], "--steps=8", "--noscan_layers"))
  assert unscanned.returncode == 2 and "scan_layers: saved true, now false" in unscanned.stderr


def test_a_run_directory_written_by_the_previous_version(story_file, tmp_path):
  """tests/data/v1/run: a tiny MLRA-4 run trained 4 steps by commit a36d22d (config
  format 1). It loads (the same logits the old code gave, expected.npz), evaluates
  with --tokenizer standing in for the tokenizer path it recorded, and resumes."""
  data = os.path.join(os.path.dirname(__file__), "data", "v1")
  run_dir = tmp_path / "run"
  shutil.copytree(os.path.join(data, "run"), run_dir)
  from experiments import trainer
  from experiments.specs import DataSpec
  config, model, _, meta, _ = trainer.load_run(str(run_dir), need_tokenizer=False)
  assert meta["step"] == 4 and meta["format"] == 2 and meta["run_options"]["causal_chunks"] == 0
  assert (config.attention.variant, config.attention.branches, config.attention.groups) == ("mlra4", 4, 1)
  expected = np.load(os.path.join(data, "expected.npz"))
  np.testing.assert_allclose(np.asarray(model(expected["tokens"])), expected["logits"], rtol=1e-5, atol=1e-5)

  with pytest.raises(trainer.RunError, match="the run's tokenizer .* is missing .*; pass --tokenizer=PATH"):
    trainer.load_run(str(run_dir))
  spec = DataSpec(kind="tinystories", tinystories_train=str(story_file / "train.txt"),
                  data_dir=str(story_file / "cache"), tokenizer=os.path.join(data, "tokenizer.model"))
  evaluated = trainer.run_eval(str(run_dir), spec, mesh="", eval_batches=2, eval_batch_size=4, prompt="Tom had",
                               sample_tokens=4, seed=0)
  assert evaluated["step"] == 4 and 0 < evaluated["loss"] < 6.0 and evaluated["sample"].startswith("Tom had")

  # its stories and tokenizer are gone: training on these is a data change, refused unless asked for
  cmd = train_cmd(story_file, run_dir, "--steps=6", "--ckpt_every=6", "--keep_checkpoints=1")
  refused = run_cmd(cmd)
  assert refused.returncode == 2 and _error_line(refused).startswith(f"error: {run_dir} was trained on other data")
  assert "dataset tiny_stories/local_17f7df98d37fb26a -> tiny_stories/local_" in refused.stderr
  resumed = run_cmd(cmd + ["--allow_data_change"])
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step 4" in resumed.stdout and "warning: --allow_data_change: dataset" in resumed.stdout
  assert sorted(train_losses(run_dir)) == [1, 2, 3, 4, 5, 6]
  ckpt = T.Checkpoints(str(run_dir / "checkpoints"), async_save=False)
  assert ckpt.latest_step() == 6 and ckpt.read_meta()["model_config"]["config_version"] == CONFIG_VERSION
  ckpt.close()


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_falls_back(story_file, tmp_path):
  """A truncated state file in the newest step, then a deleted meta file: each
  resume moves the damaged step to checkpoints/damaged-STEP (nothing deleted),
  says so, resumes from the newest intact step and trains on to the end; with
  nothing intact left it stops with one line."""
  run_dir = tmp_path / "run"
  first = run_cmd(train_cmd(story_file, run_dir, "--steps=6", "--ckpt_every=2", "--keep_checkpoints=3"))
  assert first.returncode == 0, first.stderr
  ckpts = run_dir / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2", "4", "6"]
  data_files = [p for p in (ckpts / "6" / "state").rglob("*") if p.is_file() and p.stat().st_size > 1000]
  with open(max(data_files, key=lambda p: p.stat().st_size), "r+b") as f:
    f.truncate(100)                                  # a torn write of the newest step's arrays
  (ckpts / "4" / "meta" / "metadata").unlink()       # and the one before lost its meta file
  again = run_cmd(train_cmd(story_file, run_dir, "--steps=8", "--ckpt_every=2", "--keep_checkpoints=3"))
  assert again.returncode == 0, again.stderr[-3000:]
  assert "checkpoint step 6" in again.stdout and "checkpoint step 4" in again.stdout
  assert "resumed from step 2" in again.stdout
  assert (ckpts / "damaged-6").is_dir() and (ckpts / "damaged-4").is_dir()
  assert final_params(run_dir)[0] == 8
  # reading the run (eval) skips a damaged newest step without moving anything
  data_files = [p for p in (ckpts / "8" / "state").rglob("*") if p.is_file() and p.stat().st_size > 1000]
  with open(max(data_files, key=lambda p: p.stat().st_size), "r+b") as f:
    f.truncate(100)
  listing = sorted(p.name for p in ckpts.iterdir())
  evaluated = run_cmd(train_cmd(story_file, run_dir, "--mode=eval"))
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "checkpoint step 8" in evaluated.stdout and "using step 6" in evaluated.stdout
  assert '"step": 6' in evaluated.stdout
  assert sorted(p.name for p in ckpts.iterdir()) == listing
  # nothing intact: one line, exit 2, the damaged steps kept
  for step in [p.name for p in ckpts.iterdir() if p.name.isdigit()]:
    (ckpts / step / "meta" / "metadata").unlink()
  last = run_cmd(train_cmd(story_file, run_dir, "--steps=10", "--ckpt_every=2"))
  assert last.returncode == 2
  assert _error_line(last).startswith("error: no intact checkpoint left in")
  assert len([p for p in ckpts.iterdir() if p.name.startswith("damaged-")]) >= 4


_FULL_DISK = r"""
import errno, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
write = handler.JsonCheckpointHandler._save_fn

async def full_disk_at_step_4(self, item, directory):   # the disk fills up as step 4's meta is written
  if isinstance(item, dict) and item.get("step") == 4:
    raise OSError(errno.ENOSPC, "No space left on device")
  return await write(self, item, directory)

handler.JsonCheckpointHandler._save_fn = full_disk_at_step_4
from absl import app
from experiments import run
app.run(run.main, flags_parser=run.parse_flags, argv=["run"] + sys.argv[1:])
"""


def test_a_save_that_fails_stops_at_once_and_keeps_the_previous_checkpoint(story_file, tmp_path):
  """ENOSPC raised in orbax's background write of step 4: the run stops with one
  line naming the step and the intact one, within two steps of the failure; step 2
  restores, and rerunning (the disk freed) resumes from it to the end."""
  run_dir = tmp_path / "run"
  driver = tmp_path / "full_disk.py"
  driver.write_text(_FULL_DISK)
  cmd = train_cmd(story_file, run_dir, "--steps=12", "--ckpt_every=2")
  failed = run_cmd([sys.executable, str(driver)] + cmd[3:], env={**os.environ, "PYTHONPATH": os.getcwd()})
  assert failed.returncode == 2, failed.stderr[-3000:]
  assert failed.stderr.strip().splitlines() == [failed.stderr.strip()], failed.stderr[-3000:]   # one line
  assert _error_line(failed).startswith(f"error: saving checkpoint step 4 in {run_dir / 'checkpoints'} failed "
                                        "(OSError: [Errno 28] No space left on device); step 2 is intact")
  assert max(train_losses(run_dir)) <= 6                # reported at once, not at the end of the run
  assert final_params(run_dir)[0] == 2
  again = run_cmd(cmd)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step 2" in again.stdout and final_params(run_dir)[0] == 12


@pytest.mark.full
def test_a_dataset_damaged_mid_file_is_named_when_read(story_file, tmp_path):
  """The opening check reads a split's first and last records; damage between them
  is found when training reads it: one line naming the dataset folder, the last
  checkpoint kept; rebuilding the folder resumes the run."""
  import glob
  data_dir = tmp_path / "data"
  cmd = train_cmd(story_file, tmp_path / "run", f"--data_dir={data_dir}", "--ckpt_every=2")
  first = run_cmd(cmd + ["--steps=2"])
  assert first.returncode == 0, first.stderr[-3000:]
  (train_file,) = glob.glob(str(data_dir / "**" / "*-train.array_record-*"), recursive=True)
  size = os.path.getsize(train_file)
  with open(train_file, "r+b") as f:                   # 4 KiB in the middle overwritten
    f.seek(size // 2)
    f.write(np.random.default_rng(0).bytes(4096))
  damaged = run_cmd(cmd + ["--steps=600"])             # past one epoch: every record is read
  line = _error_line(damaged)
  assert line.startswith("error: reading the training data for step ") and "Riegeli" in line
  assert f"the cached dataset in {os.path.dirname(train_file)} is damaged; delete that folder" in line
  kept = int(line.split("resumes from step ")[1].rstrip(")"))
  assert final_params(tmp_path / "run")[0] == kept >= 2
  shutil.rmtree(os.path.dirname(train_file))
  again = run_cmd(cmd + [f"--steps={kept + 2}"])
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed from step {kept}" in again.stdout and final_params(tmp_path / "run")[0] == kept + 2
