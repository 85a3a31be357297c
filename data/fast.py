"""``DATA.LOADER fast``: uint8 on the CPU, normalisation and erasing on the device.

DataLoader workers decode (simplejpeg, with libjpeg-turbo's DCT scaling when the random crop allows it), crop and
resize (torchvision's uint8 bicubic with antialias, which matches Pillow's), flip and apply timm's RandAugment (its
own op choice, magnitudes and Pillow ops, except that the affine ops run through OpenCV), and yield uint8
``(B, H, W, 3)`` batches (RGB training) or ``(B, C, H, W)`` ones (evaluation, and other channel counts).

Channels (``MODEL.SWIN(V2).IN_CHANS``): 1 (grey: a JPEG decoded to its luma by libjpeg, other files as the torch
loader's Pillow 'L'; RandAugment runs on the grey Pillow image as there), 3 (RGB), 2 and 4 (grey + alpha, RGBA) and
any count from ``.npy`` arrays, as ``data.datasets.decode_image`` gives them; for those the crop, flip and erasing
run on uint8 tensors (``validate_config`` refuses their colour augmentation, as for the torch loader).
``DATA.IMG_SIZE`` [H, W]: the random-resized crop goes to H x W and the eval geometry is the torch loader's
(``data.transforms.eval_geometry``).

Normalisation and random erasing run on the device after the copy, in batch (as timm's
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

from config import ConfigError, img_size_hw, mean_std, model_in_chans

from .datasets import decode_image, import_optional, is_jpeg, read_bytes
from .device_batch import DeviceCollate, DeviceFinish, erase_params
from .transforms import (EVAL_INTERPOLATION, GEOMETRIC_OPS, PIL_CHANNELS, affine_matrix, augment_ops,
                         check_fast_config, eval_geometry, rrc_interpolation, size_only, timm_train_pieces)

class LoaderDependencyError(ConfigError):
    """A package that a ``DATA.LOADER`` choice needs is missing or broken; the message names it and the fix. A
    ConfigError, so main.py prints it as one line and exits 2."""


def require(module: str, pip_name: str, loader: str) -> Any:
    """Import ``module`` or raise ``LoaderDependencyError`` naming ``DATA.LOADER`` and the pip command."""
    return import_optional(module, pip_name, f"DATA.LOADER {loader!r}",
                           "(it is in requirements.txt) or set DATA.LOADER torch", LoaderDependencyError)


# ----------------------------------------------------------------------------- decoding

class Decoder:
    """Decoding to an ``(H, W, C)`` uint8 array of ``channels`` channels: simplejpeg for baseline/progressive
    YCbCr and grey JPEGs (1.3x Pillow's decode on the benchmark photos, and DCT-scaled decoding in steps of 1/8;
    RGB, or for 1 channel libjpeg's grey output, the luma), Pillow for the rest (CMYK JPEGs, PNG, ..., and
    ``.npy`` arrays: ``data.datasets.decode_image``). Damaged data raises one of ``data.datasets.DECODE_ERRORS``
    (ValueError/OSError)."""

    def __init__(self, loader: str, channels: int = 3) -> None:
        self.loader, self.channels = loader, channels
        self.simplejpeg = require('simplejpeg', 'simplejpeg', loader)
        # libjpeg's output colour spaces: 2 and 4 channels (alpha) have none, they go through Pillow
        self.colorspace = {1: 'Gray', 3: 'RGB'}.get(channels)

    def __getstate__(self) -> dict:  # modules do not pickle (spawned DataLoader workers): import it again there
        return {'loader': self.loader, 'channels': self.channels}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state['loader'], state.get('channels', 3))

    def size(self, data: bytes) -> Optional[Tuple[int, int]]:
        """(width, height) from a JPEG header that simplejpeg decodes, else None."""
        if self.colorspace is None or not is_jpeg(data):
            return None
        height, width, colorspace, _ = self.simplejpeg.decode_jpeg_header(data)
        return (width, height) if colorspace in ('YCbCr', 'Gray') else None

    def decode(self, data: bytes, min_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """The image as (H, W, C) uint8; with ``min_size`` (w, h) a JPEG may come back DCT-downscaled to the
        smallest n/8 scale at least that large."""
        if self.size(data) is not None:
            if min_size is None:
                pixels = self.simplejpeg.decode_jpeg(data, colorspace=self.colorspace)
            else:
                pixels = self.simplejpeg.decode_jpeg(data, colorspace=self.colorspace, min_width=int(min_size[0]),
                                                     min_height=int(min_size[1]))
        else:
            pixels = np.array(decode_image(data, self.channels))  # writable: torch.from_numpy follows
        return pixels if pixels.ndim == 3 else pixels[:, :, None]  # grey: (H, W) -> (H, W, 1)


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
    """Encoded bytes -> ``(uint8 image, erase params)``: timm's training distribution, uint8 end to end; the image
    is (H, W, 3) for RGB (Pillow's layout after RandAugment), else (C, H, W).

    ``decode`` draws the random-resized crop on the full-size dimensions (from the JPEG header), then decodes with
    DCT scaling to the smallest 1/8 step whose crop is still at least the output size, and rescales the crop box;
    ``__call__`` resizes the crop (bicubic + antialias, torchvision's uint8 kernel, 4x Pillow's here), flips, runs
    RandAugment and draws the erasing boxes. Normalisation and erasing run later on the device (``DeviceFinish``).
    """

    takes_encoded = True

    def __init__(self, config: Any) -> None:
        check_fast_config(config)
        self.height, self.width = img_size_hw(config)
        self.channels = model_in_chans(config)
        self.decoder = Decoder('fast', self.channels)
        self.crop, self.flip, self.secondary, self.eraser = timm_train_pieces(config)
        if self.secondary is not None and not getattr(self.secondary, 'transforms', True):
            self.secondary = None  # an empty Compose: no RandAugment / ColorJitter configured
        if self.secondary is not None and self.channels not in PIL_CHANNELS:
            # validate_config refuses this; the Pillow ops cannot take these images
            raise ConfigError(f"DATA.LOADER 'fast': colour augmentation ({self.secondary}) needs 1 or 3 channels, "
                              f"the model takes {self.channels}")
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
            pixels = self.decoder.decode(data, (math.ceil(full_w * self.width / w),
                                                math.ceil(full_h * self.height / h)))
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
        crop = torch.from_numpy(pixels).permute(2, 0, 1)[:, i:i + h, j:j + w]  # (C, h, w) view
        out = F2.resize(crop, [self.height, self.width], interpolation=interpolation, antialias=True)  # (C, H, W)
        if self.channels not in PIL_CHANNELS:  # 2, 4, N channels: no Pillow image; crop, flip, erasing only
            if self.flip is not None:
                out = self.flip(out)  # RandomHorizontalFlip's own draw, on the tensor
            return out.contiguous(), erase_params(self.eraser, self.height, self.width)
        # (C, H, W) planes -> Pillow image: Pillow's merge is 5x a transposing copy (torch or numpy) here
        planes = [Image.fromarray(plane) for plane in out.numpy()]
        img = planes[0] if self.channels == 1 else Image.merge('RGB', planes)
        if self.flip is not None:
            img = self.flip(img)  # RandomHorizontalFlip's own draw; Pillow's transpose is a cheap row copy
        if self.secondary is not None:
            img = self.secondary(img)
        array = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # (H, W, 3) or grey (H, W)
        image = array if self.channels == 3 else array[None]  # (H, W, 3) or (1, H, W)
        return image, erase_params(self.eraser, self.height, self.width)


class FastEvalTransform:
    """Encoded bytes -> uint8 (C, H, W): the deterministic eval transform (short side to int(256/224*size),
    center crop, per side for [H, W] as ``data.transforms.eval_resize``; or a plain resize without TEST.CROP)
    with torchvision's uint8 antialiased resize. It resizes the
    whole image and crops, as the reference: Pillow resizing only the surviving box (fractional coordinates)
    measured 2.2x slower than this here, and torch cannot take a fractional box. Max difference to the reference
    transform on the benchmark photos: 2 levels of 255 (mean 0.003)."""

    takes_encoded = True

    def __init__(self, config: Any) -> None:
        check_fast_config(config)
        self.height, self.width = img_size_hw(config)
        self.crop = bool(config.TEST.CROP)
        self.interpolation = EVAL_INTERPOLATION[config.DATA.INTERPOLATION]
        self.decoder = Decoder('fast', model_in_chans(config))

    def decode(self, source: Any) -> np.ndarray:
        return self.decoder.decode(read_bytes(source))

    def __call__(self, pixels: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        chw = torch.from_numpy(pixels).permute(2, 0, 1)  # (C, h, w) view
        (rh, rw), (top, left) = eval_geometry(chw.shape[2], chw.shape[1], (self.height, self.width), self.crop)
        out = F2.resize(chw, [rh, rw], interpolation=self.interpolation, antialias=True)
        out = out[:, top:top + self.height, left:left + self.width].contiguous()  # (C, H, W)
        return out, torch.zeros(1, dtype=torch.int64)  # no erasing


# ----------------------------------------------------------------------------- the batches

def fast_collate(is_train: bool, config: Any) -> DeviceCollate:
    """RGB training batches are (B, H, W, 3) (Pillow's layout, after RandAugment), the others (B, C, H, W);
    normalised with ``config.mean_std`` (``DATA.MEAN`` / ``DATA.STD``, or the channel count's default)."""
    (h, w), channels = img_size_hw(config), model_in_chans(config)
    mean, std = mean_std(config)
    return DeviceCollate(DeviceFinish(config.AUG.REMODE, mean, std),
                         empty_shape=(0, h, w, 3) if is_train and channels == 3 else (0, channels, h, w))
