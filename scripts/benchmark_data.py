#!/usr/bin/env python
"""Measure the input pipelines on the same real JPEG files, interleaved in one process (rounds; medians; ratios):

- timm: ``create_transform(S, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25,
  re_mode='pixel', interpolation='bicubic')`` over ``Image.open(f).convert('RGB')`` (timm's reader) and a torch
  DataLoader (float batches); ``timm-prefetch``: the same with ``use_prefetcher=True`` (uint8 batches, normalise and
  erasing left to timm's PrefetchLoader on the GPU, not run here);
- ours: ``DATA.LOADER torch`` (the timm transform plus per-sample seeding), ``fast`` (uint8 batches; normalise +
  erasing on the device) and ``gpu`` (the workers only read bytes and draw parameters; decode and augmentation run on
  the device: on this machine's CPU, per image, in the "device" rows).

Per stage (one process, one thread: what one DataLoader worker does per image), then the loaders with 1 and N
workers, for the training and the eval transforms. Every figure is printed with the CPU model and its AVX and AMX flags.

    python scripts/benchmark_data.py                        # scikit-image photos -> 256 JPEGs in a temp folder
    python scripts/benchmark_data.py --data-path DIR        # DIR/<class>/<image> (or DIR/train/<class>/...)
    python scripts/benchmark_data.py --sources folder zip wds hf   # the sources (DATA.DATASET), same JPEGs

``--sources``: the same files as a class folder, a zip + map file, WebDataset shards (scripts/pack_wds.py) and a
Hugging Face ``save_to_disk`` copy, each read by its own training dataset + sampler through a DataLoader with
``DATA.LOADER`` torch and fast; images/s per worker (loader rate / workers; 0 workers counts as one).

    python scripts/benchmark_data.py --paired --rounds 7     # folder vs wds: the readers alone (see paired_rounds)

The default images: the 16 photographs bundled with scikit-image (``pip install scikit-image``), each resized to
cover 540x405 and cut to 500x375 at 15 offsets (every other one mirrored) plus one 1600x1200 version, JPEG quality
90: 240 ImageNet-sized files and 16 large ones.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # pack_zip, pack_wds (--sources)
from config import load_config  # noqa: E402
from data import batch_to_device  # noqa: E402
from data.build import loader_collate, loader_transform  # noqa: E402
from data.seeding import SampleKey, seeded_rngs  # noqa: E402
from data.transforms import fix_posterize  # noqa: E402

PHOTOS = ['astronaut', 'brick', 'camera', 'chelsea', 'clock_motion', 'coffee', 'coins', 'grass', 'gravel',
          'hubble_deep_field', 'ihc', 'moon', 'motorcycle_left', 'motorcycle_right', 'retina', 'rocket']


# ----------------------------------------------------------------------------- images

def make_photo_folder(out: str, offsets: int = 15, large: bool = True) -> List[str]:
    """scikit-image's photographs as ImageNet-like JPEGs under ``out/c<k>/`` (see the module docstring)."""
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("the default images are scikit-image's photographs: pip install scikit-image, or pass "
                         "--data-path <folder of JPEGs>") from None
    src = os.path.dirname(skimage.data.__file__)
    files = []
    for c, name in enumerate(PHOTOS):
        path = next(p for p in glob.glob(os.path.join(src, name + '.*')))
        img = Image.open(path).convert('RGB')

        def cover(w: int, h: int) -> Image.Image:
            s = max(w / img.width, h / img.height)
            return img.resize((round(img.width * s + 0.5), round(img.height * s + 0.5)), Image.LANCZOS)
        base = cover(540, 405)
        folder = os.path.join(out, f'c{c % 4}')
        os.makedirs(folder, exist_ok=True)
        for o in range(offsets):
            dx, dy = (o * 7) % max(1, base.width - 500), (o * 5) % max(1, base.height - 375)
            tile = base.crop((dx, dy, dx + 500, dy + 375))
            if o % 2:
                tile = tile.transpose(Image.FLIP_LEFT_RIGHT)
            files.append(os.path.join(folder, f'{name}_{o}.jpg'))
            tile.save(files[-1], quality=90)
        if large:
            files.append(os.path.join(folder, f'{name}_large.jpg'))
            cover(1600, 1200).crop((0, 0, 1600, 1200)).save(files[-1], quality=90)
    return files


