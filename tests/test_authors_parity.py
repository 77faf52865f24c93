"""The parts of experiments/authors_parity.py that run without the authors' code:
our config -> their GPTConfig keys (checked against the manifest written from
their model definitions), their get_lr against our optax schedule, and the
sweep lines it runs."""
import json
import os

import numpy as np
import pytest

from experiments import authors_parity, options
from experiments.torch_stand_ins import AUTHORS_FILE
from mla_jax import convert
from mla_jax import train as T

MANIFEST = json.load(open(os.path.join(os.path.dirname(__file__), "data", "mlra_manifest.json")))


@pytest.mark.parametrize("variant", sorted(AUTHORS_FILE))
def test_their_config_keys_for_our_config(variant):
  entry = MANIFEST[variant]
  tensors = {name: np.zeros(shape, np.float32) for name, shape in entry["tensors"].items()}
  config = convert.infer_config(variant, tensors, entry["config"])
  assert authors_parity.authors_kwargs(config) == entry["config"]
  assert entry["authors_file"] == f"model/{AUTHORS_FILE[variant]}.py"


def test_their_learning_rate_is_our_schedule():
  tc = T.TrainConfig(steps=60, warmup_steps=7, learning_rate=3e-3, min_lr_ratio=0.1)
  ours = T.learning_rate_schedule(tc)
  np.testing.assert_allclose([authors_parity.warmup_cosine(s, tc) for s in range(70)],
                             [float(ours(s)) for s in range(70)], rtol=1e-6, atol=1e-12)


def test_the_sweep_line_of_a_variant_is_what_it_runs():
  got = authors_parity.sweep_flags(os.path.join(authors_parity.REPO, "experiments", "sweeps", "mlra_cpu.sweep"),
                                   "mla")
  config = options.build(options.parse(["prog"] + got)).model
  assert config.attention.variant == "mla" and config.mlp_dim == 288 and config.attention.q_lora_rank == 64
  with pytest.raises(ValueError, match="'nope' has no line in"):
    authors_parity.sweep_flags(os.path.join(authors_parity.REPO, "experiments", "sweeps", "mlra_cpu.sweep"), "nope")


def test_the_page_reads_the_logs(tmp_path):
  """Per-step losses with known gaps: the page's columns say where the runs part."""
  rows = ["step,lr,ours,theirs,ours_grad_norm,theirs_grad_norm"]
  gaps = [0, 1e-7, 0, 5e-6, 1e-7, 2e-4, 1e-2]                       # step 4 passes 1e-6, step 6 1e-4
  for step, gap in enumerate(gaps, 1):
    rows.append(f"{step},0.001,{2.0 * (1 + gap)},2.0,{9.0 if step == 5 else 1.0},{3.0 if step == 2 else 1.0}")
  (tmp_path / "mla_seed0.csv").write_text("\n".join(rows) + "\n")
  (tmp_path / "mla_seed0.json").write_text(json.dumps(dict(
      variant="mla", seed=0, decay="norms_excluded", steps=7, ours_val=2.5, theirs_val=2.6,
      largest_relative_difference=1e-2, first_step_apart_1e4=6)))
  text = authors_parity.page(str(tmp_path), str(tmp_path / "chart.png"))
  assert "| mla | 0 | norms_excluded | 7 | 2.5000 | 2.6000 | 1.0e-02 | 3 | 6 | 9.0 (5) | 3.0 (2) |" in text
  assert (tmp_path / "chart.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--variants=nope"], "error: no authors' model for 'nope'; choose from mha, mqa"),
    (["--sweep=/nonexistent.sweep"], "error: --sweep=/nonexistent.sweep does not exist"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
  """Refused before any model, data or checkout is touched (the checkout path here does not exist)."""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "experiments.authors_parity", f"--authors_repo={tmp_path}/none", *args],
                       capture_output=True, text=True, timeout=120, cwd=authors_parity.REPO)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [out.stderr.strip()] and out.stderr.startswith(message), out.stderr


