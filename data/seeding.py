"""Per-sample random state: ``SampleKey`` (a dataset index that names its augmentation) and ``seeded_rngs``.

Training samplers yield ``SampleKey``s: an int (the dataset index) that also carries (seed, epoch, draw). For
such a key the random transform runs under generators seeded from those four numbers alone (``seeded_rngs``), so
a sample's augmentation does not depend on which worker process drew it, how many workers there are, whether
they persist across epochs, or what they did before: a resumed run and a run on another world size augment each
image exactly as an uninterrupted one. A plain int index keeps the process's own random state (evaluation).

The bottom layer of ``data``: it imports nothing of the project.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import random
import struct
from typing import Any, Callable, Iterator, Tuple

import numpy as np
import torch

_UINT64 = (1 << 64) - 1


class SampleKey(int):
    """A dataset index that also names its augmentation: ``(seed, epoch, draw)``.

    It is an ``int`` equal to the index, so everything that handles indices (slicing ``list(sampler)``,
    ``dataset.samples[key]``, sets of indices) keeps working. ``draw`` tells apart copies of one image within an
    epoch (repeated augmentation); it is 0 otherwise. Keys pickle to DataLoader workers with their fields.

    The fields are class attributes of a slot-less subclass made once per (epoch, seed, draw): an int subclass
    cannot have slots, and a per-instance ``__dict__`` would make a key ~250 bytes instead of ~56 (ImageNet's
    1.28M keys of an epoch, which a mid-epoch resume lists, would take 320 MB instead of 72 MB).
    """

    __slots__ = ()
    epoch: int
    seed: int
    draw: int

    def __new__(cls, index: int, epoch: int, seed: int, draw: int = 0) -> 'SampleKey':
        if index < 0 or epoch < 0 or draw < 0:
            raise ValueError(f"SampleKey needs a non-negative index, epoch and draw, got index {index}, "
                             f"epoch {epoch}, draw {draw}")
        return int.__new__(_key_class(int(epoch), int(seed), int(draw)), index)

    def __reduce__(self) -> Tuple[Any, Tuple[int, int, int, int]]:
        return SampleKey, (int(self), self.epoch, self.seed, self.draw)

    def __repr__(self) -> str:
        return f"SampleKey({int(self)}, epoch={self.epoch}, seed={self.seed}, draw={self.draw})"


def key_maker(epoch: int, seed: int, draw: int = 0) -> Callable[[int], SampleKey]:
    """A fast ``index -> SampleKey(index, epoch, seed, draw)`` for samplers (no per-key checks or lookups)."""
    if epoch < 0 or draw < 0:
        raise ValueError(f"SampleKey needs a non-negative epoch and draw, got epoch {epoch}, draw {draw}")
    return functools.partial(int.__new__, _key_class(int(epoch), int(seed), int(draw)))


@functools.lru_cache(maxsize=None)
def _key_class(epoch: int, seed: int, draw: int) -> type:
    """The ``SampleKey`` subclass carrying these fields (one per epoch and copy: a few hundred in a run)."""
    return type('SampleKey', (SampleKey,), {'__slots__': (), 'epoch': epoch, 'seed': seed, 'draw': draw})


def augmentation_seeds(key: SampleKey) -> Tuple[int, int, int]:
    """Seeds (torch: 64 bits, python ``random``: 64 bits, numpy: 32 bits) for ``key``.

    A BLAKE2b hash of (seed, epoch, index, draw) as fixed-width words: nearby inputs give unrelated seeds,
    where ``seed + index`` would give epoch 1, index 0 the stream of epoch 0, index 1. (~1 us; numpy's
    SeedSequence mixes as well but takes ~10 us.) numpy gets 32 bits because ``np.random.seed(int)`` is 5x
    faster than seeding from an array, and in the transforms numpy only picks RandAugment's ops.
    """
    words = struct.pack('<4Q', key.seed & _UINT64, key.epoch, int(key), key.draw)
    digest = hashlib.blake2b(words, digest_size=20, person=b'swin-augment').digest()
    return (int.from_bytes(digest[:8], 'little'), int.from_bytes(digest[8:16], 'little'),
            int.from_bytes(digest[16:], 'little'))


@contextlib.contextmanager
def seeded_rngs(key: SampleKey) -> Iterator[None]:
    """Run the body with the global torch (CPU), ``random`` and numpy generators seeded for ``key``.

    Those are what the transforms draw from (torchvision's crop, flip and jitter: torch; timm's crop, RandAugment
    magnitudes and erasing boxes: ``random``; RandAugment's op choice: numpy; erasing pixels: torch). Only the
    CPU generator is reseeded: ``torch.manual_seed`` would also reseed CUDA's.

    In the main process (0 workers) the caller's states are restored afterwards, so the training loop's RNG
    streams (Mixup, dropout; checkpoints save them) are not touched by data loading. A worker process's own
    streams serve nothing but the transforms, so they are left seeded: saving and restoring numpy's state alone
    costs ~70 us, against ~10 us for the rest, per sample.
    """
    torch_seed, py_seed, np_seed = augmentation_seeds(key)
    restore = torch.utils.data.get_worker_info() is None
    if restore:
        states = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(torch_seed)
    random.seed(py_seed)
    np.random.seed(np_seed)
    try:
        yield
    finally:
        if restore:
            torch.default_generator.set_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])
