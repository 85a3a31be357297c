#!/usr/bin/env python
"""Write scikit-learn's bundled digits (1797 8x8 grey images, 10 classes) as an image folder:
``<out>/train/<class>/<n>.png`` and ``<out>/val/<class>/<n>.png`` plus ``<out>/classes.txt``.

The split is stratified (every digit keeps its share in both splits) and fixed by ``--seed``. Images are
upscaled (bicubic) to ``--size`` pixels and saved as RGB PNGs, the layout ``DATA.DATASET folder`` reads.

    python scripts/make_demo_data.py --out ./demo_data --size 32 --val-fraction 0.2
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Dict, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

CLASS_NAMES = [f'digit_{i}' for i in range(10)]
DONE_MARKER = '.complete'  # written last: a folder without it was cut short and is rewritten


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the validation samples: ``round(val_fraction * n_c)`` of each class ``c``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_val = int(round(val_fraction * len(members)))
        is_val[rng.permutation(members)[:n_val]] = True
    return is_val


def digit_to_image(pixels: np.ndarray, size: int) -> Image.Image:
    """An 8x8 digit with values 0..16 -> an RGB ``size`` x ``size`` image (white strokes on black)."""
    grey = Image.fromarray(np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8), mode='L')
    return grey.resize((size, size), Image.BICUBIC).convert('RGB')


def write_digits(out: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0, progress: bool = True,
                 force: bool = False) -> Dict[str, int]:
    """Write the digits image folder under ``out``; return the image count per split.

    An existing complete folder written with the same settings is kept as it is (unless ``force``).
    """
    from sklearn.datasets import load_digits  # imported here: only the demo needs scikit-learn

    if size < 8:
        raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
    settings = f"size={size} val_fraction={val_fraction} seed={seed}\n"
    marker = os.path.join(out, DONE_MARKER)
    if not force and os.path.isfile(marker):
        with open(marker) as f:
            if f.read() == settings:
                return count_images(out)
    for split in ('train', 'val'):
        shutil.rmtree(os.path.join(out, split), ignore_errors=True)

    digits = load_digits()
    images, labels = digits.images, digits.target
    is_val = stratified_split(labels, val_fraction, seed)
    for split in ('train', 'val'):
        for name in CLASS_NAMES:
            os.makedirs(os.path.join(out, split, name), exist_ok=True)
    for index in tqdm(range(len(labels)), desc=f'writing digits to {out}', unit='img', disable=not progress):
        split = 'val' if is_val[index] else 'train'
        path = os.path.join(out, split, CLASS_NAMES[labels[index]], f'{index:04d}.png')
        digit_to_image(images[index], size).save(path)
    with open(os.path.join(out, 'classes.txt'), 'w') as f:
        f.write('\n'.join(CLASS_NAMES) + '\n')
    with open(marker, 'w') as f:
        f.write(settings)
    return count_images(out)


def count_images(out: str) -> Dict[str, int]:
    """Number of PNG files under ``out/train`` and ``out/val``."""
    counts = {}
    for split in ('train', 'val'):
        counts[split] = sum(len([f for f in files if f.endswith('.png')])
                            for _, _, files in os.walk(os.path.join(out, split)))
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='./demo_data', help='output folder (default: ./demo_data)')
    parser.add_argument('--size', type=int, default=32, help='image side in pixels (default: 32)')
    parser.add_argument('--val-fraction', type=float, default=0.2, help='share of each class in val (default: 0.2)')
    parser.add_argument('--seed', type=int, default=0, help='split seed (default: 0)')
    parser.add_argument('--force', action='store_true', help='rewrite even if a complete folder exists')
    args = parser.parse_args(argv)
    try:
        counts = write_digits(args.out, args.size, args.val_fraction, args.seed, force=args.force)
    except ValueError as e:
        parser.error(str(e))
    print(f"{args.out}: {counts['train']} train and {counts['val']} val images, 10 classes")
    return 0


if __name__ == '__main__':
    sys.exit(main())
