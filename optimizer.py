"""The optimizer: parameter groups without weight decay, optional layer-wise LR decay, and the official choices.

Learning rates are taken from the config as they are; the linear scaling rule is applied once, elsewhere
(``config.apply_linear_scaling``).
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn

from config import CHOICES, ConfigError

# Prefixes that wrappers add to parameter names (DDP, torch.compile); stripped before matching names.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')
_BLOCK_NAME = re.compile(r'^layers\.(\d+)\.blocks\.(\d+)\.')
_STAGE_NAME = re.compile(r'^layers\.(\d+)\.')


def _plain_name(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _model_set(model: nn.Module, method: str) -> set[str]:
    """``model.no_weight_decay()`` or ``no_weight_decay_keywords()`` as a set; empty when the model lacks it."""
    inner = getattr(model, 'module', model)  # a DDP wrapper forwards no methods
    inner = getattr(inner, '_orig_mod', inner)  # nor does a compiled module's wrapper, reliably
    fn = getattr(inner, method, None)
    return set(fn()) if callable(fn) else set()


def stage_depths(model: nn.Module) -> list[int]:
    """Blocks per stage, read from the official parameter names ``layers.{i}.blocks.{j}.*``."""
    depths: dict[int, int] = {}
    for name, _ in model.named_parameters():
        m = _BLOCK_NAME.match(_plain_name(name))
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    return [depths.get(i, 0) for i in range(max(depths) + 1)] if depths else []


def layer_id(name: str, depths: list[int]) -> int:
    """Layer index of a parameter for layer-wise LR decay, as the official SimMIM fine-tuning
    (``get_swin_layer``) assigns it.

    ``patch_embed.*`` and ``mask_token`` are layer 0; block j of stage i is ``1 + sum(depths[:i]) + j``; a
    stage's downsample shares the id of the stage's last block; everything else (final ``norm``, ``head``, and
    ``absolute_pos_embed``, which the official code does not single out) is ``sum(depths) + 1``.
    """
    name = _plain_name(name)
    if name.startswith('patch_embed') or name == 'mask_token':
        return 0
    m = _BLOCK_NAME.match(name)
    if m:
        stage, block = int(m.group(1)), int(m.group(2))
        return 1 + sum(depths[:stage]) + block
    m = _STAGE_NAME.match(name)
    if m:  # downsample (or anything else the stage owns): the last block of the stage
        return sum(depths[:int(m.group(1)) + 1])
    return sum(depths) + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 per_layer: Optional[bool] = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups, official rules: no weight decay for 1-D tensors, ``*.bias``, the names in
    ``model.no_weight_decay()`` and the names holding a keyword of ``model.no_weight_decay_keywords()``.

    Frozen parameters (``requires_grad=False``) are left out. Without layers: the official ``[decay,
    no_decay]`` pair (empty ones dropped). Per layer (``per_layer``; by default when ``layer_decay < 1``): the
    official SimMIM fine-tune groups ``layer_{id}_{decay|no_decay}`` (see ``layer_id``) in order of first
    appearance, each with ``group_name`` and ``lr_scale = layer_decay ** (sum(depths) + 1 - layer_id)``.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    skip = _model_set(model, 'no_weight_decay')
    skip_keywords = _model_set(model, 'no_weight_decay_keywords')
    use_layers = layer_decay < 1.0 if per_layer is None else per_layer
    depths = stage_depths(model) if use_layers else []
    top = sum(depths) + 1

    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = _plain_name(name)
        no_decay = (param.ndim <= 1 or plain.endswith('.bias') or plain in skip
                    or any(k in plain for k in skip_keywords))
        layer = layer_id(plain, depths) if use_layers else top
        key = (layer, no_decay)
        if key not in groups:
            group: dict[str, Any] = {'params': [], 'param_names': [],
                                     'weight_decay': 0.0 if no_decay else weight_decay}
            if use_layers:
                group['group_name'] = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
                group['lr_scale'] = layer_decay ** (top - layer)
            groups[key] = group
        groups[key]['params'].append(param)
        groups[key]['param_names'].append(name)
    if use_layers:  # the official order: as the groups first appear in named_parameters()
        return list(groups.values())
    return [groups[k] for k in sorted(groups, key=lambda k: k[1])]  # [decay, no_decay]


def _apex_optimizer(name: str) -> type:
    try:
        from apex.optimizers import FusedAdam, FusedLAMB  # type: ignore[import-not-found]
    except ImportError:
        raise ImportError(f"TRAIN.OPTIMIZER.NAME = {name!r} needs NVIDIA apex (apex.optimizers), which is not "
                          f"installed; install apex or use TRAIN.OPTIMIZER.NAME adamw") from None
    return FusedAdam if name == 'fused_adam' else FusedLAMB


def _fused_available(model: nn.Module) -> bool:
    """Whether torch's fused AdamW supports every trainable parameter (floating point, on CPU or CUDA)."""
    return all(p.is_floating_point() and p.device.type in ('cpu', 'cuda')
               for p in model.parameters() if p.requires_grad)


