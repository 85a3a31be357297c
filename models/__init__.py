"""Swin Transformer V1/V2, Swin-MLP and Swin-MoE models, ``build_model(config)`` and the fine-tune loader
``load_pretrained``."""
from .build import build_model
from .fast_paths import fast_paths_enabled, set_fast_paths, use_fast_paths
from .freeze import FreezeError, FreezeSummary, freeze_parameters
from .pretrained import load_pretrained
from .swin_moe import SwinTransformerMoE
from .simmim import SimMIM, SwinTransformerForSimMIM, SwinTransformerV2ForSimMIM, build_simmim
from .swin_mlp import SwinMLP
from .swin_transformer import SwinTransformer, WindowAttention
from .swin_transformer_v2 import SwinTransformerV2, WindowAttentionV2

__all__ = ['build_model', 'load_pretrained', 'SwinTransformer', 'SwinMLP', 'SwinTransformerV2', 'WindowAttention',
           'WindowAttentionV2', 'SwinTransformerMoE', 'SimMIM', 'SwinTransformerForSimMIM', 'SwinTransformerV2ForSimMIM',
           'build_simmim', 'freeze_parameters', 'FreezeError', 'FreezeSummary', 'use_fast_paths', 'set_fast_paths',
           'fast_paths_enabled']
