"""Parts shared by Swin V1 and V2: patch embedding, block, patch merging, stage and the backbone skeleton.

V1 and V2 differ only in the attention module, the norm placement in the block (pre-norm vs res-post-norm)
and the order of norm and reduction in patch merging; everything else lives here once.

Shapes: tokens travel as ``(B, H*W, C)`` with ``(H, W)`` passed alongside. For an input of ``H x W`` pixels
and patch size ``p``, stage ``i`` (0-based) works on ``H_i x W_i`` tokens with ``H_0 = ceil(H / p)``,
``H_{i+1} = ceil(H_i / 2)`` (odd maps are zero-padded before merging), and ``embed_dim * 2**i`` channels.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.multiprocessing.reductions import StorageWeakRef
from timm.layers import DropPath, trunc_normal_

from .fast_paths import use_eager_fast_path, use_fast_paths
from .lowp import Linear, autocast_dtype
from .mlp import Mlp

from .window_ops import GeometryCache, effective_shift, merge_2x2, window_to_tuple

Size = Tuple[int, int]


class PatchEmbed(nn.Module):
    """Image to patch tokens: a strided conv, then LayerNorm. Pads the image to a patch multiple."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True,
                 norm_layer: Type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.patch_size = window_to_tuple(patch_size, 'patch_size')
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Size]:
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"the model takes {self.in_chans}-channel images (in_chans), got {x.shape[1]} "
                             f"channels in input of shape {tuple(x.shape)}")
        ph, pw = self.patch_size
        pad_h, pad_w = -x.shape[2] % ph, -x.shape[3] % pw
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, hw

    def flops(self, resolution: Size) -> float:
        h, w = resolution
        flops = h * w * self.embed_dim * self.in_chans * self.patch_size[0] * self.patch_size[1]
        if self.norm is not None:
            flops += h * w * self.embed_dim
        return flops


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (4C) and reduced to 2C.

    V1 normalises before the reduction (``norm`` over 4C); V2 after it (``norm`` over 2C).
    """

    def __init__(self, dim: int, norm_layer: Type[nn.Module] = nn.LayerNorm, norm_after: bool = False):
        super().__init__()
        self.dim = dim
        self.norm_after = norm_after
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(2 * dim if norm_after else 4 * dim)

    def forward(self, x: torch.Tensor, hw: Size) -> Tuple[torch.Tensor, Size]:
        x, h2, w2 = merge_2x2(x, *hw)
        x = self.norm(self.reduction(x)) if self.norm_after else self.reduction(self.norm(x))
        return x, (h2, w2)

    def flops(self, resolution: Size) -> float:
        h, w = resolution
        # the official counts: the 4C -> 2C reduction on the merged map, plus the norm, which V1 counts
        # as H*W*C and V2 as H*W*C/2
        reduction = (h // 2) * (w // 2) * 4 * self.dim * 2 * self.dim
        return reduction + (h * w * self.dim // 2 if self.norm_after else h * w * self.dim)


@contextlib.contextmanager
def recompute_when_saved(tensor: torch.Tensor, recompute: Callable[[], torch.Tensor]):
    """Inside, whatever autograd saves that shares ``tensor``'s storage is kept as a recipe instead: in
    backward ``recompute()`` rebuilds ``tensor`` (bitwise, from inputs that are kept anyway) and the same
    view is taken of it. Frees one activation per use for the cost of recomputing it.

    ``recompute()`` runs under the autocast state in force here (as ``torch.utils.checkpoint`` does): under
    CUDA autocast a LayerNorm runs in fp32, outside it in its input's dtype. Only a saved tensor of this very
    storage is replaced: a cast of ``tensor`` (an autocast linear's own low-precision copy) is not, so
    ``tensor`` should already be in the dtype its consumers compute in.
    """
    storage = StorageWeakRef(tensor.untyped_storage())  # storage identity (data pointers of fake tensors are 0)
    base_offset = tensor.storage_offset()
    device = tensor.device.type
    autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                    dtype=torch.get_autocast_dtype(device))

    def pack(saved: torch.Tensor):
        if StorageWeakRef(saved.untyped_storage()) == storage:
            return _Recipe(saved.shape, saved.stride(), saved.storage_offset() - base_offset)
        return saved

    def unpack(packed):
        if isinstance(packed, _Recipe):
            with torch.no_grad(), torch.autocast(**autocast):
                fresh = recompute()
            return fresh.as_strided(packed.size, packed.stride, fresh.storage_offset() + packed.offset)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _Recipe(NamedTuple):
    size: torch.Size
    stride: Tuple[int, ...]
    offset: int


class SwinBlock(nn.Module):
    """One (shifted-)window attention block with its MLP.

    ``post_norm=False`` is V1 (``x + attn(norm1(x))``); ``post_norm=True`` is V2's res-post-norm
    (``x + norm1(attn(x))``). ``attn`` maps ``(B*nW, N, C)`` windows plus an optional ``(nW, N, N)`` mask to
    ``(B*nW, N, C)``.

    Subclasses (Swin-MLP) set ``mixer_name`` (the attribute, hence the parameter names, of that token mixer) and
    ``shift_by_padding`` (shifted windows by zero padding, no mask: ``window_ops.shift_padding``).
    """

    mixer_name = 'attn'
    shift_by_padding = False

    def __init__(self, dim: int, attn: nn.Module, window_size: Size, shift_size: Size, mlp_ratio: float = 4.,
                 drop: float = 0., drop_path: float = 0., norm_layer: Type[nn.Module] = nn.LayerNorm,
                 post_norm: bool = False, mlp: Optional[nn.Module] = None):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.shift_size = shift_size
        self.post_norm = post_norm
        self.norm1 = norm_layer(dim)
        setattr(self, self.mixer_name, attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        # ``mlp``: another feed-forward taking ``(x, norm)`` like Mlp (Swin-MoE's mixture of experts)
        self.mlp = mlp if mlp is not None else Mlp(dim, int(dim * mlp_ratio), drop)
        self.mlp_ratio = mlp_ratio
        self._geometry = GeometryCache()

    def forward(self, x: torch.Tensor, hw: Size, recompute_norm: bool = False) -> torch.Tensor:
        """``recompute_norm`` (V1, outside activation checkpointing, a fast path): the attention's input windows
        are not kept for backward but recomputed from ``x`` there; one activation of the block's width less."""
        shift = effective_shift(hw[0], hw[1], self.window_size, self.shift_size)
        geometry = self._geometry.windows(hw[0], hw[1], self.window_size, shift, x.device, self.shift_by_padding)
        batch = x.shape[0]
        mixer = getattr(self, self.mixer_name)
        if self.post_norm:
            y = geometry.reverse(mixer(geometry.partition(x), geometry.mask), batch)
            x = x + self.drop_path(self.norm1(y))
            return x + self.drop_path(self.norm2(self.mlp(x)))
        if not use_fast_paths():  # the official V1 block
            windows = geometry.partition(self.norm1(x))  # (B*nW, N, C)
            x = x + self.drop_path(geometry.reverse(mixer(windows, geometry.mask), batch))
            return x + self.drop_path(self.mlp(x, self.norm2))
        # the attention's input windows in the dtype its qkv linear computes in: under CUDA autocast the norm
        # outputs fp32 and the linear would save its own low-precision cast, which the recipe below (keyed
        # on this tensor's storage) could not replace; the partition also moves half the bytes then
        compute = autocast_dtype(x) or x.dtype
        windows = geometry.partition(self.norm1(x).to(compute))  # (B*nW, N, C)
        saving = contextlib.nullcontext()
        if recompute_norm and torch.is_grad_enabled() and use_eager_fast_path('recompute_attn_input'):
            saving = recompute_when_saved(
                windows, lambda block_input=x: geometry.partition(self.norm1(block_input).to(compute)))
        with saving:
            y = mixer(windows, geometry.mask)
        x = x + self.drop_path(geometry.reverse(y, batch))
        return x + self.drop_path(self.mlp(x, self.norm2))

    def flops(self, resolution: Size) -> float:
        h, w = resolution
        wh, ww = self.window_size
        num_windows = math.ceil(h / wh) * math.ceil(w / ww)
        flops = 2 * self.dim * h * w  # norm1, norm2
        flops += num_windows * self.attn.flops(wh * ww)
        # a mixture of experts counts capacity_factor * k dense MLPs (its ``flops_scale``), as the official code
        flops += 2 * h * w * self.dim * self.dim * self.mlp_ratio * getattr(self.mlp, 'flops_scale', 1.0)
        return flops


class SwinStage(nn.Module):
    """``depth`` blocks (every second one shifted by half a window) followed by optional patch merging."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module], use_checkpoint: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, hw: Size) -> Tuple[torch.Tensor, Size, torch.Tensor]:
        """Returns the merged tokens, their size, and this stage's output before merging."""
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, hw, use_reentrant=False)
            else:
                x = block(x, hw, recompute_norm=True)
        stage_out = x
        if self.downsample is not None:
            x, hw = self.downsample(x, hw)
        return x, hw, stage_out


