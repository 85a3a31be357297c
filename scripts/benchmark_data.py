#!/usr/bin/env python
"""Measure the training input pipeline: decode + augment images/s in one process (= per DataLoader worker),
then the full training loader with N workers.

Without --data-path it writes --num-images ImageNet-like JPEGs (500x375, quality 90) to a temporary folder.
With --data-path it reads <data-path>/<DATA.TRAIN_SPLIT>/<class>/<image> (or the zip layout with --zip).

    python scripts/benchmark_data.py --num-images 256 --workers 0 2 --batch-size 32
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import load_config  # noqa: E402
from data.build import _loader_kwargs, _train_sampler, build_dataset  # noqa: E402
from data.datasets import decode_image  # noqa: E402


def make_jpeg_folder(root: str, num_images: int, size: tuple = (500, 375), classes: int = 4) -> None:
    """ImageNet-like JPEGs: smooth colour fields plus noise, so they compress like photos rather than noise."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(num_images):
        folder = os.path.join(root, 'train', f'class{i % classes}')
        os.makedirs(folder, exist_ok=True)
        fx, fy, phase = rng.uniform(0.005, 0.05, 3) * [1, 1, 400]
        base = np.stack([np.sin(xx * fx + phase + c) * np.cos(yy * fy + c) for c in range(3)], -1)
        pixels = (base * 100 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)


def time_single_process(dataset, n: int) -> dict:
    """Images/s for decode only and for decode + train transform, one process, no batching."""
    indices = [i % len(dataset) for i in range(n)]
    dataset[indices[0]]  # warm-up (lazy imports, zip handle)
    t0 = time.perf_counter()
    for i in indices:
        decode_image(dataset.read(i))
    t1 = time.perf_counter()
    for i in indices:
        dataset[i]
    t2 = time.perf_counter()
    return {'decode': n / (t1 - t0), 'decode+augment': n / (t2 - t1)}


def time_loader(dataset, config, epochs: int) -> tuple:
    """Images/s of the training DataLoader over ``epochs`` epochs, first batch (worker start-up) excluded."""
    loader = torch.utils.data.DataLoader(dataset, sampler=_train_sampler(dataset, config, 0, 1), drop_last=True,
                                         **_loader_kwargs(config))
    images, start = 0, None
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for x, _ in loader:
            if start is None:
                start = time.perf_counter()  # after the first batch
                continue
            images += x.shape[0]
    elapsed = time.perf_counter() - start
    return images / elapsed, images


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-path', help='dataset root (default: generate JPEGs in a temporary folder)')
    parser.add_argument('--zip', action='store_true', help='read <data-path>/train.zip + train_map.txt')
    parser.add_argument('--num-images', type=int, default=256, help='images to generate / time (default 256)')
    parser.add_argument('--img-size', type=int, default=224, help='DATA.IMG_SIZE (default 224)')
    parser.add_argument('--batch-size', type=int, default=32, help='loader batch size (default 32)')
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 2],
                        help='DataLoader worker counts to time (default: 0 2)')
    parser.add_argument('--epochs', type=int, default=2, help='loader epochs per worker count (default 2)')
    parser.add_argument('--cfg', help='YAML config whose DATA/AUG settings to use (default: the defaults)')
    parser.add_argument('--opts', nargs='*', default=[], help='extra config KEY VALUE pairs')
    args = parser.parse_args(argv)

    tmp = None
    data_path = args.data_path
    if not data_path:
        tmp = tempfile.TemporaryDirectory(prefix='swin_bench_')
        data_path = tmp.name
        print(f"writing {args.num_images} JPEGs (500x375) to {data_path}")
        make_jpeg_folder(data_path, args.num_images)

    def config_for(workers: int):
        opts = ['DATA.DATA_PATH', data_path, 'DATA.IMG_SIZE', str(args.img_size), 'DATA.BATCH_SIZE',
                str(args.batch_size), 'DATA.NUM_WORKERS', str(workers), 'DATA.ZIP_MODE', str(args.zip),
                'DATA.CACHE_MODE', 'no', 'MODEL.NUM_CLASSES', '21841', *args.opts]
        return load_config(args.cfg, opts)

    logging_off = __import__('logging').getLogger('data.build')
    logging_off.setLevel('ERROR')  # the class-count warning is noise here
    dataset, _ = build_dataset(True, config_for(0))
    torch.set_num_threads(1)  # as inside a DataLoader worker
    rates = time_single_process(dataset, min(args.num_images, len(dataset)))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, image size {args.img_size}, "
          f"{len(dataset)} training images")
    for name, rate in rates.items():
        print(f"  one process, {name:15s}: {rate:8.1f} images/s")
    for workers in args.workers:
        config = config_for(workers)
        rate, n = time_loader(build_dataset(True, config)[0], config, args.epochs)
        print(f"  loader, {workers:2d} workers, batch {args.batch_size}: {rate:8.1f} images/s ({n} images timed)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == '__main__':
    main()
