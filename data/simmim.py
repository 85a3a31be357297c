"""SimMIM pre-training data: the official mask generator and transform, and the pre-training loader.

The loader reads class folders (``DATA.DATA_PATH`` is the folder with the class sub-folders, as in the official
``--data-path <imagenet>/train``) or, with ``DATA.ZIP_MODE``, ``<DATA_PATH>/<DATA.TRAIN_SPLIT>.zip`` with its map
file as the classification loader does. It uses the classification loader's datasets, training sampler and
loader settings, so per-rank sharding is exact and every sample's crop, flip and mask are a function of
(SEED, epoch, index) alone (the mask generator draws from numpy's global generator, which the dataset seeds per
sample): a mid-epoch resume reproduces the rest of the epoch exactly.

Batches are ``[images (B, 3, S, S), masks (B, S/p, S/p) int64, targets (B,)]`` as the official loader yields them.

Layer: the top of ``data`` below ``__init__``: it builds on ``data.build``'s shared loader settings.
"""
from __future__ import annotations

import logging
import os
from typing import Any, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms

from config import ConfigError
from utils.distributed import dist_info

from .build import choose_loaders, loader_kwargs, split_name, train_sampler, wds_streams, zip_cache_indices
from .datasets import DatasetLayoutError, ImageFolderDataset, ZipImageDataset
from .hf import HFImageDataset
from .wds import WdsDataset

logger = logging.getLogger(__name__)

# The official SimMIM crop: RandomResizedCrop to DATA.IMG_SIZE with this scale and aspect-ratio range.
CROP_SCALE = (0.67, 1.0)
CROP_RATIO = (3. / 4., 4. / 3.)


class MaskGenerator:
    """Random patch masks as the official SimMIM: ``ceil(mask_ratio * cells)`` of the ``(input_size /
    mask_patch_size)**2`` cells are masked (1), then each cell is repeated to the model's patch grid.

    Draws from numpy's global generator (``np.random.permutation``) like the official one, so the same numpy
    state gives the same mask. Returns an ``(input_size / model_patch_size,)*2`` int array.
    """

    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6):
        if min(input_size, mask_patch_size, model_patch_size) < 1:
            raise ValueError(f"DATA.IMG_SIZE ({input_size}), DATA.MASK_PATCH_SIZE ({mask_patch_size}) and the "
                             f"model's PATCH_SIZE ({model_patch_size}) must be >= 1")
        if input_size % mask_patch_size:
            raise ValueError(f"DATA.IMG_SIZE ({input_size}) must be a multiple of DATA.MASK_PATCH_SIZE "
                             f"({mask_patch_size})")
        if mask_patch_size % model_patch_size:
            raise ValueError(f"DATA.MASK_PATCH_SIZE ({mask_patch_size}) must be a multiple of the model's "
                             f"PATCH_SIZE ({model_patch_size})")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"DATA.MASK_RATIO must be in [0, 1], got {mask_ratio}")
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size ** 2
        self.mask_count = int(np.ceil(self.token_count * mask_ratio))

    def __call__(self) -> np.ndarray:
        mask_idx = np.random.permutation(self.token_count)[:self.mask_count]
        mask = np.zeros(self.token_count, dtype=int)
        mask[mask_idx] = 1
        mask = mask.reshape((self.rand_size, self.rand_size))
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)  # (S / p, S / p)


def model_patch_size(config: Any) -> int:
    """The patch size of ``MODEL.TYPE``'s backbone (the official code reads MODEL.SWIN's for both types)."""
    if config.MODEL.TYPE == 'swin':
        return int(config.MODEL.SWIN.PATCH_SIZE)
    if config.MODEL.TYPE == 'swinv2':
        return int(config.MODEL.SWINV2.PATCH_SIZE)
    raise ValueError(f"SimMIM supports MODEL.TYPE 'swin' and 'swinv2', not {config.MODEL.TYPE!r}")


class SimMIMTransform:
    """PIL image -> (normalised tensor ``(3, S, S)``, patch mask ``(S/p, S/p)``), as the official transform:
    RandomResizedCrop(S, scale (0.67, 1), ratio (3/4, 4/3)), horizontal flip, ImageNet mean/std.

    The official one first converts to RGB; our datasets already decode every image to RGB.
    """

    def __init__(self, config: Any):
        size = int(config.DATA.IMG_SIZE)
        self.transform_img = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
        ])
        self.mask_generator = MaskGenerator(input_size=size, mask_patch_size=int(config.DATA.MASK_PATCH_SIZE),
                                            model_patch_size=model_patch_size(config),
                                            mask_ratio=float(config.DATA.MASK_RATIO))

    def __call__(self, img: Image.Image) -> Tuple[torch.Tensor, np.ndarray]:
        return self.transform_img(img), self.mask_generator()


