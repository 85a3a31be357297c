#!/usr/bin/env python
"""Top-k predictions of a trained Swin for one image or every image in a folder.

The model is built from ``--cfg`` (+ ``--opts``) or, when omitted, from the config stored in the checkpoint
(every checkpoint this framework writes holds one). The checkpoint is read only through the project's safe
loader (``weights_only=True``). Images get the deterministic eval transform of the config. Class names come
from ``--class-names`` (one per line, in label order) or ``--data-path`` (the dataset folder: class folders
sorted by name, as training labelled them; for a multi-label model its ``classes.txt``); otherwise labels are
printed as numbers.

A multi-label model (trained with ``DATA.LABELS csv``) gets a sigmoid per class instead of a softmax, and each
image's line lists every class whose probability is at least ``--threshold`` (default: the checkpoint's
``TEST.THRESHOLD``), most likely first, or ``(no label >= 0.50)``.

    python scripts/predict.py --resume demo_output/swin_demo_digits_48_ft/default/ckpt_best.pth \\
        --data-path demo_data demo_data/val/digit_7
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import (ConfigError, get_defaults, is_multi_label, load_config, merge_config_dict,  # noqa: E402
                    merge_opts, model_in_chans, validate_config)

if TYPE_CHECKING:
    import torch

# torch, the models and the checkpoint module are imported where they are used, so that --help is instant.

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def config_from_checkpoint(checkpoint: dict, path: str, opts: Sequence[str] = ()) -> Any:
    """The config stored in ``checkpoint['config']`` (a plain dict), with ``opts`` applied; validated, frozen."""
    stored = checkpoint.get('config')
    if not isinstance(stored, dict):
        raise ConfigError(f"{path} holds no config; pass the model's config file with --cfg")
    config = get_defaults()
    try:
        merge_config_dict(config, stored)  # DATA.IMG_SIZE may be [height, width]
        merge_opts(config, list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"the config stored in {path} does not fit this version's keys: {e}; "
                          f"pass --cfg") from None
    validate_config(config)
    config.freeze()
    return config


def load_model(checkpoint_path: str, cfg: Optional[str] = None, opts: Sequence[str] = (), ema: bool = False,
               trust: bool = False, device: str = 'cpu') -> Tuple[torch.nn.Module, Any]:
    """(model in eval mode on ``device``, config) from a checkpoint and an optional config file."""
    from models import build_model
    from models.pretrained import extract_state_dict
    from utils.checkpoint import CheckpointError, load_checkpoint_file, load_model_state, read_sharded_model
    checkpoint = load_checkpoint_file(checkpoint_path, trust=trust)
    config = load_config(cfg, opts) if cfg else config_from_checkpoint(checkpoint, checkpoint_path, opts)
    model = build_model(config)
    if checkpoint.get('sharded_dir'):  # a sharded (FSDP) checkpoint directory: its tensors read in full here
        state = read_sharded_model(checkpoint['sharded_dir'], ema)
    elif ema:
        if not isinstance(checkpoint.get('ema'), dict):
            raise CheckpointError(f"{checkpoint_path} has no EMA weights (train with TRAIN.EMA.ENABLE True)")
        state = checkpoint['ema']
    else:
        state = extract_state_dict(checkpoint)
    load_model_state(model, {'model': state}, checkpoint_path)
    return model.to(device).eval(), config


def read_class_names(class_names: Optional[str], data_path: Optional[str], config: Any) -> Optional[List[str]]:
    """Names in label order from a one-per-line file or a dataset folder (its training split), else None."""
    from data.datasets import CLASS_NAMES_FILE, read_class_names as read_names_file
    if class_names:
        return read_names_file(class_names)
    if data_path and is_multi_label(config):  # DATA.LABELS csv: the class names file beside the CSVs
        path = os.path.join(data_path, CLASS_NAMES_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CLASS_NAMES_FILE} in {data_path} (a multi-label dataset names its classes "
                                    f"there, one per line); pass --class-names FILE or leave --data-path out")
        return read_names_file(path)
    if data_path:
        split = os.path.join(data_path, config.DATA.TRAIN_SPLIT)
        root = split if os.path.isdir(split) else data_path
        names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not names:
            raise FileNotFoundError(f"no class folders in {root}")
        return names
    return None


def list_images(path: str) -> List[str]:
    """``path`` itself if it is a file, else every image below the folder ``path``, sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such image or folder: {path}")
    found = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    return sorted(found)


