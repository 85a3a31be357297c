#!/usr/bin/env python
"""Pack an image folder (``<src>/<split>/<class>/<image>``) into the zip layout that ``DATA.ZIP_MODE`` reads:
``<out>/<split>.zip`` plus ``<out>/<split>_map.txt`` with lines ``<class>/<image><TAB><label>``.

Labels are the sorted class folder names of the first split (normally train); later splits use the same
mapping, so a validation class folder that the first split lacks is an error. Images are stored uncompressed
by default (JPEGs do not shrink, and stored members read fastest).

    python scripts/pack_zip.py /data/imagenet /data/imagenet_zip --splits train val
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
from typing import Dict, List, Optional, Sequence

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.datasets import scan_class_folder  # noqa: E402


def pack_split(src_split: str, zip_path: str, map_path: str, class_to_idx: Optional[Dict[str, int]] = None,
               compression: int = zipfile.ZIP_STORED, progress: bool = True) -> Dict[str, int]:
    """Write one split's archive and map file (atomically); return its class -> label mapping."""
    samples, class_to_idx = scan_class_folder(src_split, class_to_idx)
    lines: List[str] = []
    tmp_zip, tmp_map = zip_path + '.tmp', map_path + '.tmp'
    with zipfile.ZipFile(tmp_zip, 'w', compression=compression, allowZip64=True) as archive:
        for path, label in tqdm(samples, desc=os.path.basename(zip_path), unit='img', disable=not progress):
            member = os.path.relpath(path, src_split).replace(os.sep, '/')
            if '\t' in member or '\n' in member:
                raise ValueError(f"{path}: tabs and newlines in file names cannot be written to a map file")
            archive.write(path, member)
            lines.append(f"{member}\t{label}\n")
    with open(tmp_map, 'w', encoding='utf-8') as f:
        f.writelines(lines)
    os.replace(tmp_zip, zip_path)
    os.replace(tmp_map, map_path)
    return class_to_idx


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='dataset root holding one folder per split, each with one folder per class')
    parser.add_argument('out', help='output folder for <split>.zip and <split>_map.txt')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'],
                        help='split folder names to pack; the first defines the labels (default: train val)')
    parser.add_argument('--deflate', action='store_true', help='compress members (default: stored)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    compression = zipfile.ZIP_DEFLATED if args.deflate else zipfile.ZIP_STORED
    class_to_idx = None
    for split in args.splits:
        class_to_idx = pack_split(os.path.join(args.src, split), os.path.join(args.out, f'{split}.zip'),
                                  os.path.join(args.out, f'{split}_map.txt'), class_to_idx, compression,
                                  progress=not args.no_progress)
    print(f"packed {', '.join(args.splits)} ({len(class_to_idx or {})} classes) into {args.out}")


if __name__ == '__main__':
    main()
