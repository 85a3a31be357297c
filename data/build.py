"""``build_loader``, ``build_dataset`` and ``build_transform``: the official entry points, made exact and checked."""
from __future__ import annotations

import logging
import os
import signal
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from .datasets import (IMAGENET22K_CLASSES, DatasetLayoutError, ImageDataset, ImageFolderDataset,
                       ImageNet22KDataset, SkipNoneCollate, ZipImageDataset)
from .samplers import (DistributedEvalSampler, DistributedTrainSampler, RepeatAugSampler, ShardShuffleSampler,
                       dist_info, eval_shard_indices, part_cache_shard)

logger = logging.getLogger(__name__)

IMAGENET22K_MAPS = {True: 'ILSVRC2011fall_whole_map_train.txt', False: 'ILSVRC2011fall_whole_map_val.txt'}

# Eval resize interpolation per DATA.INTERPOLATION. 'random' is a training-time choice; for a deterministic
# eval the official code falls back to bilinear, and so do we.
_EVAL_INTERPOLATION = {
    'bicubic': InterpolationMode.BICUBIC,
    'bilinear': InterpolationMode.BILINEAR,
    'nearest': InterpolationMode.NEAREST,
    'random': InterpolationMode.BILINEAR,
}


# ----------------------------------------------------------------------------- transforms

def _posterize_allowing_zero_bits(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, with 0 bits kept giving a black image as Pillow < 13 did.

    RandAugment's 'PosterizeIncreasing' reaches 0 bits at magnitude 10 (m9 with mstd 0.5 gets there), and
    Pillow 13 rejects bits outside 1..8, which would crash a training run at random.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_auto_augment.posterize(img, bits_to_keep, **kwargs)


def _fix_posterize(transform: Any) -> None:
    """Swap timm's posterize for the zero-bit-safe one inside RandAugment / AutoAugment / AugMix ops."""
    for t in getattr(transform, 'transforms', []):
        ops = list(getattr(t, 'ops', []))
        for sub_policy in getattr(t, 'policy', []):  # AutoAugment: a list of op lists
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, 'aug_fn', None) is timm_auto_augment.posterize:
                op.aug_fn = _posterize_allowing_zero_bits


def train_transform_kwargs(config: Any) -> Dict[str, Any]:
    """timm ``create_transform`` arguments of the training augmentation (shared by every ``DATA.LOADER``)."""
    return dict(
        input_size=config.DATA.IMG_SIZE,
        is_training=True,
        scale=tuple(config.AUG.RRC_SCALE),
        hflip=config.AUG.HFLIP,
        color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
        auto_augment=config.AUG.AUTO_AUGMENT if config.AUG.AUTO_AUGMENT not in ('', 'none', None) else None,
        re_prob=config.AUG.REPROB,
        re_mode=config.AUG.REMODE,
        re_count=config.AUG.RECOUNT,
        interpolation=config.DATA.INTERPOLATION,
    )


