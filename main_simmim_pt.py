"""SimMIM pre-training with the official command line, on the same engine as classification.

    torchrun --nproc_per_node 8 main_simmim_pt.py \\
        --cfg configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml \\
        --data-path <imagenet>/train --batch-size 128

The official flags (``--cfg --opts --batch-size --data-path --resume --accumulation-steps --use-checkpoint
--enable-amp --disable-amp --output --tag``) and every flag of ``main.py`` work. Checkpoints, resume, preemption,
AMP, logging and TensorBoard behave as for classification; the model returns its masked-pixel loss.
"""
from __future__ import annotations

import sys
from typing import List, Optional

AMP_FLAGS = ('--enable-amp', '--disable-amp')


def simmim_argv(argv: Optional[List[str]]) -> List[str]:
    """The official SimMIM flags in ``main.py``'s terms: the last of ``--enable-amp`` / ``--disable-amp`` wins
    as in the official parser. ``--disable-amp`` is ``main.py``'s own flag; ``--enable-amp`` is dropped, since
    AMP is on unless ``AMP_ENABLE`` is set False (the official flag also overrode the file; here the file and
    ``--opts`` are respected)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    amp = [a for a in argv if a in AMP_FLAGS]
    rest = [a for a in argv if a not in AMP_FLAGS]
    return rest + ['--disable-amp'] if amp and amp[-1] == '--disable-amp' else rest


def main(argv: Optional[List[str]] = None) -> int:
    """Run SimMIM pre-training; returns the exit code of ``main.main`` (0 done, 2 bad input, ...)."""
    import main as swin_main  # the classification command line: one parser, one setup, one engine
    return swin_main.main(simmim_argv(argv), pretrain=True)


if __name__ == '__main__':
    sys.exit(main())
