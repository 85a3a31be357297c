"""Swin Transformer (V1): hierarchical vision transformer with shifted windows (Liu et al., ICCV 2021).

Parameter names and constructor keywords follow the official implementation, so official checkpoints load
with ``model.load_state_dict(ckpt['model'])``. Any input size works (maps are padded to window multiples);
at the trained size the output equals the official model's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from .attention import ScaledWindowAttention
from .lowp import Linear
from .swin_common import SwinBackbone
from .window_ops import relative_position_index


class WindowAttention(ScaledWindowAttention):
    """Window multi-head self-attention with a learned relative position bias table."""

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 fused_attn: bool = True):
        super().__init__(dim, num_heads, window_size, attn_drop, proj_drop, fused_attn)
        wh, ww = self.window_size
        self.scale = qk_scale or self.head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer('relative_position_index', relative_position_index(self.window_size),
                             persistent=False)
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def _bias_sources(self) -> tuple:
        return (self.relative_position_bias_table,)

    def position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()  # (nH, N, N)


class SwinTransformer(SwinBackbone):
    """Swin Transformer V1.

    Args (official names): img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads,
    window_size, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate, ape, patch_norm,
    use_checkpoint. Ours: ``fused_attn`` (SDPA in the fast attention path of ``models.attention``, with the fast
    paths of ``models.fast_paths`` on; equal outputs).
    ``img_size`` sets the position-embedding grid, the FLOP count and the per-stage window rule; other sizes
    run too.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size=7, mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.1,
                 norm_layer=nn.LayerNorm, ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False,
                 fused_window_process: bool = False, fused_attn: bool = True, **kwargs):
        if kwargs:
            raise TypeError(f"SwinTransformer got unexpected keyword arguments: {sorted(kwargs)}")

        def attn_factory(dim, heads, window, stage):
            return WindowAttention(dim, window, heads, qkv_bias, qk_scale, attn_drop_rate, drop_rate, fused_attn)

        super().__init__(img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size,
                         mlp_ratio, drop_rate, drop_path_rate, ape, patch_norm, use_checkpoint, attn_factory,
                         norm_layer)
