#!/usr/bin/env python
"""Plot the loss and accuracy curves of one or more runs from their ``metrics.jsonl`` into a PNG.

``metrics.jsonl`` (written by the engine into the run's output folder) holds one JSON object per epoch with
``epoch, train_loss, val_acc1, val_acc5, val_loss, lr``. Several runs (e.g. a training and its fine-tune) are
drawn one after the other on a shared epoch axis.

    python scripts/plot_metrics.py demo_output/swin_demo_digits_32/default/metrics.jsonl --out curves.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

REQUIRED_KEYS = ('epoch', 'train_loss', 'val_acc1', 'val_loss')


def read_metrics(path: str) -> List[Dict[str, float]]:
    """The per-epoch records of ``path``, sorted by epoch (a later line for the same epoch wins)."""
    if os.path.isdir(path):
        path = os.path.join(path, 'metrics.jsonl')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file not found: {path}")
    by_epoch: Dict[int, Dict[str, float]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            missing = [k for k in REQUIRED_KEYS if k not in record]
            if missing:
                raise ValueError(f"{path} line {number}: missing keys {missing} (has {sorted(record)})")
            by_epoch[int(record['epoch'])] = record
    if not by_epoch:
        raise ValueError(f"{path} holds no epoch records")
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_runs(paths: Sequence[str], out: str, labels: Sequence[str] | None = None, title: str = '') -> str:
    """Draw train/val loss and val top-1/top-5 of the runs in ``paths`` into the PNG ``out``; return ``out``."""
    import matplotlib
    matplotlib.use('Agg')  # no display needed
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [os.path.basename(os.path.dirname(os.path.abspath(p))) or p
                                          for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for path, label in zip(paths, labels):
        records = read_metrics(path)
        epochs = [offset + r['epoch'] + 1 for r in records]
        ax_loss.plot(epochs, [r['train_loss'] for r in records], '-', label=f'{label} train')
        ax_loss.plot(epochs, [r['val_loss'] for r in records], '--', label=f'{label} val')
        ax_acc.plot(epochs, [r['val_acc1'] for r in records], '-o', markersize=3, label=f'{label} top-1')
        if all('val_acc5' in r for r in records):
            ax_acc.plot(epochs, [r['val_acc5'] for r in records], ':', label=f'{label} top-5')
        offset = epochs[-1]
    ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_acc.set(xlabel='epoch', ylabel='accuracy (%)', title='validation accuracy')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('metrics', nargs='+', help='metrics.jsonl files (or run folders holding one), in order')
    parser.add_argument('--out', default='metrics.png', help='PNG to write (default: metrics.png)')
    parser.add_argument('--labels', nargs='+', help='one legend label per run (default: the folder names)')
    parser.add_argument('--title', default='', help='figure title')
    args = parser.parse_args(argv)
    try:
        plot_runs(args.metrics, args.out, args.labels, args.title)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(f"wrote {args.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