def list_images(root: str) -> List[str]:
    files = sorted(glob.glob(os.path.join(root, '*', '*.*')) + glob.glob(os.path.join(root, 'train', '*', '*.*')))
    files = [f for f in files if f.lower().endswith(('.jpg', '.jpeg', '.png'))]
    if not files:
        raise SystemExit(f"no images under {root}/<class>/ or {root}/train/<class>/")
    return files


def machine() -> str:
    model, flags = '?', ''
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith('Model name:'):
                model = line.split(':', 1)[1].strip()
            if line.startswith('Flags:'):
                flags = ' '.join(sorted({f for f in line.split()[1:] if f.startswith(('avx', 'amx'))}))
    except OSError:
        pass
    return (f"CPU: {model}; {os.cpu_count()} CPUs; AVX and AMX flags: {flags or 'none'}; load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}")


# ----------------------------------------------------------------------------- contenders

def timm_transform(size: int, train: bool, prefetch: bool = False) -> Any:
    from timm.data import create_transform
    if train:
        t = create_transform(size, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25,
                             re_mode='pixel', interpolation='bicubic', use_prefetcher=prefetch)
        fix_posterize(t)  # Pillow 13 rejects 0-bit posterize, which m9-mstd0.5 reaches (see docs/DATA.md)
        return t
    return create_transform(size, is_training=False, interpolation='bicubic', crop_pct=224 / 256,
                            use_prefetcher=prefetch)


class FileDataset(Dataset):
    """timm's reader (``Image.open(f).convert('RGB')``) + a transform, or one of our encoded transforms
    (``decode`` then ``__call__``) under the sample's key."""

    def __init__(self, files: Sequence[str], transform: Any, keyed: bool = False) -> None:
        self.files, self.transform, self.keyed = list(files), transform, keyed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        with seeded_rngs(SampleKey(index, 0, 0)) if self.keyed else _null():
            if getattr(self.transform, 'takes_encoded', False):
                return self.transform(self.transform.decode(self.files[index])), 0
            with open(self.files[index], 'rb') as f:
                img = Image.open(f).convert('RGB')
            return self.transform(img), 0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def our_config(loader: str, size: int) -> Any:
    return load_config(None, ['DATA.LOADER', loader, 'DATA.IMG_SIZE', str(size)])


def contenders(size: int, train: bool) -> Dict[str, Tuple[Any, Optional[Callable], bool]]:
    """name -> (per-sample transform, collate_fn, keyed)."""
    out: Dict[str, Tuple[Any, Optional[Callable], bool]] = {
        'timm': (timm_transform(size, train), None, False),
        'timm-prefetch': (timm_transform(size, train, prefetch=True), None, False),
    }
    for loader in ('torch', 'fast', 'gpu'):
        config = our_config(loader, size)
        collate = loader_collate(train, config)
        out[loader] = (loader_transform(train, config), collate, train)
    return out


# ----------------------------------------------------------------------------- per-stage timing

def stage_functions(size: int, train: bool) -> Dict[str, List[Tuple[str, Callable]]]:
    """name -> [(stage, f(state) -> state)] whose composition is that contender's per-sample work."""
    from data.datasets import read_bytes
    from data.fast import FastEvalTransform, FastTrainTransform
    timm_t = timm_transform(size, train).transforms
    fast = (FastTrainTransform if train else FastEvalTransform)(our_config('fast', size))

    def pil_decode(path: str) -> Image.Image:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')

    if train:
        def fast_resize(decoded: Any) -> Any:
            from torchvision.transforms.v2 import functional as F2
            pixels, (i, j, h, w), interpolation = decoded
            crop = torch.from_numpy(pixels).permute(2, 0, 1)[:, i:i + h, j:j + w]
            return F2.resize(crop, [size, size], interpolation=interpolation, antialias=True)

        def fast_flip(chw: torch.Tensor) -> Image.Image:
            return fast.flip(Image.merge('RGB', [Image.fromarray(plane) for plane in chw.numpy()]))

        def fast_final(img: Image.Image) -> Any:
            from data.device_batch import erase_params
            return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)), erase_params(fast.eraser, size, size)

        return {
            'timm': [('decode', pil_decode), ('crop+resize', timm_t[0]), ('flip', timm_t[1]),
                     ('RandAugment', timm_t[2]),
                     ('to-tensor/normalise/erase', lambda x: timm_t[5](timm_t[4](timm_t[3](x))))],
            'fast': [('decode', lambda p: fast.decode(read_bytes(p))), ('crop+resize', fast_resize),
                     ('flip', fast_flip), ('RandAugment', fast.secondary), ('to-tensor/normalise/erase', fast_final)],
        }
    return {
        'timm': [('decode', pil_decode), ('crop+resize', lambda x: timm_t[1](timm_t[0](x))),
                 ('to-tensor/normalise/erase', lambda x: timm_t[3](timm_t[2](x)))],
        'fast': [('decode', lambda p: fast.decode(read_bytes(p))), ('crop+resize', lambda x: fast(x)),
                 ('to-tensor/normalise/erase', lambda x: x)],
    }


