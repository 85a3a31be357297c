"""The linear layers' matmul kernels on the CPU: bf16/fp16 without native arithmetic, and fp32 through oneDNN.

On an x86 CPU without AVX512-BF16 or AMX, PyTorch's bf16 GEMM falls back to a generic kernel: measured
40-65 GFLOP/s on this project's CPU, against 150-230 for MKL's fp32 GEMM on Swin's shapes. There, a matmul
on bf16 operands is computed by the fp32 kernel on the same (bf16-valued) operands and rounded back to bf16:
the arithmetic of a bf16 GEMM with fp32 accumulation (products of bf16 values are exact in fp32), at fp32
speed. Activations stay bf16 in memory. Where the CPU has native support, or on GPUs, nothing changes; with the
fast paths off (``models.fast_paths``) neither: PyTorch's own low-precision kernels run.

fp32 and native bf16 (``onednn_linear``): PyTorch computes fp32 ``F.linear`` on x86 with MKL's sgemm, which on
an AMD EPYC Zen 5 ran Swin's shapes at 81-199 GFLOP/s against 110-460 for oneDNN's fp32 GEMM (``torch.ops.mkldnn.
_linear_pointwise``, the kernel inductor calls for CPU linears; 2 threads, docs/BENCHMARKS.md); in bf16 under
autocast, ``F.linear`` ran 280-630 GFLOP/s and oneDNN's linear on the same bf16 operands 420-800, the most on
the narrow first-stage layers (C = 96). Where the selection (``models.fast_path_select``) measures it faster
on the machine, a linear layer's forward and its input gradient take oneDNN, and so does its weight gradient
(a reduction over the rows) in fp32; in bf16 that one stays aten's ``mm`` (:func:`weight_grad_mm`). Without a
gradient to record, the MLP's GELU is fused into fc1's GEMM (oneDNN's erf GELU post-op: one pass over the
4C-wide output instead of two). The same products and sums in another order: outputs agree to rounding.

``linear`` and :class:`Linear` apply these, and also run under autocast the way ``F.linear`` would.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.utils.weak import WeakIdKeyDictionary

from .fast_paths import capturing, use_eager_fast_paths, use_fast_path


@functools.lru_cache(maxsize=None)
def cpu_native(dtype: torch.dtype) -> bool:
    """Whether this CPU has native arithmetic for ``dtype`` matmuls (bf16: AVX512-BF16 or AMX)."""
    def has(feature: str) -> bool:  # private torch.cpu probes; assume native when one is missing
        probe = getattr(torch.cpu, f'_is_{feature}_supported', None)
        return True if probe is None else bool(probe())

    if dtype == torch.bfloat16:
        return has('avx512_bf16') or has('amx_tile')
    if dtype == torch.float16:
        return has('amx_fp16')
    return True


def upcast_dtype(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether matmuls of ``dtype`` on ``device`` should run through the fp32 kernel (a fast path)."""
    return device.type == 'cpu' and dtype in (torch.bfloat16, torch.float16) and use_fast_path('lowp_matmul') \
        and not cpu_native(dtype)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``x``'s device, or None."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _rounded(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t`` rounded to ``dtype`` and held in fp32 (the operand a low-precision GEMM would see)."""
    return None if t is None else t.to(dtype).float()


class _UpcastLinear(torch.autograd.Function):
    """``F.linear`` on low-precision operands through fp32 kernels; saves the low-precision input only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        low = x.dtype
        return F.linear(x.float(), _rounded(weight, low), _rounded(bias, low)).to(low)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        low = x.dtype
        grad = grad_out.to(low).float().flatten(0, -2)
        grad_x = grad.mm(_rounded(weight, low)).to(low).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = grad.t().mm(x.float().flatten(0, -2)).to(low).to(weight.dtype) \
            if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0).to(low).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's CPU linear (``torch.ops.mkldnn._linear_pointwise``)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')
    except (AttributeError, RuntimeError):
        return False


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether the ``onednn_linear`` path can take a linear of ``dtype``: fp32, and bf16 where the CPU has
    native bf16 arithmetic (without it, ``lowp_matmul`` or PyTorch's own kernel takes bf16)."""
    return onednn_available() and (dtype == torch.float32 or dtype == torch.bfloat16 and cpu_native(dtype))


