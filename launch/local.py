"""Start an N-process run on this machine (CPU devices, gloo collectives).

    python launch/local.py --processes=2 --devices_per_process=2 -- \\
        python -m experiments.run --flagfile=experiments/configs/quickstart.flags --mesh=data:4

Every child gets its own coordinator flags and its own CPU device count (an
inherited XLA_FLAGS device count is removed: it would be wrong for the
children). Process 0's output streams here; the others' go to
`<log_dir>/process_<i>.log` and are printed if a process fails. When one
process fails, the rest are stopped and this exits with its status.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env() -> dict:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=2, help="processes to start")
  parser.add_argument("--devices_per_process", type=int, default=1, help="CPU devices per process")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: pick a free one)")
  parser.add_argument("--log_dir", default="runs/launch_logs", help="where processes 1.. log")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds before every process is stopped")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each process runs")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after --, e.g. -- python -m experiments.run --flagfile=...")
  if args.processes < 1 or args.devices_per_process < 1:
    parser.error("--processes and --devices_per_process must be >= 1")
  port = args.port or free_port()
  os.makedirs(args.log_dir, exist_ok=True)
  procs, logs = [], []
  for i in range(args.processes):
    cmd = command + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={args.processes}",
                     f"--process_id={i}", f"--local_device_count={args.devices_per_process}"]
    if i == 0:
      out = None
    else:
      out = open(os.path.join(args.log_dir, f"process_{i}.log"), "w")
      logs.append(out)
    procs.append(subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT if out else None))
  deadline = time.time() + args.timeout
  status = 0
  try:
    while procs and time.time() < deadline:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        status = failed[0][1]
        print(f"launch: process {failed[0][0]} exited with status {status}; stopping the others",
              file=sys.stderr)
        break
      if all(c == 0 for c in codes):
        break
      time.sleep(0.2)
    else:
      if procs:
        status = 124
        print(f"launch: timed out after {args.timeout:.0f}s; stopping every process", file=sys.stderr)
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
    for p in procs:
      try:
        p.wait(timeout=20)
      except subprocess.TimeoutExpired:
        p.kill()
    for f in logs:
      f.close()
  if status:
    for i in range(1, args.processes):
      path = os.path.join(args.log_dir, f"process_{i}.log")
      with open(path) as f:
        tail = f.read().strip().splitlines()[-15:]
      print(f"--- process {i} ({path}), last lines:\n" + "\n".join(tail), file=sys.stderr)
  return status


if __name__ == "__main__":
  sys.exit(main())
