"""The transformer MLP (optional pre-norm -> fc1 -> GELU -> fc2), computed in row chunks with a lean backward.

A plain ``fc2(gelu(fc1(norm(x))))`` keeps the norm output, the fc1 output and the GELU output for backward,
and allocates every 4C-wide intermediate as one fresh tensor. At the first stage of Swin-T (batch 8) such a
tensor is 38 MiB, above glibc's mmap threshold, so each one costs page faults on first touch (measured: a
``(25088, 96) @ (96, 384)`` matmul takes 17.7 ms into a fresh output and 8.4 ms into a reused one).

``_ChunkedMlp`` does the same arithmetic over chunks of rows:
- only the input, the fc1 output and the weights as cast for the matmuls are saved; the norm output and GELU
  are recomputed in backward per chunk (cheap, elementwise, and still in cache);
- every intermediate is chunk-sized, so it is served from the allocator's free lists and stays in cache;
- the weight gradients accumulate over chunks.
Under autocast the matmuls run in the autocast dtype, as ``F.linear`` would, and the norm in its parameters' dtype
(fp32), as autocast's own LayerNorm would. It is a fast path (``models.fast_paths``): with the switch off, under
graph capture and with dropout between the layers the MLP is the official ``fc2(drop(gelu(fc1(norm(x)))))``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast_paths import use_eager_fast_path
from .lowp import Linear, autocast_dtype, cast_weight, linear, linear_kernel, mm, weight_grad_mm

# Chunking pays when the whole 4C-wide intermediate would be large enough to be mmapped afresh (glibc's
# threshold tops out at 32 MiB); then chunks hold about CHUNK_BYTES each. Measured on Swin-T, 2 CPU cores:
# the first stage (38 MiB) gains, the second (19 MiB) and later ones lose a little when chunked.
WHOLE_BYTES = 24 << 20
CHUNK_BYTES = 2 << 20
MIN_CHUNK_ROWS = 1024


def chunk_rows(rows: int, hidden: int, itemsize: int, device: torch.device) -> int:
    """Rows per chunk for ``rows`` tokens of a ``hidden``-wide intermediate of ``itemsize`` bytes.

    One chunk off the CPU: GPU allocators reuse memory, and many small kernels would cost launches.
    """
    if device.type != 'cpu' or rows * hidden * itemsize <= WHOLE_BYTES:
        return max(rows, 1)
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (hidden * itemsize))


def _norm_dtype(x: torch.Tensor, norm_weight: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype the folded LayerNorm runs in: its parameters' (fp32 under autocast, as autocast's own
    fp32 LayerNorm would). CUDA's layer_norm kernels reject a bf16/fp16 input with fp32 parameters (the
    residual stream is low precision after a patch merging under autocast); only the CPU's accept the mix."""
    return x.dtype if norm_weight is None else norm_weight.dtype


def _mlp_forward(x: torch.Tensor, normed: bool, norm_weight: Optional[torch.Tensor],
                 norm_bias: Optional[torch.Tensor], eps: float, w1: torch.Tensor, b1: Optional[torch.Tensor],
                 w2: torch.Tensor, b2: Optional[torch.Tensor], rows: int, compute: torch.dtype, kernel: str,
                 keep_hidden: bool = True):
    """Forward over chunks of ``rows`` rows of a 2-D ``x``: returns the output, the fc1 output chunks (none
    unless ``keep_hidden``; then the GELU may be fused into fc1, see ``lowp.linear``) and the two weights in the
    compute dtype (for backward, which would otherwise cast them again)."""
    w1c, w2c, b1c, b2c = (cast_weight(t, compute, keep=not keep_hidden) for t in (w1, w2, b1, b2))
    outs: List[torch.Tensor] = []
    hidden: List[torch.Tensor] = []
    norm_dtype = _norm_dtype(x, norm_weight)
    with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit
        for start in range(0, x.shape[0], rows):
            xc = x[start:start + rows]
            if normed:
                xc = F.layer_norm(xc.to(norm_dtype), xc.shape[-1:], norm_weight, norm_bias, eps)
            if keep_hidden:
                h = linear(xc.to(compute), w1c, b1c, kernel)
                hidden.append(h)
                h = F.gelu(h)
            else:
                h = linear(xc.to(compute), w1c, b1c, kernel, gelu=True)
            outs.append(linear(h, w2c, b2c, kernel))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), hidden, (w1c, w2c)


