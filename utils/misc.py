"""Small helpers: seeding, memory use, time formatting."""
from __future__ import annotations

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
