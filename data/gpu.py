"""``DATA.LOADER gpu``: decoding and augmentation on the training device, fed by the torch loader's own sampler.

DataLoader workers read each file's bytes and draw all of the sample's random parameters under its ``SampleKey``
(``seeded_rngs``) with timm's own code: the random-resized crop (``get_params`` on the size from the JPEG header),
the flip, RandAugment's op choice and magnitudes (timm's ``RandAugment`` run on a recorder instead of an image),
and the erasing boxes and noise seed. The batch carries the encoded images and these plans; ``on_device`` decodes
them with ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA, a batched call) and executes the plans with torchvision
tensor ops on the device, then normalises and erases (``data.device_batch.DeviceFinish``).

The same code runs with ``device='cpu'`` (the tests, CPU training), so CI exercises what runs on the GPU. What is
sampled (which images, in which order, per rank and epoch) is the torch loader's sampler itself; the augmentation of
a sample is a pure function of (SEED, epoch, index) as on the other loaders, though not bit-identical to theirs
(nvJPEG/torch kernels instead of Pillow's, bilinear/bicubic affine through ``grid_sample``).

Non-JPEG files, CMYK JPEGs and JPEGs without an end marker (truncated) are decoded by Pillow in the worker (a
damaged one then takes the broken-image path there) and travel as uint8 pixels.

Layer: a loader, over ``data.datasets``, ``data.transforms`` and ``data.device_batch`` (not over ``data.fast``).
"""
from __future__ import annotations

import copy
import io
import logging
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from config import ConfigError

from .datasets import DECODE_ERRORS, decode_image, is_jpeg, read_bytes
from .device_batch import DeviceBatch, DeviceCollate, DeviceFinish, erase_params
from .transforms import (EVAL_INTERPOLATION, GEOMETRIC_OPS, affine_matrix, augment_ops, check_fast_config,
                         eval_geometry, posterize_allowing_zero_bits, rrc_interpolation, size_only,
                         timm_train_pieces)

logger = logging.getLogger(__name__)