def build_transform(is_train: bool, config: Any) -> Callable:
    """The training augmentation (timm) or the deterministic eval transform for ``config``.

    Train: RandomResizedCrop + flip + RandAugment + random erasing through timm's ``create_transform``; for
    ``DATA.IMG_SIZE <= 32`` the crop is a padded RandomCrop (CIFAR style) as in the official code.
    Eval: with ``TEST.CROP`` resize the short side to int(256 / 224 * size) and center-crop, else resize
    straight to (size, size); then ImageNet mean/std normalisation.
    """
    size = config.DATA.IMG_SIZE
    if is_train:
        transform = create_transform(**train_transform_kwargs(config))
        if size <= 32:
            # Small images: a padded random crop instead of a random-resized crop. pad_if_needed keeps the
            # output size fixed for images smaller than the crop.
            transform.transforms[0] = transforms.RandomCrop(size, padding=4, pad_if_needed=True)
        _fix_posterize(transform)
        return transform

    interpolation = _EVAL_INTERPOLATION[config.DATA.INTERPOLATION]
    if config.TEST.CROP:
        resize = [transforms.Resize(int((256 / 224) * size), interpolation=interpolation),
                  transforms.CenterCrop(size)]
    else:
        resize = [transforms.Resize((size, size), interpolation=interpolation)]
    return transforms.Compose(resize + [transforms.ToTensor(),
                                        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def loader_transform(is_train: bool, config: Any) -> Callable:
    """The per-sample transform of ``DATA.LOADER``: ``build_transform`` for 'torch'; for 'fast' and 'gpu' the
    encoded-bytes transforms of ``data.fast`` / ``data.gpu`` (their batches finish on the device)."""
    kind = config.DATA.LOADER
    if kind == 'torch':
        return build_transform(is_train, config)
    if kind == 'fast':
        from .fast import FastEvalTransform, FastTrainTransform
        return FastTrainTransform(config) if is_train else FastEvalTransform(config)
    if kind == 'gpu':
        from .gpu import GpuEvalTransform, GpuTrainTransform
        return GpuTrainTransform(config) if is_train else GpuEvalTransform(config)
    raise ValueError(f"DATA.LOADER = {kind!r} is not one of ['torch', 'fast', 'gpu']")


def loader_collate(is_train: bool, config: Any) -> Optional[Callable]:
    """The DataLoader ``collate_fn`` of ``DATA.LOADER`` (None: torch's default, for 'torch' training)."""
    kind = config.DATA.LOADER
    if kind == 'fast':
        from .fast import fast_collate
        return fast_collate(is_train, config)
    if kind == 'gpu':
        from .gpu import gpu_collate
        return gpu_collate(is_train, config)
    return None if is_train else SkipNoneCollate(config.DATA.IMG_SIZE)


# ----------------------------------------------------------------------------- datasets

def _check_num_classes(found: int, config: Any, where: str) -> None:
    wanted = config.MODEL.NUM_CLASSES
    if found > wanted:
        raise DatasetLayoutError(
            f"{where} has {found} classes but MODEL.NUM_CLASSES is {wanted}: the model's head would be too "
            f"small. Set it with --opts MODEL.NUM_CLASSES {found}")
    if found < wanted:
        logger.warning("%s has %d classes, fewer than MODEL.NUM_CLASSES = %d; the extra outputs stay unused",
                       where, found, wanted)


def _check_labels(dataset: ImageDataset, limit: Optional[int] = None) -> None:
    """Labels must be >= 0 and, with ``limit``, < limit."""
    low, high = min(dataset.targets), max(dataset.targets)
    limit = high + 1 if limit is None else limit
    if low < 0 or high >= limit:
        bad = next(p for p, label in dataset.samples if label < 0 or label >= limit)
        raise DatasetLayoutError(f"{dataset.description}: label out of range [0, {limit}) for {bad!r} "
                                 f"(labels span {low}..{high})")


def _split_name(is_train: bool, config: Any) -> str:
    return config.DATA.TRAIN_SPLIT if is_train else config.DATA.VAL_SPLIT


def _zip_cache_indices(is_train: bool, num_samples: int, config: Any) -> Optional[range | list]:
    mode = config.DATA.CACHE_MODE
    if mode == 'no':
        return None
    if mode == 'full':
        return range(num_samples)
    rank, world = dist_info()
    if is_train:
        return part_cache_shard(num_samples, world, rank)
    # Validation: exactly the images this rank's eval sampler will read.
    return eval_shard_indices(num_samples, world, rank, contiguous=config.TEST.SEQUENTIAL,
                              shuffle=config.TEST.SHUFFLE, seed=config.SEED)


def build_dataset(is_train: bool, config: Any, class_to_idx: Optional[Dict[str, int]] = None
                  ) -> Tuple[Dataset, int]:
    """The training or validation dataset for ``config`` and its class count (``MODEL.NUM_CLASSES`` unchanged).

    ``class_to_idx``: for a validation class folder, the training split's mapping, so labels agree.
    Raises ``DatasetLayoutError`` for a missing split/map/archive, an empty class folder, a label out of range
    or more classes than ``MODEL.NUM_CLASSES``.
    """
    transform = loader_transform(is_train, config)
    on_broken = 'error' if config.DATA.STRICT_IMAGES else ('substitute' if is_train else 'drop')
    root = config.DATA.DATA_PATH
    kind = config.DATA.DATASET
    if kind in ('imagenet', 'folder'):
        split = _split_name(is_train, config)
        if config.DATA.ZIP_MODE:
            dataset = ZipImageDataset(os.path.join(root, f'{split}.zip'), os.path.join(root, f'{split}_map.txt'),
                                      transform, on_broken)
            _check_labels(dataset)  # the class count check below bounds them from above
            cache = _zip_cache_indices(is_train, len(dataset), config)
            if cache is not None:
                dataset.fill_cache(cache)
        else:
            dataset = ImageFolderDataset(os.path.join(root, split), transform, on_broken, class_to_idx)
        num_classes = dataset.num_classes
    elif kind == 'imagenet22K':
        if config.DATA.ZIP_MODE:
            raise DatasetLayoutError("DATA.ZIP_MODE is not supported for DATA.DATASET 'imagenet22K' (it reads "
                                     "the official JSON map files); turn one of them off")
        dataset = ImageNet22KDataset(root, IMAGENET22K_MAPS[is_train], transform, on_broken)
        _check_labels(dataset, IMAGENET22K_CLASSES)
        num_classes = IMAGENET22K_CLASSES
    else:
        raise DatasetLayoutError(f"DATA.DATASET = {kind!r} is not one of ['imagenet', 'imagenet22K', 'folder']")
    _check_num_classes(num_classes, config, dataset.description)
    return dataset, num_classes


# ----------------------------------------------------------------------------- loaders

def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. under taskset/cgroups)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _local_processes() -> int:
    """Training processes on this node: torchrun's LOCAL_WORLD_SIZE, 1 when not launched by torchrun."""
    value = os.environ.get('LOCAL_WORLD_SIZE', '1')
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE={value!r} in the environment is not a positive integer "
                         f"(torchrun sets it to the processes per node)")
    return n


