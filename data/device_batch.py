"""The device batch of ``DATA.LOADER fast`` and ``gpu``: a batch whose last steps run on the training device.

DataLoader workers draw every random parameter (``seeded_rngs``); what is left for the device is executing them.
A ``DeviceBatch`` unpacks as ``images, targets = batch`` (uint8 images, or the gpu loader's encoded ones) and
``batch.on_device(device)`` returns the finished float ``(images, targets)``: its ``finish`` (picklable, sent with
the batch) normalises and erases there with ``DeviceFinish``, as timm's PrefetchLoader does. The random erasing
boxes are drawn in the worker by ``erase_params`` with timm's own calls. ``batch_to_device`` is what the engine
calls for every batch, a plain ``(images, targets)`` of ``DATA.LOADER torch`` or a ``DeviceBatch``.

Layer: a leaf of ``data`` (imports nothing of the project); the fast and gpu loaders build on it.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing


# ----------------------------------------------------------------------------- random erasing (drawn on the CPU)

def erase_boxes(eraser: RandomErasing, height: int, width: int) -> List[Tuple[int, int, int, int]]:
    """The (top, left, h, w) boxes timm's ``RandomErasing._erase`` would erase, drawn with the same ``random`` calls
    in the same order (tests check equality with timm's), so that erasing itself can run later on the device."""
    if random.random() > eraser.probability:
        return []
    area = height * width
    count = eraser.min_count if eraser.min_count == eraser.max_count else \
        random.randint(eraser.min_count, eraser.max_count)
    boxes = []
    for _ in range(count):
        for _attempt in range(10):
            target_area = random.uniform(eraser.min_area, eraser.max_area) * area / count
            aspect_ratio = math.exp(random.uniform(*eraser.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                boxes.append((top, left, h, w))
                break
    return boxes


def erase_params(eraser: Optional[RandomErasing], height: int, width: int) -> torch.Tensor:
    """``(4 * max_count + 1,)`` int64: the boxes (h = 0: none) then the seed of their noise (torch RNG)."""
    slots = eraser.max_count if eraser is not None else 0
    out = torch.zeros(4 * slots + 1, dtype=torch.int64)
    boxes = erase_boxes(eraser, height, width) if eraser is not None else []
    if boxes:
        out[:4 * len(boxes)] = torch.tensor(boxes, dtype=torch.int64).flatten()
        out[-1] = int(torch.randint(0, 2 ** 62, (1,)))
    return out


# ----------------------------------------------------------------------------- the device side

class DeviceFinish:
    """uint8 (B, H, W, 3) or (B, 3, H, W) on the device -> float (B, 3, H, W) normalised with the ImageNet
    mean/std, then random erasing from the drawn boxes (timm's modes: 'pixel' per-pixel normal noise, 'rand' one
    normal colour per box, 'const' zeros), the noise from a generator seeded with the sample's drawn seed."""

    def __init__(self, mode: str = 'pixel', mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        self.mode = mode
        self.mean = tuple(255.0 * m for m in mean)
        self.std = tuple(255.0 * s for s in std)

    def __call__(self, images: torch.Tensor, erase: Optional[torch.Tensor]) -> torch.Tensor:
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)  # (B, 3, H, W) view of (B, H, W, 3)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        inv_std = 1.0 / torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        # One converting copy into a contiguous float buffer, then in-place: 4-6x fewer passes than
        # ((x.float() - mean) / std).contiguous() on a channels-last view (measured on the CPU).
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)  # (B, 3, H, W)
        out.copy_(images)
        out.sub_(mean).mul_(inv_std)
        if erase is not None and erase.shape[1] > 1:
            self._erase(out, erase.tolist())  # one small host copy of the boxes (B x (4k+1) ints)
        return out

    def _erase(self, out: torch.Tensor, params: List[List[int]]) -> None:
        for b, row in enumerate(params):
            boxes = [row[k:k + 4] for k in range(0, len(row) - 1, 4) if row[k + 2] > 0]
            if not boxes:
                continue
            g = torch.Generator(device=out.device).manual_seed(row[-1])
            for top, left, h, w in boxes:
                if self.mode == 'pixel':
                    fill = torch.randn((3, h, w), generator=g, device=out.device)
                elif self.mode == 'rand':
                    fill = torch.randn((3, 1, 1), generator=g, device=out.device)
                else:
                    fill = torch.zeros((3, 1, 1), device=out.device)
                out[b, :, top:top + h, left:left + w] = fill


class DeviceBatch:
    """A batch whose last steps run on the training device: ``images, targets = batch`` and ``batch[i]`` as a
    tuple; ``on_device(device)`` -> finished float ``(images, targets)`` there. ``pin_memory`` (DataLoader's
    pinning thread calls it) pins the tensors and keeps the type."""

    def __init__(self, images: Any, targets: torch.Tensor, extras: Any, finish: Callable) -> None:
        self.images, self.targets, self.extras, self.finish = images, targets, extras, finish

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Any:
        return (self.images, self.targets)[i]

    def __iter__(self):
        return iter((self.images, self.targets))

    def pin_memory(self) -> 'DeviceBatch':
        if isinstance(self.images, torch.Tensor):
            self.images = self.images.pin_memory()
        self.targets = self.targets.pin_memory()
        return self

    def on_device(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.finish(self, torch.device(device))


class DeviceCollate:
    """Collate for the fast/gpu loaders: drops ``None`` samples (unreadable validation images), stacks the uint8
    images (or keeps the per-sample items as a list, ``stack=False``) and returns a ``DeviceBatch``. An all-dropped
    batch has no images and 0 targets."""

    def __init__(self, finish: Callable, stack: bool = True, empty_shape: Sequence[int] = (0, 224, 224, 3)) -> None:
        self.finish, self.stack, self.empty_shape = finish, stack, tuple(empty_shape)

    def __call__(self, samples: Sequence[Optional[Tuple[Tuple[Any, torch.Tensor], int]]]) -> DeviceBatch:
        kept = [s for s in samples if s is not None]
        targets = torch.tensor([label for _, label in kept], dtype=torch.int64)
        if not kept:
            return DeviceBatch(torch.empty(self.empty_shape, dtype=torch.uint8) if self.stack else [], targets,
                               None, self.finish)
        items = [item for item, _ in kept]
        if self.stack:
            images = torch.stack([img for img, _ in items])  # (B, S, S, 3) or (B, 3, S, S) uint8
            extras = torch.stack([e for _, e in items])  # (B, 4k+1) int64
        else:
            images, extras = [img for img, _ in items], [e for _, e in items]
        return DeviceBatch(images, targets, extras, self.finish)


def batch_to_device(batch: Any, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, targets) on ``device``: a ``DeviceBatch`` finishes there, a plain batch is copied."""
    if isinstance(batch, DeviceBatch):
        return batch.on_device(device)
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
