"""Bad input to the runner, as a user types it: exit status 2, one line on stderr
that names the problem (and the fix), no traceback, nothing trained and the run
directory untouched.

The cases run in ONE subprocess (`_driver`): each resets absl's flags, parses
its command line and calls the runner's main, as `python -m experiments.run`
would, so the table costs one JAX import rather than one per row.
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--d_model=32", "--num_heads=2", "--head_dim=16", "--q_lora_rank=16", "--kv_lora_rank=16",
        "--rope_head_dim=8", "--mlp_dim=64", "--variant=mlra4", "--vocab_size=300", "--batch_size=2",
        "--seq_len=16", "--steps=2", "--warmup_steps=1", "--num_train_stories=50", "--num_valid_stories=10",
        "--noprogress"]

_DRIVER = r"""
import contextlib, io, json, os, sys, time, traceback
from experiments import run
cases = json.load(open(sys.argv[1]))
workspace = sys.argv[3]

def listing():   # every path under the workspace with its size and modification time
  return sorted((os.path.join(b, f), os.path.getsize(os.path.join(b, f)), os.path.getmtime(os.path.join(b, f)))
                for b, _, fs in os.walk(workspace) for f in fs + [""] if os.path.exists(os.path.join(b, f)))

results = []
for argv in cases:
  before = listing()
  err = io.StringIO()
  start = time.time()
  code, tb = None, ""
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
      run.FLAGS.unparse_flags()
      rest = run.parse_flags(["run"] + argv)
      run.main(rest)
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    except BaseException:
      tb = traceback.format_exc()
      code = "raised"
  results.append({"code": code, "stderr": err.getvalue(), "traceback": tb, "seconds": time.time() - start,
                  "changed": listing() != before})