def time_stages(files: Sequence[str], size: int, train: bool, rounds: int, batch: int) -> Dict[str, Dict[str, float]]:
    """Median ms per image of each stage (and the collate of ``batch`` samples, per image)."""
    stages = stage_functions(size, train)
    times: Dict[Tuple[str, str], List[float]] = {}
    for r in range(rounds):
        for name, steps in stages.items():
            states: List[Any] = list(files)
            for k, (stage, fn) in enumerate(steps):
                t0 = time.perf_counter()
                outs = [fn(s) for s in states]  # unseeded: per-sample seeding would add the same cost to both
                times.setdefault((name, stage), []).append((time.perf_counter() - t0) / len(files) * 1e3)
                states = outs
            samples = [(s, 0) for s in states[:batch]]
            collate = default_collate if name == 'timm' else loader_collate(train, our_config('fast', size))
            t0 = time.perf_counter()
            collate(samples)
            times.setdefault((name, 'collate'), []).append((time.perf_counter() - t0) / len(samples) * 1e3)
    out: Dict[str, Dict[str, float]] = {}
    for (name, stage), v in times.items():
        out.setdefault(name, {})[stage] = statistics.median(v)
    return out


def time_device_finish(files: Sequence[str], size: int, train: bool, device: torch.device, batch: int,
                       rounds: int) -> Dict[str, float]:
    """ms per image of the device-side finish (normalise/erase; gpu: decode + augment too) on ``device``."""
    out: Dict[str, List[float]] = {}
    for r in range(rounds):
        for loader in ('fast', 'gpu'):
            config = our_config(loader, size)
            transform, collate = loader_transform(train, config), loader_collate(train, config)
            items = []
            for n, f in enumerate(files[:batch]):
                with seeded_rngs(SampleKey(n, r, 0)):
                    items.append((transform(transform.decode(f)), 0))
            b = collate(items)
            if device.type == 'cuda':
                b.pin_memory()
                batch_to_device(b, device)  # warm-up (nvJPEG handles, kernels)
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            images, _ = batch_to_device(b, device)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            out.setdefault(loader, []).append((time.perf_counter() - t0) / len(items) * 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- loaders

def time_loader(files: Sequence[str], transform: Any, collate: Optional[Callable], keyed: bool, workers: int,
                batch: int, epochs: int, device: Optional[torch.device] = None) -> float:
    """Images/s of a DataLoader over ``files`` (persistent workers; the first epoch is warm-up, not timed).
    With ``device``, batches are also finished there (batch_to_device), as the training loop does."""
    loader = DataLoader(FileDataset(files, transform, keyed), batch_size=batch, shuffle=False, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0, collate_fn=collate,
                        pin_memory=device is not None and device.type == 'cuda')
    images, start = 0, 0.0
    for epoch in range(epochs + 1):
        if epoch == 1:
            start = time.perf_counter()
        for b in loader:
            if device is not None:
                x, _ = batch_to_device(b, device)
                if device.type == 'cuda':
                    torch.cuda.synchronize(device)
            if epoch >= 1:
                images += len(b[1])
    return images / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- sources (DATA.DATASET)

SOURCES = ('folder', 'zip', 'wds', 'hf')


def pack_sources(files: Sequence[str], out: str, sources: Sequence[str]) -> Dict[str, Tuple[str, List[str]]]:
    """``files`` (``.../<class>/<image>``) as each source under ``out``: {source: (DATA_PATH, extra --opts)}."""
    import pack_wds
    import pack_zip
    folder = os.path.join(out, 'folder')
    for f in files:
        dst = os.path.join(folder, 'train', os.path.basename(os.path.dirname(f)), os.path.basename(f))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            os.symlink(os.path.abspath(f), dst)
    layouts: Dict[str, Tuple[str, List[str]]] = {'folder': (folder, ['DATA.DATASET', 'folder'])}
    if 'zip' in sources:
        pack_zip.pack_split(os.path.join(folder, 'train'), os.path.join(out, 'train.zip'),
                            os.path.join(out, 'train_map.txt'), progress=False)
        layouts['zip'] = (out, ['DATA.DATASET', 'folder', 'DATA.ZIP_MODE', 'True', 'DATA.CACHE_MODE', 'no'])
    if 'wds' in sources:
        pack_wds.pack_split(folder, os.path.join(out, 'wds'), 'train', samples_per_shard=64, progress=False)
        layouts['wds'] = (os.path.join(out, 'wds'), ['DATA.DATASET', 'wds', 'DATA.WDS_SHUFFLE', '256'])
    if 'hf' in sources:
        import datasets
        classes = sorted(os.listdir(os.path.join(folder, 'train')))
        paths = [os.path.join(folder, 'train', c, f) for c in classes
                 for f in sorted(os.listdir(os.path.join(folder, 'train', c)))]
        features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=classes)})
        split = datasets.Dataset.from_dict({'image': paths, 'label': [classes.index(os.path.basename(
            os.path.dirname(p))) for p in paths]}, features=features)
        datasets.DatasetDict({'train': split}).save_to_disk(os.path.join(out, 'hf'))
        layouts['hf'] = (os.path.join(out, 'hf'), ['DATA.DATASET', 'hf'])
    return {k: layouts[k] for k in sources}


