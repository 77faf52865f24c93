"""The sweep runner: sweep-file parsing, parameter matching, judge-free sample
metrics, and a tiny sweep end to end (resume, skip, locks, results page)."""
import glob
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from experiments import sweep as S
from experiments.post_run import sample_metrics
from tests.runner_helpers import run_cmd, story_file  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_parse_orders_seed_major_and_reads_options(tmp_path):
  ff = _write(tmp_path / "a.flags", "--steps=5\n")
  sweep = _write(tmp_path / "s.sweep", f"""# comment
a {ff} --variant=mha seeds=0,1,2 paper="2.147 (+0%)"
b {ff} --variant=mla match=g   # trailing comment
c {ff} seeds=3,4 table="peak lr 1e-3"
""")
  runs = S.parse(sweep)
  assert [(r.name, r.seed) for r in runs] == [("a", 0), ("b", 0), ("c", 3), ("a", 1), ("c", 4), ("a", 2)]
  a = runs[0]
  assert a.extra == ["--variant=mha"] and a.paper == "2.147 (+0%)" and a.match == ""
  assert runs[1].match == "g" and runs[1].extra == ["--variant=mla"]
  assert [r.table for r in runs[:3]] == ["", "", "peak lr 1e-3"]


@pytest.mark.parametrize("line,message", [
    ("a missing.flags", "does not exist"),
    ("a {ff} variant=mha", "neither a --flag"),
    ("a {ff} seeds=0,x", "seeds=0,1,2"),
    ("a", "name flagfile"),
    ("a {ff}\na {ff}", "appears twice"),
    ("# nothing", "no runs"),
])
def test_parse_errors_name_the_problem(tmp_path, line, message):
  ff = _write(tmp_path / "a.flags", "--steps=5\n")
  sweep = _write(tmp_path / "s.sweep", line.format(ff=ff) + "\n")
  with pytest.raises(ValueError, match=message):
    S.parse(sweep)


def test_steps_wanted_lets_the_run_flags_override_the_flagfile(tmp_path):
  ff = _write(tmp_path / "a.flags", "--steps=300  # the default\n--eval_every=10\n")
  assert S._steps_wanted(S.Run("a", ff, [], 0, "a")) == 300
  assert S._steps_wanted(S.Run("a", ff, ["--steps=7"], 0, "a")) == 7


def test_sample_metrics_by_hand():
  texts = ["a b a b a b", "c d e"]
  m = sample_metrics(texts)
  # unigrams: a b a b a b c d e -> 5 distinct of 9; bigrams: ab ba ab ba ab, cd de -> 4 of 7
  assert m["distinct_1"] == pytest.approx(5 / 9)
  assert m["distinct_2"] == pytest.approx(4 / 7)
  # 4-grams of the first: abab baba abab -> 2 distinct of 3 -> 1/3 repeated; the second has none
  assert m["repetition_4gram"] == pytest.approx(1 / 3)


def test_loss_spikes_by_hand():
  losses = [5.0, 4.0, 3.0, 3.25, 3.31, 2.9, 2.0] + [2.0] * 9 + [2.29, 2.31]
  # step 5 (3.31) is 0.31 above step 3's 3.0; step 18 (2.31) is 0.31 above the lowest of steps 8-17
  assert S.loss_spikes(losses) == [5, 18]
  assert S.loss_spikes(losses, jump=0.32) == []
  assert S.largest_rise(losses) == pytest.approx(0.31)
  # the window: a rise over a low more than 10 steps back is not a spike
  assert S.loss_spikes([1.0] + [1.2] * 10 + [1.35]) == []
  assert S.loss_spikes([1.0] + [1.2] * 10 + [1.35], window=11) == [12]


