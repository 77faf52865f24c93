"""Test setup: 8 simulated CPU devices (set before JAX starts) and shared helpers."""
import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole suite, its runner subprocesses included:
# the same tiny models compile in many tests (the runner tests' train, eval and
# decode steps above all), and a cache hit takes ~3 s where a compile took ~20 s on
# two busy cores. It holds compiled programs only; what they compute is unchanged.
# Only programs that took a second or more to compile are written (about 1 in 25
# here): serializing an executable is where jaxlib 0.10.2's XLA:CPU has crashed a
# worker (a segfault in `executable.serialize()`), and a tiny one recompiles as fast
# as it loads. Fewer writes, fewer crashes; not none (one in a sharded test's
# program on the next clean run): the rerun below still catches them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"mla_jax_tests_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size limit turns on the cache's file lock: without it an entry is read while
# another process (the other worker, a runner subprocess) is still writing it,
# and deserializing a torn executable aborts the process. 64 GiB never evicts.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 << 30))

import jax  # noqa: E402  (after the settings above: JAX reads them when imported)

from mla_jax.compat import simulated_cpu_devices  # noqa: E402

# The suite compiles thousands of tiny programs (every eager op, every test's model)
# and runs each a few times: LLVM's optimisation is most of an XLA:CPU compile
# (3x here), so tests compile without it. These flags lower LLVM's effort; the
# traffic tests, which read the compiled HLO and its cost analysis, pass unchanged.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = simulated_cpu_devices(8, f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}")  # read when JAX starts

jax.config.update("jax_default_matmul_precision", "highest")


# The runner tests (subprocesses that train, resume and sweep) take minutes each:
# started first, they run beside the many short tests instead of after them, so
# neither pytest-xdist worker idles at the end of the suite.
RUNNER_FILES = ("test_sweep.py", "test_multiprocess.py", "test_train.py", "test_runner_errors.py",
                "test_kv_report.py", "test_serve.py", "test_notebook.py")


def pytest_collection_modifyitems(config, items):
  order = {name: i for i, name in enumerate(RUNNER_FILES)}
  items.sort(key=lambda item: order.get(item.path.name, len(RUNNER_FILES)))    # stable within a file


# A crashed xdist worker (a segfault or abort inside XLA) prints its threads'
# stacks to stderr, where they drown in the output and CI shows only the tail:
# the list of extension modules. Each worker writes them to a file instead, and
# the controller prints the signal and the crashing thread's stack last.
CRASH_DIR = "MLA_JAX_TEST_CRASH_DIR"
_crash_file = None


@pytest.hookimpl(trylast=True)             # after pytest's faulthandler plugin, whose handler this replaces
def pytest_configure(config):
  global _crash_file
  import faulthandler
  if not hasattr(config, "workerinput"):
    os.environ[CRASH_DIR] = tempfile.mkdtemp(prefix="mla_jax_test_crashes_")    # workers inherit it
  elif os.environ.get(CRASH_DIR):
    _crash_file = open(os.path.join(os.environ[CRASH_DIR], f"{config.workerinput['workerid']}-{os.getpid()}.txt"), "w")
    faulthandler.enable(file=_crash_file, all_threads=True)


# jaxlib 0.10.2's XLA:CPU has crashes that strike at random in its worker threads
# (jax-ml/jax#39257, #40412: YNNPACK fusions; simulated meshes also run without
# them), seen here about once per CI run, each time in another test of a simulated
# mesh. A test whose worker died of a fatal signal runs once more in a fresh worker,
# is reported as RERUN with the crash printed at the end, and fails if it crashes
# again. An assertion or an exception is never rerun.
CRASH_RERUNS = 1
_crashes: dict[str, int] = {}


@pytest.hookimpl(optionalhook=True)        # an xdist hook: absent under -p no:xdist
def pytest_handlecrashitem(crashitem, report, sched):
  if _crashes.get(crashitem, 0) < CRASH_RERUNS:
    sched.mark_test_pending(crashitem)
    report.outcome = "rerun"
  _crashes[crashitem] = _crashes.get(crashitem, 0) + 1


def pytest_report_teststatus(report):
  if report.outcome == "rerun":
    return "rerun", "R", ("RERUN", {"yellow": True})
  return None


def crash_summary(text: str, max_lines: int = 40) -> list[str]:
  """The signal line and the crashing thread's stack from a faulthandler dump."""
  text = text.split("\nExtension modules:")[0]
  blocks = text.strip().split("\n\n")
  current = [b for b in blocks if b.startswith("Current thread")]
  if current:
    return (blocks[0].splitlines()[:1] + current[0].splitlines())[:max_lines]
  # crashed in a thread Python does not know (XLA's own): every Python thread's innermost frames
  return (blocks[0].splitlines()[:1] + ["(not in a Python thread; the innermost frames of each:)"] +
          [line for b in blocks[1:] for line in b.splitlines()[:4]])[:max_lines]


def pytest_unconfigure(config):
  """The controller removes the crash folder when no worker crashed (else it stays, to read)."""
  folder = os.environ.get(CRASH_DIR)
  if hasattr(config, "workerinput") or not folder or not os.path.isdir(folder):
    return
  files = [os.path.join(folder, f) for f in os.listdir(folder)]
  if all(os.path.getsize(f) == 0 for f in files):
    for f in files:
      os.remove(f)
    os.rmdir(folder)


@pytest.hookimpl(trylast=True)             # after the durations table: the last thing CI's tail shows
def pytest_terminal_summary(terminalreporter):
  folder = os.environ.get(CRASH_DIR)
  if not folder or not os.path.isdir(folder):
    return
  for test, count in _crashes.items():
    terminalreporter.write_line(f"{test}: its worker crashed {count} time(s)"
                                f"{'; it was rerun' if count <= CRASH_RERUNS else ''}", yellow=True)
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name)) as f:
      text = f.read()
    if text.strip():
      terminalreporter.section(f"worker crash ({name})")
      for line in crash_summary(text):
        terminalreporter.write_line(line)