def cpu_seconds_of_children() -> Optional[Dict[int, float]]:
    """{pid: seconds spent on a CPU} of this process's child processes (the DataLoader's workers), from Linux's
    /proc (``schedstat``: nanoseconds); None where /proc does not give them."""
    me = os.getpid()
    try:
        with open(f'/proc/{me}/task/{me}/children') as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return None
    out = {}
    for pid in pids:
        try:
            with open(f'/proc/{pid}/schedstat') as f:
                out[pid] = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return out


def time_source(path: str, opts: Sequence[str], loader: str, size: int, workers: int, batch: int,
                epochs: int, seed: int = 0) -> Tuple[float, Optional[float]]:
    """(images/s, images per CPU-second of the workers) of one source's training dataset + sampler + collate
    through a DataLoader (first epoch warm-up). With 0 workers the CPU time is the main process's. The CPU
    figure counts only the time a worker ran on a core, so it is what a worker costs, whoever else shares the
    machine (waiting for a core is left out; caches and clocks shared with other jobs still count); the wall
    rate is what the training loop sees. ``seed`` (SEED) draws the order and the augmentations: which image
    gets which crop and RandAugment ops."""
    from data.build import build_dataset, loader_collate, train_sampler
    config = load_config(opts=['DATA.DATA_PATH', path, 'DATA.IMG_SIZE', str(size), 'DATA.BATCH_SIZE', str(batch),
                               'DATA.NUM_WORKERS', str(workers), 'DATA.LOADER', loader, 'MODEL.NUM_CLASSES',
                               '1000', 'SEED', str(seed), *opts])
    dataset, _ = build_dataset(True, config)
    sampler = train_sampler(dataset, config, 0, 1)
    data = DataLoader(dataset, sampler=sampler, batch_size=batch, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0, collate_fn=loader_collate(True, config))
    images, start, cpu_start, cpu = 0, 0.0, 0.0, None
    for epoch in range(epochs + 1):
        if epoch == 1:
            start = time.perf_counter()
            cpu, cpu_start = cpu_seconds_of_children() if workers else None, time.process_time()
        sampler.set_epoch(epoch)
        for b in data:
            if epoch >= 1:
                images += len(b[1])
    seconds = time.perf_counter() - start
    if not workers:
        return images / seconds, images / (time.process_time() - cpu_start)
    now = cpu_seconds_of_children()  # the persistent workers, still running
    if cpu is None or now is None or not set(cpu) & set(now):
        return images / seconds, None
    return images / seconds, images / sum(now[p] - cpu[p] for p in set(cpu) & set(now))


