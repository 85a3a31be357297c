"""Per-sample augmentation RNG (a pure function of SEED, epoch and index), the worker cap, folder-scan progress."""
import logging
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import data.build
import data.datasets
import data.seeding
from config import load_config
from data import build_dataset, build_loader


def write_folder(root, n_train: int = 10, n_val: int = 3, classes: int = 2) -> str:
    """Small RGB photos-like images of different sizes, plus one truncated JPEG (the substitute path)."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for i in range(n):
            folder = os.path.join(root, split, f'c{i % classes}')
            os.makedirs(folder, exist_ok=True)
            h, w = 40 + 7 * (i % 4), 56 + 5 * (i % 3)
            yy, xx = np.mgrid[0:h, 0:w]
            pixels = np.stack([np.sin(xx * (0.05 + 0.01 * i) + c) * np.cos(yy * 0.07 + c) for c in range(3)], -1)
            pixels = (pixels * 90 + 128 + rng.normal(0, 10, pixels.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f'{i:03d}.jpg'), quality=90)
    with open(os.path.join(root, 'train', 'c0', '000.jpg'), 'rb') as f:
        head = f.read(300)
    with open(os.path.join(root, 'train', 'c1', 'broken.jpg'), 'wb') as f:
        f.write(head)  # truncated: training substitutes the next readable image
    return str(root)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp('rng'))


def cfg(path, *opts):
    # 40 px > 32: timm's RandomResizedCrop (python random) + flip (torch) + RandAugment (numpy op choice, python
    # magnitudes) + random erasing (python boxes, torch pixels): every generator the transforms use. DATA.LOADER
    # torch: float batches of timm's own transforms (fast's batches and resume: tests/test_fast_loader.py).
    return load_config(None, ['DATA.DATA_PATH', path, 'DATA.IMG_SIZE', '40', 'DATA.NUM_WORKERS', '0',
                              'DATA.LOADER', 'torch',
                              'MODEL.NUM_CLASSES', '2', 'DATA.BATCH_SIZE', '2', 'AUG.REPROB', '0.5',
                              'AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-inc1', 'SEED', '7', *opts])


def run_epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b) and len(a) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


def train_loader(path, *opts):
    _, _, loader, _, _ = build_loader(cfg(path, *opts))
    return loader


@pytest.fixture
def uncapped(monkeypatch):
    """Enough cores that DATA.NUM_WORKERS 2 is not capped on a smaller CI machine."""
    monkeypatch.setattr(data.build, 'available_cpus', lambda: 8, raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)


def test_batches_identical_for_any_worker_setting(folder, uncapped):
    """Epochs 0 and 1 with 0 workers, 2 persistent workers and 2 fresh-per-epoch workers give identical batches."""
    settings = {'0 workers': ('DATA.NUM_WORKERS', '0'),
                '2 persistent': ('DATA.NUM_WORKERS', '2', 'DATA.PERSISTENT_WORKERS', 'True'),
                '2 not persistent': ('DATA.NUM_WORKERS', '2', 'DATA.PERSISTENT_WORKERS', 'False')}
    runs = {}
    for name, opts in settings.items():
        loader = train_loader(folder, *opts)
        assert (loader.num_workers, loader.persistent_workers) == {
            '0 workers': (0, False), '2 persistent': (2, True), '2 not persistent': (2, False)}[name]
        runs[name] = [run_epoch(loader, epoch) for epoch in (0, 1)]
    for name in settings:
        for epoch in (0, 1):
            assert_same_batches(runs[name][epoch], runs['0 workers'][epoch])


@pytest.mark.parametrize('workers', [0, 2])
def test_loader_restarted_mid_epoch_matches_uninterrupted(folder, workers, uncapped):
    """A resume rebuilds the loader over the rest of the epoch (engine: a new DataLoader over a slice of
    ``list(loader.sampler)``); with persistent workers that already ran epoch 0 in the uninterrupted run."""
    opts = ('DATA.NUM_WORKERS', str(workers), 'DATA.PERSISTENT_WORKERS', 'True')
    uninterrupted = train_loader(folder, *opts)
    assert uninterrupted.num_workers == workers
    run_epoch(uninterrupted, 0)
    full = run_epoch(uninterrupted, 1)

    torch.manual_seed(1234)  # a fresh process: other global RNG states than the uninterrupted run's
    random.seed(1234)
    np.random.seed(1234)
    fresh = train_loader(folder, *opts)
    fresh.sampler.set_epoch(1)
    skip = 2
    rest = list(fresh.sampler)[skip * fresh.batch_size:]
    resumed = DataLoader(fresh.dataset, sampler=rest, batch_size=fresh.batch_size, num_workers=fresh.num_workers,
                         collate_fn=fresh.collate_fn, drop_last=fresh.drop_last)
    assert_same_batches([(x, y) for x, y in resumed], full[skip:])


@pytest.mark.parametrize('workers,persistent', [(0, 'False'), (2, 'True'), (2, 'False')])
def test_loaders_leave_the_global_rng_alone(folder, workers, persistent, uncapped):
    """Iterating the loaders draws nothing from the global generators that the training loop and its
    checkpoints own: starting an iterator draws the workers' base seed, which a resumed run would otherwise draw
    at another point of the restored stream (persistent workers draw it once, in the first epoch iterated)."""
    _, _, train, val, _ = build_loader(cfg(folder, 'DATA.NUM_WORKERS', str(workers),
                                           'DATA.PERSISTENT_WORKERS', persistent))
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    for epoch in (0, 1):
        run_epoch(train, epoch)
        list(val)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])


def test_epochs_differ_and_replay_exactly(folder):
    """The same index is augmented differently in another epoch, identically in a replay of the same epoch
    whatever the global RNG state, and loading a sample leaves the caller's RNG streams untouched."""
    loader = train_loader(folder)
    dataset = loader.dataset

    def epoch_images(epoch):
        loader.sampler.set_epoch(epoch)
        return {int(k): dataset[k][0] for k in loader.sampler}

    first = epoch_images(1)
    second = epoch_images(2)
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    replay = epoch_images(1)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    assert first.keys() == second.keys() == replay.keys()
    for i in first:
        assert torch.equal(first[i], replay[i])
        assert not torch.equal(first[i], second[i]), f"index {i}: epochs 1 and 2 gave the same augmentation"
    # The mixer does not collide where seed + index would (epoch 1, index 0 vs epoch 0, index 1, ...).
    seeds = {data.seeding.augmentation_seeds(data.seeding.SampleKey(i, e, 7))
             for e in range(20) for i in range(200)}
    assert len(seeds) == 20 * 200


