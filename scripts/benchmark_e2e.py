#!/usr/bin/env python
"""Time a whole short training job: ``main.py`` against timm's own ``train.py``, same model, recipe and images.

What a user waits for is the whole run (start-up, loader start, epochs, evaluation every epoch, checkpoints,
logging), not one step. Both tools train the same small Swin (``--model small``: embed 48, depths 2-2-2, heads
3-6-12, window 4, at 64 px; ``--model tiny``: Swin-T at 224) from scratch with the official recipe: AdamW (lr
scaled as ``BASE_LR * batch / 512``, weight decay 0.05), a cosine schedule stepped per update after one warm-up
epoch, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, RandAugment ``rand-m9-mstd0.5-inc1``, colour jitter 0.4,
random erasing 0.25 (pixel), bicubic, drop path 0.1, gradient clipping at 5, the eval crop 224/256; fp32; one
data worker; evaluation and a checkpoint every epoch (each tool's default). Each tool runs with its defaults
otherwise (ours: ``DATA.LOADER auto``, the fast paths as ``MODEL.FAST_PATHS_SELECT measure``
chooses them).

The runs alternate (ours, timm, ours, ...; the order flips every round), each a fresh process, and the table
reports the median wall time of each and the ratio of the medians (timm / ours: > 1 means ours is faster).

    python scripts/benchmark_e2e.py --timm-train /path/to/pytorch-image-models/train.py --rounds 3

The images: scikit-image's 16 photographs (``pip install scikit-image``) as 500x375 JPEGs at ``--tiles`` offsets
each, in 4 classes, every sixth one in ``val/``. timm's ``train.py`` is not in the timm package: pass the file
from a clone of huggingface/pytorch-image-models (its version should match the installed timm's).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

MODELS = {  # name: (embed_dim, depths, num_heads, window, img_size, batch)
    'small': (48, (2, 2, 2), (3, 6, 12), 4, 64, 32),
    'tiny': (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224, 32),
}
NUM_CLASSES = 4
BASE_LR, WARMUP_LR, MIN_LR = 5e-4, 5e-7, 5e-6  # the official defaults, scaled by batch / 512 below


def make_images(out: str, tiles: int) -> str:
    """``out/train/c<k>/*.jpg`` and ``out/val/c<k>/*.jpg`` (every sixth tile is a validation image)."""
    from benchmark_data import make_photo_folder  # scikit-image's photographs, as benchmark_data.py uses them
    flat = os.path.join(out, 'flat')
    files = make_photo_folder(flat, offsets=tiles, large=False)
    for i, path in enumerate(sorted(files)):
        split = 'val' if i % 6 == 5 else 'train'
        folder = os.path.join(out, split, os.path.basename(os.path.dirname(path)))
        os.makedirs(folder, exist_ok=True)
        shutil.move(path, os.path.join(folder, os.path.basename(path)))
    shutil.rmtree(flat)
    return out


def ours_command(data: str, out: str, model: str, epochs: int) -> List[str]:
    embed, depths, heads, window, size, batch = MODELS[model]
    opts = {
        'DATA.DATASET': 'folder', 'DATA.IMG_SIZE': size, 'DATA.NUM_WORKERS': 1,
        'MODEL.TYPE': 'swin', 'MODEL.NAME': f'e2e_{model}', 'MODEL.NUM_CLASSES': NUM_CLASSES,
        'MODEL.DROP_PATH_RATE': 0.1, 'MODEL.SWIN.EMBED_DIM': embed, 'MODEL.SWIN.DEPTHS': list(depths),
        'MODEL.SWIN.NUM_HEADS': list(heads), 'MODEL.SWIN.WINDOW_SIZE': window,
        'TRAIN.EPOCHS': epochs, 'TRAIN.WARMUP_EPOCHS': 1, 'TRAIN.BASE_LR': BASE_LR, 'TRAIN.WARMUP_LR': WARMUP_LR,
        'TRAIN.MIN_LR': MIN_LR, 'AMP_ENABLE': False,
    }
    flat = [str(x) for kv in opts.items() for x in (kv[0], repr(kv[1]) if isinstance(kv[1], list) else kv[1])]
    return [sys.executable, os.path.join(ROOT, 'main.py'), '--data-path', data, '--batch-size', str(batch),
            '--output', out, '--device', 'cpu', '--opts', *flat]


# timm's train.py as it is, run with one fix: Pillow 13 refuses posterize to 0 bits, which RandAugment's
# 'PosterizeIncreasing' reaches at m9 mstd0.5 and which would crash the run at random (ours: data.transforms.
# posterize_allowing_zero_bits). Inline, so that timm's run imports nothing of ours.
TIMM_RUNNER = """
import runpy, sys
from PIL import Image
import timm.data.auto_augment as aa
plain = aa.posterize
def posterize(img, bits_to_keep, **kwargs):
    return Image.new(img.mode, img.size) if bits_to_keep <= 0 else plain(img, bits_to_keep, **kwargs)
for name, op in list(aa.NAME_TO_OP.items()):
    if op is plain:
        aa.NAME_TO_OP[name] = posterize
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def timm_command(train_py: str, data: str, out: str, model: str, epochs: int) -> List[str]:
    embed, depths, heads, window, size, batch = MODELS[model]
    scale = batch / 512  # the linear scaling rule, as main.py applies it
    return [sys.executable, '-c', TIMM_RUNNER, train_py, '--data-dir', data, '--train-split', 'train',
            '--val-split', 'val',
            '--model', 'swin_tiny_patch4_window7_224', '--model-kwargs', f'embed_dim={embed}',
            f'depths={depths}', f'num_heads={heads}', f'window_size={window}', f'img_size={size}',
            '--img-size', str(size), '--num-classes', str(NUM_CLASSES), '--device', 'cpu', '-b', str(batch),
            '-j', '1', '--epochs', str(epochs), '--warmup-epochs', '1', '--warmup-prefix', '--cooldown-epochs', '0',
            '--sched', 'cosine', '--sched-on-updates', '--opt', 'adamw', '--lr', str(BASE_LR * scale),
            '--warmup-lr', str(WARMUP_LR * scale), '--min-lr', str(MIN_LR * scale), '--weight-decay', '0.05',
            '--mixup', '0.8', '--cutmix', '1.0', '--smoothing', '0.1', '--aa', 'rand-m9-mstd0.5-inc1',
            '--color-jitter', '0.4', '--reprob', '0.25', '--remode', 'pixel', '--train-interpolation', 'bicubic',
            '--interpolation', 'bicubic', '--crop-pct', '0.875', '--drop-path', '0.1', '--clip-grad', '5.0',
            '--seed', '0', '--output', out, '--experiment', f'e2e_{model}']


def run_timed(command: Sequence[str], env: Dict[str, str], log: str) -> Tuple[float, float]:
    """(wall seconds of the run, seconds until its first line of output: imports and set-up)."""
    t0 = time.perf_counter()
    first = None
    with open(log, 'w') as f:
        proc = subprocess.Popen(command, cwd=os.path.dirname(log), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            first = time.perf_counter() - t0 if first is None else first
            f.write(line)
        proc.wait()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{command[1] if command[1] != '-c' else command[3]} failed (exit {proc.returncode}); "
                         f"the end of {log}:\n{tail}")
    return seconds, first or seconds


def last_top1(log: str) -> str:
    with open(log) as f:
        text = f.read()
    ours = re.findall(r'\* Acc@1 ([\d.]+)', text)
    timm = re.findall(r'Acc@1:\s+[\d.]+ \(\s*([\d.]+)\)', text)  # the running mean, at the last batch
    found = ours or timm
    return found[-1] if found else '?'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--timm-train', required=True, help="timm's train.py (from a pytorch-image-models clone)")
    parser.add_argument('--model', choices=sorted(MODELS), default='small')
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--rounds', type=int, default=2, help='runs of each tool, interleaved')
    parser.add_argument('--tiles', type=int, default=56, help='JPEGs per photograph (16 photographs)')
    parser.add_argument('--threads', type=int, default=0,
                        help="OMP_NUM_THREADS of each run (default 0: not set, each tool's own choice)")
    parser.add_argument('--keep', default='', help='keep the images, outputs and logs here')
    args = parser.parse_args()
    from benchmark_data import machine  # lscpu model and flags, as every benchmark prints them

    work = args.keep or tempfile.mkdtemp(prefix='swin_e2e_')
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, 'images')
    if not os.path.isdir(os.path.join(data, 'val')):
        make_images(data, args.tiles)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
        env.pop(name, None)
        if args.threads:
            env[name] = str(args.threads)
    print(machine())
    n_train = sum(len(fs) for _, _, fs in os.walk(os.path.join(data, 'train')))
    n_val = sum(len(fs) for _, _, fs in os.walk(os.path.join(data, 'val')))
    print(f"model {args.model} {MODELS[args.model]}, {args.epochs} epochs, {n_train} train / {n_val} val JPEGs, "
          f"OMP_NUM_THREADS={args.threads or 'unset'}, 1 data worker, {args.rounds} interleaved rounds\n")
    times: Dict[str, List[float]] = {'ours': [], 'timm': []}
    print("| round | tool | wall s | first output at s | final top-1 |\n| --- | --- | --- | --- | --- |")
    for r in range(args.rounds):
        for tool in (('ours', 'timm') if r % 2 == 0 else ('timm', 'ours')):
            out = os.path.join(work, f'{tool}_{r}')
            shutil.rmtree(out, ignore_errors=True)
            command = (ours_command(data, out, args.model, args.epochs) if tool == 'ours' else
                       timm_command(args.timm_train, data, out, args.model, args.epochs))
            log = os.path.join(work, f'{tool}_{r}.log')
            seconds, first = run_timed(command, env, log)
            times[tool].append(seconds)
            print(f"| {r} | {tool} | {seconds:.1f} | {first:.1f} | {last_top1(log)} |", flush=True)
    ours, timm = statistics.median(times['ours']), statistics.median(times['timm'])
    print(f"\nmedian wall time: ours {ours:.1f} s, timm {timm:.1f} s; timm / ours = **{timm / ours:.2f}x**")
    print(machine())
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
