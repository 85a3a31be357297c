"""Fine-tune loading: official (or converted) Swin weights into a model of another resolution/window/head.

What ``load_pretrained`` does, and logs:
- drops derived buffers (``relative_position_index``, ``attn_mask``, ``relative_coords_table``);
- bicubic-interpolates every ``relative_position_bias_table`` whose window differs (e.g. 7 -> 12 for 384);
- bicubic-interpolates ``absolute_pos_embed`` to the model's patch grid (square or not: h x w patches);
- adapts ``patch_embed.proj.weight`` of another input channel count (an RGB checkpoint for a grey or RGBA model)
  with timm's ``adapt_input_conv`` (sum over the channels for 1, repeat and rescale for more);
- maps a 21841-class ImageNet-22K head to 1000 ImageNet-1K classes with the official index list
  (``map22kto1k.txt``), or re-initialises a head of any other size (zeros, as the official code does);
- anything else that does not fit (another architecture, other widths/heads) is an error naming the key.
  Swin-MLP's ``spatial_mlp`` of another window or head count is such an error (no resize exists for it).

A SimMIM pre-training checkpoint (keys under ``encoder.``) is converted as the official SimMIM fine-tune
(``utils_simmim.load_pretrained``) does: only ``encoder.*``, prefix stripped, ``mask_token`` and the decoder
dropped, ``rpe_mlp`` renamed ``cpb_mlp``, and each V1 ``relative_position_bias_table`` resized by the official
cubic spline over geometrically spaced relative positions (``geometric_resize_relative_position_bias_table``)
instead of the bicubic grid resize. It has no head: the model's head keeps its fresh initialisation, as upstream.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import adapt_input_conv

from .swin_common import DERIVED_BUFFERS

_LOG = logging.getLogger(__name__)
MAP_22K_TO_1K = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'map22kto1k.txt')


def imagenet22k_to_1k_indices() -> torch.Tensor:
    """The 1000 row indices of the ImageNet-1K classes in a 21841-class ImageNet-22K head."""
    with open(MAP_22K_TO_1K) as f:
        return torch.tensor([int(line) for line in f if line.strip()], dtype=torch.long)


def extract_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint: ``ckpt['model']`` (official), ``['state_dict']``, or the dict itself."""
    for key in ('model', 'state_dict', 'model_ema'):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    return dict(checkpoint)


def resize_relative_position_bias_table(table: torch.Tensor, window_size) -> torch.Tensor:
    """``((2W'-1)^2, nH)`` table of a square window resized bicubically to ``window_size``'s table."""
    length, heads = table.shape
    side = int(round(math.sqrt(length)))
    if side * side != length:
        raise ValueError(f"cannot resize a relative position table of {length} rows: not a square window")
    target = (2 * window_size[0] - 1, 2 * window_size[1] - 1)
    grid = table.permute(1, 0).reshape(1, heads, side, side).float()
    grid = F.interpolate(grid, size=target, mode='bicubic', align_corners=False)
    return grid.reshape(heads, -1).permute(1, 0).to(table.dtype).contiguous()