def collate_fn(batch: Sequence[Tuple[Tuple[torch.Tensor, np.ndarray], int]]) -> List[torch.Tensor]:
    """``((image, mask), target)`` samples -> ``[images, masks, targets]``, the official batch layout."""
    images = default_collate([sample[0][0] for sample in batch])  # (B, 3, S, S)
    masks = default_collate([sample[0][1] for sample in batch])  # (B, S / p, S / p) int64
    targets = default_collate([sample[1] for sample in batch])  # (B,)
    return [images, masks, targets]


def build_dataset_simmim(config: Any) -> Dataset:
    """The pre-training images: the class folder ``DATA.DATA_PATH``, or with ``DATA.ZIP_MODE`` the archive
    ``<DATA_PATH>/<TRAIN_SPLIT>.zip`` and its map file (cached per ``DATA.CACHE_MODE``). Labels are kept but
    unused. ``DATA.DATASET`` ``hf`` / ``wds``: the ``DATA.TRAIN_SPLIT`` split of that source (data/hf.py,
    data/wds.py)."""
    transform = SimMIMTransform(config)
    on_broken = 'error' if config.DATA.STRICT_IMAGES else 'substitute'
    root = config.DATA.DATA_PATH
    if not root:
        raise DatasetLayoutError("DATA.DATA_PATH is empty: pass --data-path (the folder of class folders, e.g. "
                                 "<imagenet>/train)")
    if config.DATA.DATASET == 'hf':
        return HFImageDataset(root, split_name(True, config), transform, on_broken,
                              image_column=config.DATA.HF_IMAGE_COLUMN, label_column=config.DATA.HF_LABEL_COLUMN)
    if config.DATA.DATASET == 'wds':
        rank, world = dist_info()
        return WdsDataset(root, split_name(True, config), True, config.MODEL.NUM_CLASSES, rank, world,
                          config.DATA.BATCH_SIZE, wds_streams(config), config.SEED, config.DATA.WDS_SHUFFLE,
                          transform, on_broken)
    if config.DATA.ZIP_MODE:
        split = split_name(True, config)
        dataset = ZipImageDataset(os.path.join(root, f'{split}.zip'), os.path.join(root, f'{split}_map.txt'),
                                  transform, on_broken)
        cache = zip_cache_indices(True, len(dataset), config)
        if cache is not None:
            dataset.fill_cache(cache)
        return dataset
    return ImageFolderDataset(root, transform, on_broken)


def build_loader_simmim(config: Any) -> DataLoader:
    """The SimMIM pre-training loader (official name): shuffled, sharded over ranks, ``drop_last``.

    Its sampler has ``set_epoch`` (call it every epoch) and yields ``SampleKey``s like the classification
    training sampler.
    """
    if config.DATA.LOADER not in ('torch', 'auto'):  # auto: torch here (data.build.choose_loaders)
        raise ConfigError(f"DATA.LOADER {config.DATA.LOADER!r} is for classification; SimMIM pre-training has its "
                          f"own transform (mask generator) and needs DATA.LOADER torch (or auto)")
    logger.info(choose_loaders(config, pretrain=True).describe())
    rank, world = dist_info()
    dataset = build_dataset_simmim(config)
    sampler = train_sampler(dataset, config, rank, world)
    if len(sampler) < config.DATA.BATCH_SIZE:
        raise DatasetLayoutError(
            f"{dataset.description}: {len(sampler)} images per rank, fewer than DATA.BATCH_SIZE = "
            f"{config.DATA.BATCH_SIZE}, so no full batch can be formed; lower DATA.BATCH_SIZE or add images")
    return DataLoader(dataset, sampler=sampler, drop_last=True, collate_fn=collate_fn, **loader_kwargs(config))


__all__ = ['CROP_RATIO', 'CROP_SCALE', 'MaskGenerator', 'SimMIMTransform', 'build_dataset_simmim',
           'build_loader_simmim', 'collate_fn', 'model_patch_size']
