"""bench_checkouts --cost: compiling the same checkout twice prints the same costs."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.full
def test_cost_of_a_checkout_against_itself_is_one():
  out = subprocess.run([sys.executable, "-m", "experiments.bench_checkouts", f"--old={ROOT}", f"--new={ROOT}",
                        "--cost", "--variants=gta"], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  row = next(line.split() for line in out.stdout.splitlines() if line.startswith("gta"))
  flops, bytes_, temp = float(row[1]), float(row[3]), float(row[5])
  assert flops > 1e9 and bytes_ > 1e8 and temp > 0
  assert row[2] == row[4] == row[6] == "1.0000", out.stdout


def test_cost_needs_an_old_checkout():
  out = subprocess.run([sys.executable, "-m", "experiments.bench_checkouts", "--cost"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 2 and "--old=PATH" in out.stderr
