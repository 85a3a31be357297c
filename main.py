"""Swin Transformer training, evaluation and throughput: the command line.

    python main.py --cfg configs/swin/swin_tiny_patch4_window7_224.yaml --data-path /imagenet --batch-size 128
    torchrun --nproc_per_node 8 main.py --cfg ... --data-path ...
    python main.py --cfg ... --data-path ... --eval --resume ckpt.pth

The flags are the official ones (plus ``--device`` and ``--trust-checkpoint``); the work is done in ``engine.run``.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import List, NoReturn, Optional

from utils.run_lock import RunLock, RunLockedError  # no torch: cheap before the config is checked


class FlagParser(argparse.ArgumentParser):
    """argparse with one-line errors: an unknown flag is named with the closest known one (``--batch-szie``:
    did you mean ``--batch-size``?), as config keys are, and the process exits 2 without the usage block."""

    def __init__(self, *args, **kwargs):
        self.flags: List[str] = []  # before super().__init__, which adds --help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):  # type: ignore[override]
        action = super().add_argument(*args, **kwargs)
        self.flags.extend(action.option_strings)
        return action

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        prefix = 'unrecognized arguments:'
        if message.startswith(prefix):
            unknown = [a.split('=')[0] for a in message[len(prefix):].split() if a.startswith('-')]
            named = []
            for flag in unknown:
                close = difflib.get_close_matches(flag, self.flags, n=1, cutoff=0.75)
                named.append(flag + (f" (did you mean {close[0]}?)" if close else ''))
            message = (f"unknown flag{'s' if len(named) > 1 else ''} {', '.join(named) or message[len(prefix):]}; "
                       f"python {os.path.basename(sys.argv[0]) or 'main.py'} --help lists them")
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the official flags; an unknown flag is an error that names it and the closest known one."""
    parser = FlagParser(
        'Swin Transformer training and evaluation',
        description='Train, evaluate or benchmark Swin Transformer V1/V2 (microsoft/Swin-Transformer flags).')
    parser.add_argument('--cfg', type=str, metavar='FILE', help='path to a config YAML file')
    parser.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE',
                        help="modify config options with KEY VALUE pairs, e.g. --opts TRAIN.EPOCHS 10")
    parser.add_argument('--batch-size', type=int, help='batch size per process (DATA.BATCH_SIZE)')
    parser.add_argument('--data-path', type=str, help='path to the dataset (DATA.DATA_PATH)')
    parser.add_argument('--zip', action='store_true', help='read zipped datasets (DATA.ZIP_MODE)')
    parser.add_argument('--cache-mode', type=str, default=None, choices=['no', 'full', 'part'],
                        help='no: no cache; full: cache all data; part: each process caches its shard')
    parser.add_argument('--pretrained', type=str, help='weights to fine-tune from (adapted to the model)')
    parser.add_argument('--resume', type=str, help='checkpoint to resume training (or evaluate) from')
    parser.add_argument('--accumulation-steps', type=int, help='gradient accumulation steps')
    parser.add_argument('--use-checkpoint', action='store_true',
                        help='activation checkpointing: less memory, slower')
    # The official spellings come first (and name the attribute); the hyphenated aliases match the other flags.
    parser.add_argument('--disable_amp', '--disable-amp', dest='disable_amp', action='store_true',
                        help='train and evaluate in fp32')
    parser.add_argument('--amp-opt-level', type=str, choices=['O0', 'O1', 'O2'],
                        help='deprecated apex option; O0 disables AMP; O1/O2 use apex when installed, else torch.amp')
    parser.add_argument('--output', type=str, metavar='PATH',
                        help='root output folder; the run writes to <output>/<MODEL.NAME>/<tag> (default: output)')
    parser.add_argument('--tag', type=str, help='tag of the experiment')
    parser.add_argument('--eval', action='store_true', help='evaluate only (with --resume or --pretrained)')
    parser.add_argument('--throughput', action='store_true', help='measure throughput only')
    parser.add_argument('--optim', type=str, help='optimizer name, overrides TRAIN.OPTIMIZER.NAME')
    parser.add_argument('--fused_window_process', '--fused-window-process', dest='fused_window_process',
                        action='store_true',
                        help='official fused window kernel flag (accepted; windows use the built-in path)')
    parser.add_argument('--fused_layernorm', '--fused-layernorm', dest='fused_layernorm', action='store_true',
                        help="apex's FusedLayerNorm for every LayerNorm (FUSED_LAYERNORM); without apex, torch's "
                             "LayerNorm and one log line")
    parser.add_argument('--local_rank', '--local-rank', dest='local_rank', type=int, default=None,
                        help='set by torch.distributed.launch; torchrun uses the LOCAL_RANK variable')
    parser.add_argument('--device', type=str, choices=['auto', 'cpu', 'cuda'],
                        help='where to run (DEVICE); auto: CUDA when available')
    parser.add_argument('--fsdp', action='store_true',
                        help='shard weights, gradients and optimizer state over the processes (TRAIN.FSDP.ENABLE; '
                             'torch FSDP2) and save sharded checkpoints')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='allow full unpickling of checkpoint files you trust (TRUST_CHECKPOINTS)')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None, pretrain: bool = False) -> int:
    """Run the command line; returns the process exit code. ``pretrain``: SimMIM pre-training
    (``main_simmim_pt.py``).

    0: done; 2: bad input (config, data layout, checkpoint file), with a one-line message; 1: stopped for
    non-finite losses; 143 (``utils.preemption.PREEMPTED_EXIT_CODE``) or 130 (Ctrl-C): stopped by
    SIGTERM/SIGUSR1/SIGINT after saving a checkpoint that the next start resumes from.
    """
    args = parse_args(argv)
    # The config is built and checked before torch is imported (config.py imports no torch), so that a typo in
    # a key or value is reported at once rather than after seconds of imports; --help needs no torch either.
    from config import ConfigError, get_config
    notes: List[str] = []  # warnings about the config, logged once the log exists
    # Under torchrun every rank finds the same bad config, data path or checkpoint: rank 0 (torchrun's RANK,
    # read before any process group exists) prints it once, and every rank exits with the same code.
    first_rank = os.environ.get('RANK', '0') in ('', '0')
    from utils.trackers import check_tracker_packages  # no torch, and no tracker package is imported
    try:
        config = get_config(args, notes, pretrain=pretrain)
        check_tracker_packages(config)  # an enabled wandb / MLflow that is not installed: before any output
    except ConfigError as e:
        return report_error(e, 2, first_rank)

    import torch  # noqa: F401

    import engine
    from config import apply_linear_scaling, save_config
    from data import DatasetLayoutError
    from data.build import check_data_paths
    from models.fast_paths import use_fast_paths
    from utils.checkpoint import CheckpointError, last_checkpoint_name, saved_files_description
    from utils.distributed import cleanup_distributed, init_distributed
    from utils.logger import create_logger
    from utils.misc import keep_freed_cpu_memory, seed_everything
    from utils.preemption import Preempted

    try:  # before the process group and the output folder: a wrong path leaves nothing behind
        check_data_paths(config, pretrain)
        resume = config.MODEL.RESUME
        if resume and not (os.path.exists(resume) or (config.MODEL.TYPE == 'swin_moe' and os.path.exists(
                resume + ('.global' if config.TRAIN.MOE.SAVE_MASTER else '.rank0')))):  # Swin-MoE: <name>.pth.rank<r>
            raise CheckpointError(f"checkpoint file not found: {config.MODEL.RESUME} (--resume / MODEL.RESUME)")
    except (DatasetLayoutError, CheckpointError) as e:
        return report_error(e, 2, first_rank)
    try:
        dist_info = init_distributed(config.DEVICE, config.DIST_TIMEOUT,
                                     cpu_collectives=config.TRAIN.FSDP.ENABLE and config.TRAIN.FSDP.CPU_OFFLOAD)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_lock = RunLock(config.OUTPUT)
    try:
        if not (config.EVAL_MODE or config.THROUGHPUT_MODE):  # evaluating a running run's checkpoints is fine
            refused = take_run_lock(run_lock, dist_info.is_main, notes)
            if refused:
                if dist_info.is_main:
                    print(f"error: {refused}", file=sys.stderr)
                return 2
        config = apply_linear_scaling(config, dist_info.world_size)
        seed_everything(config.SEED + dist_info.rank, config.DETERMINISTIC)
        os.makedirs(config.OUTPUT, exist_ok=True)
        logger = create_logger(config.OUTPUT, dist_info.rank, name=config.MODEL.NAME)
        inference_only = config.EVAL_MODE or config.THROUGHPUT_MODE
        if inference_only and dist_info.device.type == 'cpu' and config.MODEL.FAST_PATHS and use_fast_paths():
            if keep_freed_cpu_memory():  # before the model and the data workers (they inherit it)
                logger.info("CPU inference: malloc keeps freed blocks of up to 32 MiB for reuse (utils.misc."
                            "keep_freed_cpu_memory; MODEL.FAST_PATHS False turns it off)")
        if dist_info.is_main:
            for note in notes:  # once per run, not once per process
                logger.warning(note)
            path = os.path.join(config.OUTPUT, 'config.yaml')
            save_config(config, path)
            logger.info(f"full config saved to {path}")
        logger.info(f"rank {dist_info.rank}/{dist_info.world_size} on {dist_info.device}; lr {config.TRAIN.BASE_LR:.3e}"
                    f" (linear scaling: batch {config.DATA.BATCH_SIZE} x {dist_info.world_size} processes x "
                    f"{config.TRAIN.ACCUMULATION_STEPS} accumulation / 512)")
        if config.AMP_OPT_LEVEL in ('O1', 'O2') and config.AMP_ENABLE and engine.apex_amp_module(config) is None:
            logger.warning(f"--amp-opt-level {config.AMP_OPT_LEVEL}: NVIDIA apex (apex.amp) is not installed; "
                           f"using native torch.amp mixed precision instead (AMP_DTYPE {config.AMP_DTYPE})")
        engine.run(config, dist_info, logger, pretrain=pretrain)
        return 0
    except (ConfigError, DatasetLayoutError, CheckpointError) as e:
        return report_error(e, 2, dist_info.is_main)
    except engine.NonFiniteLossError as e:
        return report_error(e, 1, dist_info.is_main)
    except Preempted as e:
        if dist_info.is_main:
            last = os.path.join(config.OUTPUT, last_checkpoint_name(sharded=bool(config.TRAIN.FSDP.ENABLE)))
            written = saved_files_description(config, last, dist_info.world_size)  # Swin-MoE: <last>.rank<r>
            print(f"{e}: checkpoint saved{f' ({written})' if written != last else ''}; the same command resumes "
                  f"from it (auto-resume reads {config.OUTPUT}; or add --resume {last}) (exit code {e.exit_code})",
                  file=sys.stderr)
        return e.exit_code
    finally:
        cleanup_distributed()
        run_lock.release()


def report_error(error: BaseException, code: int, is_main: bool) -> int:
    """Print ``error: <message>`` once (on rank 0; every rank meets the same error) and return ``code``, the exit
    code of every rank. Other ranks note it in their log file, when one exists."""
    if is_main:
        print(f"error: {error}", file=sys.stderr)
    else:
        import logging
        logging.getLogger('swin').info(f"error (printed by rank 0): {error}")
    return code


def take_run_lock(run_lock: RunLock, is_main: bool, notes: List[str]) -> Optional[str]:
    """Rank 0 takes the output folder's run lock before any rank writes there; every rank learns the outcome
    (a collective under torchrun). Returns the refusal message (the folder is another live run's), else None."""
    from utils.distributed import broadcast_object
    refused = None
    if is_main:
        try:
            warning = run_lock.acquire()
            if warning:
                notes.append(warning)
        except RunLockedError as e:
            refused = str(e)
    return broadcast_object(refused)


if __name__ == '__main__':
    sys.exit(main())
