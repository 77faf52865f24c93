"""The ModelConfig of each sweep configuration, from the runner's own flag
parsing. Imported only in the sweep's helper subprocesses: the runner's absl
flags are process-global and share names with the sweep's."""
from __future__ import annotations

import sys


def configs(argvs: dict[str, list[str]]):
  """Yield (name, ModelConfig) for name -> runner command line."""
  from experiments import run as R
  for name, argv in argvs.items():
    R.FLAGS.unparse_flags()
    try:
      R.FLAGS(argv)
      config = R.model_config_from_flags()
    except Exception as e:  # noqa: BLE001  (a flag error or a config that fails validation)
      print(f"run {name}: {e}", file=sys.stderr)
      sys.exit(2)
    yield name, config
