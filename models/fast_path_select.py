"""Choosing the named fast paths (``models.fast_paths.PATHS``) by measurement on the machine, as
``torch.backends.cudnn.benchmark`` chooses convolution kernels: each path is timed against its plain
computation on whole steps of the model where the caller gives one (else on the model's own blocks), at the
run's real shapes and autocast dtype, in training (forward and backward) and in evaluation (forward, no grad),
and kept only where it does not cost time.

Cost: one forward of the model on a sample batch (to catch every block's input: the cache key), then, per mode,
each applicable path off in turn and the baseline (all on), interleaved over up to ``rounds`` rounds (within
``BUDGET_S``, at least ``MIN_ROUNDS``) after a warm-up, each a whole step of the sample batch: a forward in
evaluation, a forward and backward in training (the optimizer runs the same either way). Without a step from
the caller, one block per stage (the shifted one where a stage has it) weighted by the stage's depth: about a
third of a step, but blind to what happens between blocks. Measured on a Zen 5, bf16: the blocks timed apart saw
SDPA's cost in evaluation at 2-3%, inside the margin, where whole forwards (each block's input cold, SDPA's
batch-wide mask copy in fresh memory) saw 6-10%; in training they saw 0.87x of all on without the chunked MLP
where interleaved whole steps measured 0.93-0.99x. The fastest round of each counts (as ``timeit`` advises): on a
shared machine other processes only ever add time, and a median of a few rounds still swings by factors there
(measured on 2 shared cores: the same tiny block took 1 ms to 400 ms).

No I/O here (models never do I/O): the caller (``engine.select_fast_paths``) caches the result per machine,
torch version, dtype and the signature this module returns, broadcasts it and records it in checkpoints.
On CUDA nothing is timed (today's choices, all on, are kept): see :func:`applicable_paths`.
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .fast_paths import MODES, Choices, all_on, fast_path_choices, get_fast_path_choices
from .lowp import cpu_native, onednn_supports
from .swin_common import SwinBlock

Timer = Callable[[], float]
# Timed rounds after the warm-up stop once this many seconds were spent on them (at least MIN_ROUNDS rounds, at
# most ``rounds``): one round decided on noise there (Swin-T bf16, two runs: V1's recomputed attention input 0.58x
# then 1.23x of all on), and a choice is cached for good. Measured on 2 shared cores (load ~6): Swin-T batch 8
# bf16 took 130 s for a warm-up and 3 rounds (one model-equivalent train step ~5.6 s there), a tiny demo model
# 12 s; the choice is cached per machine and shape and never remeasured on resume, so this is paid once.
# Two rounds were too few for a 4-6% difference: on a 2-core Intel Xeon with AMX (family 6 model 167, Swin-T
# batch 8 bf16 training, 2026-12-04) three selections with the two-round budget timed the plain MLP at 1.10x,
# 0.98x and 0.96x of all on, where eight interleaved rounds measured 0.93-0.95x in each of three repetitions.
BUDGET_S = 15.0
MIN_ROUNDS = 3
# A path is switched off only when its plain computation is faster by more than this fraction: the fast paths
# are the tested default, and a difference inside timing noise should not flip it from run to run. The check of
# the paths so chosen, timed off together, then only asks for a faster time than all on: applying the margin a
# second time rejected a 5% gain about one time in three on that Xeon.
MARGIN = 0.03


def applicable_paths(mode: str, dtype: Optional[torch.dtype], device: torch.device) -> List[str]:
    """The named paths that change what runs in ``mode`` for ``dtype`` (None: fp32) on ``device``.

    Off the CPU: none (no timing; CUDA keeps every path on, as before). On the CPU: ``lowp_matmul`` only for a
    low-precision dtype the CPU has no native arithmetic for; ``onednn_linear`` for fp32 and for bf16 where the
    CPU has native bf16; ``sdpa`` only in evaluation (CPU training takes the matmul attention anyway, see
    ``models.attention.window_attention``); the contiguous heads, V1's recomputed attention input and the
    permutation backward only in training.
    """
    if device.type != 'cpu':
        return []
    paths = ['chunked_mlp']
    if dtype in (torch.bfloat16, torch.float16) and not cpu_native(dtype):
        paths.append('lowp_matmul')
    if onednn_supports(dtype or torch.float32):
        paths.append('onednn_linear')
    if mode == 'train':
        paths += ['contiguous_heads', 'recompute_attn_input', 'permute_backward']
    else:
        paths.append('sdpa')
    return paths


class _Sample:
    """One block's call as the model made it: the block, its (detached) input, the map size, its weight."""

    def __init__(self, block: nn.Module, x: torch.Tensor, hw: Tuple[int, int], weight: int):
        self.block, self.x, self.hw, self.weight = block, x, hw, weight