def _fake_rows(losses_by_name):
  rows = []
  for name, finals in losses_by_name.items():
    rows.append((name, [{"seed": k, "eval": {"loss": v}, "distinct_2": 0.9, "repetition_4gram": 0.0,
                         "decode_step_ms": 2.0, "decode_batch": 16, "decode_context": 64,
                         "metrics": [{"kind": "train", "step": i + 1, "loss": x, "grad_norm": g}
                                     for i, (x, g) in enumerate([(3.0, 1.0), (2.5, 7.5), (2.9, 0.5)])]}
                        for k, v in enumerate(finals)]))
  return rows


def test_each_table_has_its_own_baseline_spikes_and_kendall_tau():
  first = {n: S.Run(n, "f", [], 0, n, paper=p, table="t") for n, p in
           [("a", "10"), ("b", "12"), ("c", ""), ("d", "11")]}
  rows = _fake_rows({"a": [2.0, 2.2], "b": [2.3, 2.3], "c": [9.0], "d": [2.0, 2.0]})
  info = {n: {"cache_per_token": 8, "params": {"non_embedding": 100}} for n in first}
  lines = []
  S._table(lines, rows, first, info, {})
  text = "\n".join(lines)
  # b against the table's first row a: 2.3 / 2.1 - 1
  assert f"| {100 * (2.3 / 2.1 - 1):+.2f}% |" in text
  # per seed: one spike (2.9 after 2.5) and the largest gradient norm
  assert "| 1/1 | 7.5/7.5 |" in text
  # tau over the rows with a paper figure (c left out): ours a(2.1) < d(2.0)? no: d < a < b;
  # paper a(10) < d(11) < b(12): pairs (a,b) agree, (a,d) disagree, (b,d) agree -> (2 - 1) / 3
  assert "Kendall's tau between the two: +0.33 (2 of 3 pairs agree); rows without a paper figure left out: c." in text
  # two rows with a paper figure (a control table): their one pair; fewer: no ordering line
  lines = []
  S._table(lines, rows[:3], first, info, {})
  assert "Kendall's tau between the two: +1.00 (1 of 1 pair agree); rows without a paper figure left out: c." \
      in "\n".join(lines)
  lines = []
  S._table(lines, rows[2:3], first, info, {})
  assert "Kendall" not in "\n".join(lines)


def test_settings_table_pairs_one_configuration_across_tables_on_common_seeds():
  """A configuration that differs only by --learning_rate / --warmup_steps is one
  row of the best-setting table, over the seeds all its settings ran."""
  first = {"a": S.Run("a", "f", ["--variant=x"], 0, "a"),
           "b": S.Run("b", "f", ["--variant=y"], 0, "b"),
           "a_lr": S.Run("a_lr", "f", ["--variant=x", "--learning_rate=1e-3"], 0, "a_lr", table="lr 1e-3"),
           "a_wu": S.Run("a_wu", "f", ["--variant=x", "--warmup_steps=90"], 0, "a_wu", table="wu 90")}
  rows = dict(_fake_rows({"a": [2.0, 2.2, 9.0], "b": [2.5], "a_lr": [2.3, 1.8], "a_wu": [2.4, 2.3]}))
  tables = {"": [("a", rows["a"]), ("b", rows["b"])], "lr 1e-3": [("a_lr", rows["a_lr"])],
            "wu 90": [("a_wu", rows["a_wu"])]}
  text = "\n".join(S.settings_table(tables, first))
  # seeds 0,1 (seed 2 only at the main setting): a 2.1, a_lr 2.05, a_wu 2.35; each run has one spike
  assert ("| a | 0,1 | 2.1000 (2 spikes) | 2.0500 (2 spikes) | 2.3500 (2 spikes) | lr 1e-3 |") in text, text
  assert "| b |" not in text        # in one table only
  assert S.settings_table({"": tables[""]}, first) == []


