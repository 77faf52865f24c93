"""Bad input to the runner, as a user types it: exit status 2, one line on stderr
that names the problem (and the fix), no traceback, nothing trained and the run
directory untouched.

The cases run in ONE subprocess (`_driver`): each resets absl's flags, parses
its command line and calls the runner's main, as `python -m experiments.run`
would, so the table costs one JAX import rather than one per row. The driver
first trains one tiny run (`trained`), which the resume, eval, generate and serve
rows then meet with changed or impossible flags; that run, the shared dataset
and every other file must come out byte-identical.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--d_model=32", "--num_heads=2", "--head_dim=16", "--q_lora_rank=16", "--kv_lora_rank=16",
        "--rope_head_dim=8", "--mlp_dim=64", "--variant=mlra4", "--vocab_size=300", "--batch_size=2",
        "--seq_len=16", "--steps=2", "--warmup_steps=1", "--num_train_stories=50", "--num_valid_stories=10",
        "--noprogress"]

_DRIVER = r"""
import contextlib, hashlib, io, json, os, shutil, sys, time, traceback
from experiments import run
setup, cases = json.load(open(sys.argv[1]))
workspace = sys.argv[3]

import jax
compiles = [0]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: compiles.__setitem__(0, compiles[0] + ("backend_compile" in event)))

def call(argv):
  run.FLAGS.unparse_flags()
  run.main(run.parse_flags(["run"] + argv))

for argv in setup:       # must succeed: what the cases then meet
  try:
    call(argv)
  except SystemExit as e:
    sys.exit(f"setup {argv} exited {e.code}")
# a copy of the trained run whose only checkpoint lost its state/_METADATA
shutil.copytree(os.path.join(workspace, "trained"), os.path.join(workspace, "no_metadata"))
(step,) = [d for d in os.listdir(os.path.join(workspace, "no_metadata", "checkpoints")) if d.isdigit()]
os.remove(os.path.join(workspace, "no_metadata", "checkpoints", step, "state", "_METADATA"))

