"""SimMIM masked-image pre-training (Xie et al., CVPR 2022) for Swin V1 and V2, as the official code runs it.

``SimMIM(encoder, ...)(x, mask) -> loss``: the encoder (the classifier's backbone with a learned ``mask_token``
that replaces the embeddings of masked patches), a one-layer decoder (1x1 conv to ``stride**2 * in_chans``
channels, then PixelShuffle back to pixels) and an L1 loss on the masked pixels only. Parameter names are the
official ones (``encoder.*``, ``encoder.mask_token``, ``decoder.0.*``), so official SimMIM checkpoints load with
``model.load_state_dict(ckpt['model'])``.

The encoders subclass ``SwinTransformer`` / ``SwinTransformerV2``: they share every layer with the classifiers and
only change what happens between the patch embedding and the position embedding. Unlike the official encoder
(square inputs of exactly ``img_size``), any input size works, as for the classifiers.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .swin_common import SwinBackbone
from .swin_transformer import SwinTransformer
from .swin_transformer_v2 import SwinTransformerV2


def norm_targets(targets: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Each pixel normalised by the mean and unbiased variance of the ``patch_size`` x ``patch_size`` window
    around it (per channel; windows clipped at the border), as the official ``norm_targets``."""
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE must be an odd number >= 1, got {patch_size}")
    pad = patch_size // 2
    mean = F.avg_pool2d(targets, patch_size, stride=1, padding=pad, count_include_pad=False)  # (B, C, H, W)
    square_mean = F.avg_pool2d(targets ** 2., patch_size, stride=1, padding=pad, count_include_pad=False)
    # pixels per clipped window: avg_pool of ones, counting the padding, times the full window area
    count = F.avg_pool2d(torch.ones_like(targets), patch_size, stride=1, padding=pad,
                         count_include_pad=True) * (patch_size ** 2)
    var = (square_mean - mean ** 2.) * (count / (count - 1))  # unbiased (Bessel); same op order as official
    var = torch.clamp(var, min=0.)
    return (targets - mean) / (var + 1.e-6) ** 0.5


class _MaskedEncoder(SwinBackbone):
    """What the SimMIM encoders add to a Swin backbone: ``mask_token`` and ``forward(x, mask)``.

    A mixin placed before ``SwinTransformer``/``SwinTransformerV2`` in the bases, so the backbone code is
    the classifier's.
    """

    def _add_mask_token(self) -> None:
        if self.num_classes != 0:
            raise ValueError(f"a SimMIM encoder has no classification head: num_classes must be 0, "
                             f"got {self.num_classes}")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0., std=.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Images ``(B, C, H, W)`` and a patch mask ``(B, H/p, W/p)`` (1 = masked) -> the normalised last-stage
        map ``(B, num_features, H/stride, W/stride)``."""
        x, hw = self.patch_embed(x)  # (B, L, embed_dim), L = h * w patches
        if mask is None:
            raise ValueError("the SimMIM encoder needs a mask of shape (B, H / patch, W / patch)")
        if mask.ndim != 3 or mask.shape[0] != x.shape[0] or tuple(mask.shape[1:]) != hw:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the {x.shape[0]} images' patch "
                             f"grid {hw}: expected ({x.shape[0]}, {hw[0]}, {hw[1]})")
        w = mask.flatten(1).unsqueeze(-1).type_as(x)  # (B, L, 1)
        x = x * (1. - w) + self.mask_token.to(x.dtype) * w  # mask_token broadcasts over (B, L)
        x = self.pos_drop(self._pos_embed(x, hw))
        for layer in self.layers:
            x, hw, _ = layer(x, hw)
        x = self.norm(x)  # (B, h * w, num_features)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], hw[0], hw[1])

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return super().no_weight_decay() | {'mask_token'}


class SwinTransformerForSimMIM(_MaskedEncoder, SwinTransformer):
    """Swin V1 encoder for SimMIM (official name); takes ``SwinTransformer``'s keywords, ``num_classes=0``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._add_mask_token()


