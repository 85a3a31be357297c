"""Window operations shared by Swin V1 and V2: token gathers for (shifted) windows, masks, padding.

Instead of ``pad -> roll -> window_partition`` (three copies) we gather the tokens of a ``(B, H*W, C)`` map
straight into window order with one precomputed index, and scatter them back with its inverse. The
padding to window multiples is folded into the same index (padded slots point at an appended zero token),
so any input size works. Indices and masks depend only on the geometry and are cached per geometry.

All of that is a fast path (``models.fast_paths``); with the switch off :class:`ReferenceWindows` does what the
official code does (pad, roll, partition; a mask of -100 built afresh) and :func:`merge_2x2` takes four slices.
"""
from __future__ import annotations

from typing import Dict, Tuple, Union

import torch
import torch.nn.functional as F

from .fast_paths import use_eager_fast_path, use_fast_paths

# Additive mask across shifted-window borders. The official code uses -100, but softmax then yields weights
# near exp(-100) = 3.7e-44, subnormal floats, and x86 matmuls over them stall: attention-times-values of a
# shifted block measured 23.5 ms instead of 0.4 ms on this project's CPU (torch.set_flush_denormal does not
# reach MKL's threads). With -1e4 the masked weights underflow to exactly 0; outputs differ from -100's by
# less than 1e-38 (the masked terms), and the bias stays finite in fp16 and bf16.
MASK_VALUE = -1e4
OFFICIAL_MASK_VALUE = -100.0  # with the fast paths off


class WindowGeometry:
    """Where every token of an ``H x W`` map goes when split into ``window`` windows shifted by ``shift``.

    Attributes:
        gather_index: ``(nW * N,)`` token index per window slot; ``H*W`` marks a padded (zero) slot.
        scatter_index: ``(H*W,)`` window slot of every real token (inverse of ``gather_index``).
        mask: ``(nW, N, N)`` additive shifted-window mask (0 or ``MASK_VALUE``), or None when there is no shift.
        num_windows, padded: window count and whether any slot is padding.
    """

    def __init__(self, height: int, width: int, window: Tuple[int, int], shift: Tuple[int, int],
                 device: torch.device, shift_by_padding: bool = False):
        wh, ww = window
        sh, sw = shift
        top, left = shift_padding(window, shift) if shift_by_padding else (0, 0)
        hp, wp = -(-(height + top) // wh) * wh, -(-(width + left) // ww) * ww
        self.padded = (hp, wp) != (height, width)
        self.num_windows = (hp // wh) * (wp // ww)
        # token id of every position of the padded map, padding -> height*width (the zero token)
        grid = torch.full((hp, wp), height * width, dtype=torch.long)
        grid[top:top + height, left:left + width] = torch.arange(height * width).view(height, width)
        if not shift_by_padding:
            # cyclic shift towards the top-left, as torch.roll(x, (-sh, -sw)) does in the official code
            grid = torch.roll(grid, shifts=(-sh, -sw), dims=(0, 1))
        windows = grid.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1)
        self.gather_index = windows.to(device)
        # inverse permutation; padded slots all land on the extra entry height*width, which is dropped
        # (a scatter rather than boolean indexing keeps shapes static for torch.compile)
        scatter = torch.zeros(height * width + 1, dtype=torch.long)
        scatter.scatter_(0, windows, torch.arange(windows.numel()))
        self.scatter_index = scatter[:height * width].to(device)
        # shifting by padding glues no regions together: nothing to mask
        self.mask = shifted_window_mask(hp, wp, window, shift).to(device) if (sh or sw) and not shift_by_padding \
            else None

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H*W, C)`` -> ``(B*nW, N, C)`` in window order (with shift and zero padding)."""
        b, _, c = x.shape
        if self.padded:
            x = torch.cat([x, x.new_zeros(b, 1, c)], dim=1)
            return x.index_select(1, self.gather_index).view(b * self.num_windows, -1, c)
        return permute_tokens(x, self.gather_index, self.scatter_index).view(b * self.num_windows, -1, c)

    def reverse(self, windows: torch.Tensor, batch: int) -> torch.Tensor:
        """``(B*nW, N, C)`` -> ``(B, H*W, C)``; drops padded slots and undoes the shift."""
        windows = windows.reshape(batch, -1, windows.shape[-1])
        if self.padded:
            return windows.index_select(1, self.scatter_index)
        return permute_tokens(windows, self.scatter_index, self.gather_index)


class _PermuteTokens(torch.autograd.Function):
    """Gather along dim 1 by a permutation; backward gathers by the inverse permutation instead of
    zero-filling and scatter-adding as ``index_select``'s backward does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.inverse = inverse  # a constant of the geometry, never modified
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(1, ctx.inverse), None, None


