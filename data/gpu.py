"""``DATA.LOADER gpu``: decoding and augmentation on the training device, fed by the torch loader's own sampler.

DataLoader workers read each file's bytes and draw all of the sample's random parameters under its ``SampleKey``
(``seeded_rngs``) with timm's own code: the random-resized crop (``get_params`` on the size from the JPEG header),
the flip, RandAugment's op choice and magnitudes (timm's ``RandAugment`` run on a recorder instead of an image),
and the erasing boxes and noise. The collate turns the batch's plans into tensors for the device (``BatchPlan``,
one ``PackedTensors`` copy): the crop-resize as per-output taps (``compile_resize``) and RandAugment as layers --
every sample's first op, then its second -- whose samples are sorted by kind of op (``compile_augment``): the
per-pixel ops as lookup tables, autocontrast and equalize as lookup tables made on the device from each image's
histogram, colour, contrast and sharpness as blends, the affine ops as one ``grid_sample`` with a grid per sample.
``on_device`` decodes with ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA, one batched call, on a stream of its
own: ``decode_batch``) and runs the plan with a fixed number of kernels per batch (about 130 for a training batch
with RandAugment and erasing, 13 for eval, whatever the batch size; no loop over samples on the device) and no
blocking copy, then normalises and erases (``data.device_batch.DeviceFinish``).

The same code runs with ``device='cpu'`` (the tests, CPU training), so CI exercises what runs on the GPU, except
the crop-resize, which runs per image on the CPU (``resize_per_sample``: torchvision's uint8 kernels are several
times faster there, and a CPU has no kernel launches to save); the tests run the batched one on the CPU too and
compare. Each op's arithmetic is torchvision's (the batched kernels give the per-image ones' pixels; see the
functions). What is sampled (which images, in which order, per rank and epoch) is the torch loader's sampler
itself; the augmentation of a sample is a pure function of (SEED, epoch, index) as on the other loaders, though
not bit-identical to theirs (nvJPEG/torch kernels instead of Pillow's, bilinear/bicubic affine through
``grid_sample``).

Non-JPEG files, CMYK JPEGs and JPEGs without an end marker (truncated) are decoded by Pillow in the worker (a
damaged one then takes the broken-image path there) and travel as uint8 pixels.

Channels (``MODEL.SWIN(V2).IN_CHANS``): 3 (RGB); 1 (grey: JPEGs decoded by nvJPEG / libjpeg to their luma, other
files by Pillow as 'L' in the worker); 2, 4 and any count from ``.npy`` arrays decoded in the worker by
``data.datasets.decode_image`` and sent as (C, H, W) pixels. RandAugment and ColorJitter are RGB only here
(``validate_config`` refuses them for other counts); the crop, flip and erasing run for every count.
``DATA.IMG_SIZE`` [H, W]: the crop-resize goes to H x W, the eval geometry is the torch loader's
(``data.transforms.eval_geometry``).

Layer: a loader, over ``data.datasets``, ``data.transforms`` and ``data.device_batch`` (not over ``data.fast``).
"""
from __future__ import annotations

import copy
import functools
import io
import logging
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from config import ConfigError, img_size_hw, mean_std, model_in_chans

from .datasets import DECODE_ERRORS, decode_image, is_jpeg, read_bytes
from .device_batch import DeviceBatch, DeviceFinish, PackedTensors, erase_params, pair, stack_targets
from .transforms import (EVAL_INTERPOLATION, GEOMETRIC_OPS, affine_matrix, augment_ops, check_fast_config,
                         eval_geometry, posterize_allowing_zero_bits, rrc_interpolation, size_only,
                         timm_train_pieces)

logger = logging.getLogger(__name__)

