"""The fast input paths behind ``DATA.LOADER``: ``fast`` (uint8 on the CPU) and ``gpu`` (decode and augment on
the device), and the device-side finish they share.

``DATA.LOADER fast``: DataLoader workers decode (simplejpeg, with libjpeg-turbo's DCT scaling when the random
crop allows it), crop and resize (torchvision's uint8 bicubic with antialias, which matches Pillow's), flip and
apply timm's RandAugment (its own op choice, magnitudes and Pillow ops, except that the affine ops run through
OpenCV), and yield uint8 ``(B, H, W, 3)`` batches. Normalisation and random erasing run on the device after the
copy, in batch (as timm's PrefetchLoader does); Mixup/CutMix follow in the engine as before.

``DATA.LOADER gpu`` (``data.gpu``): the workers only read the bytes and draw every random parameter; decoding
(``torchvision.io.decode_jpeg``, nvJPEG on CUDA), crop/resize, flip, RandAugment, normalisation and erasing run on
the training device. On a CPU device the same code runs with ``device='cpu'``.

Both keep the property of ``data.datasets``: a training sample's augmentation is a pure function of
``(SEED, epoch, index)`` (its ``SampleKey``). Every random draw happens in the worker under ``seeded_rngs``; the
device side only executes drawn parameters (the erasing noise comes from a generator seeded with a drawn seed).

The batches are ``DeviceBatch`` objects: ``images, targets = batch`` and ``batch[0]`` work as for a tuple (uint8
images, or for ``gpu`` a list of encoded images), and ``batch.on_device(device)`` returns the finished float
``(images, targets)``; the engine calls it where it would copy a plain batch to the device.
"""
from __future__ import annotations

import importlib
import math
import random
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from config import ConfigError

from .datasets import decode_image


class LoaderDependencyError(ConfigError):
    """A package that a ``DATA.LOADER`` choice needs is missing or broken; the message names it and the fix. A
    ConfigError, so main.py prints it as one line and exits 2."""


def require(module: str, pip_name: str, loader: str) -> Any:
    """Import ``module`` or raise ``LoaderDependencyError`` naming ``DATA.LOADER`` and the pip command."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken binary (OSError, AttributeError...)
        raise LoaderDependencyError(
            f"DATA.LOADER {loader!r} needs the package {pip_name!r} ({type(e).__name__}: {e}); install it with "
            f"'pip install {pip_name}' (it is in requirements.txt) or set DATA.LOADER torch") from e


# ----------------------------------------------------------------------------- decoding

JPEG_SOI = b'\xff\xd8'


def is_jpeg(data: bytes) -> bool:
    return data[:2] == JPEG_SOI


def read_bytes(source: Any) -> bytes:
    """A path or bytes (what ``ImageDataset.read`` returns) -> the encoded bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    with open(source, 'rb') as f:
        return f.read()


class Decoder:
    """RGB decoding to an ``(H, W, 3)`` uint8 array: simplejpeg for baseline/progressive YCbCr and grey JPEGs
    (1.3x Pillow's decode on the benchmark photos, and DCT-scaled decoding in steps of 1/8), Pillow for the rest
    (CMYK JPEGs, PNG, ...). Damaged data raises one of ``data.datasets.DECODE_ERRORS`` (ValueError/OSError)."""

    def __init__(self, loader: str) -> None:
        self.loader = loader
        self.simplejpeg = require('simplejpeg', 'simplejpeg', loader)

    def __getstate__(self) -> dict:  # modules do not pickle (spawned DataLoader workers): import it again there
        return {'loader': self.loader}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state['loader'])

    def size(self, data: bytes) -> Optional[Tuple[int, int]]:
        """(width, height) from a JPEG header that simplejpeg decodes, else None."""
        if not is_jpeg(data):
            return None
        height, width, colorspace, _ = self.simplejpeg.decode_jpeg_header(data)
        return (width, height) if colorspace in ('YCbCr', 'Gray') else None

    def decode(self, data: bytes, min_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """The image as (H, W, 3) uint8; with ``min_size`` (w, h) a JPEG may come back DCT-downscaled to the
        smallest n/8 scale at least that large."""
        if self.size(data) is not None:
            if min_size is None:
                return self.simplejpeg.decode_jpeg(data, colorspace='RGB')
            return self.simplejpeg.decode_jpeg(data, colorspace='RGB', min_width=int(min_size[0]),
                                               min_height=int(min_size[1]))
        return np.array(decode_image(data))  # writable: torch.from_numpy follows


# ----------------------------------------------------------------------------- RandAugment's affine ops

def affine_matrix(name: str, arg: float, size: Tuple[int, int]) -> Tuple[float, ...]:
    """Pillow's AFFINE coefficients (output -> input, pixel-centre coordinates) of timm's geometric op ``name``
    (its ``aug_fn.__name__``) with level argument ``arg`` on an image of ``size`` (w, h)."""
    w, h = size
    if name == 'shear_x':
        return (1, arg, 0, 0, 1, 0)
    if name == 'shear_y':
        return (1, 0, 0, arg, 1, 0)
    if name == 'translate_x_rel':
        return (1, 0, arg * w, 0, 1, 0)
    if name == 'translate_y_rel':
        return (1, 0, 0, 0, 1, arg * h)
    if name == 'translate_x_abs':
        return (1, 0, arg, 0, 1, 0)
    if name == 'translate_y_abs':
        return (1, 0, 0, 0, 1, arg)
    if name == 'rotate':  # Image.rotate's matrix (counter-clockwise about the centre)
        angle = -math.radians(arg)
        a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
        d, e = -b, a
        cx, cy = w / 2, h / 2
        return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)
    raise KeyError(name)


