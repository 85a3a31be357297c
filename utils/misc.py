"""Small helpers: seeding, the CPU allocator, memory use, time formatting."""
from __future__ import annotations

import ctypes
import datetime
import os
import random
import resource
import sys

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); with ``deterministic`` also ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        # cuBLAS needs this for deterministic matmuls; harmless on CPU.
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    else:
        torch.backends.cudnn.benchmark = True


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_cpu_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse (CPU inference); True when it took it.

    Why: by default glibc hands a freed block above its mmap threshold (adaptive from 128 KiB) back to the kernel,
    and trims the heap top whenever its free part grows. An inference batch allocates its 5-40 MiB activations
    anew each time, and each one comes back as fresh zeroed pages: one page fault per 4 KiB. Keeping them (mmap
    threshold 32 MiB, no trimming) measured on a Zen 5, Swin-T batch 8, ours alone, two runs each: bf16
    243 -> 184 and 327 -> 283 ms a batch, fp32 291 -> 268 and 300 -> 273 ms, the same peak memory. Training
    is not given it: there it measured +4% (bf16) and -2% to -20% (fp32), within noise at best. PyTorch's CPU
    allocator has no cache of its own and no torch API sets this. Linux with glibc only (elsewhere: False).
    The process keeps its peak heap until it exits, which its peak memory already was."""
    if not sys.platform.startswith('linux'):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1


def memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated memory; CPU: resident set size of this process (MiB)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open('/proc/self/statm') as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / (2 ** 20 if sys.platform == 'darwin' else 2 ** 10)


def memory_label(device: torch.device) -> str:
    """What ``memory_mb`` measures, named for the log: ``max_mem`` (CUDA peak allocated) or ``rss`` (CPU)."""
    name = 'max_mem' if device.type == 'cuda' else 'rss'
    return f"{name} {memory_mb(device):.0f}MB"


def format_seconds(seconds: float) -> str:
    """``H:MM:SS`` for logs."""
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))