def stage_window(resolution: Size, window_size: Size) -> Tuple[Size, bool]:
    """The official rule: a stage whose map is not larger than the window uses a window the size of the
    map and no shift. Returns the window and whether shifting is allowed."""
    if min(resolution) <= max(window_size):
        side = min(resolution)
        return (side, side), False
    return window_size, True


AttnFactory = Callable[[int, int, Size, int], nn.Module]  # (dim, heads, window, stage index) -> module
# (dim, stage index, block index) -> a block's feed-forward, or None for the standard Mlp
MlpFactory = Callable[[int, int, int], Optional[nn.Module]]


class SwinBackbone(nn.Module):
    """The Swin skeleton shared by V1 and V2; subclasses provide the attention and the norm placement.

    Public surface (both versions): ``forward``, ``forward_features``, ``forward_head``,
    ``forward_backbone`` (four NCHW stage maps), ``flops``, ``no_weight_decay``,
    ``no_weight_decay_keywords``. Parameter names follow the official checkpoints.
    """

    post_norm = False  # V2 overrides
    block_class: Type[SwinBlock] = SwinBlock  # Swin-MLP overrides

    def __init__(self, img_size, patch_size, in_chans: int, num_classes: int, embed_dim: int,
                 depths: Sequence[int], num_heads: Sequence[int], window_size, mlp_ratio: float,
                 drop_rate: float, drop_path_rate: float, ape: bool, patch_norm: bool, use_checkpoint: bool,
                 attn_factory: AttnFactory, norm_layer: Type[nn.Module] = nn.LayerNorm,
                 mlp_factory: Optional[MlpFactory] = None):
        super().__init__()
        img_size = window_to_tuple(img_size, 'img_size')
        patch = window_to_tuple(patch_size, 'patch_size')
        window = window_to_tuple(window_size, 'window_size')
        depths, num_heads = list(depths), list(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length")
        if any(d < 1 for d in depths) or any(h < 1 for h in num_heads):
            raise ValueError(f"depths and num_heads must be >= 1, got {depths} and {num_heads}")
        if embed_dim < 1 or in_chans < 1 or num_classes < 0:
            raise ValueError(f"embed_dim ({embed_dim}) and in_chans ({in_chans}) must be >= 1, "
                             f"num_classes ({num_classes}) >= 0")
        for i, heads in enumerate(num_heads):
            if (embed_dim * 2 ** i) % heads:
                raise ValueError(f"embed_dim {embed_dim}: stage {i} has {embed_dim * 2 ** i} channels, which "
                                 f"{heads} heads (num_heads[{i}]) do not divide")
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio
        self.window_size = window[0] if window[0] == window[1] else window

        self.patch_embed = PatchEmbed(patch, in_chans, embed_dim, patch_norm, norm_layer)
        self.patches_resolution = (math.ceil(img_size[0] / patch[0]), math.ceil(img_size[1] / patch[1]))
        if ape:
            num_patches = self.patches_resolution[0] * self.patches_resolution[1]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.stage_resolutions: List[Size] = []
        layers = []
        resolution = self.patches_resolution
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2 ** i
            stage_win, can_shift = stage_window(resolution, window)
            shift = (stage_win[0] // 2, stage_win[1] // 2) if can_shift else (0, 0)
            blocks = [self.block_class(dim, attn_factory(dim, heads, stage_win, i), stage_win,
                                shift if j % 2 else (0, 0), mlp_ratio, drop_rate,
                                dpr[sum(depths[:i]) + j], norm_layer, self.post_norm,
                                mlp_factory(dim, i, j) if mlp_factory is not None else None)
                      for j in range(depth)]
            last = i == self.num_layers - 1
            downsample = None if last else PatchMerging(dim, norm_layer, norm_after=self.post_norm)
            layers.append(SwinStage(blocks, downsample, use_checkpoint))
            self.stage_resolutions.append(resolution)
            resolution = (math.ceil(resolution[0] / 2), math.ceil(resolution[1] / 2))
        self.layers = nn.ModuleList(layers)
        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        # official checkpoints carry derived buffers; drop them on load (ours are rebuilt and cached)
        self._register_load_state_dict_pre_hook(_drop_derived_buffers)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'relative_position_bias_table'}

    def derived_buffer_names(self) -> Tuple[str, ...]:
        """Endings of the buffer names rebuilt from the geometry (``DERIVED_BUFFERS``): official checkpoints
        carry them, ours do not; checkpoint loading neither compares nor requires them."""
        return DERIVED_BUFFERS

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.use_checkpoint = enable

    def _pos_embed(self, x: torch.Tensor, hw: Size) -> torch.Tensor:
        if not self.ape:
            return x
        pos = self.absolute_pos_embed
        if hw != self.patches_resolution:  # another input size: resample the learned grid
            h0, w0 = self.patches_resolution
            grid = pos.reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=hw, mode='bicubic', align_corners=False)
            pos = grid.flatten(2).transpose(1, 2)
        return x + pos

    def _stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], List[Size]]:
        x, hw = self.patch_embed(x)
        x = self.pos_drop(self._pos_embed(x, hw))
        outs, sizes = [], []
        for layer in self.layers:
            size = hw
            x, hw, stage_out = layer(x, hw)
            outs.append(stage_out)
            sizes.append(size)
        return x, outs, sizes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> normalised tokens of the last stage ``(B, L, num_features)``."""
        x, _, _ = self._stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x.transpose(1, 2)).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_backbone(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four stage outputs (before merging) as NCHW maps, for detection/segmentation heads.

        Stage ``i`` has ``embed_dim * 2**i`` channels and ``ceil(H / patch / 2**i)`` rows (likewise columns).
        """
        _, outs, sizes = self._stages(x)
        return [o.transpose(1, 2).reshape(o.shape[0], o.shape[2], h, w) for o, (h, w) in zip(outs, sizes)]

    def flops(self) -> float:
        """Multiply-accumulates of one forward at ``img_size``, counted the way the official code counts.

        It counts each matmul as M*N*K (one per multiply-add), adds one per element for LayerNorms, and
        skips softmax, GELU, biases, additions and the position bias. ``torch.utils.flop_counter`` counts
        2 per multiply-add and only matmuls/convs, so its total is about twice this number (the tests check
        the relation).
        """
        flops = self.patch_embed.flops(self.patches_resolution)
        for layer, resolution in zip(self.layers, self.stage_resolutions):
            for block in layer.blocks:
                flops += block.flops(resolution)
            if layer.downsample is not None:
                flops += layer.downsample.flops(resolution)
        # the official final-norm term divides by 2**num_layers (not 4**(num_layers-1)); kept to match
        flops += self.num_features * self.patches_resolution[0] * self.patches_resolution[1] // (2 ** self.num_layers)
        flops += self.num_features * self.num_classes
        return flops


# Buffers official checkpoints carry that are derived from the config (ours are rebuilt, not stored).
DERIVED_BUFFERS = ('relative_position_index', 'attn_mask', 'relative_coords_table')


def _drop_derived_buffers(state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and k.rsplit('.', 1)[-1] in DERIVED_BUFFERS]:
        del state_dict[key]