GEOMETRIC_OPS = ('shear_x', 'shear_y', 'translate_x_rel', 'translate_y_rel', 'translate_x_abs',
                 'translate_y_abs', 'rotate')


_CV2_SINGLE_THREAD = False


def _cv2() -> Any:
    """OpenCV, set to one thread per process: a warp of one 224 px image is too small to share out, and its
    default pool (a thread per core) in each of N DataLoader workers would oversubscribe the CPU."""
    global _CV2_SINGLE_THREAD
    import cv2
    if not _CV2_SINGLE_THREAD:
        cv2.setNumThreads(1)
        _CV2_SINGLE_THREAD = True
    return cv2


class Cv2AffineOp:
    """timm's Pillow affine op ``name`` through cv2.warpAffine: Pillow's bicubic affine is a generic per-pixel
    loop (2.7 ms on 224 px here, against 0.8 ms), and the five affine ops are a third of RandAugment's choices.
    Same matrix, fill and interpolation family; OpenCV's cubic kernel is a = -0.75 where Pillow's is -0.5.
    A class, not a closure, so that the transform pickles (spawned DataLoader workers)."""

    def __init__(self, name: str) -> None:
        self.name = self.__name__ = name

    def __call__(self, img: Image.Image, arg: float, **kwargs: Any) -> Image.Image:
        cv2 = _cv2()
        timm_auto_augment._check_args_tf(kwargs)  # draws the interpolation as timm does (DATA.INTERPOLATION random)
        if self.name == 'rotate' and arg % 360 == 0:
            return img.copy()
        a, b, c, d, e, f = affine_matrix(self.name, arg, img.size)
        m = np.array([[a, b, c], [d, e, f]], dtype=np.float64)
        m[:, 2] += m[:, :2] @ (0.5, 0.5) - 0.5  # Pillow samples at pixel centres, OpenCV at integer coordinates
        flags = {Image.NEAREST: cv2.INTER_NEAREST, Image.BILINEAR: cv2.INTER_LINEAR}.get(kwargs['resample'],
                                                                                        cv2.INTER_CUBIC)
        fill = kwargs.get('fillcolor', (128, 128, 128))
        out = cv2.warpAffine(np.asarray(img), m, img.size, flags=flags | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(fill))
        return Image.fromarray(out)


def augment_ops(transform: Any) -> List[Any]:
    """timm's AugmentOps inside a RandAugment / AutoAugment / Compose."""
    ops = []
    for t in list(getattr(transform, 'transforms', [])) + [transform]:
        ops.extend(getattr(t, 'ops', []))
        for sub_policy in getattr(t, 'policy', []):
            ops.extend(sub_policy)
    return ops


def use_cv2_affine(transform: Any, loader: str) -> None:
    """Swap timm's Pillow affine ops for the OpenCV ones inside ``transform``."""
    require('cv2', 'opencv-python-headless', loader)
    for op in augment_ops(transform):
        name = getattr(op.aug_fn, '__name__', '')
        if name in GEOMETRIC_OPS:
            op.aug_fn = Cv2AffineOp(name)


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