def capture_blocks(model: nn.Module, run_forward: Callable[[], object]) -> List[_Sample]:
    """The input of every :class:`SwinBlock` during one ``run_forward()`` (no grad), then one block per group of
    equal (width, map size) calls, the shifted one where there is one, weighted by the group's size."""
    calls: List[Tuple[nn.Module, torch.Tensor, Tuple[int, int]]] = []

    def hook(module, args, kwargs):
        x, hw = args[0], tuple(int(v) for v in args[1])
        calls.append((module, x.detach().clone(), hw))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, SwinBlock)]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    groups: Dict[tuple, List[Tuple[nn.Module, torch.Tensor, Tuple[int, int]]]] = {}
    for call in calls:
        groups.setdefault((call[0].dim, call[2], tuple(call[1].shape)), []).append(call)
    samples = []
    for members in groups.values():
        shifted = [c for c in members if any(c[0].shift_size)]
        block, x, hw = (shifted or members)[0]
        samples.append(_Sample(block, x, hw, len(members)))
    return samples


def signature(samples: Sequence[_Sample]) -> List[list]:
    """What the timings depend on besides the machine: per sampled block its class, input shape, map size,
    window, shift, heads, weight (a cache key part)."""
    return [[type(s.block).__name__, list(s.x.shape), list(s.hw), list(s.block.window_size),
             list(s.block.shift_size), int(getattr(s.block.attn, 'num_heads', 0)), s.weight] for s in samples]


def _step(samples: Sequence[_Sample], mode: str, autocast: contextlib.AbstractContextManager) -> None:
    """One timed unit: every sampled block once (training: forward and backward)."""
    for s in samples:
        if mode == 'train':
            x = s.x.detach().requires_grad_(True)
            with autocast:
                y = s.block(x, s.hw, recompute_norm=True)
            y.float().sum().backward()
        else:
            with torch.no_grad(), autocast:
                s.block(s.x, s.hw)


def _weighted_time(samples: Sequence[_Sample], mode: str, autocast_fn, timer: Timer) -> float:
    total = 0.0
    for s in samples:
        start = timer()
        _step([s], mode, autocast_fn())
        total += (timer() - start) * s.weight
    return total


def _forward_time(forward: Callable[[], object], autocast_fn, timer: Timer) -> float:
    with torch.no_grad(), autocast_fn():
        start = timer()
        forward()
        return timer() - start


def _train_step_time(forward: Callable[[], torch.Tensor], model: nn.Module, autocast_fn, timer: Timer) -> float:
    """One training step's forward and backward of the whole model (no optimizer: it runs the same either way)."""
    model.zero_grad(set_to_none=True)
    start = timer()
    with autocast_fn():
        out = forward()
    out.float().sum().backward()
    return timer() - start


# The together-timings of measure_choices and the all-on timing each is compared with.
BASELINE_OF = {'chosen, timed together': 'all on, timed again',
               'best alone, timed together': 'all on, timed again (best alone)'}


