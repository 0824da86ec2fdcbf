"""run.host_allocator: keep freed host memory, so a step's large buffers are not mapped and zeroed again."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from fastmil.train import TrainConfig

PROBE = """
import resource, sys
import torch
if sys.argv[1] == "keep":
    from fastmil.train.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory()
n = 64 * 2**20 // 4  # a 64 MiB fp32 buffer: above glibc's largest mmap threshold (32 MiB)
torch.empty(n).fill_(1.0)  # allocated, touched, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(n).fill_(2.0)  # the same size again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting exists for glibc only")
def test_kept_memory_is_reused_without_page_faults():
    pages = 64 * 2**20 // 4096
    assert _faults("system") > pages // 2  # glibc's default: the buffer is mapped (and faulted in) again
    assert _faults("keep") < pages // 20  # kept: the freed heap space is reused


def test_host_allocator_config():
    assert TrainConfig().run.host_allocator == "keep"
    assert TrainConfig.from_dict({"run": {"host_allocator": "system"}}).run.host_allocator == "system"
    with pytest.raises(Exception, match="host_allocator"):
        TrainConfig.from_dict({"run": {"host_allocator": "jemalloc"}})
