"""The pieces of the training and eval transforms, shared by every ``DATA.LOADER``.

timm builds the training augmentation from the config (``train_transform_kwargs``): ``build_transform`` composes
it for ``DATA.LOADER torch``; ``timm_train_pieces`` hands its parts (crop, flip, RandAugment, erasing) to the fast
and gpu loaders, which run them on uint8 pixels or record them as plans for the device. The eval geometry (resize
the short side to int(256/224 * size), center crop) and its interpolation are here too, so that the three loaders
agree on them. RandAugment's affine ops are described here once (``affine_matrix``), for the OpenCV (fast) and
the tensor (gpu) versions.

Layer: a leaf of ``data`` (it imports no other ``data`` module; from the project only ``config``).
"""
from __future__ import annotations

import logging
import math
import random
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, ResizeKeepRatio
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from config import ConfigError, img_size_hw, mean_std, model_in_chans

_LOG = logging.getLogger(__name__)

# Eval resize interpolation per DATA.INTERPOLATION. 'random' is a training-time choice; for a deterministic
# eval the official code falls back to bilinear, and so do we.
EVAL_INTERPOLATION = {
    'bicubic': InterpolationMode.BICUBIC,
    'bilinear': InterpolationMode.BILINEAR,
    'nearest': InterpolationMode.NEAREST,
    'random': InterpolationMode.BILINEAR,
}


# ----------------------------------------------------------------------------- timm's augmentation, as the reference