@pytest.mark.parametrize('repeats', [0, 3])
def test_same_augmentation_for_world_size_1_and_2(folder, repeats):
    """Each (index, copy) gets the same augmented tensor whether one rank or two draw it."""
    config = cfg(folder, 'DATA.REPEATED_AUG', str(repeats))
    dataset, _ = build_dataset(True, config)

    def augmented(rank, world):
        sampler = data.build.train_sampler(dataset, config, rank, world)
        sampler.set_epoch(3)
        return {(int(k), getattr(k, 'draw', 0)): dataset[k][0] for k in sampler}

    single = augmented(0, 1)
    torch.manual_seed(5)  # the ranks of another run start from other global states
    pair = {**augmented(0, 2), **augmented(1, 2)}
    common = single.keys() & pair.keys()
    assert len(common) >= len(dataset) // 2
    for key in common:
        assert torch.equal(single[key], pair[key]), f"(index, copy) {key} differs between world sizes 1 and 2"
    if repeats > 1:  # the copies of one image within an epoch are augmented differently
        by_index = {}
        for (i, draw), x in {**single, **pair}.items():
            by_index.setdefault(i, {})[draw] = x
        copies = [xs for xs in by_index.values() if len(xs) > 1]
        assert copies
        for xs in copies:
            xs = list(xs.values())
            assert not torch.equal(xs[0], xs[1])


# ----------------------------------------------------------------------------- worker cap

@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, 'cpu_count', lambda: 2)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    return monkeypatch


def test_workers_capped_at_cores_per_process(folder, two_cores, caplog, recwarn):
    with caplog.at_level(logging.INFO, logger='data.build'):
        _, _, dl_train, dl_val, _ = build_loader(cfg(folder, 'DATA.NUM_WORKERS', '8'))
    assert dl_train.num_workers == dl_val.num_workers == 2
    capped = [r.getMessage() for r in caplog.records if 'capped' in r.getMessage()]
    assert capped == ['DATA.NUM_WORKERS 8 capped to 2: 2 CPU cores available for 1 local process']
    dl_train.check_worker_number_rationality()  # PyTorch's "will create N worker processes" check
    assert not [w for w in recwarn if 'worker processes' in str(w.message)]

    two_cores.setenv('LOCAL_WORLD_SIZE', '2')  # torchrun, 2 processes on this node: 1 core each
    assert data.build.worker_count(8) == 1 and data.build.worker_count(1) == 1
    two_cores.setenv('LOCAL_WORLD_SIZE', '4')  # more processes than cores: still one worker each
    assert data.build.worker_count(2) == 1
    two_cores.delenv('LOCAL_WORLD_SIZE')
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='data.build'):
        assert data.build.worker_count(0) == 0 and data.build.worker_count(2) == 2
    assert 'capped' not in caplog.text
    two_cores.setenv('LOCAL_WORLD_SIZE', 'two')
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='two'"):
        data.build.worker_count(2)


# ----------------------------------------------------------------------------- scan progress

def test_folder_scan_logs_progress(folder, monkeypatch, caplog):
    root = os.path.join(folder, 'train')
    with caplog.at_level(logging.INFO, logger='data.datasets'):
        samples, _ = data.datasets.scan_class_folder(root)
    assert 'scann' not in caplog.text  # a small folder: nothing

    monkeypatch.setattr(data.datasets, 'SCAN_PROGRESS_SECONDS', 0.0, raising=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='data.datasets'):
        again, _ = data.datasets.scan_class_folder(root)
    assert again == samples
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"scanning {root}: 1 / 2 classes, 5 images so far, ")
    assert lines[1].startswith(f"scanning {root}: 2 / 2 classes, 11 images so far, ")
    assert lines[2].startswith(f"scanned {root}: 2 classes, 11 images in ")

    monkeypatch.setattr(data.datasets, 'dist_info', lambda: (1, 2))  # other ranks stay quiet
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='data.datasets'):
        data.datasets.scan_class_folder(root)
    assert not caplog.records
