"""Fake CUDA: run the device path without a GPU and count what it would do there.

Under torch's ``FakeTensorMode`` tensors on ``cuda`` have shapes, dtypes and devices but no data, so every device
step (forward, clipping, fused AdamW, GradScaler, EMA, the loaders' device finish) runs on a CPU-only machine in
about the time Python takes to dispatch its ops. :func:`fake_cuda` enters that mode with CUDA autocast and
GradScaler switched on (torch turns them off when ``torch.cuda.is_available()`` is False), and
:class:`DeviceOps` counts, per op:

- ``launches``: ops that run a kernel on the device (views, allocations and device queries are not counted);
- ``host_reads``: the host waiting for a device value (``.item()``, ``bool()``, ``.tolist()``, a blocking
  device-to-host copy, an op whose output size depends on data such as ``nonzero``). On fake tensors these
  raise (``DataDependentOutputException`` / ``DynamicOutputShapeException``): there is no value to read; the
  counter records the read and where it came from before the exception goes on;
- ``blocking_copies``: host-to-device copies with ``non_blocking=False`` (``torch.tensor(list, device=...)``,
  ``.to(device)``, ``copy_``), each a ``cudaStreamSynchronize``-like wait on a real GPU.

Mixing devices raises ``FakeTensorDeviceMismatchError`` as a real GPU would.

What it cannot run, and what stands in (inside :func:`fake_cuda`):

- backward: autograd wants a CUDA context. ``Tensor.backward`` is replaced by giving every leaf reachable from
  the loss's graph a zero gradient (if it has none), so everything after backward (unscale, clip, step, EMA)
  traces with gradients of the right shape, dtype and device; the backward kernels themselves are not traced
  or counted.
- ``torch.Generator(device='cuda')``: a CPU generator stands in (fake kernels do not check a generator's
  device; on a real GPU it is a CUDA generator).
- torch takes its foreach (multi-tensor) paths only for tensor types it lists; FakeTensor is added to those
  lists, so clipping, the optimizers and the EMA trace the paths a GPU runs.
- SDPA's fused kernel choice (the math path's shapes are traced), streams and events, NCCL and nvJPEG are not
  traced at all; a test that reaches nvJPEG substitutes the decoder itself.

Models are built on ``meta`` outside the fake mode (constructors read host values) and moved with
``to_empty(device='cuda')`` inside it: :func:`on_fake_cuda`.

Usage::

    with fake_cuda():
        model = on_fake_cuda(lambda: SwinTransformer())
        x = torch.randn(2, 3, 224, 224, device='cuda')
        with DeviceOps() as ops, torch.autocast('cuda', dtype=torch.bfloat16):
            logits = model(x)
    assert not ops.host_reads and not ops.blocking_copies, ops.report()

Run the tests that use it with ``pytest -m fake_cuda`` (docs/DEVICE.md).
"""
from __future__ import annotations

import collections
import contextlib
import os
import traceback
import warnings
from typing import Callable, Iterator, List, Optional, Tuple, TypeVar

