"""``build_loader`` and ``build_dataset``: the official entry points, made exact and checked.

Layer: over every other module of ``data`` except ``data.simmim`` (which builds on this one); it picks the
sources, samplers and the ``DATA.LOADER`` transform and collate, and holds the loader settings all loaders share
(``loader_kwargs``, ``train_sampler``). ``build_transform`` (``DATA.LOADER torch``) lives in ``data.transforms``.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import signal
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
import timm
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy
from torch.utils.data import DataLoader, Dataset, Sampler

from config import ConfigError, img_size_hw, in_chans_key, is_multi_label, model_in_chans
from utils.distributed import dist_info

from .datasets import (DECODE_ERRORS, IMAGENET22K_CLASSES, ChannelError, DatasetLayoutError, ImageDataset,
                       ImageFolderDataset, ImageNet22KDataset, MultiLabelCsvDataset, SkipNoneCollate,
                       ZipImageDataset, decode_image, image_channels)
from .fast import FastEvalTransform, FastTrainTransform, fast_collate
from .gpu import GpuEvalTransform, GpuTrainTransform, gpu_collate
from .hf import HFImageDataset
from .samplers import (DistributedEvalSampler, DistributedTrainSampler, RepeatAugSampler, ShardShuffleSampler,
                       eval_shard_indices, part_cache_shard)
from .transforms import build_transform
from .wds import WdsDataset, WdsEvalSampler, WdsTrainSampler

logger = logging.getLogger(__name__)

IMAGENET22K_MAPS = {True: 'ILSVRC2011fall_whole_map_train.txt', False: 'ILSVRC2011fall_whole_map_val.txt'}


# ----------------------------------------------------------------------------- DATA.LOADER: transform and collate

LOADERS = ('torch', 'fast', 'gpu')  # the concrete loaders; DATA.LOADER auto picks one per split (choose_loaders)


class LoaderChoice(NamedTuple):
    """The loaders a run uses, one per split ('torch' | 'fast' | 'gpu'), and why (``DATA.LOADER auto``)."""
    train: str
    eval: str
    reason: str = ''

    def describe(self, training: bool = True) -> str:
        """One log line: which loader trains and which evaluates."""
        what = (f"training on DATA.LOADER {self.train!r}, evaluation on {self.eval!r}" if training else
                f"evaluation on DATA.LOADER {self.eval!r}")
        return f"data loaders: {what}" + (f" (auto: {self.reason})" if self.reason else '')


def fast_train_refusal(config: Any) -> Optional[str]:
    """Why ``DATA.LOADER fast`` cannot train ``config`` (a package it needs does not import, or a setting it does
    not implement, e.g. the padded crop of ``DATA.IMG_SIZE`` <= 32), as its own error says; None when it can.
    Building the transform is the test, so the rule cannot drift from what ``FastTrainTransform`` refuses."""
    try:
        FastTrainTransform(config)
    except ConfigError as e:  # LoaderDependencyError (a missing or broken package) is one too
        return str(e)
    return None


def choose_loaders(config: Any, pretrain: bool = False) -> LoaderChoice:
    """The training and evaluation loaders of ``config``: ``DATA.LOADER`` itself for both unless it is 'auto'.

    'auto' trains on 'fast' (the same augmentation draws as 'torch', faster CPU kernels: docs/DATA.md lists
    where its pixels differ) when ``fast_train_refusal`` finds nothing, else on 'torch'; it evaluates on 'torch',
    whose eval transform is the official one pixel for pixel ('fast' resizes with torchvision's uint8 kernel: up
    to 2 levels of 255 apart). SimMIM pre-training (``pretrain``) has its own transform: 'torch'. A pure function
    of the config and the installed packages, so a resumed run makes the same choice (``check_resumed_loader``
    compares it with the one its checkpoint recorded)."""
    kind = config.DATA.LOADER
    if kind in LOADERS:
        return LoaderChoice(kind, kind)
    if kind != 'auto':
        raise ValueError(f"DATA.LOADER = {kind!r} is not one of {['auto', *LOADERS]}")
    evaluation = "evaluation keeps the official eval transform"
    if pretrain:
        return LoaderChoice('torch', 'torch', "SimMIM pre-training has its own transform (mask generator), which "
                                              "only the torch loader runs")
    refusal = fast_train_refusal(config)
    if refusal is not None:
        return LoaderChoice('torch', 'torch', f"the fast loader cannot train this config: {refusal}")
    return LoaderChoice('fast', 'torch', f"the fast loader trains (its packages import and it takes this config); "
                                         f"{evaluation}; DATA.LOADER torch trains on the official pixels")


def check_resumed_loader(config: Any, recorded: Optional[str], path: Optional[str], pretrain: bool = False) -> str:
    """The training loader of this run (``choose_loaders``), checked against ``recorded``, the one that trained
    the run a checkpoint at ``path`` comes from (None: a fresh run, or a checkpoint that does not say).

    The loaders draw the same augmentation parameters but give other pixels, so a run resumed on another loader
    is not an exact continuation. With ``DATA.LOADER auto`` that would happen silently (a package installed or
    missing since, another machine, a checkpoint from before 'auto' was the default): a ``ConfigError`` names
    both loaders and the setting that resumes exactly. An explicit ``DATA.LOADER`` is the user's choice: a
    warning."""
    train = choose_loaders(config, pretrain).train
    if recorded is None or recorded == train:
        return train
    if config.DATA.LOADER == 'auto':
        raise ConfigError(f"resume: {path} was trained on DATA.LOADER {recorded!r}, and DATA.LOADER auto now picks "
                          f"{train!r} ({choose_loaders(config, pretrain).reason}); the same loader keeps the resume "
                          f"exact: --opts DATA.LOADER {recorded}" + (
                              " (if it cannot run here, install what its error names)" if recorded == 'fast' else
                              '') + f", or --opts DATA.LOADER {train} to go on with other pixels")
    logger.warning("resume: %s was trained on DATA.LOADER %r, this run trains on %r (DATA.LOADER): the same "
                   "augmentation draws with other pixels, not an exact continuation", path, recorded, train)
    return train


def loader_transform(is_train: bool, config: Any, kind: Optional[str] = None) -> Callable:
    """The per-sample transform of the split's loader (``kind``, default ``choose_loaders``): ``build_transform``
    for 'torch'; for 'fast' and 'gpu' the encoded-bytes transforms of ``data.fast`` / ``data.gpu`` (their batches
    finish on the device)."""
    kind = kind or _split_loader(is_train, config)
    if kind == 'torch':
        return build_transform(is_train, config)
    if kind == 'fast':
        return FastTrainTransform(config) if is_train else FastEvalTransform(config)
    if kind == 'gpu':
        return GpuTrainTransform(config) if is_train else GpuEvalTransform(config)
    raise ValueError(f"DATA.LOADER = {kind!r} is not one of {list(LOADERS)}")


def loader_collate(is_train: bool, config: Any, kind: Optional[str] = None) -> Optional[Callable]:
    """The DataLoader ``collate_fn`` of the split's loader (``kind``, default ``choose_loaders``; None: torch's
    default, for 'torch' training)."""
    kind = kind or _split_loader(is_train, config)
    if kind == 'fast':
        return fast_collate(is_train, config)
    if kind == 'gpu':
        return gpu_collate(is_train, config)
    return None if is_train else SkipNoneCollate(img_size_hw(config), model_in_chans(config))


def _split_loader(is_train: bool, config: Any) -> str:
    if config.DATA.LOADER in LOADERS:  # explicit: no probing
        return config.DATA.LOADER
    choice = choose_loaders(config)
    return choice.train if is_train else choice.eval


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


def split_name(is_train: bool, config: Any) -> str:
    """``DATA.TRAIN_SPLIT`` or ``DATA.VAL_SPLIT``: the folder or archive name of the split."""
    return config.DATA.TRAIN_SPLIT if is_train else config.DATA.VAL_SPLIT


def zip_cache_indices(is_train: bool, num_samples: int, config: Any) -> Optional[range | list]:
    """The samples of a zip split this rank caches in memory per ``DATA.CACHE_MODE`` (None: no cache)."""
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


def build_dataset(is_train: bool, config: Any, class_to_idx: Optional[Dict[str, int]] = None,
                  loader: Optional[str] = None) -> Tuple[Dataset, int]:
    """The training or validation dataset for ``config`` and its class count (``MODEL.NUM_CLASSES`` unchanged).

    ``class_to_idx``: for a validation class folder, the training split's mapping, so labels agree. ``loader``:
    the split's loader ('torch' | 'fast' | 'gpu'; default: ``choose_loaders``), whose transform the samples get.
    Raises ``DatasetLayoutError`` for a missing split/map/archive, an empty class folder, a label out of range
    or more classes than ``MODEL.NUM_CLASSES``.
    """
    transform = loader_transform(is_train, config, loader)
    on_broken = 'error' if config.DATA.STRICT_IMAGES else ('substitute' if is_train else 'drop')
    root = config.DATA.DATA_PATH
    kind = config.DATA.DATASET
    if is_multi_label(config):  # validate_config allows it for the folder sources only, without ZIP_MODE
        num_classes = config.MODEL.NUM_CLASSES
        dataset = MultiLabelCsvDataset(root, f'{split_name(is_train, config)}.csv', num_classes, transform, on_broken)
    elif kind in ('imagenet', 'folder'):
        split = split_name(is_train, config)
        if config.DATA.ZIP_MODE:
            dataset = ZipImageDataset(os.path.join(root, f'{split}.zip'), os.path.join(root, f'{split}_map.txt'),
                                      transform, on_broken)
            _check_labels(dataset)  # the class count check below bounds them from above
            cache = zip_cache_indices(is_train, len(dataset), config)
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
    elif kind == 'hf':
        dataset = HFImageDataset(root, split_name(is_train, config), transform, on_broken,
                                 image_column=config.DATA.HF_IMAGE_COLUMN, label_column=config.DATA.HF_LABEL_COLUMN)
        _check_labels(dataset)
        num_classes = dataset.num_classes
    elif kind == 'wds':
        # The labels are read with the samples: one outside [0, MODEL.NUM_CLASSES) makes that sample damaged.
        rank, world = dist_info()
        dataset = WdsDataset(root, split_name(is_train, config), is_train, config.MODEL.NUM_CLASSES, rank, world,
                             config.DATA.BATCH_SIZE, wds_streams(config), config.SEED, config.DATA.WDS_SHUFFLE,
                             transform, on_broken)
        num_classes = config.MODEL.NUM_CLASSES
    else:
        raise DatasetLayoutError(f"DATA.DATASET = {kind!r} is not one of ['imagenet', 'imagenet22K', 'folder', "
                                 f"'hf', 'wds']")
    if isinstance(dataset, ImageDataset):
        dataset.channels = model_in_chans(config)
        check_channels(dataset, config)
    _check_num_classes(num_classes, config, dataset.description)
    return dataset, num_classes


def check_channels(dataset: ImageDataset, config: Any) -> None:
    """The first readable image of ``dataset`` decodes to the model's channel count; else a ``DatasetLayoutError``
    naming the file and ``MODEL.*.IN_CHANS``, before any training (images of other files that cannot give the
    count are broken samples later, skipped and counted with a warning that names them)."""
    key, channels = in_chans_key(config), model_in_chans(config)
    for index in range(min(len(dataset), 8)):  # the first readable one of the first few
        try:
            img = decode_image(dataset.read(index), channels)
        except ChannelError as e:
            raise DatasetLayoutError(f"{key} is {channels} but {dataset.name_of(index)} cannot give "
                                     f"{channels} channels: {e}") from None
        except DECODE_ERRORS:
            continue
        if image_channels(img) != channels:  # decode_image's conversions make this impossible; kept as a guard
            raise DatasetLayoutError(f"{key} is {channels} but {dataset.name_of(index)} decodes to "
                                     f"{image_channels(img)} channels")
        return


def check_data_paths(config: Any, pretrain: bool = False) -> None:
    """The files and folders the datasets will read exist: a cheap check (no scanning) that ``main.py`` runs
    before the process group and the output folder are touched, so that a wrong ``--data-path`` is one line and
    leaves nothing behind. Raises ``DatasetLayoutError`` naming the missing path; the full checks (classes,
    labels, archive members) stay in ``build_dataset``."""
    root = config.DATA.DATA_PATH
    if not root:
        raise DatasetLayoutError("DATA.DATA_PATH is empty: pass --data-path (the dataset folder)")
    if config.DATA.DATASET in ('wds', 'hf'):  # a URL, a pipe: command or a dataset name: their readers check
        return
    if not os.path.isdir(root):
        raise DatasetLayoutError(f"DATA.DATA_PATH (--data-path) {root!r} is not a folder")
    if pretrain:  # SimMIM: DATA_PATH holds the class folders, or <TRAIN_SPLIT>.zip with its map
        wanted = [f'{config.DATA.TRAIN_SPLIT}.zip', f'{config.DATA.TRAIN_SPLIT}_map.txt'] if config.DATA.ZIP_MODE \
            else []
    elif config.DATA.DATASET == 'imagenet22K':
        wanted = [IMAGENET22K_MAPS[True], IMAGENET22K_MAPS[False]] if not config.EVAL_MODE else \
            [IMAGENET22K_MAPS[False]]
    elif is_multi_label(config):
        splits = ([] if config.EVAL_MODE else [config.DATA.TRAIN_SPLIT]) + [config.DATA.VAL_SPLIT]
        wanted = [f'{split}.csv' for split in splits]
    elif config.DATA.DATASET in ('imagenet', 'folder'):
        splits = ([] if config.EVAL_MODE else [config.DATA.TRAIN_SPLIT]) + [config.DATA.VAL_SPLIT]
        wanted = [name for split in splits for name in ((f'{split}.zip', f'{split}_map.txt') if config.DATA.ZIP_MODE
                                                         else (split,))]
    else:
        return  # build_dataset names the unknown DATA.DATASET
    missing = [name for name in wanted if not os.path.exists(os.path.join(root, name))]
    if missing:
        layout = '<split>.zip and <split>_map.txt' if config.DATA.ZIP_MODE else \
            '<split>.csv (DATA.LABELS csv)' if is_multi_label(config) else '<split>/<class>/<image>'
        raise DatasetLayoutError(f"DATA.DATA_PATH (--data-path) {root!r} lacks {', '.join(missing)} (expected "
                                 f"{layout}; check DATA.DATA_PATH, DATA.TRAIN_SPLIT / DATA.VAL_SPLIT)")


def wds_streams(config: Any) -> int:
    """Streams per rank of ``DATA.DATASET wds``: the requested ``DATA.NUM_WORKERS`` (at least 1), not the capped
    count, so that the epoch's order depends on the config alone (a worker can serve any stream; fewer workers
    than streams only re-read some shards)."""
    streams = max(1, config.DATA.NUM_WORKERS)
    workers = worker_count(config.DATA.NUM_WORKERS)
    if workers and streams % workers:
        logger.warning("DATA.DATASET wds: %d data workers for %d streams per rank (DATA.NUM_WORKERS): workers "
                       "re-read shards of each other's streams; run with DATA.NUM_WORKERS <= the cores per "
                       "process to avoid it", workers, streams)
    return streams


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


def loader_kwargs(config: Any) -> Dict[str, Any]:
    """The ``DataLoader`` settings every loader shares: batch size, capped workers, pinning, the seeded generator."""
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


def train_sampler(dataset: Dataset, config: Any, rank: int, world: int) -> Sampler:
    """The training sampler for ``config`` (repeated augmentation, a part-cache shard, or torch's order) on
    rank ``rank`` of ``world``; it yields ``SampleKey``s."""
    if isinstance(dataset, WdsDataset):
        return WdsTrainSampler(dataset)
    n = len(dataset)
    if config.DATA.REPEATED_AUG > 1:
        return RepeatAugSampler(n, world, rank, repeats=config.DATA.REPEATED_AUG, seed=config.SEED)
    if config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == 'part' and world > 1:
        # Each rank cached only its share: sample from it (as the official code), equal lengths across ranks.
        return ShardShuffleSampler(part_cache_shard(n, world, rank), length=n // world, seed=config.SEED)
    return DistributedTrainSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.SEED)


def check_timm_multi_label() -> None:
    """``DATA.LABELS csv`` trains with timm's multi-label pieces: ``Mixup(multi_label=True)``,
    ``BinaryCrossEntropy(smooth_dense=True)`` and ``timm.task.MultiLabelClassificationEvaluator`` (the engine's
    mAP / F1); an older timm lacks them: a ConfigError (one line, exit 2) saying so."""
    found = ('multi_label' in inspect.signature(Mixup).parameters
             and 'smooth_dense' in inspect.signature(BinaryCrossEntropy).parameters
             and importlib.util.find_spec('timm.task') is not None)
    if not found:
        raise ConfigError(f"DATA.LABELS csv (multi-label) needs timm's multi-label Mixup, BCE and evaluator, which "
                          f"timm {timm.__version__} lacks (timm 1.0.31 has them): pip install -U timm")


def build_mixup(config: Any) -> Optional[Mixup]:
    """timm's Mixup/CutMix from AUG.*, or None when both are off. Multi-label (``DATA.LABELS csv``): timm's
    ``multi_label`` mode, which mixes the (B, C) multi-hot targets as they are (each label smoothed towards 0.5 by
    ``MODEL.LABEL_SMOOTHING``) instead of one-hot encoding class ids."""
    aug = config.AUG
    if not (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None):
        return None
    multi = {'multi_label': True} if is_multi_label(config) else {}  # the official call otherwise
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES, **multi)


def build_loader(config: Any) -> Tuple[Optional[Dataset], Dataset, Optional[DataLoader], DataLoader,
                                       Optional[Mixup]]:
    """(dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn) for ``config``.

    In ``EVAL_MODE`` the training split is not read and the train dataset and loader are None. The training
    loader's sampler (``data_loader_train.sampler``) has ``set_epoch``; the engine calls it every epoch. It
    yields ``SampleKey``s (ints that carry seed and epoch), so each sample's augmentation is a function of
    (SEED, epoch, index) alone; a loader over a slice of ``list(sampler)`` (a mid-epoch resume) reproduces the
    rest of the epoch exactly, with any number of workers. ``DATA.NUM_WORKERS`` is capped at the cores per
    local process. ``DATA.LOADER`` picks the per-sample transform and collate (``loader_transform``,
    ``loader_collate``; 'auto', the default: ``choose_loaders``, logged once): with 'fast' / 'gpu' the batches
    are ``data.device_batch.DeviceBatch``es, finished on the device by ``data.batch_to_device``; the samplers are
    the same for every loader.
    Validation is sharded exactly: sum correct counts over ranks and divide by ``len(dataset_val)`` minus the
    broken images (``data.pop_broken_count``).
    """
    rank, world = dist_info()
    if is_multi_label(config):
        check_timm_multi_label()
    choice = choose_loaders(config)
    logger.info(choice.describe(training=not config.EVAL_MODE))
    dataset_train = loader_train = None
    class_to_idx = None
    if not config.EVAL_MODE:
        dataset_train, _ = build_dataset(True, config, loader=choice.train)
        class_to_idx = getattr(dataset_train, 'class_to_idx', None)
        logger.info("rank %d: train dataset %r", rank, dataset_train)
    dataset_val, _ = build_dataset(False, config, class_to_idx=class_to_idx, loader=choice.eval)
    logger.info("rank %d: val dataset %r", rank, dataset_val)

    kwargs = loader_kwargs(config)
    if dataset_train is not None:
        sampler_train = train_sampler(dataset_train, config, rank, world)
        if len(sampler_train) < config.DATA.BATCH_SIZE:
            raise DatasetLayoutError(
                f"{dataset_train.description}: {len(sampler_train)} training images per rank, fewer than "
                f"DATA.BATCH_SIZE = {config.DATA.BATCH_SIZE}, so no full batch can be formed; lower "
                f"DATA.BATCH_SIZE or add images")
        loader_train = DataLoader(dataset_train, sampler=sampler_train, drop_last=True,
                                  collate_fn=loader_collate(True, config, choice.train), **kwargs)

    if isinstance(dataset_val, WdsDataset):  # contiguous blocks: each rank reads its own shards
        sampler_val = WdsEvalSampler(dataset_val)
    else:
        sampler_val = DistributedEvalSampler(len(dataset_val), world, rank, contiguous=config.TEST.SEQUENTIAL,
                                             shuffle=config.TEST.SHUFFLE, seed=config.SEED)
    loader_val = DataLoader(dataset_val, sampler=sampler_val, drop_last=False,
                            collate_fn=loader_collate(False, config, choice.eval), **kwargs)
    return dataset_train, dataset_val, loader_train, loader_val, build_mixup(config)
