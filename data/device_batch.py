"""The device batch of ``DATA.LOADER fast`` and ``gpu``: a batch whose last steps run on the training device.

DataLoader workers draw every random parameter (``seeded_rngs``); what is left for the device is executing them.
A ``DeviceBatch`` unpacks as ``images, targets = batch`` (uint8 images, or the gpu loader's encoded ones) and
``batch.on_device(device)`` returns the finished float ``(images, targets)``: its ``finish`` (picklable, sent with
the batch) normalises and erases there with ``DeviceFinish``, as timm's PrefetchLoader does. The random erasing
boxes are drawn in the worker by ``erase_params`` with timm's own calls, and their fill (timm's noise, drawn from a
generator seeded with the sample's drawn seed) is made there too, by ``DeviceFinish.prepare``.

What the device step needs besides the images (normalisation constants, the erasing fill, the gpu loader's plans)
travels with the batch as one ``PackedTensors`` buffer: pinned by the DataLoader's pinning thread, copied with one
non-blocking copy, read on the device as views. So a batch reaches the device without a blocking copy and its
finish launches a fixed number of kernels, whatever its size (no per-sample loop on the device).
``batch_to_device`` is what the engine calls for every batch, a plain ``(images, targets)`` of ``DATA.LOADER
torch`` or a ``DeviceBatch``.

Layer: a leaf of ``data`` (imports nothing of the project); the fast and gpu loaders build on it.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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


def erase_fill(params: torch.Tensor, mode: str, height: int, width: int, channels: int = 3
               ) -> Dict[str, torch.Tensor]:
    """What the device writes for the drawn erasing ``params`` (B, 4k+1) (CPU): ``erase_index`` (E,) the erased
    pixels' positions in the flat (B, C, H, W) batch, in order, and ``erase_values`` (E,) float32 their values.

    timm's modes: 'pixel' per-pixel normal noise, 'rand' one normal colour per box, 'const' zeros, each of the
    image's ``channels`` (timm's ``(chan, h, w)`` patch); boxes in their drawn order (a later one overwrites an
    earlier one where they overlap), the noise of a sample from a generator seeded with its drawn seed alone."""
    c, plane, indices, values = channels, height * width, [], []
    for b, row in enumerate(params.tolist()):
        boxes = [row[k:k + 4] for k in range(0, len(row) - 1, 4) if row[k + 2] > 0]
        if not boxes:
            continue
        g = torch.Generator().manual_seed(row[-1])
        fills = [torch.randn((c, h, w), generator=g) if mode == 'pixel' else
                 torch.randn((c, 1, 1), generator=g).expand(c, h, w) if mode == 'rand' else torch.zeros((c, h, w))
                 for _, _, h, w in boxes]
        if len(boxes) == 1:  # the box's pixels, row-major: its fill as it is
            top, left, h, w = boxes[0]
            pixels = ((top + torch.arange(h))[:, None] * width + left + torch.arange(w)).view(-1)
            value = fills[0].reshape(-1)
        else:  # overlapping boxes: the last one drawn wins
            canvas = torch.zeros((c, height, width))
            mask = torch.zeros((height, width), dtype=torch.bool)
            for (top, left, h, w), fill in zip(boxes, fills):
                canvas[:, top:top + h, left:left + w] = fill
                mask[top:top + h, left:left + w] = True
            pixels = mask.view(-1).nonzero().squeeze(1)  # (n,) row-major
            value = canvas.view(c, -1)[:, pixels].reshape(-1)
        indices.append((b * c * plane + plane * torch.arange(c)[:, None] + pixels).view(-1))
        values.append(value)  # (C * n,): channel-major, as the indices
    index_type = torch.int32 if len(params) * c * plane < 2 ** 31 else torch.int64
    return {'erase_index': torch.cat(indices).to(index_type) if indices else torch.zeros(0, dtype=index_type),
            'erase_values': torch.cat(values) if values else torch.zeros(0)}


# ----------------------------------------------------------------------------- one host-to-device copy per batch

class PackedTensors:
    """Named CPU tensors in one uint8 buffer: ``to(device)`` makes one non-blocking copy (from pinned memory once
    ``pin_memory`` ran, as the DataLoader's pinning thread does) and returns the tensors as views of it there.

    A batch's small tensors (targets, normalisation constants, erasing fill, the gpu loader's plans) then cost one
    copy instead of one each, and no ``torch.tensor(..., device=...)`` (a blocking copy) runs in an update."""

    ALIGN = 16  # bytes: every entry starts aligned for its dtype

    def __init__(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.layout: Dict[str, Tuple[int, int, torch.dtype, Tuple[int, ...]]] = {}
        offset = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            self.layout[name] = (offset, nbytes, t.dtype, tuple(t.shape))
            offset += -(-nbytes // self.ALIGN) * self.ALIGN
        self.data = torch.empty(offset, dtype=torch.uint8)
        for name, t in tensors.items():
            start, nbytes, _, _ = self.layout[name]
            if nbytes:
                self.data[start:start + nbytes] = t.detach().contiguous().view(-1).view(torch.uint8)

    def __contains__(self, name: str) -> bool:
        return name in self.layout

    def shape(self, name: str) -> Tuple[int, ...]:
        """An entry's shape, known on the host (no device read)."""
        return self.layout[name][3]

    def pin_memory(self) -> 'PackedTensors':
        self.data = self.data.pin_memory()
        return self

    def to(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """The tensors on ``device``: views of one copy of the buffer (a copy on the CPU too, so that the device
        step may write into them without changing the batch)."""
        data = self.data.to(device, non_blocking=True, copy=True)
        return {name: data[start:start + nbytes].view(dtype).view(shape)
                for name, (start, nbytes, dtype, shape) in self.layout.items()}


# ----------------------------------------------------------------------------- the device side

def pair(size: Any) -> Tuple[int, int]:
    """An image size, an int (a square) or (height, width), as (height, width)."""
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def channels_last(shape: Sequence[int], channels: int) -> bool:
    """Whether a uint8 batch of ``shape`` is (B, H, W, C) rather than (B, C, H, W): the fast loader's RGB
    training batches come from Pillow as (B, H, W, 3), every other batch is (B, C, H, W). Unambiguous for the
    sizes these loaders take (H, W > 32, the ``check_fast_config`` rule, and never equal to C)."""
    return shape[-1] == channels and shape[1] != channels


class DeviceFinish:
    """uint8 (B, H, W, C) or (B, C, H, W) on the device -> float (B, C, H, W) normalised with the per-channel
    ``mean``/``std`` (their length is C; ImageNet's RGB ones by default), then random erasing (``erase_fill``)
    written into the drawn boxes.

    ``prepare`` (in the DataLoader worker) makes the CPU tensors this needs, ``apply`` (on the device) runs it from
    them in four kernels; calling the object does both (tests, direct use)."""

    def __init__(self, mode: str = 'pixel', mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        if len(mean) != len(std) or not len(mean):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one value per channel each")
        self.mode = mode
        self.channels = len(mean)
        self.mean = tuple(255.0 * m for m in mean)
        self.std = tuple(255.0 * s for s in std)

    def prepare(self, erase: Optional[torch.Tensor], height: int, width: int) -> Dict[str, torch.Tensor]:
        """The normalisation ((x - mean) * (1 / std) per channel) and, for drawn erasing ``erase`` (B, 4k+1) on the
        CPU, its fill (``erase_fill``)."""
        out = {'normalise': torch.tensor([self.mean, [1.0 / s for s in self.std]], dtype=torch.float32)}
        if erase is not None and erase.shape[1] > 1:
            out.update(erase_fill(erase, self.mode, height, width, self.channels))
        return out

    def apply(self, images: torch.Tensor, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.channels
        if channels_last(images.shape, c):
            images = images.permute(0, 3, 1, 2)  # (B, C, H, W) view of (B, H, W, C)
        if images.shape[1] != c:  # shapes are host values: no sync
            raise ValueError(f"DeviceFinish normalises {c}-channel images (len(mean)), got a batch of shape "
                             f"{tuple(images.shape)}")
        mean, inv_std = tensors['normalise'].view(2, 1, c, 1, 1).unbind(0)
        # One converting copy into a contiguous float buffer, then in-place: 4-6x fewer passes than
        # ((x.float() - mean) / std).contiguous() on a channels-last view, and 1.7x addcmul's mixed-dtype pass
        # (measured on the CPU).
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)  # (B, C, H, W)
        out.copy_(images)
        out.sub_(mean).mul_(inv_std)
        index = tensors.get('erase_index')
        if index is not None and index.shape[0]:
            out.view(-1).index_put_((index,), tensors['erase_values'])  # the erased pixels only
        return out

    def __call__(self, images: torch.Tensor, erase: Optional[torch.Tensor]) -> torch.Tensor:
        height, width = images.shape[1:3] if channels_last(images.shape, self.channels) else images.shape[2:]
        return self.apply(images, PackedTensors(self.prepare(erase, height, width)).to(images.device))


def stack_targets(labels: Sequence[Any]) -> torch.Tensor:
    """A batch's labels: class ids -> (B,) int64; multi-hot vectors (``DATA.LABELS csv``) -> (B, C) float32."""
    if labels and isinstance(labels[0], torch.Tensor):
        return torch.stack(list(labels)).float()  # (B, C)
    return torch.tensor(labels, dtype=torch.int64)  # (B,)


class DeviceBatch:
    """A batch whose last steps run on the training device: ``images, targets = batch`` and ``batch[i]`` as a
    tuple; ``on_device(device)`` -> finished float ``(images, targets)`` there. ``pin_memory`` (DataLoader's
    pinning thread calls it) pins the tensors (and ``extras``, the packed tensors for the device) and keeps the
    type."""

    def __init__(self, images: Any, targets: torch.Tensor, extras: Any, finish: Callable) -> None:
        self.images, self.targets, self.extras, self.finish = images, targets, extras, finish

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Any:
        return (self.images, self.targets)[i]

    def __iter__(self):
        return iter((self.images, self.targets))

    def pin_memory(self) -> 'DeviceBatch':
        if hasattr(self.images, 'pin_memory'):
            self.images = self.images.pin_memory()
        self.targets = self.targets.pin_memory()
        if hasattr(self.extras, 'pin_memory'):
            self.extras = self.extras.pin_memory()
        return self

    def on_device(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.finish(self, torch.device(device))


class UInt8Finish:
    """The ``finish`` of batches of uint8 images (``DATA.LOADER fast``; picklable, sent with each batch): copy the
    images and the packed tensors (both non-blocking), then ``DeviceFinish.apply``."""

    def __init__(self, device_finish: DeviceFinish) -> None:
        self.device_finish = device_finish

    def __call__(self, batch: DeviceBatch, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        tensors = batch.extras.to(device)
        images = batch.images.to(device, non_blocking=True)  # (B, H, W, 3) or (B, C, H, W) uint8
        return self.device_finish.apply(images, tensors), tensors['targets']


class DeviceCollate:
    """Collate for uint8 images: drops ``None`` samples (unreadable validation images), stacks the images and
    returns a ``DeviceBatch`` finished by ``UInt8Finish``, whose extras are the ``PackedTensors`` of the targets
    and ``DeviceFinish.prepare`` (normalisation, erasing fill), made here in the worker. An all-dropped batch has
    no images and 0 targets."""

    def __init__(self, device_finish: DeviceFinish, empty_shape: Sequence[int] = (0, 224, 224, 3)) -> None:
        self.finish, self.empty_shape = UInt8Finish(device_finish), tuple(empty_shape)

    def __call__(self, samples: Sequence[Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], int]]]) -> DeviceBatch:
        kept = [s for s in samples if s is not None]
        targets = stack_targets([label for _, label in kept])
        if kept:
            images = torch.stack([img for (img, _), _ in kept])  # (B, H, W, 3) or (B, C, H, W) uint8
            erase = torch.stack([e for (_, e), _ in kept])  # (B, 4k+1) int64
        else:
            images, erase = torch.empty(self.empty_shape, dtype=torch.uint8), None
        last = channels_last(images.shape, self.finish.device_finish.channels)
        height, width = images.shape[1:3] if last else images.shape[2:]
        prepared = self.finish.device_finish.prepare(erase, height, width)
        return DeviceBatch(images, targets, PackedTensors({'targets': targets, **prepared}), self.finish)


def batch_to_device(batch: Any, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, targets) on ``device``: a ``DeviceBatch`` finishes there, a plain batch is copied.

    The finish runs with autocast off: the engine calls this inside the training step's autocast, and the
    augmentation's convolutions and samplers must not drop to bf16/fp16 there."""
    if isinstance(batch, DeviceBatch):
        device = torch.device(device)
        with torch.autocast(device.type, enabled=False):
            return batch.on_device(device)
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