import torch
import torch.cuda.amp.common as amp_common
import torch.nn as nn
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode, unset_fake_temporarily)
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device('cuda', 0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOT_KERNELS = {'empty', 'empty_strided', 'empty_like', 'new_empty', 'new_empty_strided', '_local_scalar_dense',
                'lift_fresh', 'lift_fresh_copy', 'set_', 'resize_', '_unsafe_view'}
_RealGenerator = torch.Generator
_standing_in = 0  # > 0 while a stand-in (the zero-gradient backward) runs: its ops are not the program's
ModuleT = TypeVar('ModuleT', bound=nn.Module)


def _on_cuda(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == 'cuda'


def _where() -> str:
    """The innermost project frame (not torch, not this module) of the current stack: ``file:line function``."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path.startswith(ROOT) and 'site-packages' not in path and path != os.path.abspath(__file__):
            return f"{os.path.relpath(path, ROOT)}:{frame.lineno} {frame.name}"
    return '<outside the project>'


class DeviceOps(TorchDispatchMode):
    """Counts device kernels, host reads and blocking host-to-device copies of the ops run inside it.

    Enter it inside :func:`fake_cuda` (it sees each op before the fake mode does). ``launches`` maps op names to
    counts; ``host_reads`` and ``blocking_copies`` are lists of ``"op (shape) at file:line function"``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.launches: collections.Counter = collections.Counter()
        self.host_reads: List[str] = []
        self.blocking_copies: List[str] = []

    @property
    def total(self) -> int:
        """Device kernels launched."""
        return sum(self.launches.values())

    def report(self, top: int = 12) -> str:
        common = ', '.join(f"{name} x{n}" for name, n in self.launches.most_common(top))
        return (f"{self.total} device ops ({common}); {len(self.host_reads)} host reads {self.host_reads[:5]}; "
                f"{len(self.blocking_copies)} blocking copies {self.blocking_copies[:5]}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _standing_in:
            return func(*args, **kwargs)
        name = func.__name__.split('.')[0]
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        self._copies(name, args, kwargs)
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            self.host_reads.append(f"{name} {self._shape(tensors)} at {_where()}")
            raise
        if name == '_local_scalar_dense' and tensors and _on_cuda(tensors[0]):
            self.host_reads.append(f"{name} {self._shape(tensors)} at {_where()}")
        elif func.namespace == 'aten' and not func.is_view and name not in _NOT_KERNELS:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(_on_cuda(t) for t in (*tensors, *outs)):
                self.launches[name] += 1
        return out

    def _copies(self, name: str, args: tuple, kwargs: dict) -> None:
        """Record a blocking host-to-device copy, or a blocking device-to-host copy (a host read)."""
        if name == '_to_copy' and 'device' in kwargs:
            src, dst = args[0].device, torch.device(kwargs['device'])
            blocking = not kwargs.get('non_blocking', False)
        elif name == 'copy_':
            src, dst = args[1].device, args[0].device
            blocking = not (args[2] if len(args) > 2 else kwargs.get('non_blocking', False))
        else:
            return
        if not blocking:
            return
        where = f"{name} {tuple(args[1 if name == 'copy_' else 0].shape)} at {_where()}"
        if src.type == 'cpu' and dst.type == 'cuda':
            self.blocking_copies.append(where)
        elif src.type == 'cuda' and dst.type == 'cpu':
            self.host_reads.append(where)

    @staticmethod
    def _shape(tensors: List[torch.Tensor]) -> Tuple[int, ...]:
        return tuple(tensors[0].shape) if tensors else ()


class _CpuForCudaGenerator(_RealGenerator):
    """``torch.Generator(device='cuda')`` -> a CPU generator (the rest as torch's): fake kernels ignore a
    generator's device, and creating a CUDA one needs a driver."""

    def __new__(cls, device: object = 'cpu') -> torch.Generator:
        if torch.device(device).type == 'cuda':
            device = 'cpu'
        return _RealGenerator.__new__(_RealGenerator, device=device)


def _leaves(root: torch.Tensor) -> List[torch.Tensor]:
    """The leaf tensors (parameters) that backward from ``root`` would give gradients to."""
    seen, leaves, stack = set(), [], [root.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, 'variable'):  # AccumulateGrad
            leaves.append(fn.variable)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


def zero_gradient_backward(self: torch.Tensor, *args, **kwargs) -> None:
    """Stands in for ``Tensor.backward`` on fake CUDA: each reachable leaf without a gradient gets zeros."""
    global _standing_in
    _standing_in += 1
    try:
        for leaf in _leaves(self):
            if leaf.grad is None:
                leaf.grad = torch.zeros_like(leaf)
    finally:
        _standing_in -= 1


@contextlib.contextmanager
def fake_cuda(zero_grad_backward: bool = True) -> Iterator[FakeTensorMode]:
    """Fake CUDA tensors, CUDA autocast and GradScaler on, and the stand-ins of the module docstring.

    ``amp_definitely_not_available`` is read only by the autocast and GradScaler constructors, and
    ``is_bf16_supported`` only to refuse bf16 autocast; patching both makes torch apply its real CUDA autocast
    rules (the dispatcher's AutocastCUDA key) to fake CUDA tensors. ``zero_grad_backward``: replace
    ``Tensor.backward`` (see :func:`zero_gradient_backward`).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patch(amp_common, 'amp_definitely_not_available', lambda: False))
        stack.enter_context(_patch(torch.cuda, 'is_bf16_supported', lambda *a, **k: True))
        stack.enter_context(_patch(torch, 'Generator', _CpuForCudaGenerator))
        stack.enter_context(_foreach_on_fake_tensors())
        if zero_grad_backward:
            stack.enter_context(_patch(torch.Tensor, 'backward', zero_gradient_backward))
        stack.enter_context(warnings.catch_warnings())
        # deepcopy (ModelEmaV3's copy of the model) asks every tensor for its data pointer; fake ones have none
        warnings.filterwarnings('ignore', message='Accessing the data pointer of FakeTensor')
        yield stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))


@contextlib.contextmanager
def _foreach_on_fake_tensors() -> Iterator[None]:
    """Let clipping, the optimizers and the EMA take their foreach (multi-tensor) paths on fake tensors as they
    do on CUDA: torch picks them only for the tensor types in these lists (DTensor adds itself the same way)."""
    from torch.optim import optimizer as optim_module
    from torch.utils import _foreach_utils
    lists = [optim_module._foreach_supported_types, _foreach_utils._foreach_supported_types]
    added = [types for types in lists if FakeTensor not in types]
    for types in added:
        types.append(FakeTensor)
    try:
        yield
    finally:
        for types in added:
            types.remove(FakeTensor)


@contextlib.contextmanager
def _patch(owner: object, name: str, value: object) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def on_fake_cuda(build: Callable[[], ModuleT], device: Optional[torch.device] = None) -> ModuleT:
    """``build()`` on ``meta`` (outside the fake mode: constructors read host values), then
    ``to_empty(device='cuda')`` inside it. Call within :func:`fake_cuda`."""
    with unset_fake_temporarily(), torch.device('meta'):
        module = build()
    return module.to_empty(device=device or DEVICE)