def source_datasets(path: str, opts: Sequence[str], loader: str, size: int, batch: int, seed: int) -> Any:
    """(training dataset, sampler) of one source as one DataLoader worker of one rank sees it."""
    from data.build import build_dataset, train_sampler
    config = load_config(opts=['DATA.DATA_PATH', path, 'DATA.IMG_SIZE', str(size), 'DATA.BATCH_SIZE', str(batch),
                               'DATA.NUM_WORKERS', '1', 'DATA.LOADER', loader, 'MODEL.NUM_CLASSES', '1000',
                               'SEED', str(seed), *opts])
    dataset, _ = build_dataset(True, config)
    return dataset, train_sampler(dataset, config, 0, 1)


def paired_rounds(layouts: Dict[str, Tuple[str, List[str]]], loaders: Sequence[str], size: int, batch: int,
                  rounds: int) -> Dict[Tuple[str, str], List[float]]:
    """ms per sample of the folder and the wds training datasets on the same (image, augmentation seed) pairs.

    The shard reader serves position p of an epoch with some image X (shard order + shuffle buffer); the folder
    dataset's sample list is re-ordered so that its position p is X's file too. Both then decode and augment the
    same images under the same keys, and what differs is the reading alone (the folder: open + read + close of
    a file; wds: the tar stream, the shuffle buffer). The two are called alternately, sample by sample, so load
    from other processes falls on both alike. Each round draws another SEED."""
    import copy
    import pack_wds
    times: Dict[Tuple[str, str], List[float]] = {}
    for r in range(rounds):
        for loader in loaders:
            wds, sampler = source_datasets(*layouts['wds'], loader, size, batch, seed=r)
            keys = list(sampler)
            layout = wds.layout(0)
            raws = [wds.reader(0, 0).get(layout.locate(int(k))[1]) for k in keys]  # read, not decoded
            wds._readers = {}  # timed from a fresh reader: the shuffle buffer fills inside the timing
            folder, _ = source_datasets(*layouts['folder'], loader, size, batch, seed=r)
            by_key = {pack_wds.sample_key(0, path).split('_', 1)[1]: (path, label) for path, label in folder.samples}
            paired = copy.copy(folder)
            paired.samples = list(folder.samples)
            for k, (name, parts) in zip(keys, raws):
                paired.samples[int(k)] = by_key[name.split('_', 1)[1]]
                if int(parts['cls']) != paired.samples[int(k)][1]:  # the pairing is the same image, same label
                    raise RuntimeError(f"wds sample {name} paired with {paired.samples[int(k)]}: another label")
            del raws
            paired.targets = [label for _, label in paired.samples]
            spent = {'folder': 0.0, 'wds': 0.0}
            for n, key in enumerate(keys):
                for source in (('folder', 'wds') if n % 2 else ('wds', 'folder')):
                    dataset = paired if source == 'folder' else wds
                    t0 = time.perf_counter()
                    dataset[key]
                    spent[source] += time.perf_counter() - t0
            for source, seconds in spent.items():
                times.setdefault((source, loader), []).append(seconds / len(keys) * 1e3)
    return times