def permute_tokens(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x.index_select(1, index)`` for a permutation ``index`` whose inverse is ``inverse``."""
    if torch.is_grad_enabled() and x.requires_grad and use_eager_fast_path('permute_backward'):
        return _PermuteTokens.apply(x, index, inverse)
    return x.index_select(1, index)


def shift_padding(window: Tuple[int, int], shift: Tuple[int, int]) -> Tuple[int, int]:
    """Top and left zero padding of Swin-MLP's shifted windows: ``window - shift`` on each shifted side (the
    official ``P_t``/``P_l``), so the window grid starts ``shift`` tokens before the map; the bottom/right
    padding then fills up to a window multiple (the official ``P_b``/``P_r = shift`` at window-multiple sizes)."""
    return (window[0] - shift[0] if shift[0] else 0, window[1] - shift[1] if shift[1] else 0)


def shifted_window_mask(height: int, width: int, window: Tuple[int, int], shift: Tuple[int, int],
                        value: float = MASK_VALUE) -> torch.Tensor:
    """Additive mask ``(nW, N, N)`` (0 or ``value``) that keeps attention inside the regions a cyclic shift glued
    together.

    ``height``/``width`` are the padded map size (multiples of the window), as in the official code.
    """
    wh, ww = window
    sh, sw = shift
    region = torch.zeros(height, width)
    label = 0
    for hs in ((0, height - wh), (height - wh, height - sh), (height - sh, height)):
        for ws in ((0, width - ww), (width - ww, width - sw), (width - sw, width)):
            region[hs[0]:hs[1], ws[0]:ws[1]] = label
            label += 1
    windows = region.view(height // wh, wh, width // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, value)


class ReferenceWindows:
    """The official window split, for the fast paths off: the same interface as :class:`WindowGeometry`, and
    the same windows, from zero padding to window multiples, ``torch.roll`` and a view/permute partition; the
    mask (``OFFICIAL_MASK_VALUE``) is built with every instance, as nothing is cached."""

    def __init__(self, height: int, width: int, window: Tuple[int, int], shift: Tuple[int, int],
                 device: torch.device, shift_by_padding: bool = False):
        self.height, self.width, self.window, self.shift = height, width, window, shift
        self.shift_by_padding = shift_by_padding
        wh, ww = window
        self.top, self.left = shift_padding(window, shift) if shift_by_padding else (0, 0)
        self.padded_height = -(-(height + self.top) // wh) * wh
        self.padded_width = -(-(width + self.left) // ww) * ww
        self.num_windows = (self.padded_height // wh) * (self.padded_width // ww)
        rolled = (shift[0] or shift[1]) and not shift_by_padding
        self.mask = (shifted_window_mask(self.padded_height, self.padded_width, window, shift, OFFICIAL_MASK_VALUE)
                     .to(device) if rolled else None)

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H*W, C)`` -> ``(B*nW, N, C)``: pad, roll by ``-shift``, split into windows."""
        b, _, c = x.shape
        (wh, ww), (sh, sw) = self.window, self.shift
        hp, wp = self.padded_height, self.padded_width
        x = F.pad(x.reshape(b, self.height, self.width, c),
                  (0, 0, self.left, wp - self.width - self.left, self.top, hp - self.height - self.top))
        if (sh or sw) and not self.shift_by_padding:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        x = x.view(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5)  # (B, nWh, nWw, wh, ww, C)
        return x.reshape(-1, wh * ww, c)

    def reverse(self, windows: torch.Tensor, batch: int) -> torch.Tensor:
        """``(B*nW, N, C)`` -> ``(B, H*W, C)``: merge the windows, roll by ``+shift``, crop the padding."""
        (wh, ww), (sh, sw) = self.window, self.shift
        hp, wp, c = self.padded_height, self.padded_width, windows.shape[-1]
        x = windows.view(batch, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, c)
        if (sh or sw) and not self.shift_by_padding:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        x = x[:, self.top:self.top + self.height, self.left:self.left + self.width]
        return x.reshape(batch, self.height * self.width, c)


