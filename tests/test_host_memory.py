"""mla_jax.host_memory: freed blocks over glibc's 32 MiB mmap threshold are kept
and reused, so allocating the same large buffer again does not page-fault."""
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from mla_jax.host_memory import reuse_freed_memory
    applied = None
    if sys.argv[1] == "reuse":
        applied = reuse_freed_memory()
        assert reuse_freed_memory() == applied  # a second call changes nothing
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def faults_of_one_buffer():
        # plain malloc + memset, as XLA:CPU does (numpy would ask for huge pages)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buf = libc.malloc(64 << 20)          # 64 MiB: over glibc's mmap threshold
        ctypes.memset(buf, 1, 64 << 20)
        libc.free(buf)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_one_buffer()
    print(applied, min(faults_of_one_buffer() for _ in range(3)))
""")


def _faults(mode):
  out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
  applied, faults = out.stdout.split()
  return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_large_buffers_are_reused_without_page_faults():
  pages = (64 << 20) // 4096
  _, plain = _faults("plain")
  applied, reused = _faults("reuse")
  assert applied == "True"
  assert plain > pages // 2, f"glibc should map the buffer afresh each time ({plain} faults)"
  assert reused < pages // 20, f"the buffer should come back from the heap ({reused} faults)"
