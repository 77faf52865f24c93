"""Helpers for tests that drive `python -m experiments.run` in subprocesses."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mla_jax import train as T


@pytest.fixture(scope="session")
def story_file(tmp_path_factory):
  root = tmp_path_factory.mktemp("stories")
  rng = np.random.default_rng(0)
  names, things = ["Tom", "Lily", "Sam", "Mia", "Ben"], ["ball", "kite", "cat", "dog", "cake", "box"]
  with open(root / "train.txt", "w") as f:
    for _ in range(1500):
      n, t = rng.choice(names), rng.choice(things)
      f.write(f"{n} had a {t}. One day the {t} was lost. {n} looked for the {t} and found it.\n"
              "<|endoftext|>\n")
  return root


def train_cmd(story_file, out, *extra):
  return [sys.executable, "-m", "experiments.run", "--mode=train", "--data=tinystories",
          f"--tinystories_train={story_file / 'train.txt'}", f"--data_dir={story_file / 'cache'}",
          f"--output_dir={out}", "--vocab_size=300", "--d_model=32", "--num_heads=2", "--head_dim=16",
          "--q_lora_rank=16", "--kv_lora_rank=16", "--rope_head_dim=8", "--mlp_dim=64",
          "--variant=mlra4", "--batch_size=4", "--seq_len=32", "--warmup_steps=2", "--eval_every=10",
          "--eval_batches=2", "--eval_batch_size=4", "--max_new_tokens=8", "--noprogress", *extra]


def run_cmd(cmd, **kw):
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def train_losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}


def final_params(run_dir):
  ckpt = T.Checkpoints(os.path.join(run_dir, "checkpoints"), async_save=False)
  step = ckpt.latest_step()
  restored = ckpt.restore_as_saved(step)
  ckpt.close()
  flat = jax.tree_util.tree_flatten_with_path(restored["params"])[0]
  return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