def predict(model: torch.nn.Module, config: Any, paths: Sequence[str], topk: int = 5, batch_size: int = 32,
            device: str = 'cpu', threshold: Optional[float] = None) -> List[List[Tuple[int, float]]]:
    """For each image, the ``topk`` (label, probability) pairs, most likely first. ``threshold`` (multi-label
    models): every (label, sigmoid probability) pair with a probability >= ``threshold`` instead."""
    import torch
    from data import build_transform
    from data.datasets import decode_image
    transform = build_transform(False, config)
    results: List[List[Tuple[int, float]]] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = torch.stack([transform(decode_image(p, model_in_chans(config))) for p in chunk]).to(device)
        with torch.no_grad():
            logits = model(images).float()  # (B, C)
        if threshold is not None:
            probs = logits.sigmoid()  # (B, C): one independent probability per class
            for row in probs:
                values, labels = row.sort(descending=True)
                kept = values >= threshold
                results.append(list(zip(labels[kept].tolist(), values[kept].tolist())))
            continue
        probs = logits.softmax(dim=-1)
        values, labels = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        results.extend([list(zip(lab.tolist(), val.tolist())) for lab, val in zip(labels, values)])
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('images', help='an image file or a folder of images (searched recursively)')
    parser.add_argument('--resume', '--checkpoint', dest='checkpoint', required=True,
                        help='checkpoint (.pth with a "model" entry, or .safetensors with --cfg)')
    parser.add_argument('--cfg', help='config file of the model (default: the config stored in the checkpoint)')
    parser.add_argument('--opts', nargs='+', default=[], help='KEY VALUE config overrides')
    parser.add_argument('--class-names', metavar='FILE', help='class names, one per line, in label order')
    parser.add_argument('--data-path', help='dataset folder: class names are its (training split) class folders')
    parser.add_argument('--topk', type=int, default=5, help='how many classes to show (default: 5)')
    parser.add_argument('--threshold', type=float,
                        help="multi-label models: show the classes with a sigmoid probability >= this (default: the "
                             "checkpoint's TEST.THRESHOLD)")
    parser.add_argument('--batch-size', type=int, default=32, help='images per forward pass (default: 32)')
    parser.add_argument('--ema', action='store_true', help="use the EMA weights ('ema' entry)")
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'],
                        help='where to run (default: auto, CUDA when available)')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='allow full unpickling of a legacy checkpoint (only for files you trust)')
    args = parser.parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        parser.error('--topk and --batch-size must be >= 1')
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        parser.error('--threshold must be in (0, 1)')
    import torch
    from models.fast_paths import use_fast_paths
    from utils.checkpoint import CheckpointError
    from utils.misc import keep_freed_cpu_memory
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        model, config = load_model(args.checkpoint, args.cfg, args.opts, args.ema, args.trust_checkpoint,
                                   args.device)
        names = read_class_names(args.class_names, args.data_path, config)
        paths = list_images(args.images)
        threshold = None
        if is_multi_label(config):
            threshold = args.threshold if args.threshold is not None else config.TEST.THRESHOLD
        elif args.threshold is not None:
            raise ConfigError('--threshold is for multi-label models (trained with DATA.LABELS csv); this one is '
                              'single-label: use --topk')
        if args.device == 'cpu' and use_fast_paths():  # off with MODEL.FAST_PATHS False or SWIN_FAST_PATHS=0
            keep_freed_cpu_memory()  # (build_model has applied the checkpoint's MODEL.FAST_PATHS)
        results = predict(model, config, paths, args.topk, args.batch_size, args.device, threshold)
    except (CheckpointError, ConfigError, FileNotFoundError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if names is not None and len(names) != config.MODEL.NUM_CLASSES:
        print(f"warning: {len(names)} class names for a {config.MODEL.NUM_CLASSES}-class model", file=sys.stderr)
    for path, top in zip(paths, results):
        shown = ', '.join(f"{names[label] if names and label < len(names) else label} {100 * p:.1f}%"
                          for label, p in top)
        print(f"{path}: {shown or f'(no label >= {threshold:.2f})'}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