_PIL_TO_MODE = {Image.NEAREST: 'nearest', Image.BILINEAR: 'bilinear', Image.BICUBIC: 'bicubic'}
_INTERPOLATIONS = (InterpolationMode.NEAREST, InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
# timm's aug_fn names -> the ops below (the zero-bit-safe posterize of data.transforms counts as posterize)
_OP_ALIASES = {posterize_allowing_zero_bits.__name__: 'posterize'}


# ----------------------------------------------------------------------------- worker side: read and draw

def encoded_or_pixels(data: bytes) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(payload, (w, h)): the raw bytes as a 1-D uint8 tensor for a JPEG that nvJPEG / libjpeg decode as RGB, else
    the image decoded here by Pillow as (3, H, W) uint8 (raises a DECODE_ERRORS exception when it is damaged)."""
    if is_jpeg(data) and data.rstrip(b'\x00')[-2:] == b'\xff\xd9':
        with Image.open(io.BytesIO(data)) as img:  # header only
            if img.format == 'JPEG' and img.mode in ('RGB', 'L'):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), img.size
    pixels = torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1).contiguous()  # (3, H, W)
    return pixels, (pixels.shape[2], pixels.shape[1])


class _Recorder:
    """Stands in for a timm op function: appends (op, level args, interpolation, fill) to the list passed through
    RandAugment in place of the image. The affine ops draw their interpolation as timm's do (``_check_args_tf``)."""

    def __init__(self, name: str) -> None:
        self.name = _OP_ALIASES.get(name, name)

    def __call__(self, record: list, *args: Any, **kwargs: Any) -> list:
        resample = None
        if self.name in GEOMETRIC_OPS:
            timm_auto_augment._check_args_tf(kwargs)
            resample = kwargs['resample']
        record.append((self.name, tuple(float(a) for a in args), _PIL_TO_MODE.get(resample),
                       tuple(kwargs.get('fillcolor', (128, 128, 128)))))
        return record


def plan_recorder(secondary: Any) -> Any:
    """A copy of timm's RandAugment / AutoAugment whose ops record instead of transforming; None for no
    augmentation. Other secondary transforms (ColorJitter without AUTO_AUGMENT) have no GPU plan: an error."""
    if secondary is None or not getattr(secondary, 'transforms', None):
        return None
    recorder = copy.deepcopy(secondary)
    ops = augment_ops(recorder)
    if not ops:
        raise ConfigError(f"DATA.LOADER 'gpu' runs timm's RandAugment/AutoAugment on the device; this config's "
                          f"{secondary} has no such ops (AUG.COLOR_JITTER without AUG.AUTO_AUGMENT); use "
                          f"DATA.LOADER fast or torch")
    for op in ops:
        name = getattr(op.aug_fn, '__name__', '')
        if _OP_ALIASES.get(name, name) not in TENSOR_OPS:
            raise ConfigError(f"AUG.AUTO_AUGMENT op {op.name!r} has no device version in DATA.LOADER 'gpu'")
        op.aug_fn = _Recorder(name)
    return recorder


class GpuTrainTransform:
    """Encoded bytes -> (payload, plan) for the device; all random draws happen here, under the sample's key."""

    takes_encoded = True

    def __init__(self, config: Any) -> None:
        check_fast_config(config)
        self.size = config.DATA.IMG_SIZE
        self.crop, self.flip, secondary, self.eraser = timm_train_pieces(config)
        self.recorder = plan_recorder(secondary)

    def decode(self, source: Any) -> Tuple[torch.Tensor, Tuple[int, int]]:
        return encoded_or_pixels(read_bytes(source))

    def __call__(self, decoded: Tuple[torch.Tensor, Tuple[int, int]]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        payload, (w, h) = decoded
        box = self.crop.get_params(size_only(w, h), self.crop.scale, self.crop.ratio)
        interpolation = rrc_interpolation(self.crop)
        flip = self.flip is not None and bool(torch.rand(1) < self.flip.p)  # RandomHorizontalFlip's draw
        ops = self.recorder([]) if self.recorder is not None else []
        plan = {'size': (w, h), 'crop': box, 'interpolation': _INTERPOLATIONS.index(interpolation), 'flip': flip, 'ops': ops,
                'erase': erase_params(self.eraser, self.size, self.size)}
        return payload, plan


class GpuEvalTransform:
    """Encoded bytes -> (payload, plan) of the deterministic eval transform (``data.transforms.eval_geometry``, as
    ``data.fast``)."""

    takes_encoded = True

    def __init__(self, config: Any) -> None:
        check_fast_config(config)
        self.size = config.DATA.IMG_SIZE
        self.crop = bool(config.TEST.CROP)
        self.interpolation = _INTERPOLATIONS.index(EVAL_INTERPOLATION[config.DATA.INTERPOLATION])

    def decode(self, source: Any) -> Tuple[torch.Tensor, Tuple[int, int]]:
        return encoded_or_pixels(read_bytes(source))

    def __call__(self, decoded: Tuple[torch.Tensor, Tuple[int, int]]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        payload, (w, h) = decoded
        return payload, {'size': (w, h), 'eval': eval_geometry(w, h, self.size, self.crop),
                         'interpolation': self.interpolation}


# ----------------------------------------------------------------------------- device side: tensor ops

def _warp(x: torch.Tensor, matrix: Sequence[float], mode: str, fill: Sequence[int]) -> torch.Tensor:
    """Pillow's AFFINE transform (output -> input, pixel centres) of a (3, H, W) uint8 image via grid_sample.
    Sampling (x - fill) with zero padding and adding fill back gives the fill colour outside the image."""
    _, h, w = x.shape
    a, b, c, d, e, f = matrix
    # Pillow's pixel-centre coordinates -> affine_grid's normalised ones (align_corners=False): u = 2 x / W - 1.
    theta = torch.tensor([[a, b * h / w, a + b * h / w + 2 * c / w - 1],
                          [d * w / h, e, d * w / h + e + 2 * f / h - 1]], dtype=torch.float32, device=x.device)
    grid = F.affine_grid(theta[None], [1, 3, h, w], align_corners=False)  # (1, H, W, 2)
    fill_t = torch.tensor(fill, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    out = F.grid_sample(x[None].float() - fill_t, grid, mode=mode, padding_mode='zeros', align_corners=False)
    return (out + fill_t).round_().clamp_(0, 255).to(torch.uint8)[0]  # (3, H, W)


def _solarize_add(x: torch.Tensor, add: float, thresh: float = 128) -> torch.Tensor:
    return torch.where(x < thresh, (x.to(torch.int16) + int(add)).clamp_(0, 255).to(torch.uint8), x)


def _posterize(x: torch.Tensor, bits: float) -> torch.Tensor:
    bits = int(bits)
    if bits >= 8:
        return x
    if bits <= 0:
        return torch.zeros_like(x)  # what Pillow < 13 gave (see data.transforms.posterize_allowing_zero_bits)
    return F2.posterize(x, bits)


def _solarize(x: torch.Tensor, thresh: float) -> torch.Tensor:
    return x if thresh > 255 else F2.solarize(x, float(thresh))


# op name -> f(image (3, H, W) uint8, *level args); the affine ops go through _warp.
TENSOR_OPS = {
    'auto_contrast': lambda x: F2.autocontrast(x),
    'invert': lambda x: F2.invert(x),
    'equalize': lambda x: F2.equalize(x),
    'solarize': _solarize,
    'solarize_add': _solarize_add,
    'posterize': _posterize,
    'contrast': lambda x, f: F2.adjust_contrast(x, f),
    'color': lambda x, f: F2.adjust_saturation(x, f),
    'brightness': lambda x, f: F2.adjust_brightness(x, f),
    'sharpness': lambda x, f: F2.adjust_sharpness(x, f),
    **{name: None for name in GEOMETRIC_OPS},
}


def apply_op(x: torch.Tensor, op: Tuple[str, Tuple[float, ...], Optional[str], Tuple[int, ...]]) -> torch.Tensor:
    name, args, mode, fill = op
    if name in GEOMETRIC_OPS:
        if name == 'rotate' and args[0] % 360 == 0:
            return x
        return _warp(x, affine_matrix(name, args[0], (x.shape[2], x.shape[1])), mode or 'bicubic', fill)
    return TENSOR_OPS[name](x, *args)


def _decode_jpegs(payloads: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    # Lazily: torchvision.io loads its image codecs (libjpeg, nvJPEG) on import, which only DATA.LOADER gpu needs.
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter('ignore')
        return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device if device.type == 'cuda' else 'cpu')


def _decode_one(payload: torch.Tensor, size: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """One JPEG the batched call rejected: alone on the device, else Pillow on the CPU (it reads some files
    nvJPEG does not), else a black image of the header's size with a warning, so that the run goes on as with
    unreadable files elsewhere (the worker already checked the header and the end marker)."""
    try:
        return _decode_jpegs([payload], device)[0].to(device)
    except RuntimeError:
        pass
    try:
        pixels = np.array(decode_image(bytes(payload.numpy())))
        return torch.from_numpy(pixels).permute(2, 0, 1).to(device)  # (3, H, W)
    except DECODE_ERRORS as exc:
        logger.warning("DATA.LOADER gpu: a JPEG of %dx%d px that passed the worker's checks cannot be decoded "
                       "(%s: %s); a black image takes its place", size[0], size[1], type(exc).__name__, exc)
        return torch.zeros((3, size[1], size[0]), dtype=torch.uint8, device=device)


def decode_batch(payloads: Sequence[torch.Tensor], device: torch.device,
                 sizes: Optional[Sequence[Tuple[int, int]]] = None) -> List[torch.Tensor]:
    """(3, H, W) uint8 images on ``device``: JPEG bytes through one batched ``decode_jpeg`` there (nvJPEG on
    CUDA), already-decoded pixels copied. A batch that fails is decoded image by image (``_decode_one``)."""
    jpegs = [k for k, p in enumerate(payloads) if p.dim() == 1]
    out: List[Optional[torch.Tensor]] = [None] * len(payloads)
    if jpegs:
        try:
            decoded = _decode_jpegs([payloads[k] for k in jpegs], device)
        except RuntimeError:
            decoded = [_decode_one(payloads[k], sizes[k] if sizes else (0, 0), device) for k in jpegs]
        for k, img in zip(jpegs, decoded):
            out[k] = img.to(device, non_blocking=True)
    for k, p in enumerate(payloads):
        if out[k] is None:
            out[k] = p.to(device, non_blocking=True)
    return out  # type: ignore[return-value]


class GpuFinish:
    """Picklable ``DeviceBatch`` finish of DATA.LOADER gpu: decode, execute the plans, normalise, erase."""

    def __init__(self, size: int, erase_mode: str) -> None:
        self.size = size
        self.device_finish = DeviceFinish(erase_mode)

    def images(self, payloads: Sequence[torch.Tensor], plans: Sequence[Dict[str, Any]],
               device: torch.device) -> torch.Tensor:
        """uint8 (B, 3, S, S) on ``device``: the plans executed on the decoded images."""
        s = self.size
        out = torch.empty((len(payloads), 3, s, s), dtype=torch.uint8, device=device)
        images = decode_batch(payloads, device, [plan['size'] for plan in plans])
        for b, (img, plan) in enumerate(zip(images, plans)):
            interpolation = _INTERPOLATIONS[plan['interpolation']]
            if 'eval' in plan:
                (rh, rw), (top, left) = plan['eval']
                x = F2.resize(img, [rh, rw], interpolation=interpolation, antialias=True)[:, top:top + s, left:left + s]
            else:
                i, j, h, w = plan['crop']
                x = F2.resize(img[:, i:i + h, j:j + w], [s, s], interpolation=interpolation, antialias=True)
                if plan['flip']:
                    x = x.flip(-1)
                for op in plan['ops']:
                    x = apply_op(x, op)
            out[b] = x
        return out

    def __call__(self, batch: DeviceBatch, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        targets = batch.targets.to(device, non_blocking=True)
        if len(batch.images) == 0:
            return torch.empty((0, 3, self.size, self.size), device=device), targets
        plans, erase = batch.extras
        images = self.images(batch.images.unpack(), plans, device)
        return self.device_finish(images, erase if erase.shape[1] > 1 else None), targets


class PackedImages:
    """A batch's encoded JPEGs as one uint8 tensor plus lengths, and the (rare) Pillow-decoded images by position.

    One tensor per batch instead of one per image: DataLoader workers pass every tensor through its own shared
    memory file descriptor, and 128 per batch times the batches in flight can exceed the open-file limit."""

    def __init__(self, payloads: Sequence[torch.Tensor]) -> None:
        jpegs = [p for p in payloads if p.dim() == 1]
        self.count = len(payloads)
        self.data = torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8)  # all the bytes, (N,)
        self.lengths = [int(p.numel()) for p in jpegs]
        self.pixels = [(k, p) for k, p in enumerate(payloads) if p.dim() != 1]

    def __len__(self) -> int:
        return self.count

    def unpack(self) -> List[torch.Tensor]:
        """The payloads in batch order: 1-D byte views (contiguous) and (3, H, W) pixel tensors."""
        views = iter(torch.split(self.data, self.lengths)) if self.lengths else iter(())
        pixels = dict(self.pixels)
        return [pixels[k] if k in pixels else next(views) for k in range(self.count)]


class GpuCollate(DeviceCollate):
    """Collate for DATA.LOADER gpu: ``DeviceBatch(PackedImages, targets, (plans, erase (B, 4k+1)), GpuFinish)``;
    the plans are plain Python values (pickled in-band), the erasing parameters one stacked tensor."""

    def __call__(self, samples: Sequence[Optional[Tuple[Tuple[Any, Dict[str, Any]], int]]]) -> DeviceBatch:
        kept = [s for s in samples if s is not None]
        targets = torch.tensor([label for _, label in kept], dtype=torch.int64)
        plans = [dict(plan) for (_, plan), _ in kept]
        erase = [plan.pop('erase', torch.zeros(1, dtype=torch.int64)) for plan in plans]
        erase_t = torch.stack(erase) if erase else torch.zeros((0, 1), dtype=torch.int64)  # (B, 4k+1)
        return DeviceBatch(PackedImages([payload for (payload, _), _ in kept]), targets, (plans, erase_t),
                           self.finish)


def gpu_collate(is_train: bool, config: Any) -> DeviceCollate:
    size = config.DATA.IMG_SIZE
    return GpuCollate(GpuFinish(size, config.AUG.REMODE), stack=False, empty_shape=(0, 3, size, size))
