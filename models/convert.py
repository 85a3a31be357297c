"""Weight converters from timm's and torchvision's Swin state dicts to the official layout used here.

Both take a state dict and return a new one; tensors are shared, not copied.
"""
from __future__ import annotations

import re
from typing import Dict

import torch

from .swin_common import DERIVED_BUFFERS

StateDict = Dict[str, torch.Tensor]


def timm_to_official(state_dict: StateDict) -> StateDict:
    """timm ``swin_*`` / ``swinv2_*`` -> official names.

    timm puts patch merging at the start of stage i+1 (``layers.{i+1}.downsample``) where the official code
    has it at the end of stage i, names the classifier ``head.fc``, and keeps ``absolute_pos_embed`` as a
    ``(1, H, W, C)`` grid.
    """
    out = {}
    for key, value in state_dict.items():
        if key.rsplit('.', 1)[-1] in DERIVED_BUFFERS + ('k_bias',):
            continue
        key = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) - 1}.downsample', key)
        key = key.replace('head.fc.', 'head.')
        if key == 'absolute_pos_embed' and value.ndim == 4:
            value = value.flatten(1, 2)
        out[key] = value
    return out


def torchvision_to_official(state_dict: StateDict) -> StateDict:
    """torchvision ``swin_t/s/b`` and ``swin_v2_t/s/b`` -> official names.

    torchvision keeps a flat ``features`` list: 0 = patch embedding, odd entries = stages of blocks, even
    entries (>0) = patch merging. Its MLP is a Sequential (0 = fc1, 3 = fc2), and V2 stores one ``qkv.bias``
    whose middle (key) third is unused.
    """
    out = {}
    for key, value in state_dict.items():
        if key.rsplit('.', 1)[-1] in DERIVED_BUFFERS:
            continue
        m = re.match(r'^features\.(\d+)\.(.*)$', key)
        if m is None:
            out[key] = value  # norm.*, head.*
            continue
        index, rest = int(m.group(1)), m.group(2)
        if index == 0:
            rest = rest.replace('0.', 'proj.', 1) if rest.startswith('0.') else rest.replace('2.', 'norm.', 1)
            out[f'patch_embed.{rest}'] = value
        elif index % 2 == 1:
            stage = (index - 1) // 2
            block, rest = rest.split('.', 1)
            rest = re.sub(r'^mlp\.0\.', 'mlp.fc1.', re.sub(r'^mlp\.3\.', 'mlp.fc2.', rest))
            prefix = f'layers.{stage}.blocks.{block}.'
            if rest == 'attn.qkv.bias' and f'features.{index}.{block}.attn.logit_scale' in state_dict:
                dim = value.shape[0] // 3
                out[prefix + 'attn.q_bias'] = value[:dim]
                out[prefix + 'attn.v_bias'] = value[2 * dim:]
                continue
            out[prefix + rest] = value
        else:
            out[f'layers.{index // 2 - 1}.downsample.{rest}'] = value
    return out
