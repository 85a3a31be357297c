"""The transformer MLP (fc1 -> GELU -> fc2) with a memory-lean backward.

A plain ``fc2(gelu(fc1(x)))`` keeps both the fc1 output and the GELU output (each 4C wide) for backward.
Here GELU and fc2 form one autograd function that saves only the fc1 output and recomputes GELU (cheap,
elementwise) in backward: the largest activation of every block is stored once instead of twice.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _GeluLinear(torch.autograd.Function):
    """``linear(gelu(h), weight, bias)`` saving ``h`` only."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # under autocast, compute in the activation dtype, as F.linear would
        compute = h.dtype
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(h), weight.to(compute), None if bias is None else bias.to(compute))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight = ctx.saved_tensors
        grad_out = grad_out.to(h.dtype)
        act = F.gelu(h)
        grad_weight = grad_out.flatten(0, -2).t().mm(act.flatten(0, -2)).to(weight.dtype)
        grad_bias = grad_out.flatten(0, -2).sum(0).to(weight.dtype) if ctx.has_bias else None
        grad_act = grad_out.matmul(weight.to(h.dtype))
        grad_h = torch.ops.aten.gelu_backward(grad_act, h)
        return grad_h, grad_weight, grad_bias


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, with the official parameter names ``fc1`` / ``fc2``."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.drop.p == 0.0 and torch.is_grad_enabled() and h.requires_grad:
            return _GeluLinear.apply(h, self.fc2.weight, self.fc2.bias)
        return self.drop(self.fc2(self.drop(self.act(h))))
