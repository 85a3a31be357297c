"""Distributed set-up from the ``torchrun`` environment, the few collectives the engine needs, and
``unwrap_model``, the one helper that finds the module under compile, DDP and EMA wrappers.

Without ``torchrun`` (no ``WORLD_SIZE`` > 1 in the environment) everything runs in a single process with no
process group; the helpers then act as identities.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on this node, and its device."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error naming the key.

    A local rank without a GPU of its own is an error too: mapping it onto another rank's GPU (modulo the device
    count) would hide a launch with more processes per node than visible GPUs and slow both ranks down.
    """
    if preference not in ('auto', 'cpu', 'cuda'):
        raise ValueError(f"DEVICE = {preference!r} is not one of ['auto', 'cpu', 'cuda']")
    if preference == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError("DEVICE = 'cuda' (--device cuda) but no CUDA device is available; use --device cpu "
                           "or --device auto")
    if preference == 'cpu' or not torch.cuda.is_available():
        return torch.device('cpu')
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"LOCAL_RANK {local_rank} has no GPU: this node shows {count} "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); start at "
                           f"most {count} processes per node (torchrun --nproc_per_node {count})")
    return torch.device('cuda', local_rank)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ''):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def process_group_backend(device: torch.device, cpu_collectives: bool = False) -> str:
    """The ``init_process_group`` backend for a run on ``device``: gloo on CPU; NCCL on CUDA, with gloo beside it
    for CPU tensors when ``cpu_collectives``.

    FSDP with CPU offload (``TRAIN.FSDP.CPU_OFFLOAD``) keeps gradients as CPU DTensors, and ``clip_grad_norm_``
    reduces their norm over the group on the CPU: an NCCL-only group has no CPU backend and fails with "No
    backend type associated with device type cpu" (pytorch#148532). ``cpu:gloo,cuda:nccl`` sends each tensor to
    the backend of its device. Off by default: a gloo backend connects every pair of ranks when it is created.
    """
    if device.type != 'cuda':
        return 'gloo'
    return 'cpu:gloo,cuda:nccl' if cpu_collectives else 'nccl'


def init_distributed(device_preference: str = 'auto', timeout_minutes: float = 60,
                     cpu_collectives: bool = False) -> DistInfo:
    """Join the process group described by ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (as set by ``torchrun``).

    NCCL on CUDA, bound to this rank's GPU (``device_id``: the communicator is created at once, on the right
    device), gloo on CPU; ``cpu_collectives`` adds gloo for CPU tensors on CUDA (``process_group_backend``).
    ``timeout_minutes`` (``DIST_TIMEOUT``) is how long a collective waits for a slow rank, e.g. while rank 0 writes
    a large checkpoint to network storage. Returns the single-process ``DistInfo`` when ``WORLD_SIZE`` is unset or
    1 (no process group; ``init_single_process_group`` makes a one-rank one where one is needed).
    """
    if not timeout_minutes > 0:
        raise ValueError(f"DIST_TIMEOUT = {timeout_minutes!r} must be a positive number of minutes")
    world_size = _env_int('WORLD_SIZE', 1)
    rank = _env_int('RANK', 0)
    local_rank = _env_int('LOCAL_RANK', 0)
    device = resolve_device(device_preference, local_rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        cuda = device.type == 'cuda'
        dist.init_process_group(backend=process_group_backend(device, cpu_collectives), init_method='env://',
                                world_size=world_size, rank=rank, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if cuda else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def init_single_process_group(device: torch.device, cpu_collectives: bool = False,
                              timeout_minutes: float = 60) -> None:
    """A process group of this one process (an in-memory store, no ``torchrun``), unless one exists: what FSDP
    needs to run in one process (its mesh has one rank). ``device`` and ``cpu_collectives`` choose the backend as
    ``process_group_backend``. ``cleanup_distributed`` removes it."""
    if dist.is_initialized():
        return
    cuda = device.type == 'cuda'
    dist.init_process_group(backend=process_group_backend(device, cpu_collectives), store=dist.HashStore(),
                            rank=0, world_size=1, timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=device if cuda else None)


def has_cpu_backend() -> bool:
    """Whether the default process group can run collectives on CPU tensors."""
    return any(part.split(':')[0] == 'cpu' for part in dist.get_backend_config().split(','))


def cleanup_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dist_info() -> Tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> List[Any]:
    """The ``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------- wrappers

def unwrap_model(model: torch.nn.Module, wrapper: Optional[type] = None) -> Optional[torch.nn.Module]:
    """The plain module under ``torch.compile`` (``_orig_mod``), DDP and EMA (timm ``ModelEmaV3``) wrappers, so
    that state-dict keys carry no prefixes; with ``wrapper`` (e.g. ``DistributedDataParallel`` or FSDP2's
    ``FSDPModule``), the first module on the way down that is one, or None.

    The one unwrap helper of the project: DDP's ``no_sync`` and FSDP's gradient-sync switch live on those
    modules, whatever compiles them.
    """
    while True:
        if wrapper is not None and isinstance(model, wrapper):
            return model
        if hasattr(model, '_orig_mod'):
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel) or _is_ema(model):
            model = model.module
        else:
            return None if wrapper is not None else model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 sharded ``model`` (under any wrapper). Without importing ``torch.distributed.fsdp`` (about a
    second) when nothing did: then nothing can be sharded."""
    fsdp = sys.modules.get('torch.distributed.fsdp')
    return fsdp is not None and unwrap_model(model, fsdp.FSDPModule) is not None


def _is_ema(obj: Any) -> bool:
    # timm not imported yet: nothing can be its EMA (and the light scripts that read checkpoints stay free of it)
    timm_utils = sys.modules.get('timm.utils')
    return timm_utils is not None and isinstance(obj, timm_utils.ModelEmaV3)
