"""The KV report: per-device cache at each TP degree, measured on placed arrays,
against the MLRA paper's figures and the layouts' own arithmetic."""
import csv
import itertools
import os
import subprocess
import sys

import pytest

from mla_jax import cache_report, presets

TPS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def paper_report():
  configs = {v: presets.mlra_paper(v) for v in presets.PAPER_VARIANTS}
  return {(r.variant, r.tp): r for r in cache_report.rows(configs, tps=TPS, batch=1, context=2048)}


# Per device, units of d_h = 128, per token per layer.
EXPECTED = {
    "mla": (4.5, 4.5, 4.5, 4.5),        # the paper: MLA cannot split its latent
    "mlra4": (4.5, 2.5, 1.5, 1.5),      # the paper: one block + rope key at TP 4 and 8
    "gla2": (4.5, 2.5, 2.5, 2.5),       # two latent heads: no gain past TP 2
    "gla4": (4.5, 2.5, 1.5, 1.5),
    "mlra2": (4.5, 2.5, 1.5, 1.5),
    "mha": (48, 24, 12, 6),             # 2 * 24 heads * 128 / TP
    "mqa": (2, 2, 2, 2),                # one K and one V head, replicated
    "mfa": (4, 4, 4, 4),                # one K and one V head of 256, replicated
    "tpa": tuple((2 + 2) * (24 / t + 128) / 128 for t in TPS),   # A factors split, B replicated
    "gqa": (12, 6, None, None),         # 6 KV heads: no layout on 4 or 8 devices
    "gta": (6.5, 3.5, None, None),      # 6 tied states + one 64-wide rope key
}


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_per_device_cache_in_dh_units(paper_report, variant):
  for tp, want in zip(TPS, EXPECTED[variant]):
    row = paper_report[(variant, tp)]
    if want is None:
      assert row.per_device_dh is None and row.per_device_bytes_total is None
      assert "6 KV heads cannot be laid out on tensor:" in row.note
      assert "TP degrees that work for this model" in row.note
    else:
      assert row.per_device_dh == pytest.approx(want), (variant, tp)
      assert row.note == ""


def test_whole_cache_figures(paper_report):
  mla = paper_report[("mla", 1)]
  assert mla.cache_elements_per_token == 576
  assert mla.cache_bytes_per_token == 576 * 2                     # bf16 default
  assert mla.cache_bytes_total == 576 * 2 * 24 * 1 * 2048
  mlra4 = paper_report[("mlra4", 4)]
  assert mlra4.per_device_bytes_total == 192 * 2 * 24 * 2048
  assert mlra4.mesh == "4x1" and paper_report[("mlra4", 8)].mesh == "4x2"


def test_bytes_per_token_in_each_cache_format(paper_report):
  """Scales included: MLA at the paper's (DeepSeek's) width, 512 + 64, takes
  FlashMLA's 1152 bytes in bf16 and 656 in fp8 (512 values, 4 scales, a bf16
  rope key); MLRA-4's 128-wide blocks one scale each."""
  mla, mlra4, mha = paper_report[("mla", 1)], paper_report[("mlra4", 1)], paper_report[("mha", 1)]
  assert [getattr(mla, f"bytes_per_token_{f}") for f in ("float32", "bfloat16", "fp8", "int8")] == \
      [2304, 1152, 656, 656]
  assert mlra4.bytes_per_token_int8 == 4 * (128 + 4) + 64 * 2
  assert mha.bytes_per_token_fp8 == 2 * 24 * (128 + 4)               # K and V, one scale per head


def test_an_8bit_report_measures_scales_on_the_placed_arrays():
  from mla_jax import RunOptions
  configs = {v: presets.mlra_paper(v) for v in ("mla", "mlra4")}
  rows = {(r.variant, r.tp): r for r in cache_report.rows(configs, tps=(1, 4), options=RunOptions(cache_dtype="int8"),
                                                          batch=1, context=2048)}
  assert rows[("mla", 1)].cache_bytes_per_token == 656
  # per device at TP 4: MLRA-4's one block (128 values and a scale) and the replicated bf16 rope key
  assert rows[("mlra4", 4)].per_device_bytes_total == (128 + 4 + 64 * 2) * 24 * 2048
  assert rows[("mla", 4)].per_device_bytes_total == 656 * 24 * 2048
  assert rows[("mlra4", 4)].per_device_dh == pytest.approx(1.5)      # elements: the scales aside


def test_csv_and_plot(paper_report, tmp_path):
  rows = list(paper_report.values())
  paths = cache_report.write(rows, str(tmp_path), batch=1, context=2048, layers=24)
  with open(paths["csv"]) as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(EXPECTED) * len(TPS)
  assert {(r["variant"], int(r["tp"])) for r in table} == set(paper_report)
  gqa4 = next(r for r in table if r["variant"] == "gqa" and r["tp"] == "4")
  assert gqa4["per_device_dh"] == "" and "cannot be laid out" in gqa4["note"]
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _run(*args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)    # the runner must set its own device count
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], capture_output=True,
                        text=True, env=env, timeout=300)


