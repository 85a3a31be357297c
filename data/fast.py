"""``DATA.LOADER fast``: uint8 on the CPU, normalisation and erasing on the device.

DataLoader workers decode (simplejpeg, with libjpeg-turbo's DCT scaling when the random crop allows it), crop and
resize (torchvision's uint8 bicubic with antialias, which matches Pillow's), flip and apply timm's RandAugment (its
own op choice, magnitudes and Pillow ops, except that the affine ops run through OpenCV), and yield uint8
``(B, H, W, 3)`` batches. Normalisation and random erasing run on the device after the copy, in batch (as timm's
PrefetchLoader does; ``data.device_batch``); Mixup/CutMix follow in the engine as before.

A training sample's augmentation stays a pure function of ``(SEED, epoch, index)`` (its ``SampleKey``): every
random draw happens in the worker under ``seeded_rngs``; the device side only executes drawn parameters (the
erasing noise comes from a generator seeded with a drawn seed).

The batches are ``data.device_batch.DeviceBatch`` objects: ``images, targets = batch`` and ``batch[0]`` work as
for a tuple (uint8 images), and ``data.batch_to_device(batch, device)`` returns the finished float
``(images, targets)``; the engine calls it where it would copy a plain batch to the device.

Layer: a loader, over ``data.datasets``, ``data.transforms`` and ``data.device_batch``.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from config import ConfigError

from .datasets import decode_image, import_optional, is_jpeg, read_bytes
from .device_batch import DeviceCollate, DeviceFinish, erase_params
from .transforms import (EVAL_INTERPOLATION, GEOMETRIC_OPS, affine_matrix, augment_ops, check_fast_config,
                         eval_geometry, rrc_interpolation, size_only, timm_train_pieces)

class LoaderDependencyError(ConfigError):
    """A package that a ``DATA.LOADER`` choice needs is missing or broken; the message names it and the fix. A
    ConfigError, so main.py prints it as one line and exits 2."""


def require(module: str, pip_name: str, loader: str) -> Any:
    """Import ``module`` or raise ``LoaderDependencyError`` naming ``DATA.LOADER`` and the pip command."""
    return import_optional(module, pip_name, f"DATA.LOADER {loader!r}",
                           "(it is in requirements.txt) or set DATA.LOADER torch", LoaderDependencyError)


# ----------------------------------------------------------------------------- decoding

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


# ----------------------------------------------------------------------------- RandAugment's affine ops through OpenCV

_CV2_SINGLE_THREAD = False


def _cv2() -> Any:
    """OpenCV, set to one thread per process: a warp of one 224 px image is too small to share out, and its
    default pool (a thread per core) in each of N DataLoader workers would oversubscribe the CPU."""
    global _CV2_SINGLE_THREAD
    import cv2  # lazily: only DATA.LOADER fast needs OpenCV (use_cv2_affine checks it is there, naming the package)
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


def use_cv2_affine(transform: Any, loader: str) -> None:
    """Swap timm's Pillow affine ops for the OpenCV ones inside ``transform``."""
    require('cv2', 'opencv-python-headless', loader)
    for op in augment_ops(transform):
        name = getattr(op.aug_fn, '__name__', '')
        if name in GEOMETRIC_OPS:
            op.aug_fn = Cv2AffineOp(name)


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


class FastEvalTransform:
    """Encoded bytes -> uint8 (3, H, W): the deterministic eval transform (short side to int(256/224*size),
    center crop; or a plain resize without TEST.CROP) with torchvision's uint8 antialiased resize. It resizes the
    whole image and crops, as the reference: Pillow resizing only the surviving box (fractional coordinates)
    measured 2.2x slower than this here, and torch cannot take a fractional box. Max difference to the reference
    transform on the benchmark photos: 2 levels of 255 (mean 0.003)."""

    takes_encoded = True

    def __init__(self, config: Any) -> None:
        check_fast_config(config)
        self.size = config.DATA.IMG_SIZE
        self.crop = bool(config.TEST.CROP)
        self.interpolation = EVAL_INTERPOLATION[config.DATA.INTERPOLATION]
        self.decoder = Decoder('fast')

    def decode(self, source: Any) -> np.ndarray:
        return self.decoder.decode(read_bytes(source))

    def __call__(self, pixels: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        chw = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) view
        (rh, rw), (top, left) = eval_geometry(chw.shape[2], chw.shape[1], self.size, self.crop)
        out = F2.resize(chw, [rh, rw], interpolation=self.interpolation, antialias=True)
        out = out[:, top:top + self.size, left:left + self.size].contiguous()  # (3, S, S): no transposing copy
        return out, torch.zeros(1, dtype=torch.int64)  # no erasing


# ----------------------------------------------------------------------------- the batches

def fast_collate(is_train: bool, config: Any) -> DeviceCollate:
    """Training batches are (B, S, S, 3) (Pillow's layout, after RandAugment), eval batches (B, 3, S, S)."""
    size = config.DATA.IMG_SIZE
    return DeviceCollate(DeviceFinish(config.AUG.REMODE),
                         empty_shape=(0, size, size, 3) if is_train else (0, 3, size, size))
