"""Swin Transformer V2 (Liu et al., CVPR 2022): scaled cosine attention, log-spaced continuous position
bias, res-post-norm, and norm after reduction in patch merging.

Parameter names and constructor keywords follow the official implementation.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import WindowAttentionBase, window_attention
from .fast_paths import use_fast_paths
from .lowp import Linear, linear
from .swin_common import SwinBackbone
from .window_ops import relative_position_index, window_to_tuple


def log_spaced_coords(window_size, pretrained_window_size) -> torch.Tensor:
    """``(1, 2Wh-1, 2Ww-1, 2)`` relative coordinates normalised to [-8, 8] and log-spaced, as in V2.

    Normalised by the pre-training window when one is given, so a model fine-tuned at a larger window
    extrapolates the bias continuously.
    """
    wh, ww = window_size
    rh = torch.arange(-(wh - 1), wh, dtype=torch.float32)
    rw = torch.arange(-(ww - 1), ww, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(rh, rw, indexing='ij')).permute(1, 2, 0).contiguous().unsqueeze(0)
    ph, pw = pretrained_window_size
    norm_h, norm_w = (ph - 1, pw - 1) if ph > 0 else (wh - 1, ww - 1)
    # a 1x1 window has no offsets; avoid 0/0
    table[..., 0] /= max(norm_h, 1)
    table[..., 1] /= max(norm_w, 1)
    table *= 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


class WindowAttentionV2(WindowAttentionBase):
    """Scaled cosine window attention with a per-head learned logit scale and a continuous position bias
    (a small MLP over log-spaced coordinates, squashed to (0, 16))."""

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.,
                 proj_drop: float = 0., pretrained_window_size=(0, 0), fused_attn: bool = True):
        super().__init__(dim, num_heads, window_size, attn_drop, proj_drop, fused_attn)
        self.pretrained_window_size = tuple(pretrained_window_size)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.register_buffer('relative_coords_table',
                             log_spaced_coords(self.window_size, self.pretrained_window_size), persistent=False)
        self.register_buffer('relative_position_index', relative_position_index(self.window_size),
                             persistent=False)
        self.qkv = Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer('k_bias', torch.zeros(dim), persistent=False)
        else:
            self.q_bias = self.v_bias = None

    def _bias_sources(self) -> tuple:
        return tuple(self.cpb_mlp.parameters())

    def position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v, _ = self.split_heads(linear(x, self.qkv.weight, qkv_bias))  # (B_, nH, N, d) each
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp()  # (nH, 1, 1)
        if not use_fast_paths():  # the official cosine attention
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # (B_, nH, N, N)
            return self.official_attention(logits * logit_scale, v, mask)
        # v comes straight from the qkv linear: its dtype is the one the attention runs in (the autocast
        # dtype under autocast). q and k are brought back to it after the normalisation, which CUDA autocast
        # runs in fp32, and the fp32 logit scale is cast too; otherwise q, and the bias built for it, would
        # be fp32 (an fp32 (B*nW, nH, N, N) bias for SDPA to cast again).
        compute = v.dtype
        # cosine similarity times a per-head scale: fold the scale into the normalised queries
        q = F.normalize(q, dim=-1).to(compute) * logit_scale.to(compute)
        k = F.normalize(k, dim=-1).to(compute)
        bias = self.attention_bias(mask, compute)
        drop = self.attn_drop.p if self.training else 0.0
        return self.merge_heads(window_attention(q, k, v, bias, 1.0, self.fused_attn, drop))


class SwinTransformerV2(SwinBackbone):
    """Swin Transformer V2.

    Args (official names): img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads,
    window_size, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, ape, patch_norm,
    use_checkpoint, pretrained_window_sizes (per stage; 0 = none). Ours: ``fused_attn``.
    """

    post_norm = True

    def __init__(self, img_size=224, patch_size=4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size=7, mlp_ratio: float = 4., qkv_bias: bool = True, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0.1, norm_layer=nn.LayerNorm,
                 ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False,
                 pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0), fused_attn: bool = True, **kwargs):
        if kwargs:
            raise TypeError(f"SwinTransformerV2 got unexpected keyword arguments: {sorted(kwargs)}")
        pretrained = list(pretrained_window_sizes)
        if len(pretrained) != len(depths):
            raise ValueError(f"pretrained_window_sizes needs one entry per stage ({len(depths)}), got {pretrained}")

        def attn_factory(dim, heads, window, stage):
            return WindowAttentionV2(dim, window, heads, qkv_bias, attn_drop_rate, drop_rate,
                                     window_to_tuple(pretrained[stage], 'pretrained_window_sizes')
                                     if pretrained[stage] else (0, 0), fused_attn)

        super().__init__(img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size,
                         mlp_ratio, drop_rate, drop_path_rate, ape, patch_norm, use_checkpoint, attn_factory,
                         norm_layer)
        self.pretrained_window_sizes = pretrained
        for layer in self.layers:  # res-post-norm starts as zero (official init)
            for block in layer.blocks:
                for norm in (block.norm1, block.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'cpb_mlp', 'logit_scale', 'relative_position_bias_table'}
