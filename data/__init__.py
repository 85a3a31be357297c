"""ImageNet-style data pipeline: datasets, transforms, samplers and ``build_loader``.

Public API (the official names): ``build_loader(config)``, ``build_dataset(is_train, config)``,
``build_transform(is_train, config)``.

Unreadable images (truncated, not an image, missing from an archive) never stop a run unless
``DATA.STRICT_IMAGES`` is set, which makes them a ``BrokenImageError``:

- training: the file is skipped with a warning naming it, and the next readable sample takes its place, so
  batches stay full (Mixup needs even batches, DDP ranks need equal step counts);
- validation: the file is skipped with a warning and dropped from its batch, so each readable image is counted
  exactly once; a batch may then be smaller than ``DATA.BATCH_SIZE``, or even empty (shape (0, 3, S, S)).

Each dataset counts its skipped files in a shared-memory tensor that DataLoader workers (separate processes,
fork or spawn) add to, one slot per process, so no lock is needed.
The engine reads it from the main process once an epoch has been fully consumed::

    n_broken = data.pop_broken_count(data_loader_train)   # returns the count and resets it to 0

Batches are plain ``(images, targets)`` with ``DATA.LOADER torch``; with ``fast`` / ``gpu`` they are
``data.device_batch.DeviceBatch``es that unpack the same way and finish on the device: ``images, targets =
data.batch_to_device(batch, device)`` (normalisation and erasing there; for ``gpu`` also decoding and augmentation).
``DATA.LOADER auto`` (the default) trains on ``fast`` where it can and evaluates on ``torch``
(``choose_loaders``). SimMIM pre-training batches are ``[images, masks, targets]`` (``data.simmim``).

Modules, bottom layer first; each imports only from those before it (``tests/test_architecture.py`` checks it):
``seeding`` (SampleKey, per-sample RNGs) -> ``datasets`` (sources) -> ``hf``, ``wds`` (Hugging Face datasets,
WebDataset shards) -> ``samplers`` -> ``transforms`` (timm's pieces,
eval geometry) -> ``device_batch`` (DeviceBatch, device-side finish) -> ``fast``, ``gpu`` (loaders) -> ``build``
-> ``simmim`` -> this package.
"""
from __future__ import annotations

from typing import Any

from .build import LoaderChoice, build_dataset, build_mixup, check_resumed_loader, choose_loaders
from .build import build_loader as _build_classification_loader
from .datasets import (BrokenImageError, DatasetLayoutError, ImageDataset, ImageFolderDataset,
                       ImageNet22KDataset, SourceDependencyError, ZipImageDataset, decode_image, to_rgb)
from .device_batch import DeviceBatch, batch_to_device
from .fast import LoaderDependencyError
from .hf import HFImageDataset
from .wds import WdsDataset
from .samplers import DistributedEvalSampler, RepeatAugSampler, ShardShuffleSampler, eval_shard_indices, loader_from
from .simmim import MaskGenerator, SimMIMTransform, build_loader_simmim
from .transforms import build_transform


def build_loader(config: Any, simmim: bool = False, is_pretrain: bool = False) -> Any:
    """The official entry point. Classification (and the SimMIM fine-tune, ``simmim=True, is_pretrain=False``,
    which the official code feeds the same way): ``(dataset_train, dataset_val, data_loader_train,
    data_loader_val, mixup_fn)``. SimMIM pre-training (``simmim=True, is_pretrain=True``): the training
    DataLoader alone, batches ``[images, masks, targets]`` (see ``data.simmim``)."""
    if simmim and is_pretrain:
        return build_loader_simmim(config)
    return _build_classification_loader(config)


def _dataset_of(loader_or_dataset: Any) -> ImageDataset:
    dataset = getattr(loader_or_dataset, 'dataset', loader_or_dataset)
    if not hasattr(dataset, 'broken_images'):
        raise TypeError(f"{type(dataset).__name__} does not count broken images (not one of data's datasets)")
    return dataset


def broken_count(loader_or_dataset: Any) -> int:
    """Unreadable images skipped since the last reset (all worker processes together)."""
    return _dataset_of(loader_or_dataset).broken_images.value


def pop_broken_count(loader_or_dataset: Any) -> int:
    """The skipped-image count since the last reset, then reset it to 0 (call once per epoch)."""
    return _dataset_of(loader_or_dataset).broken_images.reset()


__all__ = ['build_loader', 'build_dataset', 'build_transform', 'build_mixup', 'choose_loaders', 'check_resumed_loader',
           'LoaderChoice', 'broken_count', 'pop_broken_count',
           'batch_to_device', 'DeviceBatch', 'LoaderDependencyError', 'SourceDependencyError',
           'HFImageDataset', 'WdsDataset',
           'BrokenImageError', 'DatasetLayoutError', 'ImageDataset', 'ImageFolderDataset', 'ImageNet22KDataset',
           'ZipImageDataset', 'decode_image', 'to_rgb', 'DistributedEvalSampler', 'RepeatAugSampler',
           'ShardShuffleSampler', 'eval_shard_indices', 'loader_from', 'MaskGenerator', 'SimMIMTransform', 'build_loader_simmim']