json.dump(results, open(sys.argv[2], "w"))
"""


def _tree_digest(path):
  """A digest of every file under `path` (names and bytes), None if it does not exist."""
  if not os.path.exists(path):
    return None
  h = hashlib.sha256()
  for base, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(base, name)
      h.update(os.path.relpath(full, path).encode())
      with open(full, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_input")
  (root / "a_file").write_text("not a directory\n")
  (root / "empty_dir").mkdir()
  (root / "not_a_tokenizer.json").write_text(json.dumps({"hello": "world"}))
  (root / "junk.flags").write_text("--steps=2\nthis line is not a flag\n")
  return root


def _cases(w):
  """(argv, what stderr must say). {w} is the workspace folder."""
  run_dir = f"--output_dir={w}/run"
  train = ["--mode=train", run_dir, f"--data_dir={w}/data"] + TINY
  return [
      (train + ["--eval_every=0"], "--eval_every must be >= 1"),
      (train + ["--ckpt_every=0"], "--ckpt_every must be >= 1"),
      (train + ["--log_every=0"], "--log_every must be >= 1"),
      (train + ["--keep_checkpoints=0"], "--keep_checkpoints must be >= 1"),
      (train + ["--keep_checkpoints=-2"], "--keep_checkpoints must be >= 1"),
      (train + ["--eval_batch_size=0"], "--eval_batch_size must be >= 1"),
      (train + ["--eval_batches=0"], "--eval_batches must be >= 1"),
      (["--mode=generate", run_dir, "--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
      (train + ["--beta2=1.5"], "beta2 must be in [0, 1)"),
      (train + ["--beta1=-0.1"], "beta1 must be in [0, 1)"),
      (train + ["--steps=0"], "steps must be >= 1"),
      (train + ["--batch_size=0"], "batch_size must be >= 1"),
      (train + ["--learning_rate=0"], "learning_rate must be > 0"),
      (train + ["--warmup_steps=5"], "warmup_steps must be in [0, steps=2]"),
      (train + ["--grad_accum=3"], "must be divisible by grad_accum=3"),
      (train + ["--min_lr_ratio=2"], "min_lr_ratio must be in [0, 1]"),
      (train + [f"--output_dir={w}/a_file"], "is a file, not a directory"),
      (train + ["--mode=bogus"], "--mode"),
      (train + ["--variant=bogus"], "bogus"),
      (train + ["--decode_impl=fast"], "decode_impl"),
      (train + ["--cache_dtype=int4"], "cache_dtype"),
      (train + ["--no_such_flag=1"], "no_such_flag"),
      (train + ["stray"], "unexpected arguments 'stray'"),
      ([f"--flagfile={w}/junk.flags"] + train, "unexpected arguments"),
      (train + ["--variant=gla2", "--num_heads=3"], "num_heads"),
      (train + ["--variant=mla", "--rope_head_dim=7"], "rope"),
      (train + [f"--tokenizer={w}/empty_dir"], "holds no tokenizer.json"),
      (train + [f"--tokenizer={w}/not_a_tokenizer.json"], "not a Hugging Face tokenizer"),
      (train + [f"--tokenizer={w}/missing.model"], "does not exist"),
      (["--mode=serve", f"--output_dir={w}/never_trained", "--page_size=-1"], "--page_size must be >= 1 (or 0"),
      (train + ["--mesh=data:two"], "mesh"),
      (train + ["--rules=bogus"], "rules"),
      (["--mode=eval", f"--output_dir={w}/never_trained"], "train first"),
      (["--mode=generate", f"--output_dir={w}/never_trained"], "train first"),
  ]


def test_bad_input_is_one_line_exit_2_and_touches_nothing(workspace, tmp_path):
  cases = _cases(workspace)
  assert len(cases) >= 25
  before = {p: _tree_digest(workspace / p) for p in ("run", "never_trained", "a_file", "data")}
  (tmp_path / "cases.json").write_text(json.dumps([argv for argv, _ in cases]))
  (tmp_path / "driver.py").write_text(_DRIVER)
  out = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "cases.json"),
                        str(tmp_path / "results.json"), str(workspace)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  problems = []
  for (argv, expected), r in zip(cases, results):
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    why = []
    if r["code"] != 2:
      why.append(f"exit {r['code']}")
    if r["traceback"] or "Traceback" in r["stderr"]:
      why.append("traceback: " + (r["traceback"] or r["stderr"])[-300:])
    if len(lines) != 1:
      why.append(f"{len(lines)} lines on stderr: {lines[:3]}")
    elif expected not in lines[0] or not lines[0].startswith("error:"):
      why.append(f"says {lines[0]!r}, not {expected!r}")
    if r["changed"]:
      why.append("changed the workspace (a run or data folder, a file)")
    if r["seconds"] > 20:
      why.append(f"took {r['seconds']:.0f} s (something compiled or built data first)")
    if why:
      problems.append(f"{' '.join(a for a in argv if a not in TINY)}: {'; '.join(why)}")
  assert not problems, "\n".join(problems)
  assert {p: _tree_digest(workspace / p) for p in before} == before


# ------------------------------------------------------------------ faults in what a run left behind


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
  """Power loss or a full disk mid-write leaves half a line; resuming drops it
  (and says so) instead of stopping on a JSON error."""
  from experiments import trainer
  lines = [json.dumps({"kind": "train", "step": s, "loss": 3.0 - s / 10}) for s in (1, 2, 3)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "train", "st')
  metrics = trainer.Metrics(str(tmp_path), resume_step=2)
  metrics.close()
  assert [r["step"] for r in trainer.read_metrics(str(tmp_path))] == [1, 2]
  assert "dropped a torn last line (4)" in capsys.readouterr().out


def test_a_bad_metrics_line_before_the_end_is_named(tmp_path):
  from experiments import trainer
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(trainer.RunError, match=r"metrics.jsonl line 2 is not JSON"):
    trainer.read_metrics(str(tmp_path))
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\nnot json\n{"step": 2}\n'   # untouched
