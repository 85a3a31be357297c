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

Named fast paths, each with a choice beside the master switch (``use_fast_path(name)`` = switch on AND the
choice for the current mode: ``'train'`` while gradients are recorded, else ``'eval'``). These are the tricks that
run separately and cost or save time by themselves, so a measurement can choose them one by one
(``models.fast_path_select``; ``engine.select_fast_paths`` applies, caches and records the choice):

- ``lowp_matmul``: the fp32-kernel low-precision matmuls of ``lowp``;
- ``chunked_mlp``: the row-chunked MLP of ``mlp``;
- ``contiguous_heads``: the contiguous q/k/v copies with the query scale folded in (CPU training);
- ``sdpa``: ``scaled_dot_product_attention`` where ``fused_attn`` allows it (else the matmul attention);
- ``recompute_attn_input``: V1's attention input recomputed in backward;
- ``permute_backward``: the window permutation's gather backward (instead of index_select's scatter-add);
- ``onednn_linear``: fp32 and native-bf16 linear layers on the CPU through oneDNN's linear instead of
  MKL's sgemm and PyTorch's addmm, the MLP's GELU fused into fc1 without gradients (``lowp``).

The rest (the window gather, cached geometries and masks, the -1e4 mask, the combined bias, the one-permute merge)
is structural and follows the master switch only. Every choice starts on (today's behaviour);
``set_fast_path_choices`` / ``fast_path_choices`` change them.

``capturing()``: under ``torch.compile``, TorchScript and the exporters built on them, the eager-only tricks
(custom autograd functions, caches keyed on parameter versions, recompute hooks) step aside for plain ops that a
graph can hold with dynamic shapes; the graph-friendly ones (SDPA, the window gather) stay.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Mapping, Optional

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

PATHS = ('lowp_matmul', 'chunked_mlp', 'contiguous_heads', 'sdpa', 'recompute_attn_input', 'permute_backward',
         'onednn_linear')
MODES = ('train', 'eval')
# Bumped whenever a path's code changes enough to change what is faster: cached choices (engine's
# select_fast_paths) are keyed on it, so a machine measures again instead of keeping a choice made for other code.
# 2: the position bias made contiguous (a permuted bias had slowed every add to it) and the matmul attention of
# inference adds it in place, which turned SDPA from faster to slower in CPU inference on a Zen 5. 3: evaluation
# timed on whole forwards (models.fast_path_select). 4: oneDNN's backward on transposed views instead of copies
# (and fp32 weight gradients through oneDNN), the in-place fp32 softmax of low-precision CPU inference. 5: training
# timed on whole steps, and a failed set's best path alone timed again (models.fast_path_select). 6: the chunked
# MLP's backward sums its bias gradients in bf16 and reuses the forward's cast weights (no fp32 copies). 7: the
# selection times at least three rounds (15 s budget) and checks the chosen set without a second margin.
REVISION = 7
Choices = Dict[str, Dict[str, bool]]  # mode -> path -> on


def all_on() -> Choices:
    """Every named path chosen (the default, and ``MODEL.FAST_PATHS_SELECT all``)."""
    return {mode: {name: True for name in PATHS} for mode in MODES}


_choices: Choices = all_on()


def check_choices(choices: Mapping) -> Choices:
    """``choices`` as a full, validated ``{mode: {path: bool}}`` (missing entries on); unknown names are an error."""
    unknown_modes = set(choices) - set(MODES)
    if unknown_modes:
        raise ValueError(f"fast-path choices: unknown mode(s) {sorted(unknown_modes)}; expected {MODES}")
    full = all_on()
    for mode, paths in choices.items():
        unknown = set(paths) - set(PATHS)
        if unknown:
            raise ValueError(f"fast-path choices: unknown path(s) {sorted(unknown)}; known: {PATHS}")
        full[mode].update({name: bool(on) for name, on in paths.items()})
    return full


def use_fast_path(name: str, mode: Optional[str] = None) -> bool:
    """Whether the named fast path runs: the switch is on and it is chosen for ``mode`` (default: ``'train'``
    while gradients are recorded, else ``'eval'``)."""
    if not _enabled:
        return False
    if mode is None:
        mode = 'train' if torch.is_grad_enabled() else 'eval'
    return _choices[mode][name]


def use_eager_fast_path(name: str) -> bool:
    """:func:`use_fast_path` for a trick only eager execution takes (no graph being captured)."""
    return use_fast_path(name) and not capturing()


def get_fast_path_choices() -> Choices:
    """A copy of the current choices ``{mode: {path: on}}``."""
    return {mode: dict(paths) for mode, paths in _choices.items()}


def set_fast_path_choices(choices: Mapping) -> None:
    """Choose the named paths for the whole process (missing entries: on); the master switch still rules."""
    global _choices
    _choices = check_choices(choices)


@contextlib.contextmanager
def fast_path_choices(choices: Mapping) -> Iterator[None]:
    """``set_fast_path_choices(choices)`` inside the block; the previous choices after it."""
    previous = get_fast_path_choices()
    set_fast_path_choices(choices)
    try:
        yield
    finally:
        set_fast_path_choices(previous)


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
