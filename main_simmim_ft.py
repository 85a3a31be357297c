"""Fine-tuning after SimMIM pre-training with the official command line, on the same engine as classification.

    torchrun --nproc_per_node 8 main_simmim_ft.py \\
        --cfg configs/simmim/simmim_finetune__swinv2_base__img224_window14__800ep.yaml \\
        --data-path <imagenet> --batch-size 128 --pretrained <simmim checkpoint>

The official flags (those of ``main_simmim_pt.py`` plus ``--pretrained --eval --throughput``) and every flag of
``main.py`` work. ``TRAIN.LAYER_DECAY`` < 1 gives the official per-layer learning rates
(``optimizer.build_optimizer(config, model, simmim=True)``).
"""
from __future__ import annotations

import sys
from typing import List, Optional

from main_simmim_pt import simmim_argv


def main(argv: Optional[List[str]] = None) -> int:
    """Run the fine-tune (or ``--eval`` / ``--throughput``); returns the exit code of ``main.main``."""
    import main as swin_main
    return swin_main.main(simmim_argv(argv))


if __name__ == '__main__':
    sys.exit(main())