def worker_count(requested: int) -> int:
    """``DATA.NUM_WORKERS`` capped at the cores per local process (at least 1 when workers were asked for).

    More worker processes than cores only add switching and memory (and PyTorch warns about it); the cap is
    logged once per loader build.
    """
    if requested <= 0:
        return 0
    cores, local = available_cpus(), _local_processes()
    per_process = max(1, cores // local)
    if requested > per_process:
        logger.info("DATA.NUM_WORKERS %d capped to %d: %d CPU cores available for %d local process%s",
                    requested, per_process, cores, local, 'es' if local > 1 else '')
        return per_process
    return requested


def _loader_kwargs(config: Any) -> Dict[str, Any]:
    workers = worker_count(config.DATA.NUM_WORKERS)
    kwargs: Dict[str, Any] = dict(
        batch_size=config.DATA.BATCH_SIZE,
        num_workers=workers,
        # Pinning only helps (and only works without a warning) when an accelerator is there to copy to.
        pin_memory=bool(config.DATA.PIN_MEMORY) and config.DEVICE != 'cpu' and torch.cuda.is_available(),
        # Starting an iterator draws the workers' base seed (even with 0 workers) from the loader's generator,
        # else from the global torch RNG, which the training loop and checkpoints own. A resumed run starts its
        # loaders at another point of that stream (persistent workers draw once, in the first epoch iterated),
        # so drawing it there shifted the restored stream. Augmentation does not use worker seeds (SampleKey).
        generator=torch.Generator().manual_seed(config.SEED),
    )
    if workers > 0:
        kwargs['persistent_workers'] = bool(config.DATA.PERSISTENT_WORKERS)
        kwargs['prefetch_factor'] = config.DATA.PREFETCH_FACTOR
        kwargs['worker_init_fn'] = ignore_ctrl_c
    return kwargs


def ignore_ctrl_c(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT. A terminal's Ctrl-C reaches the whole process group; a worker that died
    of it would break the batch the main process is finishing before it saves (utils.preemption)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _train_sampler(dataset: Dataset, config: Any, rank: int, world: int) -> Sampler:
    n = len(dataset)
    if config.DATA.REPEATED_AUG > 1:
        return RepeatAugSampler(n, world, rank, repeats=config.DATA.REPEATED_AUG, seed=config.SEED)
    if config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == 'part' and world > 1:
        # Each rank cached only its share: sample from it (as the official code), equal lengths across ranks.
        return ShardShuffleSampler(part_cache_shard(n, world, rank), length=n // world, seed=config.SEED)
    return DistributedTrainSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.SEED)


def build_mixup(config: Any) -> Optional[Mixup]:
    """timm's Mixup/CutMix from AUG.*, or None when both are off."""
    aug = config.AUG
    if not (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None):
        return None
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)


def build_loader(config: Any) -> Tuple[Optional[Dataset], Dataset, Optional[DataLoader], DataLoader,
                                       Optional[Mixup]]:
    """(dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn) for ``config``.

    In ``EVAL_MODE`` the training split is not read and the train dataset and loader are None. The training
    loader's sampler (``data_loader_train.sampler``) has ``set_epoch``; the engine calls it every epoch. It
    yields ``SampleKey``s (ints that carry seed and epoch), so each sample's augmentation is a function of
    (SEED, epoch, index) alone; a loader over a slice of ``list(sampler)`` (a mid-epoch resume) reproduces the
    rest of the epoch exactly, with any number of workers. ``DATA.NUM_WORKERS`` is capped at the cores per
    local process. ``DATA.LOADER`` picks the per-sample transform and collate (``loader_transform``,
    ``loader_collate``): with 'fast' / 'gpu' the batches are ``data.fast.DeviceBatch``es, finished on the device by
    ``data.batch_to_device``; the samplers are the same for every loader.
    Validation is sharded exactly: sum correct counts over ranks and divide by ``len(dataset_val)`` minus the
    broken images (``data.pop_broken_count``).
    """
    rank, world = dist_info()
    dataset_train = loader_train = None
    class_to_idx = None
    if not config.EVAL_MODE:
        dataset_train, _ = build_dataset(True, config)
        class_to_idx = getattr(dataset_train, 'class_to_idx', None)
        logger.info("rank %d: train dataset %r", rank, dataset_train)
    dataset_val, _ = build_dataset(False, config, class_to_idx=class_to_idx)
    logger.info("rank %d: val dataset %r", rank, dataset_val)

    kwargs = _loader_kwargs(config)
    if dataset_train is not None:
        sampler_train = _train_sampler(dataset_train, config, rank, world)
        if len(sampler_train) < config.DATA.BATCH_SIZE:
            raise DatasetLayoutError(
                f"{dataset_train.description}: {len(sampler_train)} training images per rank, fewer than "
                f"DATA.BATCH_SIZE = {config.DATA.BATCH_SIZE}, so no full batch can be formed; lower "
                f"DATA.BATCH_SIZE or add images")
        loader_train = DataLoader(dataset_train, sampler=sampler_train, drop_last=True,
                                  collate_fn=loader_collate(True, config), **kwargs)

    sampler_val = DistributedEvalSampler(len(dataset_val), world, rank, contiguous=config.TEST.SEQUENTIAL,
                                         shuffle=config.TEST.SHUFFLE, seed=config.SEED)
    loader_val = DataLoader(dataset_val, sampler=sampler_val, drop_last=False,
                            collate_fn=loader_collate(False, config), **kwargs)
    return dataset_train, dataset_val, loader_train, loader_val, build_mixup(config)
