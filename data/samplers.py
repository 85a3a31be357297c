"""Samplers: exact distributed evaluation, repeated augmentation, and a shuffled fixed shard for part caching.

All take ``num_replicas`` and ``rank`` explicitly (tests simulate ranks that way); ``utils.distributed.dist_info()``
gives the real ones, world size 1 when torch.distributed is not initialised.

The training samplers (``DistributedTrainSampler``, ``RepeatAugSampler``, ``ShardShuffleSampler``) yield
``SampleKey``s: ints equal to the dataset index that also carry (seed, epoch, draw), from which the dataset
seeds the sample's augmentation. Their order and their keys are a pure function of (seed, epoch, rank, world).
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence

import torch
from torch.utils.data import DistributedSampler, Sampler

from utils.distributed import dist_info

from .datasets import DatasetLayoutError
from .seeding import key_maker


def _check_rank(num_replicas: int, rank: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")


def eval_shard_indices(num_samples: int, num_replicas: int, rank: int, contiguous: bool = False,
                       shuffle: bool = False, seed: int = 0) -> List[int]:
    """The indices rank ``rank`` evaluates: every index goes to exactly one rank, none padded or repeated.

    ``shuffle`` permutes the order once (fixed by ``seed``) before sharding; ``contiguous`` gives each rank a
    block (sizes differ by at most one) instead of every ``num_replicas``-th index.
    """
    _check_rank(num_replicas, rank)
    if num_replicas > num_samples:
        raise DatasetLayoutError(f"{num_replicas} ranks but only {num_samples} validation images: every rank "
                                 f"needs at least one; use fewer processes or a larger validation split")
    if shuffle:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_samples, generator=g).tolist()
    else:
        order = list(range(num_samples))
    if not contiguous:
        return order[rank::num_replicas]
    base, extra = divmod(num_samples, num_replicas)
    start = rank * base + min(rank, extra)
    return order[start:start + base + (1 if rank < extra else 0)]


class DistributedEvalSampler(Sampler[int]):
    """Exact validation sharding (see ``eval_shard_indices``); ranks may get lengths differing by one."""

    def __init__(self, num_samples: int, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 contiguous: bool = False, shuffle: bool = False, seed: int = 0) -> None:
        real_rank, real_world = dist_info()
        self.num_replicas = real_world if num_replicas is None else num_replicas
        self.rank = real_rank if rank is None else rank
        self.indices = eval_shard_indices(num_samples, self.num_replicas, self.rank, contiguous, shuffle, seed)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Validation order does not change between epochs; accepted so callers can treat samplers alike."""


class DistributedTrainSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (same order, padding and ``set_epoch``) yielding ``SampleKey``s."""

    def __iter__(self) -> Iterator[int]:
        return map(key_maker(self.epoch, self.seed), super().__iter__())


class RepeatAugSampler(Sampler[int]):
    """Repeated augmentation (Hoffer et al.; DeiT): each chosen image appears ``repeats`` times per epoch,
    the copies spread over different ranks, and an epoch keeps the length of a plain one (ceil(N / ranks)
    samples per rank), so it covers about N / repeats distinct images.
    """

    def __init__(self, num_samples: int, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 repeats: int = 3, shuffle: bool = True, seed: int = 0) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        real_rank, real_world = dist_info()
        self.num_replicas = real_world if num_replicas is None else num_replicas
        self.rank = real_rank if rank is None else rank
        _check_rank(self.num_replicas, self.rank)
        self.dataset_len = num_samples
        self.repeats = repeats
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.num_selected = math.ceil(num_samples / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g)
        else:
            order = torch.arange(self.dataset_len)
        # Consecutive copies of an index land on consecutive ranks through the strided split below.
        indices = order.repeat_interleave(self.repeats).tolist()
        per_rank = math.ceil(len(indices) / self.num_replicas)
        indices += indices[:per_rank * self.num_replicas - len(indices)]
        # Copy c of an image sits at a position p with p % repeats == c (the padding repeats the start, and
        # len(indices) before padding is a multiple of repeats): it is the key's draw, so the copies get
        # different augmentations, each the same for any world size.
        positions = range(self.rank, len(indices), self.num_replicas)[:self.num_selected]
        makers = [key_maker(self.epoch, self.seed, draw) for draw in range(self.repeats)]
        return iter([makers[p % self.repeats](indices[p]) for p in positions])

    def __len__(self) -> int:
        return self.num_selected

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class ShardShuffleSampler(Sampler[int]):
    """A fixed shard of indices (this rank's cached share under 'part' caching), reshuffled every epoch.

    Every rank yields the same count (the smallest shard size) so that DDP ranks take the same number of steps.
    """

    def __init__(self, shard: Sequence[int], length: int, seed: int = 0) -> None:
        if length > len(shard):
            raise ValueError(f"length {length} exceeds the shard size {len(shard)}")
        self.shard = list(shard)
        self.length = length
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.shard), generator=g)[:self.length].tolist()
        make = key_maker(self.epoch, self.seed)
        return iter([make(self.shard[i]) for i in order])

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def part_cache_shard(num_samples: int, num_replicas: int, rank: int) -> List[int]:
    """The training indices rank ``rank`` caches and reads under 'part' caching (as the official code)."""
    _check_rank(num_replicas, rank)
    return list(range(rank, num_samples, num_replicas))


# ----------------------------------------------------------------------------- resuming mid-epoch

class _SkipSampler(Sampler):
    """The first epoch after a mid-epoch resume: the epoch's order with the already-trained part removed."""

    def __init__(self, indices: list):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loader_from(loader: torch.utils.data.DataLoader, skip_batches: int,
                seed: int = 0) -> torch.utils.data.DataLoader:
    """``loader`` itself, or one like it that starts ``skip_batches`` batches into the current epoch's order.

    The new loader gets its own generator (seeded with ``seed``): starting an iterator draws a worker base seed
    from the loader's generator, and drawing it from the global RNG would shift the restored RNG stream by one
    draw compared with the uninterrupted run, which drew it at the start of the epoch, before the checkpoint.
    """
    if not skip_batches:
        return loader
    indices = list(loader.sampler)[skip_batches * loader.batch_size:]
    kwargs = dict(batch_size=loader.batch_size, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                  pin_memory=loader.pin_memory, drop_last=loader.drop_last, worker_init_fn=loader.worker_init_fn,
                  generator=torch.Generator().manual_seed(seed))
    if loader.num_workers > 0:
        kwargs['prefetch_factor'] = loader.prefetch_factor
    return torch.utils.data.DataLoader(loader.dataset, sampler=_SkipSampler(indices), **kwargs)
