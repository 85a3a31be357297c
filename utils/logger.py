"""Logging: console on rank 0, ``log_rank{r}.txt`` per rank, TensorBoard on rank 0, ``metrics.jsonl``."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Dict, Optional

LOG_FORMAT = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
_OURS = '_swin_handler'  # marks handlers we added, so a second call replaces rather than duplicates them


def create_logger(output_dir: str, dist_rank: int = 0, name: str = 'swin') -> logging.Logger:
    """Log INFO to ``<output_dir>/log_rank{rank}.txt`` on every rank and to stdout on rank 0.

    Handlers go on the root logger so that the ``models``/``data`` module loggers land in the same file.
    Other ranks print only warnings and errors to the console. Returns the logger called ``name``.
    """
    os.makedirs(output_dir, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OURS, False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.INFO)
    formatter = logging.Formatter(LOG_FORMAT, datefmt='%Y-%m-%d %H:%M:%S')

    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if dist_rank == 0 else logging.WARNING)
    console.setFormatter(formatter)
    file_handler = logging.FileHandler(os.path.join(output_dir, f'log_rank{dist_rank}.txt'), mode='a')
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(formatter)
    for handler in (console, file_handler):
        setattr(handler, _OURS, True)
        root.addHandler(handler)
    return logging.getLogger(name)


def create_tb_writer(output_dir: str, enabled: bool, is_main: bool) -> Optional[Any]:
    """A TensorBoard ``SummaryWriter`` writing into ``output_dir`` on rank 0 when ``enabled``, else None."""
    if not (enabled and is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logging.getLogger(__name__).warning("TENSORBOARD is on but the tensorboard package is not installed; "
                                            "install it (pip install tensorboard) or set TENSORBOARD False")
        return None
    return SummaryWriter(log_dir=output_dir)


class MetricsFile:
    """``metrics.jsonl``: one JSON object per epoch (read by plotting scripts).

    On resume, lines for epochs at or after the resumed epoch are dropped, so a re-run epoch is not listed twice.
    """

    def __init__(self, path: str, start_epoch: int = 0):
        self.path = path
        if os.path.exists(path):
            kept = []
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash
                    if isinstance(record, dict) and record.get('epoch', -1) < start_epoch:
                        kept.append(line if line.endswith('\n') else line + '\n')
            tmp = path + '.tmp'
            with open(tmp, 'w') as f:
                f.writelines(kept)
            os.replace(tmp, path)

    def append(self, record: Dict[str, Any]) -> None:
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
            f.flush()