def posterize_allowing_zero_bits(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, with 0 bits kept giving a black image as Pillow < 13 did.

    RandAugment's 'PosterizeIncreasing' reaches 0 bits at magnitude 10 (m9 with mstd 0.5 gets there), and
    Pillow 13 rejects bits outside 1..8, which would crash a training run at random.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_auto_augment.posterize(img, bits_to_keep, **kwargs)


def augment_ops(transform: Any) -> List[Any]:
    """timm's AugmentOps inside a RandAugment / AutoAugment / Compose."""
    ops = []
    for t in list(getattr(transform, 'transforms', [])) + [transform]:
        ops.extend(getattr(t, 'ops', []))
        for sub_policy in getattr(t, 'policy', []):
            ops.extend(sub_policy)
    return ops


def fix_posterize(transform: Any) -> None:
    """Swap timm's posterize for the zero-bit-safe one inside RandAugment / AutoAugment / AugMix ops."""
    for op in augment_ops(transform):
        if getattr(op, 'aug_fn', None) is timm_auto_augment.posterize:
            op.aug_fn = posterize_allowing_zero_bits


# Channel counts whose images stay PIL images through the transforms (grey 'L' and RGB: timm's RandAugment and
# ColorJitter are Pillow ops, and most of them run on 'L' too). Others (2, 4, N) become float tensors first
# (``ToFloatTensor``) and get the geometric ops only (crop, flip, erasing): Pillow resizes RGBA premultiplied by
# its alpha, and N channels are no PIL image at all; config.validate_config refuses their colour ops.
PIL_CHANNELS = (1, 3)


class ToFloatTensor:
    """A decoded image (PIL 'LA'/'RGBA' or an (H, W, C) uint8 array) -> float (C, H, W) in [0, 1], as ToTensor
    scales; the transforms after it are torchvision's tensor versions (antialiased resize, as Pillow's)."""

    def __call__(self, img: Any) -> torch.Tensor:
        array = np.array(img, dtype=np.uint8, copy=True)  # (H, W, C) or (H, W)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)  # (C, H, W)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def img_size_arg(config: Any) -> Any:
    """``DATA.IMG_SIZE`` as torchvision/timm take it: an int for a square (today's transforms exactly), else
    (height, width)."""
    h, w = img_size_hw(config)
    return h if h == w else (h, w)


def train_transform_kwargs(config: Any) -> Dict[str, Any]:
    """timm ``create_transform`` arguments of the training augmentation (shared by every ``DATA.LOADER``).

    Non-square ``DATA.IMG_SIZE`` [H, W]: the random-resized crop's aspect range (3/4, 4/3) is taken around the
    output's W / H, so that an average crop is not squashed on its way to H x W; square sizes keep timm's range.
    Normalisation: ``config.mean_std`` (``DATA.MEAN`` / ``DATA.STD`` or the default for the channel count)."""
    h, w = img_size_hw(config)
    mean, std = mean_std(config)
    extra: Dict[str, Any] = {} if h == w else {'ratio': (3 / 4 * w / h, 4 / 3 * w / h)}
    return dict(
        input_size=img_size_arg(config),
        mean=mean, std=std, **extra,
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


class RandomCrop(transforms.RandomCrop):
    """The training crop for ``DATA.IMG_SIZE <= 32``: torchvision's padded ``RandomCrop(size, padding=4)`` (CIFAR
    style, the official recipe) for images that already are ``size`` x ``size``; any other image is first
    resized as the evaluation resizes it (``eval_resize``), so that training and evaluation see the same
    geometry (a 48x32 image cropped at 32 px without a resize trains on a part of each image and is evaluated
    on all of it). The name is torchvision's: it is that crop, with the resize in front for other sizes."""

    def __init__(self, size: Any, eval_resize: Callable):
        # pad_if_needed keeps the output size fixed for images smaller than the crop after the resize
        super().__init__(size, padding=4, pad_if_needed=True)
        self.side = size
        self.hw = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.eval_resize = eval_resize

    def forward(self, img: Any) -> Any:
        if tuple(TF.get_image_size(img)) != self.hw[::-1]:  # (w, h), PIL image or tensor
            img = self.eval_resize(img)
        return super().forward(img)

    def __repr__(self) -> str:
        return f"{super().__repr__()} (other sizes first: {self.eval_resize})"


def eval_scale_size(h: int, w: int) -> Tuple[int, int]:
    """The size the eval resize covers before the centre crop: the official int(256 / 224 * size), per side."""
    return int((256 / 224) * h), int((256 / 224) * w)


def eval_resize(config: Any) -> List[Callable]:
    """The eval geometry: with ``TEST.CROP`` the short side to int(256 / 224 * size) and a center crop, else a
    resize straight to (size, size). Non-square [H, W] with ``TEST.CROP``: timm's rule for a non-square crop
    (``ResizeKeepRatio``): the image keeps its aspect and is scaled just enough to cover (int(256/224 * H),
    int(256/224 * W)), then the centre H x W is cropped; without ``TEST.CROP`` a resize straight to (H, W)."""
    h, w = img_size_hw(config)
    interpolation = EVAL_INTERPOLATION[config.DATA.INTERPOLATION]
    if config.TEST.CROP and h == w:
        return [transforms.Resize(int((256 / 224) * h), interpolation=interpolation), transforms.CenterCrop(h)]
    if config.TEST.CROP:
        return [ResizeKeepRatio(eval_scale_size(h, w), interpolation=interpolation.value),
                transforms.CenterCrop((h, w))]
    return [transforms.Resize((h, w), interpolation=interpolation)]


def build_transform(is_train: bool, config: Any) -> Callable:
    """The training augmentation (timm) or the deterministic eval transform for ``config``.

    Train: RandomResizedCrop + flip + RandAugment + random erasing through timm's ``create_transform``; for
    ``DATA.IMG_SIZE <= 32`` the crop is a padded RandomCrop (CIFAR style) as in the official code, for images of
    that size; others are resized as in the evaluation first (``RandomCrop`` here).
    Eval: with ``TEST.CROP`` resize the short side to int(256 / 224 * size) and center-crop, else resize
    straight to (size, size); then ImageNet mean/std normalisation. Each split logs the geometry it uses.
    """
    h, w = img_size_hw(config)
    size, name = img_size_arg(config), f"{h}x{w}" if h != w else str(h)
    channels = model_in_chans(config)
    mean, std = mean_std(config)
    resize = eval_resize(config)
    if config.TEST.CROP and h == w:
        geometry = f"short side to {int((256 / 224) * h)} px, center crop {h}"
    elif config.TEST.CROP:
        sh, sw = eval_scale_size(h, w)
        geometry = f"keep the aspect and cover {sh}x{sw} px, center crop {h}x{w}"
    else:
        geometry = f"resize to {h}x{w}"
    tensors = channels not in PIL_CHANNELS
    if is_train:
        transform = create_transform(**train_transform_kwargs(config))
        if max(h, w) <= 32:
            transform.transforms[0] = RandomCrop(size, resize[0])
            _LOG.info(f"train transform: DATA.IMG_SIZE {name} <= 32: images of {h}x{w} px get the official "
                      f"padded RandomCrop({size}, padding=4); images of other sizes are first resized as in "
                      f"evaluation ({geometry.split(',')[0]}), then cropped so")
        else:
            _LOG.info(f"train transform: RandomResizedCrop to {h}x{w} (height x width; scale "
                      f"{tuple(config.AUG.RRC_SCALE)})")
        if tensors:  # timm's crop, flip, MaybeToTensor (a no-op), Normalize and erasing all take tensors
            transform.transforms.insert(0, ToFloatTensor())
            _LOG.info(f"train transform: {channels} channels: float tensors, geometric augmentation only")
        fix_posterize(transform)
        return transform
    _LOG.info(f"eval transform: {geometry}; {channels} channels, mean {mean}, std {std}")
    if tensors:
        return transforms.Compose([ToFloatTensor()] + resize + [transforms.Normalize(mean, std)])
    return transforms.Compose(resize + [transforms.ToTensor(), transforms.Normalize(mean, std)])


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


# ----------------------------------------------------------------------------- config -> timm's pieces (fast, gpu)

def timm_train_pieces(config: Any) -> Tuple[RandomResizedCropAndInterpolation, Optional[Any], Any,
                                            Optional[RandomErasing]]:
    """(random-resized crop, flip, secondary transform (RandAugment / AutoAugment / ColorJitter), erasing) built by
    timm's ``create_transform`` from the same arguments as ``build_transform``, so both paths parse the
    config alike."""
    primary, secondary, final = create_transform(separate=True, **train_transform_kwargs(config))
    crop = next(t for t in primary.transforms if isinstance(t, RandomResizedCropAndInterpolation))
    flip = next((t for t in primary.transforms if type(t).__name__ == 'RandomHorizontalFlip'), None)
    eraser = next((t for t in final.transforms if isinstance(t, RandomErasing)), None)
    fix_posterize(secondary)
    return crop, flip, secondary, eraser


def check_fast_config(config: Any) -> None:
    """Settings the fast/gpu loaders cannot honour: a clear error naming the keys."""
    if max(img_size_hw(config)) <= 32:
        loader = 'fast' if config.DATA.LOADER == 'auto' else config.DATA.LOADER  # auto tries fast (data.build)
        raise ConfigError(f"DATA.LOADER {loader!r} needs DATA.IMG_SIZE > 32 (small images use a padded "
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


def eval_geometry(width: int, height: int, size: Any, crop: bool) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(resized (h, w), crop offset (top, left)) of the eval transform (``eval_resize``) on an image of
    ``width`` x ``height``, for ``size`` an int (a square) or (H, W). Square: torchvision's Resize(int(256/224 *
    size)) short side (the long side truncated as torchvision does) and CenterCrop(size). [H, W]: timm's
    ``ResizeKeepRatio`` to cover (int(256/224 * H), int(256/224 * W)) (the smaller ratio, sides rounded), then
    torchvision's CenterCrop((H, W)). Without ``crop``: a resize straight to the size, no offset."""
    out_h, out_w = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
    if not crop:
        return (out_h, out_w), (0, 0)
    if out_h == out_w:
        short = int((256 / 224) * out_h)
        if width <= height:
            rh, rw = int(short * height / width), short
        else:
            rh, rw = short, int(short * width / height)
    else:
        cover_h, cover_w = eval_scale_size(out_h, out_w)
        ratio = min(height / cover_h, width / cover_w)  # ResizeKeepRatio.get_params with longest=0
        rh, rw = round(height / ratio), round(width / ratio)
    return (rh, rw), (int(round((rh - out_h) / 2.0)), int(round((rw - out_w) / 2.0)))
