"""Shared test setup: run from the repository root, few threads, deterministic seeds."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope='session')
def _fast_path_cache(tmp_path_factory):
    """The fast-path choice cache (MODEL.FAST_PATHS_SELECT measure) of the test session's own, never the user's
    ~/.cache (spawned and torchrun processes inherit the variables)."""
    path = str(tmp_path_factory.mktemp('fast_path_cache') / 'choices.json')
    previous = {k: os.environ.get(k) for k in ('SWIN_FAST_PATHS_CACHE', 'SWIN_FAST_PATHS_SELECT')}
    os.environ['SWIN_FAST_PATHS_CACHE'] = path
    # today's paths in every run unless a test unsets this (tests/test_fast_path_select.py): the suite's many
    # runs spend no time measuring, and their results do not depend on the timings of a shared machine
    os.environ['SWIN_FAST_PATHS_SELECT'] = 'all'
    yield path
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fast_paths_restored():
    """A test that flips the process-wide fast-path switch (models.fast_paths, e.g. through a config with
    MODEL.FAST_PATHS False) leaves it as it found it (as SWIN_FAST_PATHS set it when not imported yet)."""
    module = sys.modules.get('models.fast_paths')
    before = module.use_fast_paths() if module is not None else None
    choices = module.get_fast_path_choices() if module is not None else None
    yield
    module = sys.modules.get('models.fast_paths')
    if module is not None:
        module.set_fast_paths(module.enabled_by_environment() if before is None else before)
        module.set_fast_path_choices(choices if choices is not None else module.all_on())


@pytest.fixture
def fast_paths_on():
    """For the tests of the fast paths themselves: the switch on, whatever SWIN_FAST_PATHS says."""
    from models.fast_paths import fast_paths_enabled
    with fast_paths_enabled(True):
        yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the fault-injection counts that tests/test_faults.py gathered (visible with -q, no -rA needed)."""
    counts = getattr(config, '_fault_counts', None)
    if counts:
        summary = ', '.join(f"{name}: {n}" for name, n in sorted(counts.items()))
        terminalreporter.write_line(f"fault injection: {summary}")
