"""``build_model(config, is_pretrain=False)``: the model named by ``MODEL.TYPE`` from the official config keys."""
from __future__ import annotations

import logging
from typing import Type

import torch.nn as nn

from .fast_paths import set_fast_paths
from .simmim import build_simmim
from .swin_mlp import SwinMLP
from .swin_transformer import SwinTransformer
from .swin_moe import SwinTransformerMoE
from .swin_transformer_v2 import SwinTransformerV2


_LOG = logging.getLogger(__name__)


def layer_norm_class(fused: bool, logger: logging.Logger = _LOG) -> Type[nn.Module]:
    """``FUSED_LAYERNORM`` (``--fused_layernorm``): apex's ``FusedLayerNorm`` when apex is importable, else torch's
    ``nn.LayerNorm`` with one log line saying so (the official code passes None on then and crashes)."""
    if not fused:
        return nn.LayerNorm
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError:
        logger.warning("FUSED_LAYERNORM (--fused_layernorm): apex is not installed; torch's nn.LayerNorm is used")
        return nn.LayerNorm
    return FusedLayerNorm


def build_model(config, is_pretrain: bool = False) -> nn.Module:
    """Build Swin V1 (``swin``), V2 (``swinv2``), Swin-MLP (``swin_mlp``) or Swin-MoE (``swin_moe``).
    ``MODEL.NUM_CLASSES`` is used as given (any number).

    ``is_pretrain``: the SimMIM pre-training model (``models.simmim.SimMIM``) with that backbone as encoder,
    ``MODEL.SIMMIM.NORM_TARGET`` for its loss; ``forward(images, mask)`` returns the loss.

    ``MODEL.FAST_PATHS False`` turns the process-wide fast-path switch off (``models.fast_paths``: the official
    computation everywhere); True leaves it as it is (on, unless ``SWIN_FAST_PATHS=0`` or ``set_fast_paths``).
    """
    if not config.MODEL.FAST_PATHS:
        set_fast_paths(False)
    model_type = config.MODEL.TYPE
    # every LayerNorm of the model (the official build passes it to V1 only)
    norm_layer = layer_norm_class(bool(config.FUSED_LAYERNORM))
    if model_type == 'swin_mlp' and not is_pretrain:
        m = config.MODEL.SWIN_MLP
        return SwinMLP(img_size=config.DATA.IMG_SIZE, patch_size=m.PATCH_SIZE, in_chans=m.IN_CHANS,
                       num_classes=config.MODEL.NUM_CLASSES, embed_dim=m.EMBED_DIM, depths=m.DEPTHS,
                       num_heads=m.NUM_HEADS, window_size=m.WINDOW_SIZE, mlp_ratio=m.MLP_RATIO,
                       drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE,
                       norm_layer=norm_layer, ape=m.APE, patch_norm=m.PATCH_NORM,
                       use_checkpoint=config.TRAIN.USE_CHECKPOINT)
    common = dict(img_size=config.DATA.IMG_SIZE, num_classes=config.MODEL.NUM_CLASSES,
                  drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE,
                  use_checkpoint=config.TRAIN.USE_CHECKPOINT, fused_attn=config.MODEL.FUSED_ATTN)
    if model_type == 'swin_moe':
        if is_pretrain:
            raise ValueError("SimMIM pre-training supports MODEL.TYPE 'swin' and 'swinv2', not 'swin_moe'")
        return build_swin_moe(config, common, norm_layer)
    if model_type not in ('swin', 'swinv2'):
        raise ValueError(f"MODEL.TYPE {model_type!r} is not supported here; choose 'swin', 'swinv2', 'swin_mlp' or "
                         f"'swin_moe' (SimMIM pre-training takes 'swin' and 'swinv2')")
    m = config.MODEL.SWIN if model_type == 'swin' else config.MODEL.SWINV2
    arch = dict(patch_size=m.PATCH_SIZE, in_chans=m.IN_CHANS, embed_dim=m.EMBED_DIM, depths=m.DEPTHS,
                num_heads=m.NUM_HEADS, window_size=m.WINDOW_SIZE, mlp_ratio=m.MLP_RATIO, qkv_bias=m.QKV_BIAS,
                ape=m.APE, patch_norm=m.PATCH_NORM, **common)
    if is_pretrain:
        target = config.MODEL.SIMMIM.NORM_TARGET
        if model_type == 'swin':
            return build_simmim('swin', arch, bool(target.ENABLE), int(target.PATCH_SIZE), qk_scale=m.QK_SCALE)
        return build_simmim('swinv2', arch, bool(target.ENABLE), int(target.PATCH_SIZE),
                            pretrained_window_sizes=m.PRETRAINED_WINDOW_SIZES)
    if model_type == 'swin':
        return SwinTransformer(qk_scale=m.QK_SCALE, norm_layer=norm_layer, **arch)
    return SwinTransformerV2(pretrained_window_sizes=m.PRETRAINED_WINDOW_SIZES, norm_layer=norm_layer, **arch)


def build_swin_moe(config, common: dict, norm_layer=nn.LayerNorm) -> nn.Module:
    """``SwinTransformerMoE`` from ``MODEL.SWIN_MOE`` (the official keyword for every key)."""
    m = config.MODEL.SWIN_MOE
    return SwinTransformerMoE(
        patch_size=m.PATCH_SIZE, in_chans=m.IN_CHANS, embed_dim=m.EMBED_DIM, depths=m.DEPTHS, num_heads=m.NUM_HEADS,
        window_size=m.WINDOW_SIZE, mlp_ratio=m.MLP_RATIO, qkv_bias=m.QKV_BIAS, qk_scale=m.QK_SCALE, ape=m.APE,
        patch_norm=m.PATCH_NORM, mlp_fc2_bias=m.MLP_FC2_BIAS, init_std=m.INIT_STD,
        pretrained_window_sizes=m.PRETRAINED_WINDOW_SIZES, moe_blocks=m.MOE_BLOCKS,
        num_local_experts=m.NUM_LOCAL_EXPERTS, top_value=m.TOP_VALUE, capacity_factor=m.CAPACITY_FACTOR,
        cosine_router=m.COSINE_ROUTER, normalize_gate=m.NORMALIZE_GATE, use_bpr=m.USE_BPR,
        is_gshard_loss=m.IS_GSHARD_LOSS, gate_noise=m.GATE_NOISE, cosine_router_dim=m.COSINE_ROUTER_DIM,
        cosine_router_init_t=m.COSINE_ROUTER_INIT_T, moe_drop=m.MOE_DROP, aux_loss_weight=m.AUX_LOSS_WEIGHT,
        norm_layer=norm_layer, **common)
