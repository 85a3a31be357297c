"""Helpers shared by the end-to-end tests: a small real image folder and a quiet subprocess environment."""
import os

import numpy as np
from PIL import Image


def write_digits_folder(root, classes: int = 4, train_per_class: int = 16, val_per_class: int = 8) -> str:
    """scikit-learn's digits as ``root/{train,val}/digit<c>/<i>.png`` (32 px RGB), first images per class."""
    from sklearn.datasets import load_digits
    d = load_digits()
    wanted = {'train': train_per_class, 'val': val_per_class}
    counts = {(split, c): 0 for split in wanted for c in range(classes)}
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        if label >= classes:
            continue
        split = 'train' if counts[('train', label)] < train_per_class else 'val'
        if counts[(split, label)] >= wanted[split]:
            continue
        counts[(split, label)] += 1
        folder = os.path.join(str(root), split, f'digit{label}')
        os.makedirs(folder, exist_ok=True)
        pixels = (img / 16.0 * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert('RGB').save(os.path.join(folder, f'{i}.png'))
    return str(root)


def subprocess_env() -> dict:
    """One compute thread per process, and no torchrun variables leaking in from the test runner."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONHASHSEED='0')
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        env.pop(name, None)
    return env