# ----------------------------------------------------------------------------- config -> timm's pieces

def timm_train_pieces(config: Any) -> Tuple[RandomResizedCropAndInterpolation, Optional[Any], Any,
                                            Optional[RandomErasing]]:
    """(random-resized crop, flip, secondary transform (RandAugment / AutoAugment / ColorJitter), erasing) built by
    timm's ``create_transform`` from the same arguments as ``data.build.build_transform``, so both paths parse the
    config alike."""
    from .build import _fix_posterize, train_transform_kwargs
    primary, secondary, final = create_transform(separate=True, **train_transform_kwargs(config))
    crop = next(t for t in primary.transforms if isinstance(t, RandomResizedCropAndInterpolation))
    flip = next((t for t in primary.transforms if type(t).__name__ == 'RandomHorizontalFlip'), None)
    eraser = next((t for t in final.transforms if isinstance(t, RandomErasing)), None)
    _fix_posterize(secondary)
    return crop, flip, secondary, eraser


def check_fast_config(config: Any) -> None:
    """Settings the fast/gpu loaders cannot honour: a clear error naming the keys."""
    from config import ConfigError
    if config.DATA.IMG_SIZE <= 32:
        raise ConfigError(f"DATA.LOADER {config.DATA.LOADER!r} needs DATA.IMG_SIZE > 32 (small images use a padded "
                          f"random crop, which only DATA.LOADER torch implements); got {config.DATA.IMG_SIZE}")


def rrc_interpolation(crop: RandomResizedCropAndInterpolation) -> InterpolationMode:
    """The crop's interpolation, drawn as timm does when it is 'random' (after the crop parameters)."""
    interpolation = crop.interpolation
    if isinstance(interpolation, (tuple, list)):
        interpolation = random.choice(interpolation)
    return interpolation


def size_only(width: int, height: int) -> torch.Tensor:
    """A zero-storage (3, H, W) tensor: timm's ``get_params`` only reads an image's size."""
    return torch.empty((1, 1, 1), dtype=torch.uint8).expand(3, height, width)


# ----------------------------------------------------------------------------- DATA.LOADER fast: the transforms

