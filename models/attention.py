"""Window attention core shared by V1 and V2: the additive bias cache, the two fast attention paths, and the
official attention that the modules run with the fast paths off (``models.fast_paths``)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast_paths import use_eager_fast_path, use_eager_fast_paths, use_fast_path, use_fast_paths
from .lowp import Linear


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                     fused: bool, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of ``(B*nW, nH, N, d)`` windows with an additive ``(B*nW | nW | 1, nH, N, N)`` bias.

    ``fused`` uses ``scaled_dot_product_attention``, except while gradients are recorded on the CPU: SDPA has
    no CPU kernel with a backward for an additive mask, and its fallback scales q and k separately, guards
    fully masked rows with extra passes and materialises the bias gradient at ``(B*nW, nH, N, N)``. There,
    and when not ``fused``, attention runs as matmul, bias add, softmax, matmul, with a bias of ``nW``
    entries broadcast over the batch, never expanded. SDPA only while the fast paths are on (the attention
    modules run :meth:`WindowAttentionBase.official_attention` instead of this function when they are off).
    """
    if fused and use_fast_path('sdpa') and not cpu_training(q):
        if bias.shape[0] not in (1, q.shape[0]):  # SDPA needs a mask broadcastable to (B*nW, nH, N, N)
            bias = windows_mask(bias, q.shape[0])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    attn = _biased_logits(q, k, bias, scale)
    attn = _softmax_in_place(attn) if _softmax_in_place_applies(attn) else attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


# SDPA's memory-efficient CUDA kernel wants every stride of the mask but the last a multiple of this many
# elements; torch pads (copies) a mask that is not (``preprocess_mask`` in aten's transformers/attention.cpp).
MASK_ALIGNMENT = 8


