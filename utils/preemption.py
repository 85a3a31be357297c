"""Graceful stop on preemption or Ctrl-C: SIGTERM, SIGUSR1 or SIGINT -> finish the update, save, exit.

Exit codes: 143 (128 + SIGTERM) after SIGTERM/SIGUSR1, 130 (128 + SIGINT) after Ctrl-C, as a shell reports a
job ended by that signal. A second Ctrl-C stops at once (Python's ``KeyboardInterrupt``), losing only the
partial update.

Schedulers announce preemption with a signal before they kill a job: SLURM sends SIGTERM (or, with
``--signal=USR1@<seconds>``, SIGUSR1) and Kubernetes/torchrun send SIGTERM, then SIGKILL after a grace period.
The handler only sets a flag. The training loop polls it after optimizer updates; once every rank agrees that a
stop was asked for, every rank finishes the current update, ``ckpt_last.pth`` is written (mid-epoch, with RNG
states and the position in the epoch) and the process exits with ``PREEMPTED_EXIT_CODE`` (143 = 128 + SIGTERM,
what a shell reports for a job ended by SIGTERM). The next start with ``TRAIN.AUTO_RESUME`` (the default) or
``--resume <output>/ckpt_last.pth`` continues exactly where it stopped.

Agreement across ranks: each rank may receive the signal at a different moment, so the decision is an
all-reduce (MAX) of the local flag, done at the same update index on every rank: after every update in a single
process (no communication at all) and every ``PRINT_FREQ`` updates with several processes (one tiny
all-reduce, cheap next to the gradient all-reduce), plus at the end of each epoch. No rank can therefore leave
while another waits in a collective.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Dict, Iterable, Optional

import torch

from .distributed import is_distributed

PREEMPTED_EXIT_CODE = 143
INTERRUPTED_EXIT_CODE = 130
STOP_SIGNALS = ('SIGTERM', 'SIGUSR1', 'SIGINT')


class Preempted(Exception):
    """Raised by the engine after the stop checkpoint is written; ``main.py`` exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = PREEMPTED_EXIT_CODE):
        super().__init__(message)
        self.exit_code = exit_code


class PreemptionGuard:
    """Catches the stop signals while active and tells the training loop, consistently on all ranks, to stop.

    Use as a context manager around training; the previous handlers are restored on exit. Outside the main
    thread (where Python cannot install handlers) it stays inert and never asks to stop.
    """

    def __init__(self, device: torch.device = torch.device('cpu'), signals: Iterable[str] = STOP_SIGNALS):
        self.device = device
        self.signal_names = [name for name in signals if hasattr(signal, name)]
        self.received: Optional[str] = None  # name of the first stop signal seen by this process
        self._previous: Dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        # Only set a flag: logging or saving inside a signal handler can deadlock on locks held by the loop.
        if signum == getattr(signal, 'SIGINT', None):
            if self.received == 'SIGINT':
                raise KeyboardInterrupt  # the second Ctrl-C: stop at once
            # os.write, not print: a handler that prints while the loop is printing raises a reentrancy error.
            os.write(2, b"\nCtrl-C: finishing the current update, then saving a checkpoint "
                        b"(Ctrl-C again to stop at once)\n")
        if self.received is None:
            self.received = signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        """130 when the stop came from Ctrl-C (SIGINT), else 143."""
        return INTERRUPTED_EXIT_CODE if self.received == 'SIGINT' else PREEMPTED_EXIT_CODE

    def __enter__(self) -> 'PreemptionGuard':
        if threading.current_thread() is threading.main_thread():
            for name in self.signal_names:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """Whether this process has received a stop signal (local; not agreed with other ranks)."""
        return self.received is not None

    def agreed_stop(self) -> bool:
        """True when any rank received a stop signal. A collective with several processes: every rank must call
        it at the same point of the loop."""
        if not is_distributed():
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop and self.received is None:
            self.received = 'a stop signal on another rank'
        return stop
