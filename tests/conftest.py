"""Test setup: 8 simulated CPU devices (set before JAX starts) and shared helpers."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole suite, its runner subprocesses included:
# the same tiny models compile in many tests (the runner tests' train, eval and
# decode steps above all), and a cache hit takes ~3 s where a compile took ~20 s on
# two busy cores. It holds compiled programs only; what they compute is unchanged.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"mla_jax_tests_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size limit turns on the cache's file lock: without it an entry is read while
# another process (the other worker, a runner subprocess) is still writing it,
# and deserializing a torn executable aborts the process. 64 GiB never evicts.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 << 30))

import jax  # noqa: E402  (after the settings above: JAX reads them when imported)

from mla_jax.compat import simulated_cpu_devices  # noqa: E402

os.environ["XLA_FLAGS"] = simulated_cpu_devices(8, os.environ.get("XLA_FLAGS", ""))  # read when JAX starts

jax.config.update("jax_default_matmul_precision", "highest")


# The runner tests (subprocesses that train, resume and sweep) take minutes each:
# started first, they run beside the many short tests instead of after them, so
# neither pytest-xdist worker idles at the end of the suite.
RUNNER_FILES = ("test_sweep.py", "test_multiprocess.py", "test_train.py", "test_runner_errors.py",
                "test_kv_report.py", "test_serve.py", "test_notebook.py")


def pytest_collection_modifyitems(config, items):
  order = {name: i for i, name in enumerate(RUNNER_FILES)}
  items.sort(key=lambda item: order.get(item.path.name, len(RUNNER_FILES)))    # stable within a file