def windows_mask(bias: torch.Tensor, windows: int, aligned: Optional[bool] = None) -> torch.Tensor:
    """The ``(nW, nH, N, N)`` bias repeated over the batch as the ``(B*nW, nH, N, N)`` mask SDPA takes.

    It has to be a copy: window ``w`` of the batch needs entry ``w mod nW``, which no stride expresses. A
    broadcast ``(1, nW*nH, N, N)`` mask would need q, k, v (views of the qkv projection, whose layout does not
    merge ``nW`` with ``nH``) and the output copied to and from a ``(B, nW*nH, N, d)`` layout: ``4 d`` elements
    per token and head against the mask's ``N``, 128 against 49 for Swin-T (docs/DEVICE.md, "The
    shifted-window mask"). ``aligned`` (default: off the CPU) writes the copy straight into rows padded to
    :data:`MASK_ALIGNMENT` elements, the layout SDPA's memory-efficient kernel takes as it is: a plain reshape's
    copy (N = 49 is not a multiple of 8) was padded into a second full-size copy inside SDPA. The CPU kernels
    take any strides, and there the plain reshape stays. Same values either way.
    """
    nw, heads, n, _ = bias.shape
    batched = bias.unsqueeze(0).expand(windows // nw, -1, -1, -1, -1)  # (B, nW, nH, N, N), no copy
    pad = -n % MASK_ALIGNMENT
    if aligned is None:
        aligned = bias.device.type != 'cpu'
    if not aligned or pad == 0:
        return batched.reshape(windows, heads, n, n)  # (B*nW, nH, N, N), one copy
    padded = F.pad(batched, (0, pad))  # (B, nW, nH, N, N + pad), one copy, contiguous
    return padded.view(windows, heads, n, n + pad)[..., :n]  # (B*nW, nH, N, N): aligned rows, no copy


def cpu_training(t: torch.Tensor) -> bool:
    """Whether attention on ``t`` records gradients on the CPU: there the fast path is the matmul attention
    on contiguous heads (:func:`window_attention`, :meth:`WindowAttentionBase.split_heads`)."""
    return torch.is_grad_enabled() and t.device.type == 'cpu'


def eager_without_grad() -> bool:
    """Nothing recorded for a backward and no graph captured: the attention may overwrite its own buffers and
    cache what it derives from the parameters (the in-place bias add and softmax, the combined bias)."""
    return not torch.is_grad_enabled() and use_eager_fast_paths()


def _biased_logits(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q @ k^T + bias``, a bias of ``nW`` entries broadcast over the batch (never expanded).

    With nothing recorded for a backward (and outside graph capture) the bias goes into the logits' own buffer:
    one ``(B*nW, nH, N, N)`` tensor fewer to allocate, which on the CPU is fresh pages more often than not."""
    windows, heads, n, _ = q.shape
    attn = q @ k.transpose(-2, -1)  # (B*nW, nH, N, N)
    if bias.shape[0] not in (1, windows):
        attn = attn.view(-1, bias.shape[0], heads, n, n)
    if eager_without_grad():
        attn = torch.add(bias, attn, alpha=scale, out=attn)
    else:
        attn = attn + bias if scale == 1.0 else torch.add(bias, attn, alpha=scale)
    return attn.view(windows, heads, n, n)


# The rows of fp32 a chunk of :func:`_softmax_in_place` holds: small enough to stay in cache and on the
# allocator's free lists, large enough that the loop costs nothing (2 threads, Zen 5: 1 MiB chunks 15.0 ms, 4 MiB
# 14.6 ms, 256 KiB 18.7 ms a Swin-T batch-8 forward's softmaxes, with glibc keeping freed blocks).
SOFTMAX_CHUNK_BYTES = 4 << 20


def _softmax_in_place_applies(attn: torch.Tensor) -> bool:
    """Whether the low-precision CPU logits ``attn`` take :func:`_softmax_in_place`: no gradient recorded (its
    buffer is overwritten), eager fast paths."""
    return attn.dtype in (torch.bfloat16, torch.float16) and attn.device.type == 'cpu' and attn.is_contiguous() \
        and eager_without_grad()


def _softmax_in_place(attn: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of contiguous low-precision CPU logits, written back into their buffer: each
    chunk of rows converted to fp32, softmaxed there and rounded once, as the bf16 kernel also computes (in fp32).

    Why: PyTorch's CPU softmax on a bf16 last dim of N = 49 ran at about 2/3 the speed of its fp32 kernel on
    the same values converted (Zen 5, 2 threads, a Swin-T batch-8 forward's softmaxes: 19.0 ms in bf16, 14.6 ms
    this way; with glibc's default malloc 25.4 and 21.8 ms), and it needs no output buffer."""
    rows = attn.view(-1, attn.shape[-1])
    step = max(1, SOFTMAX_CHUNK_BYTES // (4 * rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step]
        chunk.copy_(torch.softmax(chunk, -1, dtype=torch.float32))
    return attn


class _SplitHeads(torch.autograd.Function):
    """``(B_, N, 3C)`` -> contiguous ``q * q_scale``, k, v ``(B_, nH, N, d)``: one copy each way.

    Contiguous heads keep every batched matmul of the attention on the fast path; views of the permuted
    ``qkv`` send the backward matmuls through per-window copies. The query scale rides along with the copy.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, q_scale: float):
        b, n, c3 = qkv.shape
        ctx.shape, ctx.heads, ctx.q_scale = qkv.shape, heads, q_scale
        parts = qkv.view(b, n, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4)
        out = torch.empty(parts.shape, dtype=qkv.dtype, device=qkv.device)
        torch.mul(parts[0], q_scale, out=out[0])
        out[1:].copy_(parts[1:])
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        b, n, c3 = ctx.shape
        grad = next(g for g in grads if g is not None)
        out = grad.new_empty(b, n, 3, ctx.heads, c3 // (3 * ctx.heads))
        for i, g in enumerate(grads):
            if g is None:
                out[:, :, i].zero_()
            elif i == 0:
                torch.mul(g.transpose(1, 2), ctx.q_scale, out=out[:, :, 0])
            else:
                out[:, :, i].copy_(g.transpose(1, 2))
        return out.view(b, n, c3), None, None


class WindowAttentionBase(nn.Module):
    """Holds what V1 and V2 attention share: qkv/proj layers, the head split, and a cache of the combined
    ``position bias + shift mask`` tensor for inference (rebuilt whenever the parameters it comes from
    change, and always rebuilt while gradients are being recorded)."""

    def __init__(self, dim: int, num_heads: int, window_size, attn_drop: float, proj_drop: float,
                 fused_attn: bool):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = tuple(window_size)
        self.fused_attn = fused_attn
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # at most one entry: key -> (mask, bias); see attention_bias
        self._bias_cache: Dict[tuple, Tuple[Optional[torch.Tensor], torch.Tensor]] = {}

    def train(self, mode: bool = True) -> 'WindowAttentionBase':
        """Switching between training and evaluation empties the bias cache: fused optimizers (torch's fused
        AdamW on CPU, at least) update weights in place without bumping their version counters, so versions
        alone would serve the previous epoch's bias to this epoch's validation."""
        self._bias_cache.clear()
        return super().train(mode)

    def position_bias(self) -> torch.Tensor:
        """``(nH, N, N)`` additive relative position bias."""
        raise NotImplementedError

    def _bias_sources(self) -> tuple:
        """Parameters the position bias is computed from (their versions key the cache)."""
        raise NotImplementedError

    def attention_bias(self, mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Position bias plus the shift mask in ``dtype``, the dtype the attention runs in: ``(nW, nH, N, N)``
        with a mask, else ``(1, nH, N, N)``.

        Built with autocast off: the position bias in its parameters' precision, rounded once to ``dtype``,
        and the mask added in ``dtype``, so no fp32 tensor of ``nW`` (or, expanded for SDPA, ``B*nW``) windows
        is made under low precision, and the values do not depend on the autocast state. Without gradients
        (and outside graph capture) the result is cached; one entry per module, keyed on the mask, ``dtype``,
        the device and the versions of the parameters, so each validation after training replaces the
        previous entry instead of adding one; ``train()``/``eval()`` empty it (see ``train``).
        """
        sources = self._bias_sources()
        device = sources[0].device
        cacheable = eager_without_grad()
        if cacheable:
            key = (id(mask), dtype, device) + tuple((p._version, p.data_ptr()) for p in sources)
            cached = self._bias_cache.get(key)
            if cached is not None and cached[0] is mask:  # the entry holds the mask, so its id is not reused
                return cached[1]
        with torch.autocast(device.type, enabled=False):
            bias = self.position_bias().to(dtype).unsqueeze(0)  # (1, nH, N, N)
            if mask is not None:
                bias = bias + mask.to(dtype).unsqueeze(1)  # (nW, nH, N, N)
        if cacheable:
            self._bias_cache.clear()
            self._bias_cache[key] = (mask, bias)
        return bias

    def split_heads(self, qkv: torch.Tensor, q_scale: float = 1.0):
        """``(B_, N, 3C)`` -> q, k, v of shape ``(B_, nH, N, d)`` and the query scale still to apply.

        On the CPU fast path while gradients are recorded (the matmul attention of :func:`window_attention`)
        q, k and v are contiguous copies with the scale folded into q (returned scale 1); otherwise they are
        views and the scale is left to the attention.
        """
        if self.fused_attn and cpu_training(qkv) and use_eager_fast_path('contiguous_heads'):
            return (*_SplitHeads.apply(qkv, self.num_heads, q_scale), 1.0)
        b, n, _ = qkv.shape
        return (*qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0), q_scale)

    def official_attention(self, logits: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The official code from the logits ``(B*nW, nH, N, N)`` on, for the fast paths off: + position bias,
        + the ``(nW, N, N)`` shift mask broadcast over the batch, softmax, dropout, ``@ v``, heads merged and
        projected. Nothing cached; the sums in the dtypes the official code gets (the mask in the logits')."""
        windows, heads, n, _ = logits.shape
        attn = logits + self.position_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(windows // nw, nw, heads, n, n) + mask.to(attn.dtype).unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.merge_heads(attn @ v)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = x.shape
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, self.dim)))

    def flops(self, n: int) -> float:
        """Official count for one window of ``n`` tokens: qkv, q@k, attn@v, proj."""
        return n * self.dim * 3 * self.dim + 2 * self.num_heads * n * (self.dim // self.num_heads) * n + \
            n * self.dim * self.dim

    def extra_repr(self) -> str:
        return f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, ' \
               f'fused_attn={self.fused_attn}'


class ScaledWindowAttention(WindowAttentionBase):
    """Window attention as ``softmax(q * scale @ k^T + bias + mask) @ v`` (V1 and Swin-MoE; V2 is cosine
    attention). Subclasses set ``qkv`` and ``scale`` and give the position bias."""

    scale: float

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v, scale = self.split_heads(self.qkv(x), self.scale)  # (B_, nH, N, d) each
        if not use_fast_paths():
            return self.official_attention((q * scale) @ k.transpose(-2, -1), v, mask)
        bias = self.attention_bias(mask, q.dtype)
        drop = self.attn_drop.p if self.training else 0.0
        return self.merge_heads(window_attention(q, k, v, bias, scale, self.fused_attn, drop))
