"""The one switch for the speed tricks in models/, and whether the model is being captured into a graph.

``use_fast_paths()`` is read, at call time, by every place in models/ that computes something another way than
the official code for speed or memory:

- ``lowp``: bf16/fp16 matmuls through fp32 kernels on CPUs without native low-precision arithmetic;
- ``mlp``: the row-chunked MLP with its LayerNorm folded in and a lean custom backward;
- ``attention`` and the two attention modules: SDPA (with ``fused_attn``), contiguous heads with the query scale
  folded in (CPU training), the combined position-bias + mask tensor in the compute dtype (cached for
  inference), the scale folded into the bias add or into q;
- ``window_ops``: windows gathered by one precomputed index (instead of pad, roll, partition) with a
  permutation backward, geometries and masks cached per map size, the -1e4 mask value (instead of -100),
  the 2x2 patch merge as one permute (instead of four slices and a concatenation);
- ``swin_common``: V1's attention input recomputed in backward instead of kept.

Off, the model runs the plain computation of the official code, op for op where the order matters (pad, roll,
window partition; ``q * scale @ k^T``, + position bias, + mask, softmax, dropout, ``@ v``): the reference
for debugging numerics. Outputs agree with the fast paths to fp32 rounding (tests/test_fast_paths.py).

The switch is process-wide. It starts from the environment variable ``SWIN_FAST_PATHS`` (read once, at import:
``0``/``false``/``off``/``no`` = off, ``1``/``true``/``on``/``yes`` or unset = on); ``set_fast_paths`` and the
context manager ``fast_paths_enabled`` change it; ``build_model`` turns it off for a config with
``MODEL.FAST_PATHS False`` (and leaves it as it is for True). ``MODEL.FUSED_ATTN`` (the modules' ``fused_attn``)
chooses SDPA only while the switch is on.

``capturing()``: under ``torch.compile``, TorchScript and the exporters built on them, the eager-only tricks
(custom autograd functions, caches keyed on parameter versions, recompute hooks) step aside for plain ops that a
graph can hold with dynamic shapes; the graph-friendly ones (SDPA, the window gather) stay.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping

import torch

ENV_VAR = 'SWIN_FAST_PATHS'
_OFF = ('0', 'false', 'off', 'no')
_ON = ('', '1', 'true', 'on', 'yes')


def enabled_by_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """What ``SWIN_FAST_PATHS`` in ``environ`` asks for (on when unset); a value of another kind is an error."""
    value = environ.get(ENV_VAR, '').strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ValueError(f"environment variable {ENV_VAR}={environ[ENV_VAR]!r} must be one of "
                     f"{', '.join(v for v in _OFF + _ON if v)} (or unset)")


_enabled = enabled_by_environment()


def use_fast_paths() -> bool:
    """Whether the speed tricks of models/ run (see the module doc); False: the official computation."""
    return _enabled


def set_fast_paths(enabled: bool) -> None:
    """Turn the speed tricks of models/ on or off for the whole process (overrides ``SWIN_FAST_PATHS``)."""
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def fast_paths_enabled(enabled: bool) -> Iterator[None]:
    """``set_fast_paths(enabled)`` inside the block; the previous state after it."""
    previous = _enabled
    set_fast_paths(enabled)
    try:
        yield
    finally:
        set_fast_paths(previous)


def capturing() -> bool:
    """True under ``torch.compile``, TorchScript tracing/scripting and the ONNX exporter built on them."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def use_eager_fast_paths() -> bool:
    """The switch for the tricks that only eager execution takes: on, and no graph being captured."""
    return _enabled and not capturing()