def relative_position_index(window: Tuple[int, int]) -> torch.Tensor:
    """``(N, N)`` index into the ``(2Wh-1)*(2Ww-1)`` relative position table, official ordering."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


class GeometryCache:
    """Per-module cache of :class:`WindowGeometry` keyed by map size and device (built once per size).

    ``windows`` gives the cached geometry on the fast paths, a fresh :class:`ReferenceWindows` off them."""

    def __init__(self) -> None:
        self._cache: Dict[tuple, WindowGeometry] = {}

    def get(self, height: int, width: int, window: Tuple[int, int], shift: Tuple[int, int],
            device: torch.device, shift_by_padding: bool = False) -> WindowGeometry:
        key = (height, width, window, shift, str(device), shift_by_padding)
        geometry = self._cache.get(key)
        if geometry is None:
            geometry = WindowGeometry(height, width, window, shift, device, shift_by_padding)
            self._cache[key] = geometry
        return geometry

    def windows(self, height: int, width: int, window: Tuple[int, int], shift: Tuple[int, int],
                device: torch.device, shift_by_padding: bool = False) -> Union[WindowGeometry, ReferenceWindows]:
        """The window split of an ``H x W`` map: :meth:`get`, or with the fast paths off the official one.

        ``shift_by_padding`` (Swin-MLP): shifted windows come from zero padding (:func:`shift_padding`) instead
        of a cyclic roll, and there is no mask."""
        # Under torch.jit.trace (the ONNX export) sizes read from shapes are 0-d tensors: a geometry built from
        # them is recorded as ops on the input's shape (the padded grid's index fill became an Expand that ONNX
        # Runtime rejects, "invalid expand shape") and keyed by tensors the cache never finds again. The export
        # fixes the image size, so the sizes are constants of the graph: take them as ints.
        height, width = static_size(height), static_size(width)
        if use_fast_paths():
            return self.get(height, width, window, shift, device, shift_by_padding)
        return ReferenceWindows(height, width, window, shift, device, shift_by_padding)


def static_size(value: Union[int, torch.Tensor]) -> int:
    """A map size as a Python int: a traced 0-d size tensor (``torch.jit.trace``) becomes its value, a constant
    of the traced graph (the tracer's warning on that is silenced by scripts/export.py)."""
    return int(value) if isinstance(value, torch.Tensor) else value


def effective_shift(height: int, width: int, window: Tuple[int, int], shift: Tuple[int, int]) -> Tuple[int, int]:
    """The shift actually used on an ``H x W`` map: none along a side the window already covers."""
    return (0 if height <= window[0] else shift[0], 0 if width <= window[1] else shift[1])


def pad_to_even(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` map at the bottom/right so that H and W are even (before merging)."""
    h, w = x.shape[1:3]
    if h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    return x


def merge_2x2(x: torch.Tensor, height: int, width: int) -> Tuple[torch.Tensor, int, int]:
    """``(B, H*W, C)`` -> ``(B, H/2*W/2, 4C)`` with the official channel order x0, x1, x2, x3.

    x0 = (even row, even col), x1 = (odd row, even col), x2 = (even row, odd col), x3 = (odd, odd). One permute
    on the fast paths; with them off the official four slices and a concatenation.
    """
    b, _, c = x.shape
    x = pad_to_even(x.view(b, height, width, c))
    h2, w2 = x.shape[1] // 2, x.shape[2] // 2
    if not use_fast_paths():
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)  # (B, h2, w2, 4C)
        return x.view(b, h2 * w2, 4 * c), h2, w2
    # (B, h2, row, w2, col, C) -> (B, h2, w2, col, row, C): col-major over the 2x2 cell = x0, x1, x2, x3
    x = x.view(b, h2, 2, w2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h2 * w2, 4 * c)
    return x, h2, w2


def window_to_tuple(value, name: str) -> Tuple[int, int]:
    """An int or a pair as a validated ``(h, w)`` tuple of positive ints."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]