def build_optimizer(config: Any, model: nn.Module, simmim: bool = False,
                    is_pretrain: bool = False) -> torch.optim.Optimizer:
    """The optimizer of ``TRAIN.OPTIMIZER.NAME`` (adamw | sgd | fused_adam | fused_lamb) over ``param_groups``
    (the official signature).

    - classification (``simmim=False``): the [decay, no_decay] pair, or per-layer groups when
      ``TRAIN.LAYER_DECAY < 1``;
    - SimMIM pre-training (``simmim=True, is_pretrain=True``): the [decay, no_decay] pair (no layer decay);
    - SimMIM fine-tuning (``simmim=True, is_pretrain=False``): per-layer groups with ``lr_scale`` from
      ``TRAIN.LAYER_DECAY`` (also when it is 1, as the official code).

    ``lr`` is ``TRAIN.BASE_LR`` times the group's ``lr_scale`` (the schedule's base value for that group, see
    ``lr_scheduler``); ``weight_decay`` is ``TRAIN.WEIGHT_DECAY`` (0 for the no-decay groups).
    """
    name = str(config.TRAIN.OPTIMIZER.NAME).lower()
    choices = CHOICES['TRAIN.OPTIMIZER.NAME']
    if name not in choices:
        raise ConfigError(f"TRAIN.OPTIMIZER.NAME = {config.TRAIN.OPTIMIZER.NAME!r} is not one of {list(choices)}")
    base_lr = float(config.TRAIN.BASE_LR)
    weight_decay = float(config.TRAIN.WEIGHT_DECAY)
    if simmim and is_pretrain:
        groups = param_groups(model, weight_decay)
    else:
        groups = param_groups(model, weight_decay, float(config.TRAIN.LAYER_DECAY), per_layer=simmim or None)
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    for group in groups:
        if 'lr_scale' in group:
            group['lr'] = base_lr * group['lr_scale']
    betas = tuple(float(b) for b in config.TRAIN.OPTIMIZER.BETAS)
    eps = float(config.TRAIN.OPTIMIZER.EPS)

    if name == 'adamw':
        # Fused: one kernel for all tensors, and it reads GradScaler's found_inf on the device, so a non-finite
        # update is skipped without a host sync (engine.UpdateStep). CUDA and CPU (torch >= 2.4) both have it.
        return torch.optim.AdamW(groups, lr=base_lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=_fused_available(model))
    if name == 'sgd':
        return torch.optim.SGD(groups, lr=base_lr, momentum=float(config.TRAIN.OPTIMIZER.MOMENTUM),
                               nesterov=True, weight_decay=weight_decay)
    optimizer_cls = _apex_optimizer(name)
    # apex does not know the 'param_names' group key; keep only what it accepts.
    groups = [{k: v for k, v in g.items() if k != 'param_names'} for g in groups]
    return optimizer_cls(groups, lr=base_lr, betas=betas, eps=eps, weight_decay=weight_decay)


def no_decay_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that get no weight decay (for logs and tests)."""
    return [n for g in param_groups(model, 1.0) if g['weight_decay'] == 0.0 for n in g['param_names']]