_PIL_TO_MODE = {Image.NEAREST: 'nearest', Image.BILINEAR: 'bilinear', Image.BICUBIC: 'bicubic'}
_INTERPOLATIONS = (InterpolationMode.NEAREST, InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
# timm's aug_fn names -> the ops below (the zero-bit-safe posterize of data.transforms counts as posterize)
_OP_ALIASES = {posterize_allowing_zero_bits.__name__: 'posterize'}


# ----------------------------------------------------------------------------- worker side: read and draw

def encoded_or_pixels(data: bytes, channels: int = 3) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(payload, (w, h)): the raw bytes as a 1-D uint8 tensor for a JPEG that nvJPEG / libjpeg decode as RGB (or
    grey, for 1 channel), else the image decoded here by ``decode_image`` as (C, H, W) uint8 (raises a
    DECODE_ERRORS exception when it is damaged)."""
    if channels in JPEG_MODES and is_jpeg(data) and data.rstrip(b'\x00')[-2:] == b'\xff\xd9':
        with Image.open(io.BytesIO(data)) as img:  # header only
            if img.format == 'JPEG' and img.mode in ('RGB', 'L'):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), img.size
    return decoded_pixels(data, channels)


def decoded_pixels(data: bytes, channels: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """``decode_image``'s image as (C, H, W) uint8 and its (w, h)."""
    # RGB keeps its call of before, decode_image(data): channels 3 is that function's default
    array = np.array(decode_image(data) if channels == 3 else decode_image(data, channels))
    array = array if array.ndim == 3 else array[:, :, None]  # grey (H, W) -> (H, W, 1)
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (C, H, W)
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
        self.height, self.width = img_size_hw(config)
        self.channels = model_in_chans(config)
        self.crop, self.flip, secondary, self.eraser = timm_train_pieces(config)
        self.recorder = plan_recorder(secondary)
        if self.recorder is not None and self.channels != 3:  # validate_config refuses this first
            raise ConfigError(f"DATA.LOADER 'gpu' runs RandAugment on RGB images only; the model takes "
                              f"{self.channels} channels: set AUG.AUTO_AUGMENT none")

    def decode(self, source: Any) -> Tuple[torch.Tensor, Tuple[int, int]]:
        return encoded_or_pixels(read_bytes(source), self.channels)

    def __call__(self, decoded: Tuple[torch.Tensor, Tuple[int, int]]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        payload, (w, h) = decoded
        box = self.crop.get_params(size_only(w, h), self.crop.scale, self.crop.ratio)
        interpolation = rrc_interpolation(self.crop)
        flip = self.flip is not None and bool(torch.rand(1) < self.flip.p)  # RandomHorizontalFlip's draw
        ops = self.recorder([]) if self.recorder is not None else []
        plan = {'size': (w, h), 'crop': box, 'interpolation': _INTERPOLATIONS.index(interpolation), 'flip': flip, 'ops': ops,
                'erase': erase_params(self.eraser, self.height, self.width)}
        return payload, plan


class GpuEvalTransform:
    """Encoded bytes -> (payload, plan) of the deterministic eval transform (``data.transforms.eval_geometry``, as
    ``data.fast``)."""

    takes_encoded = True

    def __init__(self, config: Any) -> None:
        check_fast_config(config)
        self.size = img_size_hw(config)
        self.channels = model_in_chans(config)
        self.crop = bool(config.TEST.CROP)
        self.interpolation = _INTERPOLATIONS.index(EVAL_INTERPOLATION[config.DATA.INTERPOLATION])

    def decode(self, source: Any) -> Tuple[torch.Tensor, Tuple[int, int]]:
        return encoded_or_pixels(read_bytes(source), self.channels)

    def __call__(self, decoded: Tuple[torch.Tensor, Tuple[int, int]]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        payload, (w, h) = decoded
        return payload, {'size': (w, h), 'eval': eval_geometry(w, h, self.size, self.crop),
                         'interpolation': self.interpolation}


# ----------------------------------------------------------------------------- RandAugment's ops on the device
# Each op has one batched version; a batch runs its samples' n-th ops together ("a layer"), sorted by kind so
# that every kind is a slice. The per-image entry points (TENSOR_OPS, apply_op) run these on a batch of one.

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


# Per-pixel ops (torchvision's uint8 kernels): run once on the 256 levels in the worker they give a lookup table,
# which the device applies to every pixel (one gather for all of a layer's table ops).
POINTWISE_OPS: Dict[str, Callable[..., torch.Tensor]] = {
    'invert': lambda x: F2.invert(x),
    'solarize': _solarize,
    'solarize_add': _solarize_add,
    'posterize': _posterize,
    'brightness': lambda x, f: F2.adjust_brightness(x, f),
}
HISTOGRAM_OPS = ('auto_contrast', 'equalize')  # lookup tables made on the device from each image's histogram
BLEND_OPS = ('color', 'contrast', 'sharpness')  # torchvision's blends with a grey image, its mean, a blur
WARP_MODES = ('bilinear', 'bicubic', 'nearest')  # the affine ops: one grid_sample per interpolation
# A layer's kinds in the order it runs them (its samples are sorted by kind); 'none': no op in this layer.
KINDS = ('pointwise',) + HISTOGRAM_OPS + BLEND_OPS + tuple(f'warp_{m}' for m in WARP_MODES) + ('none',)
Op = Tuple[str, Tuple[float, ...], Optional[str], Tuple[int, ...]]  # (name, level args, interpolation, fill)
_LEVELS = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).repeat(3, 1, 1)  # (3, 1, 256): every uint8 value


def op_kind(op: Optional[Op]) -> str:
    if op is None:
        return 'none'
    name, _, mode, _ = op
    if name in POINTWISE_OPS:
        return 'pointwise'
    if name in GEOMETRIC_OPS:
        return f"warp_{mode or 'bicubic'}"
    return name


def apply_luts(x: torch.Tensor, tables: torch.Tensor, indices: torch.Tensor) -> None:
    """x (G, 3, H, W) uint8 (contiguous), in place: each pixel through its image's and channel's lookup table;
    ``tables`` (G, 3, 256) uint8, ``indices`` (G, 3, H, W) int32 each pixel's index into them (``lut_indices``)."""
    torch.index_select(tables.view(-1), 0, indices.view(-1), out=x.view(-1))


def lut_indices(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(G, 3, H, W) int32: each pixel of x (G, 3, H, W) uint8 plus its table's offset (G, 3, 1, 1) ((g * 3 + c) *
    256) in a flat (G, 3, 256) table (int32: a third of int64 indices' time on the CPU, measured)."""
    return x.to(torch.int32).add_(offsets)


def histogram_luts(indices: torch.Tensor, tables: torch.Tensor, first: int, n_autocontrast: int,
                   t: Dict[str, torch.Tensor]) -> None:
    """Rows ``first..first + G'`` of ``tables`` (G, 3, 256) uint8: torchvision's autocontrast (``n_autocontrast``
    rows) then equalize, from the per-channel histograms of the images whose ``lut_indices`` are ``indices``
    (G', 3, H, W);
    ``t`` the batch's tensors (``levels`` 0..255 float, ``one`` 1 int64).

    Same arithmetic as torchvision's kernels (its autocontrast's boolean-mask assignment, a host sync on CUDA,
    becomes a ``where``); the value range comes from the cumulative histogram."""
    n, levels, out = indices[0, 0].numel(), t['levels'], tables[first:first + len(indices)]
    hist = torch.zeros(tables.numel(), dtype=torch.int64, device=tables.device)
    hist.index_add_(0, indices.view(-1), t['one'].expand(indices.numel()))
    hist = hist.view(tables.shape)[first:first + len(indices)]  # (G', 3, 256) pixel counts
    cum = hist.cumsum(2)
    top = cum.argmax(2, keepdim=True)  # the largest value present: the first bin that reaches the pixel count
    if n_autocontrast:
        low = (cum[:n_autocontrast] == 0).sum(2, keepdim=True)  # the smallest value present
        span = top[:n_autocontrast] - low
        lut = (levels - low) / (span * (1.0 / 255))  # (v - min) / inv_scale, float32 as torchvision's
        out[:n_autocontrast].copy_(torch.where(span == 0, levels, lut.clamp_(0, 255)))  # one value: unchanged
    if n_autocontrast < len(out):  # PIL's equalize, as torchvision computes it
        hist, cum, top = hist[n_autocontrast:], cum[n_autocontrast:], top[n_autocontrast:]
        step = (n - hist.gather(2, top)).div_(255, rounding_mode='floor')  # non-maximum pixels // 255
        lut = (cum - hist).add_(step.div(2, rounding_mode='floor')).div_(step.clamp(min=1), rounding_mode='floor')
        out[n_autocontrast:].copy_(torch.where(step > 0, lut.clamp_(0, 255), levels))  # step 0: unchanged


def blend(x: torch.Tensor, ratio: torch.Tensor, one_minus: torch.Tensor, n_color: int, n_contrast: int,
          t: Dict[str, torch.Tensor]) -> None:
    """x (G, 3, H, W) uint8, in place: torchvision's adjust_saturation (the first n_color images), adjust_contrast
    (the next n_contrast) and adjust_sharpness (the rest), each image with its own factor (``ratio`` (G,) and
    ``1 - ratio`` (G,) float32, computed in double on the host as torchvision's Python scalars are); ``t`` the
    batch's tensors (``sharpness_kernel``)."""
    xf = x.float()  # (G, 3, H, W)
    r, s = ratio.view(-1, 1, 1, 1), one_minus.view(-1, 1, 1, 1)
    n_grey = n_color + n_contrast
    if n_grey:
        red, green, blue = xf[:n_grey].unbind(1)
        grey = red.mul(0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).floor_()[:, None]  # (G', 1, H, W)
        if n_contrast:
            grey[n_color:] = grey[n_color:].mean((1, 2, 3), keepdim=True)
        xf[:n_grey].mul_(r[:n_grey]).addcmul_(grey, s[:n_grey])  # image * f + degenerate * (1 - f)
    if n_grey < len(xf):
        sharp = xf[n_grey:]
        inner = sharp[..., 1:-1, 1:-1]  # torchvision keeps the border pixels
        # torchvision's kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 with the division after the convolution:
        # integer sums are exact even in TF32 (cudnn), and k / 13 is never within 1/26 of a rounding boundary
        g, _, h, w = sharp.shape  # images folded into channels: batched depthwise convolutions measured 8x slower
        blurred = F.conv2d(sharp.view(1, 3 * g, h, w), t['sharpness_kernel'].expand(3 * g, 1, 3, 3), groups=3 * g)
        blurred = blurred.view(g, 3, h - 2, w - 2).div_(13).round_()
        inner.addcmul_(blurred.sub_(inner), s[n_grey:])  # image + (1 - f) * (blurred - image)
    x.copy_(xf.clamp_(0, 255))  # truncating, as torchvision's .to(uint8)


def affine_grid_lines(ops: Sequence[Op], height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``grid_sample`` grids of the ops' Pillow AFFINE transforms (output -> input, pixel centres) on images of
    (height, width), as the two terms of grid[n, y, x, i] = across[n, i, x] + down[n, i, y]: ``across`` (N, 2, W),
    ``down`` (N, 2, H) float32, made in float64 here.

    What ``affine_grid`` computes (u = 2 x / W - 1, align_corners=False), without its batched matmul: that one
    runs in TF32 on CUDA when TF32 is on (the default here), which places the samples up to ~0.1 px off."""
    xs = (2 * np.arange(width) + 1) / width - 1  # pixel centres, normalised
    ys = (2 * np.arange(height) + 1) / height - 1
    across, down = [], []
    for name, args, _, _ in ops:
        a, b, c, d, e, f = affine_matrix(name, args[0], (width, height))
        theta = np.array([[a, b * height / width, a + b * height / width + 2 * c / width - 1],
                          [d * width / height, e, d * width / height + e + 2 * f / height - 1]])
        across.append(theta[:, :1] * xs)
        down.append(theta[:, 1:2] * ys + theta[:, 2:])
    return (torch.from_numpy(np.array(across, dtype=np.float32)).view(-1, 2, width),
            torch.from_numpy(np.array(down, dtype=np.float32)).view(-1, 2, height))


def warp(x: torch.Tensor, across: torch.Tensor, down: torch.Tensor, fill: torch.Tensor,
         modes: Sequence[Tuple[str, int]]) -> None:
    """x (G, 3, H, W) uint8, in place: each image through its affine transform (``affine_grid_lines``) with
    ``grid_sample``, the fill colour (G, 3) outside (sampling x - fill with zero padding and adding fill back),
    ``modes`` the interpolation of consecutive runs of images as (mode, count)."""
    g, _, h, w = x.shape
    fill = fill.view(-1, 3, 1, 1)
    xf = x.float().sub_(fill)
    grid = torch.empty((g, h, w, 2), device=x.device)
    for i in range(2):
        torch.add(across[:, i, None, :], down[:, i, :, None], out=grid[..., i])
    outs, start = [], 0
    for mode, count in modes:
        outs.append(F.grid_sample(xf[start:start + count], grid[start:start + count], mode=mode,
                                  padding_mode='zeros', align_corners=False))
        start += count
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    x.copy_(out.add_(fill).round_().clamp_(0, 255))


class AugmentLayer:
    """One layer of a batch's RandAugment: every sample's n-th op (``index`` n), the samples sorted by kind
    (``KINDS``); ``counts`` per kind, known on the host."""

    def __init__(self, index: int, counts: Sequence[int]) -> None:
        self.index, self.counts = index, tuple(counts)

    def span(self, first: str, last: str) -> Tuple[int, int]:
        """Positions [start, stop) of the kinds first..last (in KINDS order) in the layer's order."""
        i, j = KINDS.index(first), KINDS.index(last)
        start = sum(self.counts[:i])
        return start, start + sum(self.counts[i:j + 1])

    def count(self, kind: str) -> int:
        return self.counts[KINDS.index(kind)]

    def run(self, x: torch.Tensor, t: Dict[str, torch.Tensor]) -> None:
        """x (B, 3, S, S) uint8 in this layer's order, in place; ``t`` the batch's tensors on x's device. On the
        CPU a few images at a time (``CPU_CHUNK``: the pixels stay in the cache through each kernel's passes, 1.2x
        faster than whole groups there; the same pixels), elsewhere all at once (one launch per kernel)."""
        chunk = CPU_CHUNK if x.device.type == 'cpu' else len(x)
        for start in range(0, len(x), max(chunk, 1)):
            self.run_part(x, t, start, min(start + chunk, len(x)))

    def run_part(self, x: torch.Tensor, t: Dict[str, torch.Tensor], start: int, stop: int) -> None:
        """The kernels for positions [start, stop) of the layer's order."""
        name = f'layer{self.index}.'

        def part(first: str, last: str) -> Tuple[int, int, int]:
            """[a, b): the positions of kinds first..last in [start, stop); and where those kinds begin."""
            begin, end = self.span(first, last)
            return max(start, begin), min(stop, end), begin

        def overlap(kind: str, a: int, b: int) -> int:
            begin, end = self.span(kind, kind)
            return max(0, min(b, end) - max(a, begin))

        a, b, begin = part('pointwise', 'equalize')
        if b > a:
            tables = t[name + 'lut']  # (n, 3, 256): the pointwise rows made in the worker, the histogram ones here
            indices = lut_indices(x[a:b], t[name + 'lut_offset'][a - begin:b - begin])
            first = max(a, begin + self.count('pointwise'))  # the first image with a histogram op
            if b > first:
                histogram_luts(indices[first - a:], tables, first - begin, overlap('auto_contrast', first, b), t)
            apply_luts(x[a:b], tables, indices)
        a, b, begin = part('color', 'sharpness')
        if b > a:
            blend(x[a:b], t[name + 'ratio'][a - begin:b - begin], t[name + 'one_minus'][a - begin:b - begin],
                  overlap('color', a, b), overlap('contrast', a, b), t)
        a, b, begin = part('warp_bilinear', 'warp_nearest')
        if b > a:
            modes = [(m, overlap(f'warp_{m}', a, b)) for m in WARP_MODES if overlap(f'warp_{m}', a, b)]
            warp(x[a:b], t[name + 'across'][a - begin:b - begin], t[name + 'down'][a - begin:b - begin],
                 t[name + 'fill'][a - begin:b - begin], modes)


CPU_CHUNK = 4  # images per kernel call on the CPU (AugmentLayer.run)


def compile_augment(ops: Sequence[Sequence[Op]], height: int, width: int
                    ) -> Tuple[List[AugmentLayer], Dict[str, torch.Tensor], List[int]]:
    """The layers of a batch's recorded ops (per sample, in order), the tensors they read (pointwise lookup
    tables, blend factors, affine matrices and fills, the gathers from one layer's order to the next and back to
    the batch's), and the first layer's order of the samples (the order the resize writes them in)."""
    ops = [[op for op in sample if not (op[0] == 'rotate' and op[1][0] % 360 == 0)] for sample in ops]
    n, depth = len(ops), max((len(sample) for sample in ops), default=0)
    kernel = torch.ones((1, 1, 3, 3))
    kernel[:, :, 1, 1] = 5
    tensors = {'levels': torch.arange(256, dtype=torch.float32), 'one': torch.ones(1, dtype=torch.int64),
               'sharpness_kernel': kernel}
    layers: List[AugmentLayer] = []
    order = first_order = list(range(n))
    for index in range(depth):
        at = [sample[index] if index < len(sample) else None for sample in ops]
        kinds = [KINDS.index(op_kind(op)) for op in at]
        previous, order = order, sorted(range(n), key=lambda b: (kinds[b], b))
        layer = AugmentLayer(index, [kinds.count(k) for k in range(len(KINDS))])
        name, in_order = f'layer{index}.', [at[b] for b in order]
        start, stop = layer.span('pointwise', 'equalize')
        luts = torch.zeros((stop - start, 3, 256), dtype=torch.uint8)
        for k in range(layer.count('pointwise')):
            op_name, args, _, _ = in_order[k]
            luts[k] = POINTWISE_OPS[op_name](_LEVELS, *args).view(3, 256)
        tensors[name + 'lut'] = luts
        tensors[name + 'lut_offset'] = (torch.arange(3 * len(luts), dtype=torch.int32) * 256).view(-1, 3, 1, 1)
        start, stop = layer.span('color', 'sharpness')
        factors = [in_order[k][1][0] for k in range(start, stop)]
        tensors[name + 'ratio'] = torch.tensor(factors, dtype=torch.float32)
        tensors[name + 'one_minus'] = torch.tensor([1.0 - f for f in factors], dtype=torch.float32)
        start, stop = layer.span('warp_bilinear', 'warp_nearest')
        tensors[name + 'across'], tensors[name + 'down'] = affine_grid_lines(in_order[start:stop], height, width)
        tensors[name + 'fill'] = torch.tensor([op[3] for op in in_order[start:stop]], dtype=torch.float32).view(-1, 3)
        if index:
            where = {b: k for k, b in enumerate(previous)}
            tensors[name + 'gather'] = torch.tensor([where[b] for b in order], dtype=torch.int64)
        layers.append(layer)
        if not index:
            first_order = order
    if layers:
        where = {b: k for k, b in enumerate(order)}
        tensors['augment.restore'] = torch.tensor([where[b] for b in range(n)], dtype=torch.int64)
    return layers, tensors, first_order


def augment(x: torch.Tensor, layers: Sequence[AugmentLayer], t: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The layers on x (B, 3, S, S) uint8 in the first layer's order -> the batch in its own order."""
    for layer in layers:
        if layer.index:
            x = x.index_select(0, t[f'layer{layer.index}.gather'])
        layer.run(x, t)
    return x.index_select(0, t['augment.restore']) if layers else x


def apply_op(x: torch.Tensor, op: Op) -> torch.Tensor:
    """One recorded op on one (3, H, W) uint8 image, through the batched kernels (a batch of one)."""
    layers, tensors, _ = compile_augment([[op]], x.shape[1], x.shape[2])
    return augment(x[None].clone(memory_format=torch.contiguous_format), layers, PackedTensors(tensors).to(x.device))[0]


def _one_image_op(name: str) -> Callable[..., torch.Tensor]:
    def op(x: torch.Tensor, *args: float) -> torch.Tensor:
        return apply_op(x, (name, tuple(float(a) for a in args), None, (128, 128, 128)))
    op.__name__ = name
    return op


# op name -> f(image (3, H, W) uint8, *level args): the ops the gpu loader runs, one image at a time
TENSOR_OPS = {name: _one_image_op(name) for name in (*POINTWISE_OPS, *HISTOGRAM_OPS, *BLEND_OPS, *GEOMETRIC_OPS)}


# ----------------------------------------------------------------------------- the crop-resize

def resize_taps(in_size: np.ndarray, out_size: np.ndarray, first: np.ndarray, count: int, modes: np.ndarray
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torchvision's resize (``antialias=True``) of lines of ``in_size`` pixels to ``out_size``, outputs
    ``first .. first + count - 1``, per line (n,): ``(start (n, count), length (n, count), weights (n, count, K))``
    of each output's input window, zero past its length. ``modes``: indices into ``_INTERPOLATIONS``; bilinear and
    bicubic are PIL's antialiased filters (torch's ``_upsample_*_aa`` kernels, float32 as on CUDA), nearest is
    torch's legacy nearest. Lines are computed once per process (``line_taps``: crops repeat their sizes)."""
    lines = [line_taps(int(i), int(o), int(f), count, int(m)) for i, o, f, m in zip(in_size, out_size, first, modes)]
    k = max((w.shape[1] for _, _, w in lines), default=1)
    start = np.zeros((len(lines), count), dtype=np.int64)
    length = np.ones((len(lines), count), dtype=np.int64)
    weights = np.zeros((len(lines), count, k), dtype=np.float32)
    for n, (s, l, w) in enumerate(lines):
        start[n], length[n], weights[n, :, :w.shape[1]] = s, l, w
    return start, length, weights


@functools.lru_cache(maxsize=2048)  # a line's taps: 224 x ~10 float32, ~12 KiB
def line_taps(in_size: int, out_size: int, first: int, count: int, mode: int
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``resize_taps`` of one line, (start (count,), length (count,), weights (count, K))."""
    in_size, out_size, first, modes = (np.array([v]) for v in (in_size, out_size, first, mode))
    in_f, out_f = in_size.astype(np.float32), out_size.astype(np.float32)
    o = first[:, None].astype(np.float32) + np.arange(count, dtype=np.float32)  # (n, count) output indices
    scale = in_f / out_f
    cubic = modes == _INTERPOLATIONS.index(InterpolationMode.BICUBIC)
    support = (np.maximum(scale, 1) * np.where(cubic, 2, 1)).astype(np.float32)[:, None]  # filter half-width
    center = scale[:, None] * (o + np.float32(0.5))
    start = np.maximum((center - support + np.float32(0.5)).astype(np.int64), 0)
    length = np.maximum(np.minimum((center + support + np.float32(0.5)).astype(np.int64), in_size[:, None]) - start, 1)
    taps = np.arange(length.max(initial=1), dtype=np.float32)
    x = taps + (start.astype(np.float32) - center + np.float32(0.5))[..., None]  # (n, count, K) filter arguments
    x *= (1 / np.maximum(scale, 1)).astype(np.float32)[:, None, None]
    np.abs(x, out=x)
    weights = np.zeros_like(x)
    if cubic.any():  # PIL's bicubic, a = -0.5
        xc = x[cubic]
        weights[cubic] = np.where(xc < 1, (1.5 * xc - 2.5) * xc * xc + 1,
                                  np.where(xc < 2, ((-0.5 * xc + 2.5) * xc - 4) * xc + 2, 0))
    if not cubic.all():
        weights[~cubic] = np.maximum(1 - x[~cubic], 0)
    weights *= taps < length[..., None]
    total = weights.sum(-1, keepdims=True)
    weights /= np.where(total == 0, 1, total)
    nearest = modes == _INTERPOLATIONS.index(InterpolationMode.NEAREST)
    if nearest.any():  # torch's nearest_idx: floor(o * (float) in / out), exact when the sizes match or double
        o_int = o.astype(np.int64)
        src = np.minimum(np.floor(o * scale[:, None]).astype(np.int64), in_size[:, None] - 1)
        src = np.where((in_size == out_size)[:, None], o_int, np.where((out_size == 2 * in_size)[:, None], o_int >> 1,
                                                                        src))
        start[nearest], length[nearest] = src[nearest], 1
        weights[nearest] = 0
        weights[nearest, :, 0] = 1
    return start[0], length[0], weights[0, :, :int(length.max())]


class ResizeChunk:
    """Samples whose crops are resized together on the device (their rows padded to ``width`` pixels); its
    tensors are named ``resize{index}.*``."""

    def __init__(self, index: int, count: int, width: int, identity: bool) -> None:
        self.index, self.count, self.width, self.identity = index, count, width, identity


RESIZE_BUDGET = 2 ** 27  # elements of a chunk's largest buffer (float32: 512 MiB); more starts another chunk


def compile_resize(plans: Sequence[Dict[str, Any]], order: Sequence[int], size: Any, channels: int = 3
                   ) -> Tuple[List[ResizeChunk], Dict[str, torch.Tensor]]:
    """The batched crop-resize of ``plans`` (train: crop, flip; eval: resize and center crop) into (B, C, H, W)
    at positions in ``order``, from the decoded (C, h, w) images concatenated flat in batch order; ``size`` an
    int (a square) or (H, W).

    Separable, vertical pass first: ``index_select`` gathers each crop's rows (the C channels side by side,
    padded to the chunk's widest crop) from a sliding-window view of the flat images; an ``embedding_bag`` (a
    weighted sum of taps, float32, no TF32) resizes the columns, a transpose turns the rows into columns and a
    second ``embedding_bag`` resizes those. Flips are reversed horizontal taps."""
    n, c = len(order), channels
    out_h, out_w = pair(size)
    geometry = [plans[b] for b in order]
    wh = np.array([plan['size'] for plan in geometry], dtype=np.int64).reshape(n, 2)  # (n, 2) image (w, h)
    modes = np.array([plan['interpolation'] for plan in geometry], dtype=np.int64)
    if n and 'eval' in geometry[0]:
        rh, rw = np.array([plan['eval'][0] for plan in geometry]).T
        top, left = np.array([plan['eval'][1] for plan in geometry]).T
        v_in, v_out, v_first, v_offset = wh[:, 1], rh, top, np.zeros(n, np.int64)
        h_in, h_out, h_first, h_offset = wh[:, 0], rw, left, np.zeros(n, np.int64)
        flip = np.zeros(n, bool)
    else:
        i, j, h, w = np.array([plan['crop'] for plan in geometry], dtype=np.int64).reshape(n, 4).T
        v_in, v_out, v_first, v_offset = h, np.full(n, out_h), np.zeros(n, np.int64), i
        h_in, h_out, h_first, h_offset = w, np.full(n, out_w), np.zeros(n, np.int64), j
        flip = np.array([plan['flip'] for plan in geometry], dtype=bool)
    v_start, v_len, v_w = resize_taps(v_in, v_out, v_first, out_h, modes)  # in crop coordinates
    h_start, h_len, h_w = resize_taps(h_in, h_out, h_first, out_w, modes)
    h_start, h_len, h_w = (np.where(flip[:, None], a[:, ::-1], a) if a.ndim == 2 else
                           np.where(flip[:, None, None], a[:, ::-1], a) for a in (h_start, h_len, h_w))
    y_lo, y_hi = v_offset + v_start.min(1, initial=0), v_offset + (v_start + v_len).max(1, initial=0)
    x_lo, x_hi = h_offset + h_start.min(1, initial=0), h_offset + (h_start + h_len).max(1, initial=0)
    sizes = np.array([plan['size'] for plan in plans], dtype=np.int64).reshape(len(plans), 2)
    flat_offset = np.concatenate([[0], np.cumsum(c * sizes[:, 0] * sizes[:, 1])])[np.asarray(order, np.int64)]

    chunks: List[ResizeChunk] = []
    tensors: Dict[str, torch.Tensor] = {'resize.zeros': torch.zeros(int((x_hi - x_lo).max(initial=1)),
                                                                    dtype=torch.uint8)}
    by_width = sorted(range(n), key=lambda k: -(x_hi[k] - x_lo[k]))
    while by_width:
        width, members, rows = int(x_hi[by_width[0]] - x_lo[by_width[0]]), [], 0
        while by_width and (not members or max(c * (rows + y_hi[by_width[0]] - y_lo[by_width[0]]),
                                                c * max(out_h, out_w) * (len(members) + 1)) * width
                            <= RESIZE_BUDGET):
            k = by_width.pop(0)
            members.append(k)
            rows += int(y_hi[k] - y_lo[k])
        m = np.array(sorted(members), dtype=np.int64)  # in output order: one chunk writes the batch as it is
        # the gathered rows, (sample, y, channel): the flat start of row y of that channel at the crop's left edge
        rows_of = y_hi[m] - y_lo[m]
        base = np.concatenate([[0], np.cumsum(rows_of)[:-1]])  # each sample's first row (a row: C channels)
        sample = np.repeat(np.arange(len(m)), rows_of)
        y = y_lo[m][sample] + np.arange(len(sample)) - base[sample]
        w_img, h_img = wh[m][sample].T
        row_starts = (flat_offset[m][sample] + y * w_img + x_lo[m][sample])[:, None] + \
            np.arange(c) * (h_img * w_img)[:, None]  # (rows, C)
        base = base[:, None, None]
        taps = np.arange(v_w.shape[2])
        v_idx = np.minimum(base + (v_offset[m] - y_lo[m])[:, None, None] + v_start[m][..., None] + taps,
                           base + rows_of[:, None, None] - 1)
        taps = np.arange(h_w.shape[2])
        lane = (np.arange(len(m)) * width)[:, None, None]
        h_idx = np.minimum(lane + (h_offset[m] - x_lo[m])[:, None, None] + h_start[m][..., None] + taps,
                           lane + (x_hi[m] - x_lo[m])[:, None, None] - 1)
        name = f'resize{len(chunks)}.'
        tensors.update({name + 'rows': torch.from_numpy(row_starts.reshape(-1)),
                        name + 'v_idx': torch.from_numpy(v_idx.reshape(-1).astype(np.int32)),
                        name + 'v_w': torch.from_numpy(np.ascontiguousarray(v_w[m]).reshape(-1)),
                        name + 'v_off': torch.arange(0, v_idx.size, v_w.shape[2], dtype=torch.int32),
                        name + 'h_idx': torch.from_numpy(h_idx.reshape(-1).astype(np.int32)),
                        name + 'h_w': torch.from_numpy(np.ascontiguousarray(h_w[m]).reshape(-1)),
                        name + 'h_off': torch.arange(0, h_idx.size, h_w.shape[2], dtype=torch.int32),
                        name + 'positions': torch.from_numpy(m)})
        chunks.append(ResizeChunk(len(chunks), len(m), width, len(m) == n))  # one chunk: m is 0..n-1
    return chunks, tensors


def resize_batched(images: Sequence[torch.Tensor], chunks: Sequence[ResizeChunk], t: Dict[str, torch.Tensor],
                   out: torch.Tensor) -> None:
    """``compile_resize``'s plan on the decoded (C, h, w) uint8 images into out (B, C, H, W) uint8: a fixed
    number of kernels per chunk (one chunk unless the crops are huge), whatever the batch size."""
    c, out_h, out_w = out.shape[1:]
    flat = torch.cat([img.reshape(-1) for img in images] + [t['resize.zeros']])  # (N + widest crop,) uint8
    for chunk in chunks:
        name, n, width = f'resize{chunk.index}.', chunk.count, chunk.width
        rows = flat.unfold(0, width, 1).index_select(0, t[name + 'rows'])  # (n * rows * C, width) uint8
        table = rows.float().view(-1, c * width)  # a crop row: its C channels side by side
        v = F.embedding_bag(t[name + 'v_idx'], table, t[name + 'v_off'], mode='sum',
                            per_sample_weights=t[name + 'v_w'])  # (n * H, C * width): (sample, y) x (channel, x)
        table = v.view(n, out_h, c, width).permute(0, 3, 2, 1).contiguous().view(n * width, c * out_h)
        h = F.embedding_bag(t[name + 'h_idx'], table, t[name + 'h_off'], mode='sum',
                            per_sample_weights=t[name + 'h_w'])  # (n * W, C * H): (sample, x) x (channel, y)
        h = h.round_().clamp_(0, 255).view(n, out_w, c, out_h).permute(0, 2, 3, 1)  # (n, C, H, W)
        if chunk.identity:
            out.copy_(h)
        else:
            out.index_copy_(0, t[name + 'positions'], h.to(torch.uint8))


def resize_per_sample(images: Sequence[torch.Tensor], plans: Sequence[Dict[str, Any]], order: Sequence[int],
                      out: torch.Tensor) -> None:
    """The same crop-resize one image at a time with torchvision (uint8 kernels on the CPU, several times faster
    there than the batched float taps; the CPU has no kernel launches to save)."""
    out_h, out_w = out.shape[2:]
    for k, b in enumerate(order):
        img, plan = images[b], plans[b]
        interpolation = _INTERPOLATIONS[plan['interpolation']]
        if 'eval' in plan:
            (rh, rw), (top, left) = plan['eval']
            out[k] = F2.resize(img, [rh, rw], interpolation=interpolation, antialias=True)[:, top:top + out_h,
                                                                                          left:left + out_w]
        else:
            i, j, h, w = plan['crop']
            x = F2.resize(img[:, i:i + h, j:j + w], [out_h, out_w], interpolation=interpolation, antialias=True)
            out[k] = x.flip(-1) if plan['flip'] else x


# ----------------------------------------------------------------------------- decoding

# The channel counts whose JPEGs are decoded on the device: torchvision's read modes (grey: libjpeg's / nvJPEG's
# luma output); other counts (alpha, .npy) are decoded in the worker.
JPEG_MODES = {1: 'GRAY', 3: 'RGB'}


def _decode_jpegs(payloads: List[torch.Tensor], device: torch.device, channels: int = 3) -> List[torch.Tensor]:
    # Lazily: torchvision.io loads its image codecs (libjpeg, nvJPEG) on import, which only DATA.LOADER gpu needs.
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter('ignore')
        return decode_jpeg(payloads, mode=getattr(ImageReadMode, JPEG_MODES[channels]),
                           device=device if device.type == 'cuda' else 'cpu')


def _jpeg_decoder(channels: int) -> Callable[[List[torch.Tensor], torch.device], List[torch.Tensor]]:
    """``_decode_jpegs`` as (payloads, device) -> images for ``channels`` (RGB: the function itself, as the
    tests' stand-ins for nvJPEG replace it)."""
    return _decode_jpegs if channels == 3 else functools.partial(_decode_jpegs, channels=channels)


def _decode_one(payload: torch.Tensor, size: Tuple[int, int], device: torch.device, channels: int = 3
                ) -> torch.Tensor:
    """One JPEG the batched call rejected: alone on the device, else Pillow on the CPU (it reads some files
    nvJPEG does not), else a black image of the header's size with a warning, so that the run goes on as with
    unreadable files elsewhere (the worker already checked the header and the end marker)."""
    try:
        return _jpeg_decoder(channels)([payload], device)[0].to(device)
    except RuntimeError:
        pass
    try:
        pixels, _ = decoded_pixels(bytes(payload.numpy()), channels)
        return pixels.to(device, non_blocking=True)  # (C, H, W)
    except DECODE_ERRORS as exc:
        logger.warning("DATA.LOADER gpu: a JPEG of %dx%d px that passed the worker's checks cannot be decoded "
                       "(%s: %s); a black image takes its place", size[0], size[1], type(exc).__name__, exc)
        return torch.zeros((channels, size[1], size[0]), dtype=torch.uint8, device=device)


def _decode_on_current_stream(payloads: Sequence[torch.Tensor], device: torch.device,
                              sizes: Optional[Sequence[Tuple[int, int]]], channels: int = 3) -> List[torch.Tensor]:
    jpegs = [k for k, p in enumerate(payloads) if p.dim() == 1]
    out: List[Optional[torch.Tensor]] = [None] * len(payloads)
    if jpegs:
        try:
            decoded = _jpeg_decoder(channels)([payloads[k] for k in jpegs], device)
        except RuntimeError:
            decoded = [_decode_one(payloads[k], sizes[k] if sizes else (0, 0), device, channels) for k in jpegs]
        for k, img in zip(jpegs, decoded):
            out[k] = img.to(device, non_blocking=True)
    for k, p in enumerate(payloads):
        if out[k] is None:
            out[k] = p.to(device, non_blocking=True)
    return out  # type: ignore[return-value]


_DECODE_STREAMS: Dict[torch.device, Any] = {}


def has_cuda_streams() -> bool:
    """Whether there are CUDA streams to order (not on a CPU-only machine, nor under the tests' fake CUDA)."""
    return torch.cuda.is_available()


def decode_stream(device: torch.device) -> Optional[Any]:
    """The CUDA stream decoding runs on for ``device`` (one per device, made once), or None off CUDA."""
    if device.type != 'cuda' or not has_cuda_streams():
        return None
    device = torch.device('cuda', torch.cuda.current_device() if device.index is None else device.index)
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    return _DECODE_STREAMS[device]


def decode_batch(payloads: Sequence[torch.Tensor], device: torch.device,
                 sizes: Optional[Sequence[Tuple[int, int]]] = None, channels: int = 3) -> List[torch.Tensor]:
    """(C, H, W) uint8 images on ``device``: JPEG bytes through one batched ``decode_jpeg`` there (nvJPEG on
    CUDA; RGB, or grey for ``channels`` 1), already-decoded pixels copied. A batch that fails is decoded image by
    image (``_decode_one``).

    On CUDA the images are made on a stream of their own (``decode_stream``) and handed to the current one with
    ``wait_stream`` and ``record_stream`` (pytorch/vision#9606, not fixed in torchvision 0.29): torchvision
    allocates its outputs on the caller's current stream but nvJPEG writes them from its private stream, which
    waits for nothing, so on the current stream it can be handed memory that queued kernels (the optimizer step
    after ``zero_grad(set_to_none=True)``) still read. The side stream's memory holds only decoded images, and
    ``record_stream`` keeps each from being reused before the current stream's work on it has finished."""
    side = decode_stream(device)
    if side is None:
        return _decode_on_current_stream(payloads, device, sizes, channels)
    current = torch.cuda.current_stream(device)
    with torch.cuda.stream(side):
        images = _decode_on_current_stream(payloads, device, sizes, channels)
    current.wait_stream(side)
    for img in images:
        img.record_stream(current)
    return images


# ----------------------------------------------------------------------------- the batches

class BatchPlan:
    """A batch's plans made into what the device runs (in the DataLoader worker): the crop-resize
    (``compile_resize``; per sample on the CPU), the RandAugment layers (``compile_augment``) and ``extra``
    tensors (targets, normalisation, erasing fill), all in one ``PackedTensors``."""

    def __init__(self, plans: Sequence[Dict[str, Any]], size: Any,
                 extra: Optional[Dict[str, torch.Tensor]] = None, channels: int = 3) -> None:
        """``size``: the output's, an int (a square) or (H, W); ``channels`` the images' C."""
        self.plans, self.size, self.count, self.channels = list(plans), pair(size), len(plans), channels
        self.sizes = [tuple(plan['size']) for plan in plans]
        self.layers, tensors, self.order = compile_augment([plan.get('ops', []) for plan in plans], *self.size)
        self.chunks, resize = compile_resize(self.plans, self.order, self.size, channels)
        self.packed = PackedTensors({**tensors, **resize, **(extra or {})})

    def pin_memory(self) -> 'BatchPlan':
        self.packed.pin_memory()
        return self


class GpuFinish:
    """Picklable ``DeviceBatch`` finish of DATA.LOADER gpu: decode, resize, RandAugment, normalise, erase.

    ``size`` an int (a square) or (H, W); ``mean``/``std`` per channel (ImageNet's RGB ones by default), whose
    length is the images' channel count."""

    def __init__(self, size: Any, erase_mode: str, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        self.size = pair(size)
        self.device_finish = DeviceFinish(erase_mode, mean, std)
        self.channels = self.device_finish.channels

    def run(self, payloads: Sequence[torch.Tensor], plan: BatchPlan, t: Dict[str, torch.Tensor],
            device: torch.device) -> torch.Tensor:
        """uint8 (B, C, H, W) on ``device``: ``plan`` executed on the decoded payloads (``t``: its tensors there)."""
        c = self.channels
        images = decode_batch(payloads, device, plan.sizes, c)
        for k, (img, (w, h)) in enumerate(zip(images, plan.sizes)):
            if tuple(img.shape) != (c, h, w):  # shapes are host values: no sync
                raise ValueError(f"DATA.LOADER gpu: image {k} of the batch decoded to {tuple(img.shape)}, its "
                                 f"header said {w}x{h} and the model takes {c} channels")
        x = torch.empty((plan.count, c, *self.size), dtype=torch.uint8, device=device)
        if device.type == 'cpu':
            resize_per_sample(images, plan.plans, plan.order, x)
        else:
            resize_batched(images, plan.chunks, t, x)
        return augment(x, plan.layers, t)

    def images(self, payloads: Sequence[torch.Tensor], plans: Sequence[Dict[str, Any]],
               device: torch.device) -> torch.Tensor:
        """uint8 (B, C, H, W) on ``device``: the plans executed on the decoded images (the collate's batches come
        with their plan made; this makes it here)."""
        plan = BatchPlan(plans, self.size, channels=self.channels)
        return self.run(payloads, plan, plan.packed.to(device), device)

    def __call__(self, batch: DeviceBatch, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        plan: BatchPlan = batch.extras
        t = plan.packed.to(device)
        if not plan.count:
            return torch.empty((0, self.channels, *self.size), device=device), t['targets']
        images = self.run(batch.images.unpack(device), plan, t, device)
        return self.device_finish.apply(images, t), t['targets']


class PackedImages:
    """A batch's encoded JPEGs as one uint8 tensor plus lengths, and the images decoded in the worker (other
    files; every image for 2, 4 or N channels) as another one plus shapes, by position.

    One tensor per batch instead of one per image: DataLoader workers pass every tensor through its own shared
    memory file descriptor, and 128 per batch times the batches in flight can exceed the open-file limit; and the
    decoded pixels reach the device in one copy, not one per image."""

    def __init__(self, payloads: Sequence[torch.Tensor]) -> None:
        jpegs = [p for p in payloads if p.dim() == 1]
        decoded = [(k, p) for k, p in enumerate(payloads) if p.dim() != 1]
        self.count = len(payloads)
        self.data = torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8)  # all the bytes, (N,)
        self.lengths = [int(p.numel()) for p in jpegs]
        self.pixel_positions = [k for k, _ in decoded]
        self.pixel_shapes = [tuple(p.shape) for _, p in decoded]  # (C, H, W) each
        self.pixel_data = (torch.cat([p.reshape(-1) for _, p in decoded]) if decoded else
                           torch.empty(0, dtype=torch.uint8))  # all the pixels, (M,)

    def __len__(self) -> int:
        return self.count

    def pin_memory(self) -> 'PackedImages':
        """Pins the decoded pixels (copied to the device); the JPEG bytes stay where they are: the decoder reads
        them on the host."""
        self.pixel_data = self.pixel_data.pin_memory()
        return self

    def unpack(self, device: Optional[torch.device] = None) -> List[torch.Tensor]:
        """The payloads in batch order: 1-D byte views (contiguous, on the host) and (C, H, W) pixel views, on
        ``device`` when given (one non-blocking copy of them all)."""
        views = iter(torch.split(self.data, self.lengths)) if self.lengths else iter(())
        flat = self.pixel_data
        if device is not None and flat.numel():
            flat = flat.to(device, non_blocking=True)
        sizes = [int(np.prod(shape)) for shape in self.pixel_shapes]
        pixels = {k: view.view(shape) for k, view, shape in
                  zip(self.pixel_positions, torch.split(flat, sizes) if sizes else (), self.pixel_shapes)}
        return [pixels[k] if k in pixels else next(views) for k in range(self.count)]


class GpuCollate:
    """Collate for DATA.LOADER gpu: ``DeviceBatch(PackedImages, targets, BatchPlan, GpuFinish)``; drops ``None``
    samples (unreadable validation images); the plan (with the targets, normalisation and erasing fill) is made
    here, in the worker."""

    def __init__(self, finish: GpuFinish) -> None:
        self.finish = finish

    def __call__(self, samples: Sequence[Optional[Tuple[Tuple[Any, Dict[str, Any]], int]]]) -> DeviceBatch:
        kept = [s for s in samples if s is not None]
        targets = stack_targets([label for _, label in kept])
        plans = [dict(plan) for (_, plan), _ in kept]
        erase = [plan.pop('erase', torch.zeros(1, dtype=torch.int64)) for plan in plans]
        size = self.finish.size
        prepared = self.finish.device_finish.prepare(torch.stack(erase) if erase else None, *size)
        plan = BatchPlan(plans, size, {'targets': targets, **prepared}, self.finish.channels)
        return DeviceBatch(PackedImages([payload for (payload, _), _ in kept]), targets, plan, self.finish)


def gpu_collate(is_train: bool, config: Any) -> GpuCollate:
    """Normalised with ``config.mean_std`` (``DATA.MEAN`` / ``DATA.STD``, or the channel count's default)."""
    mean, std = mean_std(config)
    return GpuCollate(GpuFinish(img_size_hw(config), config.AUG.REMODE, mean, std))
