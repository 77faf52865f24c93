"""--mode=cache_quality (experiments/cache_quality.py): its scores against
independent paths (the training forward, token-by-token decoding), and the mode
end to end on a trained run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_model, small_config
from mla_jax import quant
from runner_helpers import story_file  # noqa: F401,F811 - a fixture
from test_sharding import _decode


def test_cache_quality_scores_what_decoding_token_by_token_sees():
  """measure()'s teacher-forced pass (a whole window written by one step) is
  what decoding one token at a time through the same cache gives; its float32
  row is the training forward's loss."""
  import optax
  from experiments import cache_quality
  model = random_model(small_config("mla", layers=2), seed=4)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, model.config.vocab_size, (2, 13)).astype(np.int32)]
  rows = {r["format"]: r for r in cache_quality.measure(model, batches, prompt_len=4, num_prompts=2, new_tokens=6,
                                                        formats=("float32", "int8"), progress=lambda _: None)}
  tokens = jnp.asarray(batches[0])
  forward = jax.nn.log_softmax(model(tokens[:, :-1]), -1)
  want = optax.softmax_cross_entropy_with_integer_labels(model(tokens[:, :-1]), tokens[:, 1:]).mean()
  assert rows["float32"]["val_loss"] == pytest.approx(float(want), rel=1e-5)
  assert (rows["float32"]["kl_vs_fp32"], rows["float32"]["greedy_agreement"]) == (0.0, 1.0)
  assert set(rows) == {"float32", "int8"}
  fmt = "int8"
  cache, lengths, steps = model.init_cache(2, 12, fmt), jnp.zeros((2,), jnp.int32), []
  for t in range(12):
    logits, cache = _decode(model, tokens[:, t], cache, lengths)
    steps.append(jax.nn.log_softmax(logits, -1))
    lengths = lengths + 1
  decoded = np.stack([np.asarray(s) for s in steps], 1)
  nll = float(-np.take_along_axis(decoded, np.asarray(tokens[:, 1:, None]), -1).mean())
  forward = np.asarray(forward)
  kl = float((np.exp(forward) * (forward - decoded)).sum(-1).mean())
  assert rows[fmt]["val_loss"] == pytest.approx(nll, rel=1e-5)
  assert rows[fmt]["kl_vs_fp32"] == pytest.approx(kl, rel=1e-3, abs=1e-9) and kl > 0
  assert rows[fmt]["bytes_per_token_layer"] == quant.layout_bytes_per_token(
      quant.layout(model.config.attention.cache_spec(), quant.FORMATS[fmt]))


@pytest.mark.full
def test_the_mode_end_to_end_on_a_trained_run(story_file, tmp_path):
  import sys
  from experiments import cache_quality
  from runner_helpers import run_cmd, train_cmd
  out = tmp_path / "run"
  done = run_cmd(train_cmd(story_file, out, "--steps=10", "--variant=gqa", "--num_kv_heads=1"))
  assert done.returncode == 0, done.stderr[-2000:]
  data = ["--data=tinystories", f"--tinystories_train={story_file / 'train.txt'}", f"--data_dir={story_file / 'cache'}"]
  done = run_cmd([sys.executable, "-m", "experiments.run", "--mode=cache_quality", f"--output_dir={out}", *data,
                  "--eval_batches=2", "--eval_batch_size=4", "--quality_tokens=300", "--quality_prompts=3"])
  assert done.returncode == 0, done.stderr[-2000:]
  rows = cache_quality.read_csv(str(out / "cache_quality.csv"))
  assert [r["format"] for r in rows] == ["float32", "bfloat16", "fp8", "int8"]
  # the model's context (max_seq_len 2048 here) allows all 300 asked-for tokens, 3 prompts
  assert {(r["new_tokens"], r["prompts"]) for r in rows} == {(300, 3)}
  assert [r["bytes_per_token_layer"] for r in rows] == [128, 64, 40, 40]       # K and V of 16: 16 + a scale
  assert (out / "cache_quality.png").stat().st_size > 10_000
  assert "| gqa | int8 | 40 |" in (out / "cache_quality.md").read_text()
