"""Sharded training (torch FSDP2, ``fully_shard``) and sharded state through ``torch.distributed.checkpoint``.

``shard_model`` applies ``fully_shard`` to every block (the module classes the caller names: Swin's
``SwinBlock``) and then to the root (which holds the patch embedding, patch merging, final norm and head), with
the mixed precision of ``AMP_DTYPE`` (``MixedPrecisionPolicy``: block weights gathered in bf16/fp16, gradients
reduced in fp32; fp32 throughout when AMP is off) and, with ``TRAIN.FSDP.CPU_OFFLOAD``, ``CPUOffloadPolicy``.
Parameters become ``DTensor`` shards, so the optimizer must be built after sharding.

``save_sharded`` / ``load_sharded`` move the tensors of a ``TrainState`` (model, optimizer moments, EMA) to and
from a DCP directory through ``get_state_dict`` / ``set_state_dict``, which work the same for a sharded, a DDP or
a plain model: a checkpoint saved by N processes loads into M processes, or into one without FSDP. The
non-tensor rest (scheduler, scaler, RNG, counters, config, optimizer hyper-parameters) is written by
``utils.checkpoint``, which owns the file layout.

Security: DCP reads its ``.metadata`` file with plain ``pickle.load`` and non-tensor entries with
``torch.load(weights_only=False)``. ``SafeReader`` reads the metadata with an unpickler limited to DCP's own
metadata classes, ``torch.Size`` and dtypes, and ``TensorOnlyLoadPlanner`` refuses non-tensor entries (we never
write any), so loading a DCP directory runs no code from it; tensors themselves are read by DCP with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from .distributed import has_cpu_backend, init_single_process_group

METADATA_NAME = '.metadata'  # written last by DCP's coordinator: a directory without it is incomplete


class ShardedCheckpointError(RuntimeError):
    """A DCP directory that cannot be read or does not fit; the message names it."""


# ----------------------------------------------------------------------------- wrapping

def mixed_precision_policy(param_dtype: Optional[torch.dtype]) -> MixedPrecisionPolicy:
    """Weights gathered in ``param_dtype`` (None: as stored, fp32), gradients reduced in fp32 either way."""
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, block_types: Tuple[type, ...], param_dtype: Optional[torch.dtype] = None,
                cpu_offload: bool = False, reshard_after_forward: bool = True,
                device: Optional[torch.device] = None) -> nn.Module:
    """``fully_shard`` every module of ``block_types`` (the model's blocks), then the root; returns the (same, now
    sharded) module.

    Without a process group (one process, no ``torchrun``) it makes a one-rank one: FSDP then runs on a mesh of
    one, which with ``cpu_offload`` is how a model larger than one GPU trains there, and the same command runs on
    1 or N processes. With ``cpu_offload`` on CUDA the group needs a CPU backend (``cpu:gloo,cuda:nccl``, see
    ``utils.distributed.process_group_backend``): clipping reduces the CPU gradients' norm over it.
    Every rank must hold the same initial weights: FSDP keeps each rank's own slice of whatever it holds (unlike
    DDP, it does not broadcast rank 0's weights). The block is the unit: one block's weights are gathered at a
    time, and with activation checkpointing (``TRAIN.USE_CHECKPOINT``) its recomputation in backward gathers them
    again.
    """
    from torch.distributed.device_mesh import init_device_mesh
    if not block_types:
        raise ValueError("shard_model needs the block module classes to shard one by one (block_types)")
    device = device or next(model.parameters()).device
    offload_from_cuda = cpu_offload and device.type == 'cuda'
    if not (dist.is_available() and dist.is_initialized()):
        init_single_process_group(device, cpu_collectives=offload_from_cuda)
    if offload_from_cuda and not has_cpu_backend():
        raise RuntimeError(f"TRAIN.FSDP.CPU_OFFLOAD keeps the gradients in host memory and clipping reduces their "
                           f"norm there, but the process group (backend {dist.get_backend_config()!r}) has no CPU "
                           f"backend; create it with utils.distributed.init_distributed(..., cpu_collectives=True) "
                           f"(backend 'cpu:gloo,cuda:nccl')")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: Dict[str, Any] = dict(mesh=mesh, mp_policy=mixed_precision_policy(param_dtype),
                                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for module in model.modules():
        if isinstance(module, block_types):
            fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root's parameters are used last in forward and first in backward: resharding them would only re-gather.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def local_bytes(tensors: List[torch.Tensor]) -> int:
    """Bytes these tensors occupy on this rank (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, 'to_local') else t
        total += local.numel() * local.element_size()
    return total


