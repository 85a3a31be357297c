"""Shared test setup: run from the repository root, few threads, deterministic seeds."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the fault-injection counts that tests/test_faults.py gathered (visible with -q, no -rA needed)."""
    counts = getattr(config, '_fault_counts', None)
    if counts:
        summary = ', '.join(f"{name}: {n}" for name, n in sorted(counts.items()))
        terminalreporter.write_line(f"fault injection: {summary}")