class _ChunkedMlp(torch.autograd.Function):
    """``fc2(gelu(fc1(layer_norm(x))))`` (the norm when ``normed``) in chunks of ``rows`` rows of a 2-D
    ``x``; see the module doc."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, normed: bool, norm_weight: Optional[torch.Tensor],
                norm_bias: Optional[torch.Tensor], eps: float, w1: torch.Tensor, b1: Optional[torch.Tensor],
                w2: torch.Tensor, b2: Optional[torch.Tensor], rows: int, compute: torch.dtype,
                kernel: str) -> torch.Tensor:
        out, hidden, (w1c, w2c) = _mlp_forward(x, normed, norm_weight, norm_bias, eps, w1, b1, w2, b2, rows,
                                               compute, kernel)
        ctx.save_for_backward(x, norm_weight, norm_bias, w1c, w2c, *hidden)
        ctx.normed, ctx.eps, ctx.rows = normed, eps, rows
        ctx.weight_dtype = w1.dtype
        ctx.kernel = kernel  # the caller's matmul kernel (grad mode is off here and in backward)
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, norm_weight, norm_bias, w1c, w2c, *hidden = ctx.saved_tensors
        rows, channels, normed, weight_dtype = ctx.rows, x.shape[-1], ctx.normed, ctx.weight_dtype
        grad_out = grad_out.to(w1c.dtype)
        grad_w1: Optional[torch.Tensor] = None  # (accumulated over the chunks)
        grad_w2: Optional[torch.Tensor] = None
        grad_b1 = w1c.new_zeros(w1c.shape[0], dtype=weight_dtype) if ctx.has_b1 else None
        # Bias gradients as autocast's F.linear computes them: summed in the compute dtype (PyTorch accumulates
        # a bf16 sum in fp32 and rounds once), then cast. ``sum(0, dtype=fp32)`` of a bf16 tensor first makes an
        # fp32 copy of it: the 4C-wide grad_h of Swin-T's first stage (38 MiB) took 60 ms a block on a Zen 4.
        grad_b2 = grad_out.sum(0).to(weight_dtype) if ctx.has_b2 else None
        grad_nw = torch.zeros_like(norm_weight) if normed and ctx.needs_input_grad[2] else None
        grad_nb = torch.zeros_like(norm_bias) if normed and ctx.needs_input_grad[3] else None
        grad_x = torch.empty_like(x)
        norm_dtype = _norm_dtype(x, norm_weight)
        for i, h in enumerate(hidden):
            span = slice(i * rows, i * rows + h.shape[0])
            xc, gc = x[span], grad_out[span]
            if normed:  # recompute the norm output (bitwise the forward's) and its statistics
                xc = xc.to(norm_dtype)
                xn, mean, rstd = torch.native_layer_norm(xc, (channels,), norm_weight, norm_bias, ctx.eps)
            else:
                xn = xc
            xn = xn.to(w1c.dtype)
            grad_w2 = _accumulate_weight_grad(grad_w2, gc, F.gelu(h), ctx.kernel, weight_dtype)
            grad_h = torch.ops.aten.gelu_backward(mm(gc, w2c, ctx.kernel), h)
            grad_w1 = _accumulate_weight_grad(grad_w1, grad_h, xn, ctx.kernel, weight_dtype)
            if grad_b1 is not None:
                grad_b1 += grad_h.sum(0)
            grad_xn = mm(grad_h, w1c, ctx.kernel)
            if normed:
                mask = [True, grad_nw is not None, grad_nb is not None]
                gx, gnw, gnb = torch.ops.aten.native_layer_norm_backward(
                    grad_xn.to(norm_dtype), xc, (channels,), mean, rstd, norm_weight, norm_bias, mask)
                grad_x[span] = gx
                if grad_nw is not None:
                    grad_nw += gnw
                if grad_nb is not None:
                    grad_nb += gnb
            else:
                grad_x[span] = grad_xn
        return grad_x, None, grad_nw, grad_nb, None, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None


def _accumulate_weight_grad(acc: Optional[torch.Tensor], grad: torch.Tensor, x: torch.Tensor, kernel: str,
                            dtype: torch.dtype) -> torch.Tensor:
    """``acc + grad.t() @ x`` in ``dtype`` (the weight's), a chunk's share of a weight gradient; ``acc`` None: the
    first chunk's."""
    share = weight_grad_mm(grad, x, kernel).to(dtype)
    return share if acc is None else acc.add_(share)


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, with the official parameter names ``fc1`` / ``fc2``.

    ``forward(x, norm)`` applies ``norm`` first; a plain ``nn.LayerNorm`` is then folded into the chunked
    computation (recomputed in backward instead of stored).
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0., fc2_bias: bool = True):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_features, in_features, bias=fc2_bias)  # Swin-MoE's MLP_FC2_BIAS False: none
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        if not use_eager_fast_path('chunked_mlp') or self.drop.p > 0.0 and self.training or x.numel() == 0:
            # the official ops: fast paths off, graph capture (see fast_paths.py), dropout between the layers
            x = norm(x) if norm is not None else x
            if type(self.act) is nn.GELU and self.act.approximate == 'none':  # the same ops (lowp.linear)
                h = linear(x, self.fc1.weight, self.fc1.bias, gelu=True)  # fused in compiled CPU inference
            else:
                h = self.act(self.fc1(x))
            return self.drop(self.fc2(self.drop(h)))
        fold_norm = isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
        if norm is not None and not fold_norm:
            x = norm(x)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        compute = autocast_dtype(x) or x.dtype
        rows = chunk_rows(x.shape[0], self.fc1.out_features, torch.finfo(compute).bits // 8, x.device)
        weight, bias, eps = (norm.weight, norm.bias, norm.eps) if fold_norm else (None, None, 0.0)
        args = (x, fold_norm, weight, bias, eps, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                rows, compute, linear_kernel(compute, x.device))  # chosen here, in the caller's grad mode
        if torch.is_grad_enabled():
            out = _ChunkedMlp.apply(*args)
        else:
            out = _mlp_forward(*args, keep_hidden=False)[0]
        return out.view(*shape[:-1], out.shape[-1])
