"""Swin-MLP: the Swin backbone with window attention replaced by a spatial MLP inside (shifted) windows.

The official ``models/swin_mlp.py`` (microsoft/Swin-Transformer): each window's tokens are mixed by a learned
``N x N`` matrix per head (a grouped ``Conv1d`` with kernel 1 over ``heads * N`` channels), and the shifted
blocks get their windows by zero padding the map (``window - shift`` at the top/left, ``shift`` at the
bottom/right) instead of a cyclic roll, so no mask is needed. Everything else (patch embedding, V1 pre-norm
block with its MLP, patch merging, stage window rule, head) is the shared backbone of ``models.swin_common``.

Parameter names follow the official checkpoints (``layers.i.blocks.j.spatial_mlp.weight``); any input size works
(maps are padded to window multiples); at the official sizes the output equals the official model's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from .swin_common import Size, SwinBackbone, SwinBlock


class SpatialMLP(nn.Conv1d):
    """Multi-head spatial MLP over the ``N = Wh*Ww`` tokens of a window: head ``h`` mixes tokens with its own
    ``N x N`` matrix. A grouped kernel-1 ``Conv1d`` (``groups=num_heads``), as the official code, so its
    ``weight`` ``(heads*N, N, 1)`` and ``bias`` ``(heads*N,)`` are the checkpoint's."""

    def __init__(self, dim: int, window_size: Size, num_heads: int):
        n = window_size[0] * window_size[1]
        super().__init__(num_heads * n, num_heads * n, kernel_size=1, groups=num_heads)
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        trunc_normal_(self.weight, std=.02)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        """``(B*nW, N, C)`` windows -> ``(B*nW, N, C)``; ``mask`` is always None (windows by padding)."""
        b_, n, c = x.shape
        heads = self.num_heads
        x = x.view(b_, n, heads, c // heads).transpose(1, 2).reshape(b_, heads * n, c // heads)  # (B_, nH*N, d)
        x = super().forward(x)  # (B_, nH*N, d)
        return x.view(b_, heads, n, c // heads).transpose(1, 2).reshape(b_, n, c)  # (B_, N, C)

    def flops(self, n: int) -> float:
        """Multiply-adds for one window of ``n`` tokens, counted as the official code: ``dim * N * N``."""
        return self.dim * n * n


class SwinMLPBlock(SwinBlock):
    """The V1 pre-norm block with :class:`SpatialMLP` as token mixer (``spatial_mlp``) and padded shifts."""

    mixer_name = 'spatial_mlp'
    shift_by_padding = True

    def flops(self, resolution: Size) -> float:
        h, w = resolution
        wh, ww = self.window_size
        # the official window count: (H/Wh + 1) * (W/Ww + 1) windows when shifted (one more row and column of
        # windows from the padding), H*W/(Wh*Ww) otherwise; true division as upstream (exact at official sizes)
        if self.shift_size[0] or self.shift_size[1]:
            num_windows = (h / wh + 1) * (w / ww + 1)
        else:
            num_windows = h * w / wh / ww
        flops = 2 * self.dim * h * w  # norm1, norm2
        flops += num_windows * self.spatial_mlp.flops(wh * ww)
        flops += 2 * h * w * self.dim * self.dim * self.mlp_ratio
        return flops


class SwinMLP(SwinBackbone):
    """Swin-MLP (official ``SwinMLP``).

    Args (official names): img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads,
    window_size, mlp_ratio, drop_rate, drop_path_rate, norm_layer, ape, patch_norm, use_checkpoint.
    ``img_size`` sets the position-embedding grid, the FLOP count and the per-stage window rule (which fixes the
    ``spatial_mlp`` shapes); other input sizes run too.
    """

    block_class = SwinMLPBlock

    def __init__(self, img_size=224, patch_size=4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size=7, mlp_ratio: float = 4., drop_rate: float = 0., drop_path_rate: float = 0.1,
                 norm_layer=nn.LayerNorm, ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False,
                 **kwargs):
        if kwargs:
            raise TypeError(f"SwinMLP got unexpected keyword arguments: {sorted(kwargs)}")

        def mixer_factory(dim, heads, window, stage):
            return SpatialMLP(dim, window, heads)

        super().__init__(img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size,
                         mlp_ratio, drop_rate, drop_path_rate, ape, patch_norm, use_checkpoint, mixer_factory,
                         norm_layer)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'relative_position_bias_table'}  # as the official SwinMLP (it has none such)


__all__ = ['SwinMLP', 'SwinMLPBlock', 'SpatialMLP']