def train_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state tensors (what sharding divides)."""
    params = [p for p in model.parameters()]
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {'params': local_bytes(params), 'grads': local_bytes(grads), 'optimizer': local_bytes(states)}


# ----------------------------------------------------------------------------- safe reading

_METADATA = 'torch.distributed.checkpoint.metadata'
# What DCP's metadata pickle holds: its plain dataclasses and enums, torch.Size, dtypes and layouts, paths. Only
# these names resolve (not whole modules: some classes there, e.g. the file-system writers, act on construction).
_SAFE_GLOBALS = {
    *((_METADATA, name) for name in ('Metadata', 'MetadataIndex', 'TensorStorageMetadata', 'BytesStorageMetadata',
                                     'ChunkStorageMetadata', 'TensorProperties', 'StorageMeta',
                                     '_MEM_FORMAT_ENCODING')),
    ('torch.distributed.checkpoint.filesystem', '_StorageInfo'), ('torch', 'Size'),
    ('torch.serialization', '_get_layout'), ('collections', 'OrderedDict'), ('pathlib', 'PosixPath'),
    ('pathlib', 'PurePosixPath'), ('pathlib', 'WindowsPath'), ('pathlib', 'PureWindowsPath'),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the names in ``_SAFE_GLOBALS`` and torch dtypes; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's metadata")


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read without arbitrary unpickling."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        from torch.distributed.checkpoint.metadata import StorageMeta
        rank = kwargs.get('rank')
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, 'rb') as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except Exception as e:  # noqa: BLE001 - damaged pickles fail in many ways
                raise ShardedCheckpointError(f"{path}: unreadable checkpoint metadata: {type(e).__name__}: {e}") \
                    from None
        if not isinstance(metadata, Metadata):
            raise ShardedCheckpointError(f"{path}: not DCP metadata ({type(metadata).__name__})")
        if getattr(metadata, 'storage_meta', None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, except that a non-tensor entry is refused instead of unpickled."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise ShardedCheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object, not a "
                                     f"tensor; refusing to unpickle it")


def read_metadata(path: str) -> Metadata:
    """The DCP metadata of directory ``path`` (safely unpickled)."""
    if not os.path.isfile(os.path.join(path, METADATA_NAME)):
        raise ShardedCheckpointError(f"{path} is not a complete sharded checkpoint (no {METADATA_NAME})")
    return SafeReader(path).read_metadata()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled, unavailable or uninitialized')
        yield


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def verify_sharded(path: str) -> Metadata:
    """The metadata of DCP directory ``path`` after checking that every shard file it names exists and is long
    enough (a truncated or missing shard is found here, before any rank starts loading); no tensor is read."""
    metadata = read_metadata(path)
    needed: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), int(info.offset) + int(info.length))
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have is None or have < size:
            raise ShardedCheckpointError(f"sharded checkpoint {path}: shard {name} is "
                                         f"{'missing' if have is None else f'truncated ({have} of {size} bytes)'}")
    return metadata


def _load(state_dict: Dict[str, Any], path: str) -> None:
    try:
        with _quiet_single_process():
            dcp.load(state_dict, storage_reader=SafeReader(path), planner=TensorOnlyLoadPlanner(), no_dist=_no_dist())
    except ShardedCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - DCP wraps per-rank failures in CheckpointException
        raise ShardedCheckpointError(f"sharded checkpoint {path} does not load into this model/optimizer: "
                                     f"{type(e).__name__}: {_short(e)}") from None


def _short(e: BaseException) -> str:
    text = ' '.join(str(e).split())
    return text[:600] + (' ...' if len(text) > 600 else '')


# ----------------------------------------------------------------------------- TrainState tensors

def _ema_module(ema: Any) -> Optional[nn.Module]:
    return None if ema is None else ema.module


def optimizer_param_groups(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
    """The optimizer's ``param_groups`` as DCP names them (hyper-parameters, parameter FQN lists): not tensors,
    so a sharded checkpoint stores them beside its shards, and ``load_sharded`` needs them back.

    Through ``get_state_dict`` with the model, as ``save_sharded`` does: the model's state dict comes first, and
    FSDP2's state-dict pre-hook puts the sharded parameters back on a root that an eval forward left unsharded
    (``reshard_after_forward=False``); the optimizer's state alone would then name parameters the model does not
    show (a ``KeyError`` in DCP)."""
    if optimizer is None:
        return {'param_groups': []}
    return {'param_groups': get_state_dict(model, optimizer)[1]['param_groups']}


def save_sharded(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], ema: Any, path: str) -> None:
    """Write the tensors of model, optimizer state and EMA into DCP directory ``path`` (a collective: every
    rank writes its shards). The optimizer's groups (``optimizer_param_groups``) go into the caller's
    file."""
    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None else \
        (get_model_state_dict(model), {'state': {}})
    state: Dict[str, Any] = {'model': model_sd, 'optimizer': optim_sd['state']}
    if ema is not None:
        state['ema'] = get_model_state_dict(_ema_module(ema))
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=path, no_dist=_no_dist())


def load_sharded(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], ema: Any, path: str,
                 optimizer_groups: Optional[Mapping[str, Any]]) -> bool:
    """Load model, optimizer state and EMA from DCP directory ``path`` into the (sharded, DDP or plain) modules,
    resharding as needed. ``optimizer_groups``: what ``optimizer_param_groups`` gave at save time. Returns whether
    the EMA was restored (False when the checkpoint holds none)."""
    metadata = read_metadata(path)
    keys = metadata.state_dict_metadata.keys()
    with_optimizer = optimizer is not None and optimizer_groups is not None and \
        any(k.startswith('optimizer.') for k in keys)
    if with_optimizer:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: Dict[str, Any] = {'model': model_sd, 'optimizer': optim_sd['state']}
    else:
        model_sd, state = get_model_state_dict(model), {}
        state['model'] = model_sd
    has_ema = ema is not None and any(k.startswith('ema.') for k in keys)
    if has_ema:
        state['ema'] = get_model_state_dict(_ema_module(ema))
    _load(state, path)
    try:
        if with_optimizer:
            optim_sd = {'state': state['optimizer'], 'param_groups': list(optimizer_groups['param_groups'])}
            set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=optim_sd)
        else:
            set_model_state_dict(model, state['model'])
        if has_ema:
            set_model_state_dict(_ema_module(ema), state['ema'])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ShardedCheckpointError(f"sharded checkpoint {path} does not fit this model/optimizer: "
                                     f"{type(e).__name__}: {_short(e)}") from None
    return has_ema


def load_full_state(model: nn.Module, model_state: Mapping[str, torch.Tensor],
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    optimizer_state: Optional[Mapping[str, Any]] = None) -> None:
    """Full (unsharded) state dicts, e.g. of a single-file DDP checkpoint, into a sharded model (or EMA copy) and
    optimizer: every rank keeps its own slice. ``optimizer_state`` is ``Optimizer.state_dict()`` (parameters by
    index); its groups' ``param_names`` (which ``optimizer.build_optimizer`` records) map indices to names."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    if optimizer is not None and optimizer_state:
        groups, state = [], {}
        for group in optimizer_state['param_groups']:
            names = group.get('param_names')
            if not names or len(names) != len(group['params']):
                raise ShardedCheckpointError("the optimizer state names no parameters (param_names), so it cannot "
                                             "be sharded")
            state.update({name: optimizer_state['state'][i] for i, name in zip(group['params'], names)
                          if i in optimizer_state['state']})
            groups.append(dict(group, params=list(names)))
        set_state_dict(model, optimizer, model_state_dict=dict(model_state),
                       optim_state_dict={'state': state, 'param_groups': groups}, options=options)
    else:
        set_model_state_dict(model, dict(model_state), options=options)


def read_full_tensors(path: str, prefix: str = 'model') -> Dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` (``model`` or ``ema``) of DCP directory ``path``, as full CPU tensors in
    this one process (no process group, no GPU): what an export to one file needs."""
    metadata = read_metadata(path)
    start = prefix + '.'
    template = {k[len(start):]: torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in metadata.state_dict_metadata.items()
                if k.startswith(start) and isinstance(m, TensorStorageMetadata)}
    if not template:
        raise ShardedCheckpointError(f"sharded checkpoint {path} holds no {prefix!r} tensors")
    try:
        with _quiet_single_process():
            dcp.load({prefix: template}, storage_reader=SafeReader(path), planner=TensorOnlyLoadPlanner(),
                     no_dist=True)
    except ShardedCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ShardedCheckpointError(f"sharded checkpoint {path} is unreadable: {type(e).__name__}: "
                                     f"{_short(e)}") from None
    return template
