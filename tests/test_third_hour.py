"""The third hour (issue 24): a resumed run's metrics equal the straight run's, one run per output folder,
one-line errors under torchrun, the smaller usability fixes, and small non-square images.

Training runs use the one-block-per-stage Swin of tests/test_faults.py (embed dim 16, window 4, 32 px) on a
few scikit-learn digit images, in subprocesses with OMP_NUM_THREADS=1.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import subprocess_env, write_digits_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join('swin_tiny_patch4_window7_224', 'default')  # <OUTPUT>/<MODEL.NAME>/<TAG>
TINY = ['DATA.DATASET', 'folder', 'MODEL.SWIN.EMBED_DIM', '16', 'MODEL.SWIN.DEPTHS', '[1,1]',
        'MODEL.SWIN.NUM_HEADS', '[1,2]', 'MODEL.SWIN.WINDOW_SIZE', '4', 'DATA.IMG_SIZE', '32',
        'MODEL.NUM_CLASSES', '4', 'DATA.NUM_WORKERS', '0']
RUN = ['DETERMINISTIC', 'True', 'PRINT_FREQ', '1', 'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.EPOCHS', '3']
TRAIN_LINE = 'Train: ['


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """train/ (32 images) and val/ (16 images): 4 digit classes as 32 px RGB PNGs (4 updates per epoch)."""
    return write_digits_folder(tmp_path_factory.mktemp('digits'), 4, 8, 4)


def _cmd(data, out, extra=()):
    return [sys.executable, 'main.py', '--data-path', data, '--output', out, '--batch-size', '8',
            '--device', 'cpu', '--disable_amp', '--opts', *TINY, *RUN, *extra]


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _signal_after(proc, sig, train_lines):
    """Send ``sig`` to ``proc`` once ``train_lines`` training log lines appeared; returns (exit code, output)."""
    lines, seen = [], 0
    for line in proc.stdout:
        lines.append(line)
        if TRAIN_LINE in line:
            seen += 1
            if seen == train_lines:
                proc.send_signal(sig)
                break
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, ''.join(lines) + (rest or '')


def _metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- 1. resumed metrics

@pytest.mark.slow
@pytest.mark.parametrize('sig,after', [(signal.SIGINT, 6), (signal.SIGTERM, 2)])
def test_interrupted_run_writes_the_straight_runs_metrics(sig, after, digits, tmp_path):
    """Ctrl-C (or SIGTERM) mid-epoch and the same command again: every field of every metrics.jsonl line equals
    the uninterrupted run's (the wall-clock ``time`` only in being there: it counts the epoch's time before the
    stop too, so it is at least the resumed part)."""
    straight = str(tmp_path / 'straight')
    _ok(_run(_cmd(digits, straight)))
    out = str(tmp_path / 'interrupted')
    code, text = _signal_after(_start(_cmd(digits, out)), sig, after)
    assert code in (130, 143), text[-3000:]
    _ok(_run(_cmd(digits, out)))
    want, got = _metrics(os.path.join(straight, MODEL_DIR)), _metrics(os.path.join(out, MODEL_DIR))
    assert [m['epoch'] for m in got] == [0, 1, 2]
    for ours, theirs in zip(got, want):
        assert ours.keys() == theirs.keys()
        assert {k: v for k, v in ours.items() if k != 'time'} == {k: v for k, v in theirs.items() if k != 'time'}
        assert ours['time'] > 0