def test_committed_sweeps_build_and_the_mlra_comparison_is_parameter_matched():
  files = sorted(glob.glob(os.path.join(REPO, "experiments/sweeps/*.sweep")))
  assert {os.path.basename(f) for f in files} >= {"study_cpu.sweep", "mlra_cpu.sweep", "study_gpu.sweep",
                                                  "mlra_paper.sweep"}
  cwd = os.getcwd()
  os.chdir(REPO)                      # sweep files name flagfiles relative to the repository
  try:
    for f in files:
      runs = S.parse(f)
      info = S.describe(runs)
      S.check_matches(runs, info, 0.02)
      if os.path.basename(f) == "study_cpu.sweep":
        # MLA without RoPE has none, MLA+RoPE and the control MHA+RoPE (--mha_rope=on) have it
        assert [info[n]["rope"] for n in ("mha", "mla_rd2", "mla_rope_rd2", "mha_rope")] == [
            False, False, True, True]
        assert info["mha_rope"]["cache_per_token"] == info["mha"]["cache_per_token"] == 256
      if os.path.basename(f) in ("mlra_cpu.sweep", "mlra_paper.sweep"):
        # independent of check_matches: every run within 2% of the first
        counts = [info[r.name]["params"]["non_embedding"] for r in runs]
        assert max(counts) / min(counts) < 1.02 + 1e-9, (f, counts)
        assert {info[r.name]["variant"] for r in runs} >= {
            "mha", "mqa", "gqa", "mla", "gla2", "gta", "tpa", "mfa", "mlra2", "mlra4"}
  finally:
    os.chdir(cwd)


def test_an_unmatched_run_is_refused_before_training(tmp_path):
  ff = os.path.join(REPO, "experiments/configs/sweep_mlra_cpu.flags")
  sweep = _write(tmp_path / "s.sweep", f"mha {ff} --variant=mha match=m\nmqa {ff} --variant=mqa --mlp_dim=600 match=m\n")
  runs = S.parse(sweep)
  with pytest.raises(ValueError, match=r"mqa has .* non-embedding parameters, \+.*adjust its --mlp_dim"):
    S.check_matches(runs, S.describe(runs), 0.02)


def _tiny_sweep(tmp_path, story_file):  # noqa: F811
  ff = _write(tmp_path / "tiny.flags", "\n".join([
      "--mode=train", "--data=tinystories", f"--tinystories_train={story_file / 'train.txt'}",
      "--vocab_size=300", "--d_model=32", "--num_heads=2", "--head_dim=16", "--q_lora_rank=16",
      "--kv_lora_rank=16", "--rope_head_dim=8", "--mlp_dim=64", "--batch_size=4", "--seq_len=32",
      "--steps=6", "--warmup_steps=2", "--eval_every=3", "--ckpt_every=3", "--eval_batches=2",
      "--eval_batch_size=4"]) + "\n")
  sweep = _write(tmp_path / "tiny.sweep", f'mha {ff} --variant=mha seeds=0,1 paper="9.9"\n'
                                          f"mlra4 {ff} --variant=mlra4\n")
  args = [sys.executable, "-m", "experiments.sweep", f"--sweep={sweep}", f"--runs_dir={tmp_path / 'runs'}",
          f"--results_dir={tmp_path / 'results'}", f"--data_dir={story_file / 'cache'}", "--sample_prompts=2"]
  return args


