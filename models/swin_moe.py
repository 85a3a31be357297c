"""Swin-MoE (Hwang et al., Tutel, 2022): Swin V1 blocks whose feed-forward, in the blocks ``moe_blocks`` names,
is a mixture of experts spread over the ranks (``models.moe``).

As the official ``SwinTransformerMoE``: pre-norm blocks and V1 patch merging; attention scaled by
``head_dim ** -0.5`` with V2's continuous position bias (``cpb_mlp`` over log-spaced coordinates, no sigmoid);
``MLP_FC2_BIAS``, ``INIT_STD``. Parameter names follow the official code, so each rank's official checkpoint
loads with ``load_state_dict``. ``forward`` returns the logits (as every model here, so validation, throughput
and export need nothing special); :meth:`SwinTransformerMoE.aux_loss` returns the auxiliary loss of the last
forward, already times ``aux_loss_weight`` (the official forward's second output), for the criterion to add.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from .attention import ScaledWindowAttention
from .lowp import Linear
from .mlp import Mlp
from .moe import MoEMlp
from .swin_common import SwinBackbone
from .swin_transformer_v2 import log_spaced_coords
from .window_ops import relative_position_index, window_to_tuple


class WindowAttentionMoE(ScaledWindowAttention):
    """Scaled dot-product window attention with V2's continuous position bias used as it is (no sigmoid)."""

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 pretrained_window_size=(0, 0), fused_attn: bool = True):
        super().__init__(dim, num_heads, window_size, attn_drop, proj_drop, fused_attn)
        self.scale = qk_scale or self.head_dim ** -0.5
        self.pretrained_window_size = tuple(pretrained_window_size)
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.register_buffer('relative_coords_table',
                             log_spaced_coords(self.window_size, self.pretrained_window_size), persistent=False)
        self.register_buffer('relative_position_index', relative_position_index(self.window_size),
                             persistent=False)
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)

    def _bias_sources(self) -> tuple:
        return tuple(self.cpb_mlp.parameters())

    def position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        return table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()  # (nH, N, N)


class SwinTransformerMoE(SwinBackbone):
    """Swin-MoE.

    Args (official names): img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads,
    window_size, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate, ape, patch_norm,
    mlp_fc2_bias, init_std, use_checkpoint, pretrained_window_sizes, moe_blocks (per stage, the indices of the
    MoE blocks), num_local_experts, top_value, capacity_factor, cosine_router, normalize_gate, use_bpr,
    is_gshard_loss, gate_noise, cosine_router_dim, cosine_router_init_t, moe_drop, aux_loss_weight.
    Ours: ``fused_attn``. Runs without a process group as one rank.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size=7, mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.1,
                 norm_layer=nn.LayerNorm, ape: bool = False, patch_norm: bool = True, mlp_fc2_bias: bool = True,
                 init_std: float = 0.02, use_checkpoint: bool = False,
                 pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0),
                 moe_blocks: Sequence[Sequence[int]] = ((-1,), (-1,), (-1,), (-1,)), num_local_experts: int = 1,
                 top_value: int = 1, capacity_factor: float = 1.25, cosine_router: bool = False,
                 normalize_gate: bool = False, use_bpr: bool = True, is_gshard_loss: bool = True,
                 gate_noise: float = 1.0, cosine_router_dim: int = 256, cosine_router_init_t: float = 0.5,
                 moe_drop: float = 0.0, aux_loss_weight: float = 0.01, fused_attn: bool = True, **kwargs):
        if kwargs:
            raise TypeError(f"SwinTransformerMoE got unexpected keyword arguments: {sorted(kwargs)}")
        pretrained = list(pretrained_window_sizes)
        moe_blocks = [list(b) for b in moe_blocks]
        if len(pretrained) != len(depths) or len(moe_blocks) != len(depths):
            raise ValueError(f"pretrained_window_sizes {pretrained} and moe_blocks {moe_blocks} need one entry per "
                             f"stage ({len(depths)})")

        def attn_factory(dim, heads, window, stage):
            return WindowAttentionMoE(dim, window, heads, qkv_bias, qk_scale, attn_drop_rate, drop_rate,
                                      window_to_tuple(pretrained[stage], 'pretrained_window_sizes')
                                      if pretrained[stage] else (0, 0), fused_attn)

        def mlp_factory(dim, stage, block):
            hidden = int(dim * mlp_ratio)
            if block in moe_blocks[stage]:
                return MoEMlp(dim, hidden, num_local_experts, top_value, capacity_factor, cosine_router,
                              normalize_gate, use_bpr, is_gshard_loss, gate_noise, cosine_router_dim,
                              cosine_router_init_t, moe_drop, init_std, mlp_fc2_bias)
            return Mlp(dim, hidden, drop_rate, fc2_bias=mlp_fc2_bias)

        super().__init__(img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size,
                         mlp_ratio, drop_rate, drop_path_rate, ape, patch_norm, use_checkpoint, attn_factory,
                         norm_layer, mlp_factory)
        self.init_std = init_std
        self.aux_loss_weight = aux_loss_weight
        self.num_local_experts = num_local_experts
        self.pretrained_window_sizes = pretrained
        if init_std != .02:  # the backbone initialised with the default std
            self.apply(self._init_with_std)
            if ape:
                trunc_normal_(self.absolute_pos_embed, std=init_std)
        for m in self.moe_layers():
            m.init_weights()
        # DDP leaves these out of its all-reduce: each rank owns its experts (the official `skip_allreduce`)
        self._ddp_params_and_buffers_to_ignore: List[str] = self.expert_parameter_names()

    def _init_with_std(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=self.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def moe_layers(self) -> List[MoEMlp]:
        return [m for m in self.modules() if isinstance(m, MoEMlp)]

    def expert_parameter_names(self) -> List[str]:
        """Names of this rank's expert parameters (they differ between ranks; DDP does not all-reduce them)."""
        return [f'{prefix}.{n}' for prefix, m in self.named_modules() if isinstance(m, MoEMlp)
                for n, _ in m.expert_parameters()]

    def aux_loss(self) -> torch.Tensor:
        """The auxiliary (balance) loss of the last forward, summed over the MoE blocks, times
        ``aux_loss_weight``: the official forward's second output."""
        losses = [m.l_aux for m in self.moe_layers() if m.l_aux is not None]
        if not losses:
            return torch.zeros((), device=self.head.weight.device if hasattr(self.head, 'weight') else None)
        total = losses[0]
        for l_aux in losses[1:]:
            total = total + l_aux
        return total * self.aux_loss_weight

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'cpb_mlp', 'relative_position_bias_table', 'fc1_bias', 'fc2_bias', 'temperature',
                'cosine_projector', 'sim_matrix'}
