"""Frozen parameters: which of a model's parameters do not train (``TRAIN.FREEZE`` / ``TRAIN.LINEAR_PROBE``).

A pattern is an ``fnmatch`` glob (case-sensitive) over the names of ``model.named_parameters()``, and it also
covers everything below it: pattern ``P`` freezes the names matching ``P`` or ``P.*``. So ``layers.0`` freezes
``layers.0.blocks.0.attn.qkv.weight`` but not ``layers.10.*``; ``patch_embed`` the whole patch embedding;
``layers.*.downsample`` every patch merging; ``*.relative_position_bias_table`` one kind of tensor everywhere.
A linear probe freezes everything but the classification head (``head`` and ``head.*``).

Freezing is ``requires_grad_(False)``, done before the optimizer and DDP/FSDP are built: autograd then computes
no gradient for the tensor, ``optimizer.param_groups`` leaves it out (so it has no optimizer state), DDP puts it
in no bucket (no all-reduce) and FSDP2 reduce-scatters no gradient for it. Nothing here changes the model's
mode: it trains in ``train()`` mode as before, so dropout and drop-path still apply to the frozen part (Swin has
no BatchNorm, whose running statistics would otherwise move).

Written here because torch has no name-pattern freezing, and timm's ``timm.utils.model.freeze(root, submodules)``
takes exact module names only (no globs, no single tensors such as ``absolute_pos_embed``, an empty list freezes
everything, and a name that matches nothing gives no clear error).
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from torch import nn

HEAD = 'head'  # the classification head's module name in SwinTransformer / SwinTransformerV2 (and timm's)


class FreezeError(ValueError):
    """A freeze request that cannot be honoured: a pattern that matches nothing, or nothing left to train."""


@dataclass(frozen=True)
class FreezeSummary:
    """What ``freeze_parameters`` did: parameter counts (elements) and the frozen tensors' names."""
    trainable: int
    total: int
    frozen: Tuple[str, ...]

    def describe(self, reason: str = '') -> str:
        """``training 7,690 of 27,520,000 parameters (<reason>: 42 tensors frozen)``."""
        frozen = f"{len(self.frozen)} tensor{'' if len(self.frozen) == 1 else 's'} frozen"
        return f"training {self.trainable:,} of {self.total:,} parameters ({reason + ': ' if reason else ''}{frozen})"


def matches(name: str, pattern: str) -> bool:
    """Whether ``pattern`` covers parameter ``name``: ``name`` matches ``pattern`` or ``pattern + '.*'``."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + '.*')


def _module_prefixes(names: Sequence[str]) -> List[str]:
    """Every dotted prefix of the names (``layers``, ``layers.0``, ``layers.0.blocks``, ...), in order."""
    seen: Dict[str, None] = {}
    for name in names:
        parts = name.split('.')
        for i in range(1, len(parts) + 1):
            seen.setdefault('.'.join(parts[:i]))
    return list(seen)


def _examples(names: Sequence[str], pattern: str) -> str:
    """A few real names for an error message: the closest module paths, then the top-level ones."""
    prefixes = _module_prefixes(names)
    close = difflib.get_close_matches(pattern, prefixes, n=3, cutoff=0.6)
    top: Dict[str, None] = {}
    for name in names:  # 'patch_embed', 'layers.0', 'norm', 'head': the first part, with a stage index if any
        parts = name.split('.')
        top.setdefault('.'.join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0])
    text = f"did you mean {', '.join(close)}? " if close else ''
    return text + f"the model's modules are {', '.join(top)} (e.g. {names[0]})"


def frozen_names(names: Sequence[str], patterns: Sequence[str] = (), linear_probe: bool = False) -> List[str]:
    """The names among ``names`` (parameter names, in order) that ``patterns`` or a linear probe freeze.

    Raises ``FreezeError`` for a pattern that matches no name (naming it and a few real names) and when nothing
    would be left to train."""
    names = list(names)
    if linear_probe:
        frozen = [n for n in names if not matches(n, HEAD)]
        if len(frozen) == len(names):
            raise FreezeError(f"a linear probe trains the classification head ({HEAD}.*), but the model has no "
                              f"parameter named {HEAD}.* (MODEL.NUM_CLASSES 0 builds none); "
                              f"{_examples(names, HEAD)}")
        return frozen
    for pattern in patterns:
        if not any(matches(n, pattern) for n in names):
            raise FreezeError(f"pattern {pattern!r} matches no parameter name ({pattern!r} or '{pattern}.*'); "
                              f"{_examples(names, pattern)}")
    frozen = [n for n in names if any(matches(n, p) for p in patterns)]
    if frozen and len(frozen) == len(names):
        raise FreezeError(f"the patterns {list(patterns)} freeze all {len(names)} parameter tensors, which leaves "
                          f"nothing to train; leave the head (or some stage) out of them")
    return frozen


def freeze_parameters(model: nn.Module, patterns: Sequence[str] = (),
                      linear_probe: bool = False) -> FreezeSummary:
    """``requires_grad_(False)`` on the parameters ``patterns`` (fnmatch globs, each also covering ``P.*``) or a
    linear probe (all but ``head.*``) name; call it before the optimizer, DDP/FSDP and the EMA are built. Other
    parameters are left as they are. Raises ``FreezeError`` as ``frozen_names`` does."""
    params = dict(model.named_parameters())
    frozen = frozen_names(list(params), patterns, linear_probe)
    for name in frozen:
        params[name].requires_grad_(False)
    return FreezeSummary(trainable=sum(p.numel() for p in params.values() if p.requires_grad),
                         total=sum(p.numel() for p in params.values()), frozen=tuple(frozen))
