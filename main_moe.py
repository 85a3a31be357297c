"""Swin-MoE training and evaluation with the official command line, on the same engine as every model.

    torchrun --nproc_per_node 8 main_moe.py \\
        --cfg configs/swinmoe/swin_moe_small_patch4_window12_192_8expert_32gpu_22k.yaml \\
        --data-path <imagenet-22k> --batch-size 128

The official flags (``--cfg --opts --batch-size --data-path --zip --cache-mode --pretrained --resume
--accumulation-steps --use-checkpoint --disable_amp --amp-opt-level --output --tag --eval --throughput``) are a
subset of ``main.py``'s, and every flag of ``main.py`` works here too. What makes a run Swin-MoE is the config
(``MODEL.TYPE swin_moe``): the experts are spread over the processes (``MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS``), DDP
leaves them out of its all-reduce, the auxiliary loss joins the criterion, and each rank writes its own
checkpoint ``<name>.pth.rank<r>`` (``--resume <name>.pth`` reads it; ``TRAIN.MOE.SAVE_MASTER``: rank 0 writes
``<name>.pth.global``, which every rank resumes from; ``--pretrained <name>.pth`` reads the same files, merged with
``<name>.pth.master`` when present, as the official ``utils_moe.load_pretrained``). The official script is a copy of ``main.py`` with those
changes; here they live in the model, the engine and the checkpoint module, so this file only hands over.
"""
from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``main.main`` with these arguments; returns its exit code."""
    import main as swin_main
    return swin_main.main(argv)


if __name__ == '__main__':
    sys.exit(main())
