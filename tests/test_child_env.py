"""The training process's environment (launch.CHILD_ENV) returns freed tensor memory to the system."""

import os
import subprocess
import sys

from leantune.training.launch import CHILD_ENV

# A step's pattern in small, with glibc's malloc as torch's CPU allocator uses it: a large block freed
# (glibc then raises its mmap threshold above its size), 200 blocks of 1 MiB, all freed but the last
# one. Prints the RSS growth in MiB.
STEP = """
import ctypes

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def rss_mib():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024

def touched(size):
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    return p

before = rss_mib()
libc.free(touched(8 << 20))
blocks = [touched(1 << 20) for _ in range(200)]
for p in blocks[:-1]:
    libc.free(p)
print(rss_mib() - before)
"""

def rss_growth(extra_env: dict) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", STEP], env={**env, **extra_env},
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def test_freed_activations_leave_the_training_process():
    assert rss_growth({}) > 150  # glibc's default: the freed 199 MiB stay in the heap
    assert rss_growth(CHILD_ENV) < 20
