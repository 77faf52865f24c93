"""The command line every experiments tool shares: absl's flag parsing, with bad
flags refused the way the rest of our bad input is (one line on stderr, exit 2)."""
from __future__ import annotations

import os
import sys

from absl import flags


def _flagfile_cycle(argv, chain=()) -> str:
  """'A includes B includes A' for the first flagfile that includes itself, else ''
  (absl only warns and skips it, then runs on whatever flags remain)."""
  for arg in argv:
    if not arg.startswith("--flagfile="):
      continue
    path = os.path.realpath(os.path.expanduser(arg[len("--flagfile="):]))
    if path in chain:
      return " includes ".join(list(chain[chain.index(path):]) + [path])
    if os.path.isfile(path):
      with open(path, errors="replace") as f:
        found = _flagfile_cycle([line.strip() for line in f], chain + (path,))
      if found:
        return found
  return ""


def parse_flags(argv):
  """absl's parser for every experiments tool (`app.run(main, flags_parser=cli.parse_flags)`),
  but a bad flag is one line on stderr and exit status 2, as any other bad input."""
  cycle = _flagfile_cycle(argv[1:])
  if cycle:
    print(f"error: flagfile {cycle}; remove the --flagfile line that includes it", file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}; see --helpshort for the flags", file=sys.stderr)
    sys.exit(2)
