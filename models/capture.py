"""Whether the model is being recorded into a graph rather than run eagerly."""
from __future__ import annotations

import torch


def capturing() -> bool:
    """True under ``torch.compile``, TorchScript tracing/scripting and the ONNX exporter built on them.

    The eager fast paths (custom autograd functions, row-chunk loops, caches keyed on parameter versions)
    then step aside for plain ops that a graph can hold with dynamic shapes; the compiler plans memory itself.
    """
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