def test_tiny_sweep_end_to_end(tmp_path, story_file):  # noqa: F811
  args = _tiny_sweep(tmp_path, story_file)
  # a live lock held by another worker (this test's own pid) makes the sweep leave that run alone
  held = tmp_path / "runs/tiny/mlra4/seed0"
  held.mkdir(parents=True)
  (held / ".sweep.lock").write_text(str(os.getpid()))
  out = run_cmd(args, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "mlra4 seed 0: another worker has it" in out.stdout
  logs = tmp_path / "results/tiny_logs"
  assert sorted(p.name for p in logs.iterdir()) == ["mha"]
  # a stale lock (a dead pid) is taken over, the run goes ahead
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  (held / ".sweep.lock").write_text(dead.stdout.strip())
  out = run_cmd(args, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.count("finished, skipped") == 2 and "mlra4 seed 0: training" in out.stdout
  assert not (held / ".sweep.lock").exists()

  # the page's numbers are the logs' numbers
  def final_eval(name, seed):
    with open(logs / name / f"seed{seed}" / "metrics.jsonl") as f:
      records = [json.loads(line) for line in f]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["step"] == 6
    return evals[-1]["loss"]
  page = (tmp_path / "results/tiny.md").read_text()
  mha = [final_eval("mha", s) for s in (0, 1)]
  assert "| mha | 0,1 |" in page
  assert f"{statistics.mean(mha):.4f} ± {statistics.stdev(mha):.4f}" in page
  assert f"{math.exp(final_eval('mlra4', 0)):.3f}" in page
  assert "| 9.9 |" in page and "Not finished" not in page
  summary = json.loads((logs / "mlra4/seed0/summary.json").read_text())
  assert summary["cache_per_token"] == 4 * 4 + 8 and len(summary["texts"]) == 2
  assert (tmp_path / "results/tiny_loss_curves.png").stat().st_size > 10_000
  assert (tmp_path / "results/tiny_loss_vs_cache.png").stat().st_size > 10_000

  # an interrupted run (trained, post-run summary lost) resumes without training again
  (logs / "mha/seed1/summary.json").unlink()
  before = (logs / "mha/seed1/metrics.jsonl").read_text()
  out = run_cmd(args + ["--only=mha", "--seeds=1"], cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert (logs / "mha/seed1/metrics.jsonl").read_text() == before
  assert (logs / "mha/seed1/summary.json").exists()
  page = (tmp_path / "results/tiny.md").read_text()

  # the page rebuilds from the logs alone (e.g. a fresh clone, no run directories)
  os.rename(tmp_path / "runs", tmp_path / "runs_gone")
  (tmp_path / "results/tiny.md").unlink()
  out = run_cmd(args + ["--report_only"], cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / "results/tiny.md").read_text() == page

  # side-by-side decode timing: one figure per configuration, and the page shows it
  out = run_cmd(args + ["--report_only", "--bench_decode", "--bench_rounds=1", "--bench_context=64"], cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  timings = json.loads((logs / "decode_bench.json").read_text())
  assert set(timings) == {"mha", "mlra4"}
  page = (tmp_path / "results/tiny.md").read_text()
  for name, t in timings.items():
    assert t["step_ms"] > 0 and t["context"] == 64 and t["batch"] == 16
    assert f"| {t['step_ms']:.2f} (16x64) | {1e3 * 16 / t['step_ms']:,.0f} |" in page
  assert "side by side in one process" in page
  # a control row (same model, other training flags) is the same model: timed once, the same figure
  _write(tmp_path / "tiny.sweep", (tmp_path / "tiny.sweep").read_text()
         + f'mha_lr {tmp_path / "tiny.flags"} --variant=mha --learning_rate=1e-2 table="lr 1e-2"\n')
  out = run_cmd(args + ["--report_only", "--bench_decode", "--bench_rounds=1", "--bench_context=64"], cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  timings = json.loads((logs / "decode_bench.json").read_text())
  assert list(timings) == ["mha", "mlra4", "mha_lr"] and timings["mha_lr"] == timings["mha"]
  assert timings["mlra4"]["step_ms"] != timings["mha"]["step_ms"]
  assert "Not finished yet: mha_lr" in (tmp_path / "results/tiny.md").read_text()


def test_bad_sweep_flags_are_one_line_errors(tmp_path):
  out = run_cmd([sys.executable, "-m", "experiments.sweep"], cwd=REPO)
  assert out.returncode == 2 and out.stderr.strip().startswith("error: pass --sweep")
  out = run_cmd([sys.executable, "-m", "experiments.sweep", f"--sweep={tmp_path / 'none.sweep'}"], cwd=REPO)
  assert out.returncode == 2 and "error:" in out.stderr and "none.sweep" in out.stderr