def test_kv_report_command(tmp_path):
  out = _run("--mode=kv_report", "--family=flags", "--variants=mha,mla,mlra4", "--tps=1,2,4",
             "--d_model=64", "--num_heads=4", "--head_dim=16", "--kv_lora_rank=32",
             "--rope_head_dim=8", "--q_lora_rank=32", "--mlp_dim=128", f"--output_dir={tmp_path}")
  assert out.returncode == 0, out.stderr
  assert "mlra4" in out.stdout
  assert os.path.exists(tmp_path / "kv_report_flags.csv")
  assert os.path.exists(tmp_path / "kv_report_flags.png")


@pytest.mark.parametrize("args,msg", [(["--tps=0,2"], "--tps must list degrees >= 1"),
                                      (["--variants=mha,nope"], "unknown variant 'nope'"),
                                      (["--mode=kv_report", "--family=flags", "--num_heads=3"],
                                       "num_heads=3 is not divisible by num_kv_heads=2")])
def test_kv_report_bad_flags(args, msg, tmp_path):
  out = _run("--mode=kv_report", f"--output_dir={tmp_path}", *args)
  assert out.returncode == 2
  assert msg in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ decode traffic (compiled)


@pytest.fixture(scope="module")
def traffic():
  configs = {v: presets.mlra_paper(v) for v in ("mla", "mlra4", "gqa")}
  report = cache_report.rows(configs, tps=TPS, batch=1, context=256, compiled=True)
  return {(r.variant, r.tp): r for r in report}


def test_compiled_decode_reads_the_papers_cache_per_device(traffic):
  """From the compiled programs: MLA reads its whole 4.5 d_h cache on every device at
  every TP; MLRA-4 reads 4.5 / 2.5 / 1.5 / 1.5 d_h at TP 1 / 2 / 4 / 8."""
  for tp, mla, mlra4 in zip(TPS, EXPECTED["mla"], EXPECTED["mlra4"]):
    assert traffic[("mla", tp)].step_cache_dh == pytest.approx(mla)
    assert traffic[("mlra4", tp)].step_cache_dh == pytest.approx(mlra4)
    # the compiled step and the placed arrays agree
    assert traffic[("mlra4", tp)].step_cache_dh == pytest.approx(traffic[("mlra4", tp)].per_device_dh)
  assert traffic[("mlra4", 4)].step_cache_bytes == (128 + 64) * 2 * 256     # bf16, batch 1, 256 slots


def test_compiled_decode_collectives(traffic):
  for v in ("mla", "mlra4"):
    one = traffic[(v, 1)]
    assert one.step_collective_bytes == 0 and one.step_collectives == ""
    for tp in TPS[1:]:
      r = traffic[(v, tp)]
      assert "all-reduce" in r.step_collectives and r.step_collective_bytes > 0
      # partial outputs of d_model = 24 d_h are summed (attention and MLP); nothing cache-sized moves
      assert 48 <= r.step_collective_dh < 100
  # sharding weights over more devices means fewer weight bytes on each
  w = [traffic[("mlra4", tp)].step_weight_bytes for tp in TPS]
  assert w == sorted(w, reverse=True)
  assert traffic[("gqa", 4)].step_cache_bytes is None and "6 KV heads" in traffic[("gqa", 4)].note


def test_decode_traffic_command(tmp_path):
  out = _run("--mode=decode_traffic", "--family=flags", "--variants=mla,mlra4", "--tps=1,4", "--cps=1,2",
             "--d_model=64", "--num_heads=4", "--head_dim=16", "--kv_lora_rank=32", "--rope_head_dim=8",
             "--q_lora_rank=32", "--mlp_dim=128", "--context=64", f"--output_dir={tmp_path}")
  assert out.returncode == 0, out.stderr
  assert "Decode traffic of one Transformer block" in out.stdout
  with open(tmp_path / "decode_traffic_flags.csv") as f:
    rows = {(r["variant"], r["tp"], r["cp"]): r for r in csv.DictReader(f)}
  # mlra4 at TP 4 here: one 8-wide block + the 8-wide rope key = 16 elements = 1 d_h of 16
  assert float(rows[("mlra4", "4", "1")]["step_cache_dh"]) == pytest.approx(1.0)
  assert float(rows[("mla", "4", "1")]["step_cache_dh"]) == pytest.approx(2.5)
  # context parallelism: each device reads half the tokens, and pays one all-gather per layer for it
  for v, tp in itertools.product(("mla", "mlra4"), ("1", "4")):
    assert float(rows[(v, tp, "2")]["step_cache_dh"]) == pytest.approx(float(rows[(v, tp, "1")]["step_cache_dh"]) / 2)
    assert rows[(v, tp, "2")]["step_collectives"].count("all-gather x1") == 1
    assert "all-gather" not in rows[(v, tp, "1")]["step_collectives"]
  assert os.path.exists(tmp_path / "decode_traffic_flags.png")
