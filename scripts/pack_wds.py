#!/usr/bin/env python
"""Pack an image folder (``<src>/<split>/<class>/<image>``) or the zip layout (``<src>/<split>.zip`` +
``<split>_map.txt``) into WebDataset shards for ``DATA.DATASET wds``: ``<out>/<split>-000000.tar``, ... with
samples ``<key>.jpg`` (the file's own bytes; formats other than jpg/jpeg/png/webp are re-encoded as PNG) and
``<key>.cls`` (the label as text), plus the index ``<out>/<split>.index.json`` (per-shard sample counts and
sizes) that the reader needs.

Samples are written in an order shuffled with ``--seed`` (a class folder's order would give one-class shards,
which a shuffle buffer cannot mix); a shard closes after ``--samples`` samples or ``--max-mb`` MB.

    python scripts/pack_wds.py /data/imagenet /data/imagenet_wds --splits train val --samples 1000
    python scripts/pack_wds.py --verify /data/imagenet_wds --splits train val     # read every shard back
    python scripts/pack_wds.py --index-only /data/shards --splits train           # count existing shards once
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
import sys
import tarfile
import zipfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.datasets import decode_image, read_map_file, scan_class_folder  # noqa: E402
from data.wds import (IMAGE_EXTENSIONS, INDEX_FORMAT, INDEX_SUFFIX, WdsShardError, decode_label,  # noqa: E402
                      iter_shard, read_index)


def split_source(src: str, split: str, class_to_idx: Optional[Dict[str, int]]
                 ) -> Tuple[List[Tuple[str, int]], Dict[str, int], Callable[[str], bytes]]:
    """(samples (name, label), class_to_idx, read(name) -> bytes) of a folder split or a zip split."""
    zip_path = os.path.join(src, f'{split}.zip')
    if os.path.isdir(os.path.join(src, split)) or not os.path.isfile(zip_path):
        samples, class_to_idx = scan_class_folder(os.path.join(src, split), class_to_idx)

        def read(name: str) -> bytes:
            with open(name, 'rb') as f:
                return f.read()
        return samples, class_to_idx, read
    samples = read_map_file(os.path.join(src, f'{split}_map.txt'))
    archive = zipfile.ZipFile(zip_path)
    classes = sorted({os.path.dirname(p) for p, _ in samples})
    return samples, {c: i for i, c in enumerate(classes)}, archive.read


def sample_key(n: int, name: str) -> str:
    """A unique key without dots or slashes (the WebDataset key ends at the base name's first dot)."""
    stem = os.path.splitext(name)[0].replace(os.sep, '/')
    tail = '_'.join(stem.split('/')[-2:])
    return f"{n:08d}_" + ''.join(c if c.isalnum() or c in '-_' else '_' for c in tail)


def encoded(name: str, data: bytes) -> Tuple[str, bytes]:
    ext = os.path.splitext(name)[1].lower().lstrip('.')
    if ext in IMAGE_EXTENSIONS:
        return ext, data
    out = io.BytesIO()
    decode_image(data).save(out, format='PNG')
    return 'png', out.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # mtime 0: the same input packs to the same bytes
    tar.addfile(info, io.BytesIO(data))


def pack_split(src: str, out: str, split: str, class_to_idx: Optional[Dict[str, int]] = None,
               samples_per_shard: int = 1000, max_mb: float = 0.0, seed: int = 0,
               progress: bool = True) -> Dict[str, int]:
    """Write one split's shards and index; return its class -> label mapping."""
    samples, class_to_idx, read = split_source(src, split, class_to_idx)
    os.makedirs(out, exist_ok=True)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    shards: List[Dict[str, object]] = []
    tar, tmp, count, size = None, '', 0, 0

    def close() -> None:
        tar.close()
        final = tmp[:-len('.tmp')]
        os.replace(tmp, final)
        shards.append({'url': os.path.basename(final), 'samples': count, 'bytes': os.path.getsize(final)})

    for n, i in enumerate(tqdm(order, desc=split, unit='img', disable=not progress)):
        name, label = samples[i]
        if tar is not None and (count >= samples_per_shard or (max_mb and size >= max_mb * 2 ** 20)):
            close()
            tar = None
        if tar is None:
            tmp = os.path.join(out, f'{split}-{len(shards):06d}.tar.tmp')
            tar, count, size = tarfile.open(tmp, 'w', format=tarfile.USTAR_FORMAT), 0, 0
        ext, data = encoded(name, read(name))
        key = sample_key(n, name)
        add_member(tar, f'{key}.{ext}', data)
        add_member(tar, f'{key}.cls', str(label).encode())
        count, size = count + 1, size + len(data) + 1024
    if tar is not None:
        close()
    write_index(out, split, shards, sorted(class_to_idx, key=class_to_idx.get))
    return class_to_idx


def write_index(out: str, split: str, shards: List[Dict[str, object]], classes: Optional[List[str]] = None) -> str:
    path = os.path.join(out, split + INDEX_SUFFIX)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump({'format': INDEX_FORMAT, 'split': split, 'classes': classes, 'shards': shards}, f, indent=1)
    os.replace(path + '.tmp', path)
    return path


def index_only(root: str, split: str, progress: bool = True) -> str:
    """Count the samples of existing shards ``<root>/<split>-*.tar`` (read once) and write their index."""
    urls = sorted(glob.glob(os.path.join(root, f'{split}-*.tar')))
    if not urls:
        raise SystemExit(f"error: no shards {os.path.join(root, split)}-*.tar")
    shards = [{'url': os.path.basename(u), 'samples': sum(1 for _ in iter_shard(u)), 'bytes': os.path.getsize(u)}
              for u in tqdm(urls, desc=f'counting {split}', unit='shard', disable=not progress)]
    return write_index(root, split, shards)


def verify(root: str, split: str, decode: bool = True, progress: bool = True) -> Tuple[int, List[str]]:
    """Read every shard of ``split`` back: counts against the index, each label and (``decode``) each image.
    Returns (samples read, problems)."""
    problems: List[str] = []
    total = 0
    for shard in tqdm(read_index(root, split), desc=f'verifying {split}', unit='shard', disable=not progress):
        n = 0
        try:
            for raw in iter_shard(shard['url']):
                n += 1
                try:
                    data, _ = decode_label(raw, num_classes=2 ** 31)
                    if decode:
                        decode_image(data)
                except Exception as e:  # every kind of damage is reported, none stops the check
                    problems.append(f"{shard['url']}: sample {raw[0]}: {type(e).__name__}: {e}")
        except WdsShardError as e:
            problems.append(str(e))
        if n != shard['samples']:
            problems.append(f"{shard['url']}: {n} samples, the index says {shard['samples']}")
        if shard['bytes'] is not None and os.path.isfile(shard['url']) and \
                os.path.getsize(shard['url']) != shard['bytes']:
            problems.append(f"{shard['url']}: {os.path.getsize(shard['url'])} bytes, the index says {shard['bytes']}")
        total += n
    return total, problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='dataset root: <split>/<class>/<image> folders or <split>.zip + <split>_map.txt '
                                    '(with --verify / --index-only: the shard folder)')
    parser.add_argument('out', nargs='?', help='output folder for the shards and index files')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'],
                        help='splits to pack; the first defines the labels (default: train val)')
    parser.add_argument('--samples', type=int, default=1000, help='samples per shard (default 1000)')
    parser.add_argument('--max-mb', type=float, default=0.0, help='also close a shard at this size in MB')
    parser.add_argument('--seed', type=int, default=0, help='seed of the packing order (default 0)')
    parser.add_argument('--verify', action='store_true', help='read every shard of src back and check it')
    parser.add_argument('--no-decode', action='store_true', help='with --verify: check tars and labels only')
    parser.add_argument('--index-only', action='store_true', help='count the existing shards of src, write indexes')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)
    progress = not args.no_progress
    if args.verify:
        bad = False
        for split in args.splits:
            total, problems = verify(args.src, split, decode=not args.no_decode, progress=progress)
            for p in problems:
                print(f"problem: {p}")
            print(f"{split}: {total} samples read, {len(problems)} problems")
            bad = bad or bool(problems)
        return 1 if bad else 0
    if args.index_only:
        for split in args.splits:
            print(f"wrote {index_only(args.src, split, progress)}")
        return 0
    if not args.out:
        parser.error('the output folder is needed to pack')
    if args.samples < 1 or args.max_mb < 0:
        parser.error('--samples must be >= 1 and --max-mb >= 0')
    os.makedirs(args.out, exist_ok=True)
    class_to_idx = None
    for split in args.splits:
        class_to_idx = pack_split(args.src, args.out, split, class_to_idx, args.samples, args.max_mb, args.seed,
                                  progress)
    print(f"packed {', '.join(args.splits)} ({len(class_to_idx or {})} classes) into {args.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