@pytest.mark.parametrize("variant", ["mha", "mla", "mlra4", "tpa", "mfa"])
def test_init_offset_mixes_exactly_the_groups_named(variant):
  """experiments.init_offset: a converted model (random tensors of the authors' layout)
  mixed into ours replaces the named groups' tensors, and only those."""
  from flax import nnx

  from experiments import init_offset
  from mla_jax.model import Transformer
  entry = MANIFEST[variant]
  rng = np.random.default_rng(0)
  tensors = {name: rng.normal(size=shape).astype(np.float32) for name, shape in entry["tensors"].items()}
  if "lm_head.weight" in tensors:           # their model ties it to the embedding
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
  drawn = convert.to_model(variant, tensors, config_json=entry["config"])
  theirs = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(drawn, nnx.Param))}
  ours = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(
      Transformer(drawn.config, rngs=nnx.Rngs(0)), nnx.Param))}
  assert {init_offset.group_of(p) for p in ours} == {"embed", "attention", "mlp", "norm"}
  for combo in ("embed", "attention+mlp", "all"):
    groups = init_offset.combo_groups(combo)
    mixed = init_offset.mix(Transformer(drawn.config, rngs=nnx.Rngs(0)), drawn, groups)
    for p, v in nnx.to_flat_state(nnx.state(mixed, nnx.Param)):
      want = theirs[p] if init_offset.group_of(p) in groups else ours[p]
      np.testing.assert_array_equal(np.asarray(v.get_value()), want, err_msg=f"{combo}: {p}")
  with pytest.raises(ValueError, match="names \\['norms'\\]"):
    init_offset.combo_groups("embed+norms")


def test_init_offset_welch_t_by_hand():
  from experiments import init_offset
  a, b = [2.40, 2.35, 2.44, 2.38], [2.60, 2.62, 2.57]
  va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
  t, p = init_offset.welch(a, b)
  assert t == pytest.approx((np.mean(a) - np.mean(b)) / np.sqrt(va + vb))
  assert 0 < p < 1e-3


def test_init_offset_page_verdict_pairs_and_redraw_control(tmp_path):
  """The page from hand-made logs: 8 seeds a side with the authors' draw 0.2 worse
  on every seed is called beyond noise; the paired differences and the redraw
  control line are the numbers put in."""
  import json

  from experiments import init_offset
  rng = np.random.default_rng(1)
  ours = 2.4 + 0.03 * rng.standard_normal(8)
  theirs = ours + 0.2 + 0.01 * rng.standard_normal(8)
  redraw = {0: ours[0] + 0.05, 1: ours[1] - 0.04}
  def put(combo, seed, value, offset=0):
    with open(tmp_path / init_offset.log_name("mha", combo, seed, offset), "w") as f:
      json.dump(dict(variant="mha", combo=combo, seed=seed, draw_offset=offset, val=float(value)), f)
  for k in range(8):
    put("none", k, ours[k])
    put("all", k, theirs[k])
  for k, value in redraw.items():
    put("none", k, value, offset=100)
  text = init_offset.page(str(tmp_path))
  assert "| mha | none | k+100 | 0,1 |" in text
  assert "At 8 or more seeds a side, the authors' draw trains worse than ours beyond seed noise." in text
  d = theirs - ours
  assert ", ".join(f"{x:+.3f}" for x in d) in text
  assert f"(mean {d.mean():+.3f} ± {d.std(ddof=1):.3f})" in text
  assert "seed 0 +0.050, seed 1 -0.040 (mean |difference| 0.045)" in text
  # the same logs with the authors' side equal in distribution: not beyond noise
  for k in range(8):
    put("all", k, ours[(k + 3) % 8])
  assert "indistinguishably from ours: the difference is within seed noise" in init_offset.page(str(tmp_path))