class PairedInWorker(Dataset):
    """One item: ``paired_rounds`` run inside a DataLoader worker (its per-sample seeding is a worker's)."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Any:
        torch.set_num_threads(1)
        return paired_rounds(*self.args)


def benchmark_paired(files: Sequence[str], args: Any) -> None:
    with tempfile.TemporaryDirectory(prefix='swin_sources_') as out:
        layouts = pack_sources(files, out, ['folder', 'wds'])
        loader = DataLoader(PairedInWorker(layouts, ('torch', 'fast'), args.img_size, args.batch_size, args.rounds),
                            batch_size=None, num_workers=1)
        times = next(iter(loader))
    print(f"## reading alone: folder vs wds on the same images and augmentations, one DataLoader worker, "
          f"alternating sample by sample (ms per sample, medians of {args.rounds} rounds; speed ratio wds / folder: "
          f"median of per-round ratios, and each round's)\n")
    print("| loader | folder | wds | wds / folder | rounds |\n| --- | --- | --- | --- | --- |")
    for loader in ('torch', 'fast'):
        f, w = times[('folder', loader)], times[('wds', loader)]
        ratios = [a / b for a, b in zip(f, w)]
        print(f"| {loader} | {statistics.median(f):.3f} | {statistics.median(w):.3f} | "
              f"{statistics.median(ratios):.3f}x | {' '.join(f'{x:.3f}' for x in ratios)} |")
    print()


def benchmark_sources(files: Sequence[str], args: Any) -> None:
    """Each source per round, interleaved. Every round uses another SEED (the same for all sources): a source's
    samples meet other augmentations than the folder's at the same step (the order differs), and the cost of
    an epoch depends on which large image drew a large crop or a costly RandAugment op; fresh draws each round
    keep that from biasing one source in every round. Ratios are medians of the per-round ratios to the folder.
    Within a round the sources run in turn, the order reversed every other round (load that drifts during a
    round then falls on each source alike)."""
    with tempfile.TemporaryDirectory(prefix='swin_sources_') as out:
        layouts = pack_sources(files, out, args.sources)
        rates: Dict[Tuple[str, str, int], List[float]] = {}
        per_cpu: Dict[Tuple[str, str, int], List[Optional[float]]] = {}
        for r in range(args.rounds):
            for workers in args.workers:
                for loader in ('torch', 'fast'):
                    for source in (list(layouts) if r % 2 == 0 else list(layouts)[::-1]):
                        path, opts = layouts[source]
                        rate, cpu_rate = time_source(path, opts, loader, args.img_size, workers, args.batch_size,
                                                     args.epochs, seed=r)
                        rates.setdefault((source, loader, workers), []).append(rate / max(1, workers))
                        per_cpu.setdefault((source, loader, workers), []).append(cpu_rate)
    columns = [(loader, w) for w in args.workers for loader in ('torch', 'fast')]

    def table(title: str, values: Dict[Tuple[str, str, int], List[Any]]) -> None:
        print(f"## {title} (median of {args.rounds} rounds; ratio: median of per-round ratios to folder)\n")
        print("| source | " + " | ".join(f"{loader}, {w} worker{'s' if w != 1 else ''}" for loader, w in columns)
              + " |")
        print("| --- |" + " --- |" * len(columns))
        for source in layouts:
            cells = []
            for loader, w in columns:
                mine = values[(source, loader, w)]
                if any(x is None for x in mine):
                    cells.append('n/a')
                    continue
                cell = f"{statistics.median(mine):.0f}"
                if 'folder' in layouts and source != 'folder':
                    ratio = statistics.median(x / f for x, f in zip(mine, values[('folder', loader, w)]))
                    cell += f" ({ratio:.3f}x)"
                cells.append(cell)
            print(f"| {source} | " + " | ".join(cells) + " |")
        print()

    table("train sources: images/s per worker", rates)
    table("train sources: images per CPU-second of a worker (its time on a core, from /proc)", per_cpu)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-path', help='folder of images: <path>/<class>/<image> (default: make the photos)')
    parser.add_argument('--num-images', type=int, default=0, help='use only the first N images (default: all)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 2], help='loader worker counts (default 1 2)')
    parser.add_argument('--epochs', type=int, default=2, help='timed epochs per loader run (default 2)')
    parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds; medians are printed (default 3)')
    parser.add_argument('--loaders', nargs='+', default=['timm', 'timm-prefetch', 'torch', 'fast', 'gpu'])
    parser.add_argument('--skip-stages', action='store_true', help='only the loader figures')
    parser.add_argument('--sources', nargs='+', choices=SOURCES,
                        help='time these sources (DATA.DATASET) on the same files instead of the loaders')
    parser.add_argument('--paired', action='store_true',
                        help='folder vs wds on the same (image, augmentation) pairs in one worker: the readers alone')
    parser.add_argument('--device', default='cpu',
                        help="where the device-side finish runs (default cpu); with 'cuda' the loader rows also "
                             "include the copy and the finish on the GPU (end to end, as the training loop sees it)")
    args = parser.parse_args(argv)
    logging.getLogger('data').setLevel(logging.ERROR)
    torch.set_num_threads(1)  # as inside a DataLoader worker

    tmp = None
    if args.data_path:
        files = list_images(args.data_path)
    else:
        tmp = tempfile.TemporaryDirectory(prefix='swin_photos_')
        files = make_photo_folder(tmp.name)
    if args.num_images:
        files = files[::max(1, len(files) // args.num_images)][:args.num_images]
    sizes = [Image.open(f).size for f in files]
    print(machine())
    print(f"{len(files)} images, {sum(os.path.getsize(f) for f in files) / len(files) / 1024:.0f} KiB average, "
          f"{sum(1 for w, h in sizes if w * h > 1e6)} over 1 MP; size {args.img_size}, batch {args.batch_size}, "
          f"{args.rounds} rounds\n")
    if args.paired:
        benchmark_paired(files, args)
        print(machine())
        if tmp is not None:
            tmp.cleanup()
        return
    if args.sources:
        benchmark_sources(files, args)
        print(machine())
        if tmp is not None:
            tmp.cleanup()
        return
    device = torch.device(args.device)
    for train in (True, False):
        kind = 'train' if train else 'eval'
        if not args.skip_stages:
            stages = time_stages(files, args.img_size, train, args.rounds, args.batch_size)
            names = list(next(iter(stages.values())))
            print(f"## {kind}: ms per image, one process, one thread (medians of {args.rounds} rounds)\n")
            print("| stage | timm | ours (fast) | ratio |\n| --- | --- | --- | --- |")
            for stage in names:
                a, b = stages['timm'][stage], stages['fast'][stage]
                print(f"| {stage} | {a:.3f} | {b:.3f} | {a / b if b > 0 else float('inf'):.2f}x |")
            ta, tb = sum(stages['timm'].values()), sum(stages['fast'].values())
            print(f"| **total** | {ta:.3f} | {tb:.3f} | {ta / tb:.2f}x |")
            finish = time_device_finish(files, args.img_size, train, device, args.batch_size, args.rounds)
            augment = ' + flip + RandAugment + erase' if train else ''
            print(f"\ndevice-side finish on {device} per image: fast (normalise{' + erase' if train else ''}) "
                  f"{finish['fast']:.3f} ms; gpu (decode + crop/resize{augment} + normalise) {finish['gpu']:.3f} ms\n")
        rates: Dict[Tuple[str, int], List[float]] = {}
        built = contenders(args.img_size, train)
        for r in range(args.rounds):
            for workers in args.workers:
                for name in args.loaders:
                    transform, collate, keyed = built[name]
                    rate = time_loader(files, transform, collate, keyed, workers, args.batch_size, args.epochs,
                                       device if device.type != 'cpu' else None)
                    rates.setdefault((name, workers), []).append(rate)
        print(f"## {kind} loader: images/s (median of {args.rounds} rounds; ratio = median of per-round ratios to "
              f"timm)\n")
        print("| loader | " + " | ".join(f"{w} worker{'s' if w > 1 else ''}" for w in args.workers) + " |")
        print("| --- |" + " --- |" * len(args.workers))
        for name in args.loaders:
            cells = []
            for w in args.workers:
                med = statistics.median(rates[(name, w)])
                ratio = statistics.median(x / t for x, t in zip(rates[(name, w)], rates[('timm', w)]))
                cells.append(f"{med:.0f} ({ratio:.2f}x)")
            print(f"| {name}{'*' if name == 'gpu' else ''} | " + " | ".join(cells) + " |")
        if device.type == 'cpu':
            print("\n*gpu: the workers' share only (read bytes, draw parameters); decoding and augmentation run on "
                  "the device (the 'device-side finish' figure above)\n")
        else:
            print(f"\nend to end: every batch copied to {device} and finished there (batch_to_device)\n")
    print(machine())
    if tmp is not None:
        tmp.cleanup()


if __name__ == '__main__':
    main()