class SwinTransformerV2ForSimMIM(_MaskedEncoder, SwinTransformerV2):
    """Swin V2 encoder for SimMIM (official name); takes ``SwinTransformerV2``'s keywords, ``num_classes=0``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._add_mask_token()


class SimMIM(nn.Module):
    """Encoder + 1x1-conv/PixelShuffle decoder; ``forward(x, mask)`` returns the masked-pixel L1 loss.

    Args:
        encoder: a ``SwinTransformerForSimMIM`` / ``SwinTransformerV2ForSimMIM``.
        encoder_stride: pixels per output cell of the encoder (``patch_size * 2**(stages - 1)``; 32 for the
            official configs).
        in_chans, patch_size: of the encoder's input and patch embedding.
        norm_target, norm_target_patch_size: ``MODEL.SIMMIM.NORM_TARGET.ENABLE`` / ``.PATCH_SIZE``.
    """

    def __init__(self, encoder: _MaskedEncoder, encoder_stride: int, in_chans: int, patch_size: int,
                 norm_target: bool = False, norm_target_patch_size: int = 47):
        super().__init__()
        if norm_target and (norm_target_patch_size < 1 or norm_target_patch_size % 2 == 0):
            raise ValueError(f"MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE must be an odd number >= 1, "
                             f"got {norm_target_patch_size}")
        self.encoder = encoder
        self.encoder_stride = encoder_stride
        # official: 3 output channels per pixel; in_chans here, which is 3 in every official config
        self.decoder = nn.Sequential(
            nn.Conv2d(in_channels=encoder.num_features, out_channels=encoder_stride ** 2 * in_chans, kernel_size=1),
            nn.PixelShuffle(encoder_stride),
        )
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.norm_target = norm_target
        self.norm_target_patch_size = norm_target_patch_size
        # official V2 SimMIM checkpoints name the position-bias MLP rpe_mlp (utils_simmim renames it on load)
        self._register_load_state_dict_pre_hook(_rename_rpe_mlp)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)``, patch mask ``(B, H/p, W/p)`` -> scalar loss (mean L1 per masked value)."""
        # contiguous NCHW: the encoder's map is a channels-last view, for which the 1x1 conv's backward returns a
        # channels-last weight gradient that DDP's buckets reject with a stride warning (a copy of the small
        # last-stage map avoids it)
        z = self.encoder(x, mask).contiguous()  # (B, num_features, h, w)
        x_rec = self.decoder(z)  # (B, in_chans, h * stride, w * stride): at least H x W (padded inputs)
        height, width = x.shape[-2:]
        # the loss in fp32 whatever the autocast dtype: a sum over ~10^5 values per image
        x_rec = x_rec[..., :height, :width].float()
        mask = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)  # (B, H', W')
        mask = mask[:, :height, :width].unsqueeze(1).to(x_rec.dtype)  # (B, 1, H, W)
        target = x.float()
        if self.norm_target:
            target = norm_targets(target, self.norm_target_patch_size)
        loss_recon = F.l1_loss(target, x_rec, reduction='none')  # (B, C, H, W)
        return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / self.in_chans

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'encoder.' + name for name in self.encoder.no_weight_decay()}

    def derived_buffer_names(self) -> tuple:
        return self.encoder.derived_buffer_names()

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        # As the official code: the encoder's keywords get the 'encoder.' prefix too, so, being substrings of
        # no parameter name ('encoder.cpb_mlp' is not in 'encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight'),
        # they match nothing and pre-training decays the 2-D+ bias tables, cpb_mlp weights and logit_scale.
        # Kept so that the optimizer groups equal the official ones (tests/fixtures/simmim/groups.json).
        return {'encoder.' + name for name in self.encoder.no_weight_decay_keywords()}


def _rename_rpe_mlp(state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and '.rpe_mlp.' in k]:
        state_dict[key.replace('.rpe_mlp.', '.cpb_mlp.')] = state_dict.pop(key)


def build_simmim(model_type: str, arch: dict, norm_target: bool = False, norm_target_patch_size: int = 47,
                 qk_scale: Optional[float] = None, pretrained_window_sizes: Optional[Sequence[int]] = None) -> SimMIM:
    """The SimMIM model for ``model_type`` ('swin' | 'swinv2') from the backbone keywords ``arch``.

    ``arch`` holds ``SwinTransformer``-style keywords (``patch_size``, ``in_chans``, ``depths``, ...); its
    ``num_classes`` is ignored (the encoder has none). ``pretrained_window_sizes`` (V2): None = 0 for every stage.
    """
    arch = dict(arch, num_classes=0)
    if model_type == 'swin':
        encoder: _MaskedEncoder = SwinTransformerForSimMIM(qk_scale=qk_scale, **arch)
    elif model_type == 'swinv2':
        if pretrained_window_sizes is None:
            pretrained_window_sizes = [0] * len(arch.get('depths', (2, 2, 6, 2)))
        encoder = SwinTransformerV2ForSimMIM(pretrained_window_sizes=pretrained_window_sizes, **arch)
    else:
        raise ValueError(f"SimMIM pre-training supports MODEL.TYPE 'swin' and 'swinv2', not {model_type!r}")
    patch_size = encoder.patch_embed.patch_size
    if patch_size[0] != patch_size[1]:
        raise ValueError(f"SimMIM needs a square patch size, got {patch_size}")
    # 32 for the official 4-stage, patch-4 configs (which the official code hard-codes); other depths work too
    stride = patch_size[0] * 2 ** (len(encoder.layers) - 1)
    return SimMIM(encoder, stride, arch.get('in_chans', 3), patch_size[0], norm_target, norm_target_patch_size)


__all__ = ['SimMIM', 'SwinTransformerForSimMIM', 'SwinTransformerV2ForSimMIM', 'build_simmim', 'norm_targets']