def _in_dispatch_mode() -> bool:
    # Under a Python dispatch mode (torch.utils.flop_counter's FlopCounterMode, fake or meta tensors) tools
    # count and trace ATen ops, which know no oneDNN linear: give them F.linear. No public probe exists.
    return torch._C._len_torch_dispatch_stack() > 0


def compiling_a_graph() -> bool:
    """Whether ``torch.compile`` is capturing (not ``torch.export``, the ONNX exporter, or TorchScript, whose
    graphs must hold ATen ops only)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not torch.jit.is_tracing() \
        and not torch.jit.is_scripting()


@torch.compiler.assume_constant_result  # under torch.compile: called once, its answer a constant of the graph
def _onednn_supports_constant(dtype: torch.dtype) -> bool:
    return onednn_supports(dtype)


def linear_kernel(dtype: torch.dtype, device: torch.device) -> str:
    """The kernel for a linear computed in ``dtype`` on ``device``, by the current choices and grad mode:
    ``'aten'`` (``F.linear``), ``'upcast'`` (the fp32 kernel on low-precision operands, ``lowp_matmul``) or
    ``'onednn'`` (``onednn_linear``). A custom autograd function decides in its caller (grad mode is off
    inside it).

    Under ``torch.compile``, CPU inference keeps ``onednn_linear`` (as the opaque op ``swin::onednn_linear``):
    inductor lowers an ``F.linear`` of non-constant weights to MKL's sgemm, and Swin-T ran at 15-16 img/s
    compiled against 27 eager with oneDNN's linears (Zen 5, fp32, batch 8). Training graphs take ``F.linear``
    (inductor derives their backward)."""
    if device.type != 'cpu':
        return 'aten'
    if capturing():  # first: under a graph capture nothing eager-only is evaluated
        onednn = compiling_a_graph() and not torch.is_grad_enabled() and use_fast_path('onednn_linear')
        return 'onednn' if onednn and _onednn_supports_constant(dtype) else 'aten'
    if upcast_dtype(dtype, device):
        return 'upcast'
    if use_fast_path('onednn_linear') and onednn_supports(dtype) and not _in_dispatch_mode():
        return 'onednn'
    return 'aten'


# Inference under autocast casts every weight to the compute dtype at every call (autocast's own cache lives one
# region, one forward): 18 ms of a ~200 ms bf16 Swin-T batch-8 forward on a Zen 5. In CPU inference ours keeps
# the cast copy (half the fp32 weights' bytes) until the weight changes (its version counter or storage). Not
# on GPUs, where the cast is cheap and a kept copy of an FSDP-gathered weight would undo the sharding.
_CASTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def cast_weight(weight: Optional[torch.Tensor], dtype: torch.dtype, keep: bool) -> Optional[torch.Tensor]:
    """``weight.to(dtype)``; with ``keep`` (the caller records no gradient) a CPU cast is kept for the next call
    while the fast paths are on and no graph is captured."""
    if weight is None or weight.dtype == dtype:
        return weight
    if not keep or weight.device.type != 'cpu' or not use_eager_fast_paths():
        return weight.to(dtype)
    key = (weight._version, weight.data_ptr(), dtype)
    hit = _CASTS.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = weight.to(dtype)
    _CASTS[weight] = (key, out)
    return out


@torch.library.custom_op('swin::onednn_linear', mutates_args=())
def onednn_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     post_op: str) -> torch.Tensor:
    """oneDNN's linear as an op that ``torch.compile`` keeps opaque: inductor lowers
    ``mkldnn._linear_pointwise`` itself only for weights that are graph constants (its freezing mode)."""
    return _onednn_linear(x, weight, bias, post_op)


@onednn_linear_op.register_fake
def _onednn_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         post_op: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   post_op: str = 'none') -> torch.Tensor:
    if capturing():
        return onednn_linear_op(x, weight, bias, post_op)
    # post_op 'gelu' with algorithm 'none': the exact (erf) GELU of nn.GELU(), fused into the GEMM's output
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], 'none' if post_op == 'gelu' else '')


def mm(a: torch.Tensor, b: torch.Tensor, kernel: Optional[str] = None) -> torch.Tensor:
    """``a @ b`` for 2-D operands of one dtype (no autograd) through ``kernel`` (see :func:`linear_kernel`;
    a backward passes its forward's, as it runs without grad mode; None: decide now).

    oneDNN's linear takes ``b.t()`` as the strided view it is: a contiguous copy of it (a transposed copy of
    the weight at every input gradient) cost more than it saved. Measured on a Zen 5 (2 threads), the input
    gradients of one Swin-T batch-8 step: fp32 143 ms on the view, 178 with the copy (MKL's mm: 311); bf16
    72 ms on the view, 87 with the copy (aten's mm: 72). The same products either way (bitwise here)."""
    kernel = kernel or linear_kernel(a.dtype, a.device)
    if kernel == 'upcast':
        return a.float().mm(b.float()).to(a.dtype)
    if kernel == 'onednn':
        return _onednn_linear(a, b.t(), None)
    return a.mm(b)


def weight_grad_mm(grad: torch.Tensor, x: torch.Tensor, kernel: str) -> torch.Tensor:
    """``grad.t() @ x``, a linear layer's ``(N, K)`` weight gradient from its ``(M, N)`` output gradient and
    ``(M, K)`` input: a reduction over the M rows (no autograd). Through ``kernel`` (the forward's), except that
    oneDNN takes it only in fp32: the weight gradients of one Swin-T batch-8 step on a Zen 5 (2 threads) took
    270 ms through oneDNN on the two transposed views against 339 through MKL's mm, but in bf16 136 against 89
    through aten's mm (itself oneDNN's matmul)."""
    if kernel == 'onednn' and grad.dtype == torch.float32:
        return _onednn_linear(grad.t(), x.t(), None)
    return mm(grad.t(), x, 'upcast' if kernel == 'upcast' else 'aten')


class _OneDnnLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN's forward and input gradient; the weight gradient by :func:`weight_grad_mm`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)  # (M, N)
        grad_x = mm(grad, weight, 'onednn').view(x.shape) if ctx.needs_input_grad[0] else None  # (M, K)
        grad_w = weight_grad_mm(grad, x.reshape(-1, x.shape[-1]), 'onednn') if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           kernel: Optional[str] = None, gelu: bool = False) -> torch.Tensor:
    """``F.linear`` (then ``F.gelu`` when ``gelu``), also under autocast, through the kernel
    :func:`linear_kernel` picks (``kernel``: that decision taken by the caller; None: decide here).

    Low-precision operands (explicit or from autocast) run through fp32 kernels on CPUs without native
    support for them (``lowp_matmul``), fp32 and native bf16 through oneDNN (``onednn_linear``, which fuses
    the GELU into the GEMM when there is no gradient to record); otherwise exactly ``F.linear``."""
    autocast = autocast_dtype(x)
    low = autocast or x.dtype
    kernel = kernel or linear_kernel(low, x.device)
    if kernel == 'aten' or kernel == 'onednn' and autocast is None and weight.dtype != x.dtype:
        out = F.linear(x, weight, bias)  # (a dtype mismatch without autocast: F.linear's own error)
        return F.gelu(out) if gelu else out
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(low)
        track = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                             (bias is not None and bias.requires_grad))
        if kernel == 'onednn':  # autocast's casts, outside the function so that autograd takes them back
            weight, bias = cast_weight(weight, low, not track), cast_weight(bias, low, not track)
            if not track:
                return _onednn_linear(x, weight, bias, 'gelu' if gelu else 'none')
            out = _OneDnnLinear.apply(x, weight, bias)
        elif track:
            out = _UpcastLinear.apply(x, weight, bias)
        else:
            out = F.linear(x.float(), _rounded(weight, low), _rounded(bias, low)).to(low)
        return F.gelu(out) if gelu else out


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose matmuls take :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