class FastTrainTransform:
    """Encoded bytes -> ``(uint8 (H, W, 3) image, erase params)``: timm's training distribution, uint8 end to end.

    ``decode`` draws the random-resized crop on the full-size dimensions (from the JPEG header), then decodes with
    DCT scaling to the smallest 1/8 step whose crop is still at least the output size, and rescales the crop box;
    ``__call__`` resizes the crop (bicubic + antialias, torchvision's uint8 kernel, 4x Pillow's here), flips, runs
    RandAugment and draws the erasing boxes. Normalisation and erasing run later on the device (``DeviceFinish``).
    """

    takes_encoded = True

    def __init__(self, config: Any) -> None:
        check_fast_config(config)
        self.size = config.DATA.IMG_SIZE
        self.decoder = Decoder('fast')
        self.crop, self.flip, self.secondary, self.eraser = timm_train_pieces(config)
        use_cv2_affine(self.secondary, 'fast')

    def decode(self, source: Any) -> Tuple[np.ndarray, Tuple[int, int, int, int], InterpolationMode]:
        data = read_bytes(source)
        wh = self.decoder.size(data)
        if wh is None:  # not a JPEG simplejpeg decodes: full decode first, then the same draws
            pixels = self.decoder.decode(data)
            wh = pixels.shape[1], pixels.shape[0]
        else:
            pixels = None
        full_w, full_h = wh
        i, j, h, w = self.crop.get_params(size_only(full_w, full_h), self.crop.scale, self.crop.ratio)
        interpolation = rrc_interpolation(self.crop)
        if pixels is None:
            # Smallest decode whose crop is still >= the output size on both sides.
            pixels = self.decoder.decode(data, (math.ceil(full_w * self.size / w), math.ceil(full_h * self.size / h)))
        sy, sx = pixels.shape[0] / full_h, pixels.shape[1] / full_w
        if sx != 1 or sy != 1:
            top, left = min(round(i * sy), pixels.shape[0] - 1), min(round(j * sx), pixels.shape[1] - 1)
            i, j = top, left
            h = max(1, min(round(h * sy), pixels.shape[0] - top))
            w = max(1, min(round(w * sx), pixels.shape[1] - left))
        return pixels, (i, j, h, w), interpolation

    def __call__(self, decoded: Tuple[np.ndarray, Tuple[int, int, int, int], InterpolationMode]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        pixels, (i, j, h, w), interpolation = decoded
        crop = torch.from_numpy(pixels).permute(2, 0, 1)[:, i:i + h, j:j + w]  # (3, h, w) view
        out = F2.resize(crop, [self.size, self.size], interpolation=interpolation, antialias=True)  # (3, S, S)
        # (3, S, S) planes -> RGB image: Pillow's merge is 5x a transposing copy (torch or numpy) here
        img = Image.merge('RGB', [Image.fromarray(plane) for plane in out.numpy()])
        if self.flip is not None:
            img = self.flip(img)  # RandomHorizontalFlip's own draw; Pillow's transpose is a cheap row copy
        if self.secondary is not None:
            img = self.secondary(img)
        hwc = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # (S, S, 3)
        return hwc, erase_params(self.eraser, self.size, self.size)


def eval_geometry(width: int, height: int, size: int, crop: bool) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(resized (h, w), crop offset (top, left)) of the eval transform: torchvision's Resize(int(256/224 * size))
    short side (the long side truncated as torchvision does) and CenterCrop(size); without ``crop`` (size, size)."""
    if not crop:
        return (size, size), (0, 0)
    short = int((256 / 224) * size)
    if width <= height:
        rh, rw = int(short * height / width), short
    else:
        rh, rw = short, int(short * width / height)
    return (rh, rw), (int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0)))


class FastEvalTransform:
    """Encoded bytes -> uint8 (3, H, W): the deterministic eval transform (short side to int(256/224*size),
    center crop; or a plain resize without TEST.CROP) with torchvision's uint8 antialiased resize. It resizes the
    whole image and crops, as the reference: Pillow resizing only the surviving box (fractional coordinates)
    measured 2.2x slower than this here, and torch cannot take a fractional box. Max difference to the reference
    transform on the benchmark photos: 2 levels of 255 (mean 0.003)."""

    takes_encoded = True

    def __init__(self, config: Any) -> None:
        check_fast_config(config)
        from .build import _EVAL_INTERPOLATION
        self.size = config.DATA.IMG_SIZE
        self.crop = bool(config.TEST.CROP)
        self.interpolation = _EVAL_INTERPOLATION[config.DATA.INTERPOLATION]
        self.decoder = Decoder('fast')

    def decode(self, source: Any) -> np.ndarray:
        return self.decoder.decode(read_bytes(source))

    def __call__(self, pixels: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        chw = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) view
        (rh, rw), (top, left) = eval_geometry(chw.shape[2], chw.shape[1], self.size, self.crop)
        out = F2.resize(chw, [rh, rw], interpolation=self.interpolation, antialias=True)
        out = out[:, top:top + self.size, left:left + self.size].contiguous()  # (3, S, S): no transposing copy
        return out, torch.zeros(1, dtype=torch.int64)  # no erasing


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


def finish_uint8(batch: DeviceBatch, device: torch.device, finish: DeviceFinish) -> Tuple[torch.Tensor, torch.Tensor]:
    images = batch.images.to(device, non_blocking=True)  # (B, S, S, 3) uint8
    targets = batch.targets.to(device, non_blocking=True)
    erase = batch.extras if batch.extras is not None and batch.extras.shape[1] > 1 else None
    return finish(images, erase), targets


class _UInt8Finish:
    """Picklable ``finish`` for uint8 batches (DataLoader workers send it with each batch)."""

    def __init__(self, finish: DeviceFinish) -> None:
        self.device_finish = finish

    def __call__(self, batch: DeviceBatch, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        return finish_uint8(batch, device, self.device_finish)


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


def fast_collate(is_train: bool, config: Any) -> DeviceCollate:
    """Training batches are (B, S, S, 3) (Pillow's layout, after RandAugment), eval batches (B, 3, S, S)."""
    size = config.DATA.IMG_SIZE
    return DeviceCollate(_UInt8Finish(DeviceFinish(config.AUG.REMODE)),
                         empty_shape=(0, size, size, 3) if is_train else (0, 3, size, size))


def batch_to_device(batch: Any, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, targets) on ``device``: a ``DeviceBatch`` finishes there, a plain batch is copied."""
    if isinstance(batch, DeviceBatch):
        return batch.on_device(device)
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