def listing():   # every path under the workspace with its modification time and a digest of its bytes
  def entry(path):
    digest = hashlib.sha1(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else ""
    return path, os.path.getmtime(path), digest
  return sorted(entry(os.path.join(b, f)) for b, _, fs in os.walk(workspace) for f in fs + [""]
                if os.path.exists(os.path.join(b, f)) and ".lock" not in f)

results = []
for argv in cases:
  before, compiled = listing(), compiles[0]
  err = io.StringIO()
  start = time.time()
  code, tb = None, ""
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
      call(argv)
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    except BaseException:
      tb = traceback.format_exc()
      code = "raised"
  results.append({"code": code, "stderr": err.getvalue(), "traceback": tb, "seconds": time.time() - start,
                  "changed": listing() != before, "compiles": compiles[0] - compiled})
json.dump(results, open(sys.argv[2], "w"))
"""


def _authors_checkpoint(folder, *, config=None, config_text=None, nan=False):
  """A tiny MLA checkpoint in the MLRA authors' layout (safetensors + config.json)."""
  from safetensors.numpy import save_file
  from test_convert import MANIFEST, random_tensors
  folder.mkdir()
  tensors = random_tensors("mla")
  if nan:
    tensors["transformer.h.1.attn.c_proj.weight"][0, :3] = np.nan
  save_file(tensors, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(config_text if config_text is not None
                                      else json.dumps({**MANIFEST["mla"]["config"], **(config or {})}))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_input")
  (root / "a_file").write_text("not a directory\n")
  (root / "empty_dir").mkdir()
  (root / "not_a_tokenizer.json").write_text(json.dumps({"hello": "world"}))
  (root / "junk.flags").write_text("--steps=2\nthis line is not a flag\n")
  (root / "self.flags").write_text(f"--steps=2\n--flagfile={root / 'self.flags'}\n")
  (root / "a.flags").write_text(f"--flagfile={root / 'b.flags'}\n")
  (root / "b.flags").write_text(f"--steps=3\n--flagfile={root / 'a.flags'}\n")
  (root / "notes.txt").write_text("these are my notes, not a checkpoint\n" * 20)
  (root / "binary.txt").write_bytes(bytes(range(256)) * 64)
  (root / "empty.txt").write_text("")
  (root / "one_story.txt").write_text("Tom had a ball. The ball was red.\n<|endoftext|>\n")
  _authors_checkpoint(root / "ckpt_nan", nan=True)
  _authors_checkpoint(root / "ckpt_other_config", config={"n_layer": 3})
  _authors_checkpoint(root / "ckpt_broken_config", config_text='{"n_layer": 2,')
  # Hugging Face folders whose config.json alone is refused (no weights are read)
  deepseek = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 64,
              "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
              "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
              "first_k_dense_replace": 1, "n_routed_experts": 8}
  for name, cfg in (("hf_moe", deepseek), ("hf_gptneox", {"architectures": ["GPTNeoXForCausalLM"]})):
    (root / name).mkdir()
    (root / name / "config.json").write_text(json.dumps(cfg))
  return root


def _cases(w):
  """(argv, what stderr must say). {w} is the workspace folder."""
  run_dir = f"--output_dir={w}/run"
  train = ["--mode=train", run_dir, f"--data_dir={w}/data"] + TINY
  resume = ["--mode=train", f"--output_dir={w}/trained", f"--data_dir={w}/data"] + _trained_flags()
  tiny_data = ["--num_train_stories=50", "--num_valid_stories=10"]
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
      (train + ["--variant=mla", "--kv_lora_rank=192", "--cache_dtype=int8"],
       "cache_dtype=int8 cannot hold mla's kv_latent: a block 192 wide"),
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
      (["--mode=cache_quality", f"--output_dir={w}/never_trained"], "train first"),
      (["--mode=cache_quality", f"--output_dir={w}/trained", "--quality_prompts=0"], "--quality_prompts must be >= 1"),
      # flagfiles
      ([f"--flagfile={w}/self.flags"] + train, "self.flags includes " + f"{w}/self.flags"),
      ([f"--flagfile={w}/a.flags"] + train, "b.flags includes " + f"{w}/a.flags"),
      # stories files
      (train + ["--data=tinystories", f"--tinystories_train={w}/binary.txt"], "binary.txt is not text"),
      (train + ["--data=tinystories", f"--tinystories_train={w}/one_story.txt"], "holds 1 story: too few"),
      (train + ["--data=tinystories", f"--tinystories_train={w}/missing.txt"], "matches no .txt or .json"),
      (train + ["--data=tinystories", f"--tinystories_train={w}/empty.txt"], "no stories found"),
      (train + ["--data=tinystories"], "needs --tinystories_train=PATH"),
      # resuming the trained run with flags that change its data, its token ids or its model
      (resume + ["--num_train_stories=60"], "dataset synthetic_stories/n50_v10_s0_g1 -> synthetic_stories/n60"),
      (resume + ["--data_seed=1"], "was trained on other data than these flags give"),
      (resume + ["--tokenizer_vocab_size=500"], "tokenizer "),
      (resume + ["--seq_len=8"], "--seq_len 16 -> 8"),
      (resume + ["--batch_size=4"], "--batch_size 2 -> 4"),
      (resume + ["--seed=3"], "--seed 0 -> 3"),
      (resume + ["--variant=mla"], "holds checkpoints of a different model"),
      (resume + ["--d_model=64"], "d_model: saved 32, now 64"),
      # reading the trained run
      (["--mode=generate", f"--output_dir={w}/trained", "--max_new_tokens=2000000000"], "GB, more than this device"),
      (["--mode=serve", f"--output_dir={w}/trained", "--max_seqs=100000000", "--requests=-"], "GB, more than this device"),
      (["--mode=eval", f"--output_dir={w}/trained", "--eval_batch_size=64", f"--data_dir={w}/data", *tiny_data],
       "validation split is too small"),
      (["--mode=eval", f"--output_dir={w}/no_metadata"], "state/_METADATA missing"),
      # importing the authors' checkpoints
      (["--mode=convert", f"--torch_checkpoint={w}/notes.txt", f"--output_dir={w}/converted"],
       "notes.txt is not a PyTorch checkpoint"),
      (["--mode=convert", f"--torch_checkpoint={w}/ckpt_nan", f"--output_dir={w}/converted", "--variant=mla"],
       "holds 3 NaN or infinite values"),
      (["--mode=convert", f"--torch_checkpoint={w}/ckpt_other_config", f"--output_dir={w}/converted",
        "--variant=mla"], "config.json says n_layer=3 but the tensors hold 2"),
      (["--mode=convert", f"--torch_checkpoint={w}/ckpt_broken_config", f"--output_dir={w}/converted",
        "--variant=mla"], "ckpt_broken_config/config.json is not valid JSON"),
      (["--mode=convert", f"--torch_checkpoint={w}/ckpt_nan", f"--output_dir={w}/trained", "--variant=mla"],
       "holds 3 NaN"),
      (["--mode=convert", f"--output_dir={w}/converted"], "needs --torch_checkpoint"),
      # importing Hugging Face checkpoints
      (["--mode=convert", f"--hf_checkpoint={w}/hf_moe", f"--output_dir={w}/converted"],
       "this DeepSeek checkpoint has MoE layers (3 of 4, from first_k_dense_replace=1); MoE FFNs are not supported"),
      (["--mode=convert", f"--hf_checkpoint={w}/hf_gptneox", f"--output_dir={w}/converted"],
       "architecture 'GPTNeoXForCausalLM' is not supported"),
      (["--mode=convert", f"--hf_checkpoint={w}/empty_dir", f"--output_dir={w}/converted"],
       "holds no config.json"),
      # turning a run into a latent model, distilling from one
      (["--mode=convert_latent", f"--output_dir={w}/latent"], "needs --convert_from=RUN_DIR"),
      (["--mode=convert_latent", f"--convert_from={w}/trained", f"--output_dir={w}/latent"],
       "the source is a mlra4 model; convert_latent turns MHA, MQA or GQA models into latent ones"),
      (["--mode=convert_latent", f"--convert_from={w}/trained", f"--output_dir={w}/latent", "--variant=gqa"],
       "convert_latent converts into mla, gla2, gla4, mlra2, mlra4"),
      (["--mode=convert_latent", f"--convert_from={w}/nowhere", f"--output_dir={w}/latent"],
       "no finished checkpoint in"),
      (["--mode=convert_report", f"--convert_from={w}/trained", f"--output_dir={w}/latent", "--report_ranks=a"],
       "take integers"),
      (resume + [f"--distill_from={w}/nowhere"], "no finished checkpoint in"),
      (resume + [f"--distill_from={w}/trained"], "--distill_from names the run being trained"),
      (train + [f"--distill_from={w}/trained"], "has 512 vocabulary rows and this model 300"),
      (train + ["--distill_weight=1.5"], "distill_weight must be in [0, 1]"),
      (["--mode=export", f"--output_dir={w}/trained"], "--mode=export needs --export_dir=DIR"),
      (["--mode=export", f"--output_dir={w}/trained", f"--export_dir={w}/a_file"], "exists and is not an empty folder"),
  ]