def is_simmim_checkpoint(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` is a SimMIM pre-training state dict (its encoder's weights are under ``encoder.``)."""
    return any(k.startswith('encoder.') for k in state)


def convert_simmim_checkpoint(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The encoder of a SimMIM state dict in classifier names, as the official ``utils_simmim.load_pretrained``:
    ``encoder.*`` only (the decoder goes), prefix stripped, ``mask_token`` dropped (upstream leaves it to
    ``load_state_dict(strict=False)``), and ``rpe_mlp`` (the released SwinV2 checkpoints' name) -> ``cpb_mlp``."""
    out = {}
    for key, value in state.items():
        if not key.startswith('encoder.') or key == 'encoder.mask_token':
            continue
        out[key[len('encoder.'):].replace('rpe_mlp', 'cpb_mlp')] = value
    return out


def geometric_resize_relative_position_bias_table(table: torch.Tensor, dst_size: int) -> torch.Tensor:
    """``(S^2, nH)`` V1 table of a square window resized to ``(dst_size^2, nH)`` as the official SimMIM fine-tune.

    Upstream (``utils_simmim.remap_pretrained_keys_swin``) places the S source offsets at geometrically spaced
    positions (ratio q found by bisection so that the progression reaches ``dst_size // 2``), fits a cubic
    interpolating spline per head with ``scipy.interpolate.interp2d(kind='cubic')`` and evaluates it at the
    integer offsets. interp2d was removed in SciPy 1.14; on gridded data it was FITPACK's ``regrid_smth`` with
    s=0 plus ``bispev``, which is exactly ``RectBivariateSpline(kx=3, ky=3, s=0)`` (same knots and
    coefficients; both clamp points outside the data range to its edge). interp2d takes ``z[y, x]`` and returns
    ``[y, x]``, RectBivariateSpline takes ``z[x, y]``: passing (y, x) keeps the same orientation. Checked against
    interp2d's output in tests/test_simmim_finetune.py (fixtures made with SciPy 1.13).
    """
    from scipy.interpolate import RectBivariateSpline

    length, heads = table.shape
    src_size = int(length ** 0.5)
    if src_size * src_size != length:
        raise ValueError(f"cannot resize a relative position table of {length} rows: not a square window")

    def geometric_progression(a: float, r: float, n: int) -> float:
        return a * (1.0 - r ** n) / (1.0 - r)

    left, right = 1.01, 1.5  # upstream's bisection, kept step for step so q is the same float
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if geometric_progression(1, q, src_size // 2) > dst_size // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    src = np.array([-d for d in reversed(dis)] + [0] + dis)  # (S,) source offsets, geometric spacing
    t = dst_size // 2.0
    dst = np.arange(-t, t + 0.1, 1.0)  # (dst_size,) integer target offsets
    columns = []
    for h in range(heads):
        z = table[:, h].view(src_size, src_size).float().numpy()  # (S, S) indexed [y, x]
        spline = RectBivariateSpline(src, src, z, kx=3, ky=3, s=0)
        columns.append(torch.from_numpy(spline(dst, dst)).float().reshape(-1, 1))  # (dst^2, 1)
    # float32 as upstream (torch.Tensor), not the checkpoint's dtype: a float16 checkpoint's table is resized
    # in float32 and not rounded back (load_state_dict casts to the model's dtype)
    return torch.cat(columns, dim=1)  # (dst^2, nH)


def resize_absolute_pos_embed(pos: torch.Tensor, grid) -> torch.Tensor:
    """``(1, L, C)`` absolute position embedding of a square grid resized bicubically to ``grid`` (h, w)."""
    _, length, channels = pos.shape
    side = int(round(math.sqrt(length)))
    if side * side != length:
        raise ValueError(f"cannot resize absolute_pos_embed of {length} positions: not a square grid")
    x = pos.reshape(1, side, side, channels).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=tuple(grid), mode='bicubic', align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, -1, channels).to(pos.dtype)


def _read(checkpoint: Union[str, os.PathLike, Mapping], trust: bool) -> Dict[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        return extract_state_dict(checkpoint)
    from utils.checkpoint import load_checkpoint_file  # the one module that reads checkpoint files
    return extract_state_dict(load_checkpoint_file(str(checkpoint), trust=trust))


def load_pretrained(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping],
                    logger: Optional[logging.Logger] = None, trust: bool = False) -> Dict[str, list]:
    """Load pretrained weights into ``model`` for fine-tuning, adapting what the official recipe adapts.

    ``checkpoint`` is a file path (``.pth`` read with ``weights_only=True``, or ``.safetensors``) or a
    (state) dict. Returns ``{'adapted': [...], 'reinitialized': [...]}`` key lists. Raises ``ValueError``
    naming the key when a tensor cannot be made to fit.
    """
    log = logger or _LOG
    state = _read(checkpoint, trust)
    simmim = is_simmim_checkpoint(state)
    if simmim:
        dropped = [k for k in state if not k.startswith('encoder.') or k == 'encoder.mask_token']
        state = convert_simmim_checkpoint(state)
        log.info(f"load_pretrained: SimMIM checkpoint: encoder weights taken with the 'encoder.' prefix removed; "
                 f"dropped {len(dropped)} tensors (mask token and decoder: {dropped[:4]}"
                 f"{' ...' if len(dropped) > 4 else ''})")
    state = {k: v for k, v in state.items() if k.rsplit('.', 1)[-1] not in DERIVED_BUFFERS}
    own = model.state_dict()
    modules = dict(model.named_modules())
    adapted, reinitialized = [], []

    for key in list(state):
        if key.endswith('relative_position_bias_table') and key in own and state[key].shape != own[key].shape:
            if state[key].shape[1] != own[key].shape[1]:
                raise ValueError(f"{key}: checkpoint has {state[key].shape[1]} heads, the model "
                                 f"{own[key].shape[1]}")
            window = modules[key.rsplit('.', 1)[0]].window_size
            if simmim:  # the official SimMIM fine-tune's resize, square windows only as upstream
                if window[0] != window[1]:
                    raise ValueError(f"{key}: the SimMIM table resize needs a square window, the model has "
                                     f"{tuple(window)}")
                state[key] = geometric_resize_relative_position_bias_table(state[key], 2 * window[0] - 1)
            else:
                state[key] = resize_relative_position_bias_table(state[key], window)
            adapted.append(key)
        elif key == 'patch_embed.proj.weight' and key in own and state[key].shape[1] != own[key].shape[1] \
                and state[key].shape[0] == own[key].shape[0]:
            before = state[key].shape[1]
            # timm's rule: 3 -> 1 sums the RGB filters; more channels repeat them and rescale by 3 / in_chans
            state[key] = adapt_input_conv(own[key].shape[1], state[key].float()).to(state[key].dtype)
            adapted.append(key)
            log.info(f"load_pretrained: {key}: adapted the patch embedding from {before} to {own[key].shape[1]} "
                     f"input channels (timm's adapt_input_conv: "
                     f"{'summed over the channels' if own[key].shape[1] == 1 else 'repeated and rescaled'})")
        elif key == 'absolute_pos_embed' and key in own and state[key].shape != own[key].shape:
            if state[key].shape[-1] != own[key].shape[-1]:
                raise ValueError(f"{key}: checkpoint has width {state[key].shape[-1]}, the model {own[key].shape[-1]}")
            state[key] = resize_absolute_pos_embed(state[key], model.patches_resolution)
            adapted.append(key)

    head_w, head_b = state.get('head.weight'), state.get('head.bias')
    own_head = own.get('head.weight')
    if head_w is not None and (own_head is None or head_w.shape != own_head.shape):
        classes_in, classes_out = head_w.shape[0], (own_head.shape[0] if own_head is not None else 0)
        if classes_in == 21841 and classes_out == 1000 and head_w.shape[1] == own_head.shape[1]:
            index = imagenet22k_to_1k_indices()
            state['head.weight'], state['head.bias'] = head_w[index], head_b[index]
            adapted += ['head.weight', 'head.bias']
            log.info("load_pretrained: mapped the 21841-class ImageNet-22K head to 1000 ImageNet-1K classes")
        else:
            del state['head.weight']
            state.pop('head.bias', None)
            if isinstance(getattr(model, 'head', None), nn.Linear):
                nn.init.zeros_(model.head.weight)
                nn.init.zeros_(model.head.bias)
                reinitialized += ['head.weight', 'head.bias']
            log.warning(f"load_pretrained: checkpoint head has {classes_in} classes, the model {classes_out}: "
                        f"the head is re-initialised (zeros) and trained from scratch")

    if (simmim and 'head.weight' not in state and 'head.weight' in own
            and isinstance(getattr(model, 'head', None), nn.Linear)):
        # a pre-training checkpoint has no head: the official SimMIM fine-tune leaves the model's freshly built
        # head (trunc_normal std 0.02, bias 0) as it is, and so does this
        reinitialized += ['head.weight', 'head.bias']
        log.warning("load_pretrained: the SimMIM checkpoint has no classification head: the model's head keeps "
                    "its fresh initialisation and is trained from scratch")

    missing = [k for k in own if k not in state and k not in reinitialized]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model ({type(model).__name__}): "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. "
                         f"Is it a checkpoint of another architecture or depth?")
    for key, value in state.items():
        if value.shape != own[key].shape:
            if key.endswith(('spatial_mlp.weight', 'spatial_mlp.bias')):  # Swin-MLP: one matrix per window position
                raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} does not fit the model's "
                                 f"{tuple(own[key].shape)}: Swin-MLP's spatial MLP of another window size or head "
                                 f"count cannot be resized; fine-tune with the checkpoint's "
                                 f"MODEL.SWIN_MLP.WINDOW_SIZE and NUM_HEADS")
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} does not fit the model's "
                             f"{tuple(own[key].shape)} (another width, depth or head count?)")
    model.load_state_dict(state, strict=False)
    if adapted:
        log.info(f"load_pretrained: adapted {len(adapted)} tensors to the new size: {adapted}")
    return {'adapted': adapted, 'reinitialized': reinitialized}