def _time_variants(variants: Dict[str, Choices], unit: Callable[[], float], rounds: int, budget_s: float
                   ) -> Dict[str, float]:
    """The fastest round's time of each variant (choices), the variants interleaved within each round;
    ``unit`` runs and times one unit under the choices in force."""
    times: Dict[str, List[float]] = {k: [] for k in variants}
    spent = 0.0  # wall time of the timed rounds (time.perf_counter: the budget is real time)
    for r in range(rounds + 1):  # round 0 warms up (allocator, caches, geometries, oneDNN's primitives)
        if r > MIN_ROUNDS and spent >= budget_s:
            break
        start = time.perf_counter()
        for label, variant in variants.items():
            with fast_path_choices(variant):
                t = unit()
            if r:
                times[label].append(t)
        if r:
            spent += time.perf_counter() - start
    return {k: min(v) for k, v in times.items()}


def measure_choices(model: nn.Module, samples: Sequence[_Sample], dtype: Optional[torch.dtype],
                    device: torch.device, modes: Sequence[str] = MODES, rounds: int = 5,
                    timer: Timer = time.perf_counter, budget_s: float = BUDGET_S,
                    forward: Optional[Callable[[], torch.Tensor]] = None
                    ) -> Tuple[Choices, Dict[str, Dict[str, float]]]:
    """Time each applicable path against its plain computation; returns the choices and the fastest round's
    times ``{mode: {'all on': s, 'no <path>': s, ...}}`` (seconds per model-equivalent of the sampled blocks, or
    per whole step where ``forward`` is given).

    A path is chosen off when the time without it was shorter by more than ``MARGIN``; the paths so chosen are
    then timed off together against all on once more and kept off only if that is faster too (paths interact:
    the oneDNN linear and the chunked MLP share the MLP's matmuls, and a noisy round can make several look worth
    switching off); where it is not and several were chosen, the one whose absence saved the most is timed alone
    against all on in the same way.

    ``forward`` (a closure running ``model`` on a sample batch and returning its output) times whole steps
    instead of the blocks apart: evaluation on forwards (no grad), training on forward and backward of the output's
    sum (see the module doc).

    The model's parameters' gradients, training flag and the RNG state (dropout, drop path) are as before.
    """
    choices = all_on()
    timings: Dict[str, Dict[str, float]] = {}
    was_training = model.training
    grads = {p: p.grad for p in model.parameters()}

    def autocast_fn():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    base = get_fast_path_choices()

    def without(names: Sequence[str], mode: str) -> Choices:
        return {m: dict(c, **({n: False for n in names} if m == mode else {})) for m, c in base.items()}

    try:
        with torch.random.fork_rng(devices=[]):
            for mode in modes:
                paths = applicable_paths(mode, dtype, device)
                if not paths:
                    continue
                model.train(mode == 'train')
                variants = {'all on': base, **{f'no {name}': without([name], mode) for name in paths}}
                if forward is None:
                    unit = functools.partial(_weighted_time, samples, mode, autocast_fn, timer)
                elif mode == 'eval':
                    unit = functools.partial(_forward_time, forward, autocast_fn, timer)
                else:
                    unit = functools.partial(_train_step_time, forward, model, autocast_fn, timer)
                medians = _time_variants(variants, unit, rounds, budget_s)
                off = sorted((name for name in paths if medians[f'no {name}'] < (1.0 - MARGIN) * medians['all on']),
                             key=lambda name: medians[f'no {name}'])
                candidates = []  # (label, the paths to time off together against all on), first passing wins
                if off:
                    candidates.append(('chosen, timed together', off))
                if len(off) > 1:
                    candidates.append(('best alone, timed together', off[:1]))
                chosen: List[str] = []
                for label, names in candidates:
                    again = _time_variants({'all on': base, 'chosen': without(names, mode)}, unit, rounds, budget_s)
                    medians[label], medians[BASELINE_OF[label]] = again['chosen'], again['all on']
                    if again['chosen'] < again['all on']:
                        chosen = names
                        break
                for name in chosen:
                    choices[mode][name] = False
                timings[mode] = medians
    finally:
        model.train(was_training)
        for p, g in grads.items():
            p.grad = g
    return choices, timings
