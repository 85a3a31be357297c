"""Turn a sharded (FSDP / DCP) checkpoint directory into one official checkpoint file ``{'model': state_dict}``.

    python scripts/export_sharded.py output/<MODEL.NAME>/<TAG>/ckpt_best swin.pth [--ema]

The file loads with ``--eval --resume swin.pth``, ``--pretrained swin.pth``, ``models.load_pretrained`` and
``torch.load(..., weights_only=True)``, and in the official repository's code (its ``checkpoint['model']``).
It runs in one process on the CPU, without a process group: the shards are read straight from the directory
(DCP resharding to a single full copy), so no GPU ever holds the whole model; host memory for one copy of
the weights is needed (SwinV2-G: 12 GB in fp32). Nothing in the directory is unpickled (see ``utils.fsdp``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint', help='sharded checkpoint directory (e.g. <output>/ckpt_best or ckpt_epoch_9)')
    parser.add_argument('output', help='the .pth file to write')
    parser.add_argument('--ema', action='store_true', help='export the EMA weights instead of the model')
    args = parser.parse_args(argv)
    from utils.checkpoint import CheckpointError, export_sharded_model
    try:
        state_dict = export_sharded_model(args.checkpoint, args.output, ema=args.ema)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in state_dict.values())
    print(f"wrote {args.output}: {len(state_dict)} tensors, {n} values ({'EMA' if args.ema else 'model'})")
    return 0


if __name__ == '__main__':
    sys.exit(main())