def _setup(w):
  """The run the resume and read rows meet: two steps of a tiny MLRA-4 model."""
  return [["--mode=train", f"--output_dir={w}/trained", f"--data_dir={w}/data", *_trained_flags()]]


def _trained_flags():
  flags = [f for f in TINY if not f.startswith(("--vocab_size", "--eval"))]
  return flags + ["--vocab_size=512", "--eval_batch_size=2", "--eval_batches=1", "--max_new_tokens=4"]


def test_bad_input_is_one_line_exit_2_and_touches_nothing(workspace, tmp_path):
  cases = _cases(workspace)
  assert len(cases) >= 40
  (tmp_path / "cases.json").write_text(json.dumps([_setup(workspace), [argv for argv, _ in cases]]))
  (tmp_path / "driver.py").write_text(_DRIVER)
  out = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "cases.json"),
                        str(tmp_path / "results.json"), str(workspace)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
                            "PYTHONPATH": ROOT})      # uncached: every compile is counted
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert len(results) == len(cases)
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
    if r["compiles"]:
      why.append(f"compiled {r['compiles']} program(s) before refusing")
    if r["seconds"] > 20:
      why.append(f"took {r['seconds']:.0f} s (something built data first)")
    if why:
      problems.append(f"{' '.join(a for a in argv if a not in TINY)}: {'; '.join(why)}")
  assert not problems, "\n".join(problems)


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


def test_resume_data_keeps_a_run_on_its_data_and_lets_an_imported_run_take_any(tmp_path):
  """The decision behind the resume rows of the table, in-process: the same flags
  resume in place, other data is refused (or with --allow_data_change starts a fresh
  order), and an imported step-0 run (meta["converted_from"]) takes any data."""
  import dataclasses
  from experiments import trainer
  from experiments.specs import DataSpec
  from mla_jax import train as T
  spec = DataSpec(data_dir=str(tmp_path), num_train=50, num_validation=10, vocab_size=512)
  tc = T.TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1)
  key = trainer.data_key(spec)
  meta = {"data": key, "tokenizer": trainer.tok.sentencepiece_path(spec.root, key, 512),
          "train_config": dataclasses.asdict(tc)}
  assert trainer.resume_data(meta, spec, tc, "run") == (spec, True)
  other = dataclasses.replace(spec, num_train=60)
  with pytest.raises(trainer.RunError, match=r"dataset synthetic_stories/n50_v10_s0_g1 -> synthetic_stories/n60"):
    trainer.resume_data(meta, other, tc, "run")
  allowed = dataclasses.replace(other, allow_change=True)
  assert trainer.resume_data(meta, allowed, tc, "run") == (allowed, False)
  imported = {**meta, "converted_from": "/somewhere/model.safetensors", "data": ""}
  assert trainer.resume_data(imported, other, dataclasses.replace(tc, seq_len=64), "run") == (other, False)


def test_every_tool_refuses_a_bad_flag_in_one_line():
  """Every `python -m experiments.<tool>` parses through cli.parse_flags (absl alone
  prints 'FATAL Flags parsing error' plus a usage hint and exits 1); two of them
  are run with a bad flag value."""
  import re
  tools = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments")) if f.endswith(".py")
                 and "app.run(" in open(os.path.join(ROOT, "experiments", f)).read())
  assert len(tools) >= 11, tools
  for tool in tools:
    text = open(os.path.join(ROOT, "experiments", f"{tool}.py")).read()
    assert re.findall(r"app\.run\(([^)]*)\)", text) == ["main, flags_parser=cli.parse_flags"], tool
  for tool, bad in (("init_offset", "--draw_seed_offset=ten"), ("compare_runs", "--no_such_flag=1")):
    out = subprocess.run([sys.executable, "-m", f"experiments.{tool}", bad], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 2, (tool, out.stderr[-1000:])
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error: "), out.stderr
    assert bad.split("=")[0].lstrip("-") in out.stderr, out.stderr
