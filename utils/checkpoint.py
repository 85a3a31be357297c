"""The one module that reads and writes checkpoint files: save, prune, auto-resume, resume, export.

The training loop sees one object, ``Checkpointer(config, dist_info)``: ``save(state, kind, is_best)`` and
``restore(state)`` (then ``restore_rng(state)`` right before training), with the file or the sharded backend
picked once when it is built. What a checkpoint holds is decided in one function, ``build_checkpoint``.

File layout in the output folder (official names kept):

- ``ckpt_epoch_{e}.pth``: state after epoch ``e`` (0-based, as the official code); the last
  ``TRAIN.KEEP_CHECKPOINTS`` are kept (0 keeps all);
- ``ckpt_best.pth``: the epoch with the best validation top-1 (a hard link to the epoch file when possible);
- ``ckpt_last.pth``: the newest state, an epoch file or a mid-epoch save (``TRAIN.SAVE_EVERY_STEPS``).

Swin-MoE (the official layout): every rank writes each of these as ``<name>.pth.rank<r>`` (its experts differ),
or rank 0 alone ``<name>.pth.global`` with ``TRAIN.MOE.SAVE_MASTER`` (``checkpoint_suffix``); ``--resume`` and
``--pretrained <name>.pth`` read this rank's file, and auto-resume takes the newest position every rank can read
(``agreed_auto_resume``).

A checkpoint is a plain dict readable with ``torch.load(weights_only=True)``:
``model, optimizer, lr_scheduler, scaler, ema, epoch, step, max_accuracy, config, rng`` and, from a training
run, ``data_order``, ``data_loader`` (the loader that trained it: ``TrainState.data_loader``) and, with
experiment trackers on, ``tracker_runs`` (tracker name -> run id, so that a
resume continues the same wandb / MLflow run); a mid-epoch one also ``running_sums`` (the epoch's loss sums, skip counts and time so far,
which ``metrics.jsonl`` and TensorBoard report; a file without them resumes with fresh sums). ``epoch`` is the
last *completed* epoch (-1 before the first), as the official code reads it, and ``step`` the optimizer updates
already done in epoch ``epoch + 1`` (0 for an end-of-epoch checkpoint).
``config`` is a plain dict, never a pickled object. ``data_order``: the training sampler, seed, epoch, batches
done, batch size and world size (the epoch's order is a pure function of seed and epoch; a resume checks that it
replays the same one). The optimizer's groups carry ``param_names`` (``optimizer.build_optimizer`` records them),
so a file loads into sharded modules too.

RNG: ``rng`` holds every rank's state (all-gathered at save time): ``{'world_size': W, 'per_rank': [state, ...]}``
with torch CPU, CUDA (when present), numpy and python ``random`` states per rank. On resume with the same world
size each rank restores its own; with another world size, ranks that have no saved state are reseeded from
``SEED + rank + 1000 * epoch`` (logged), since no exact continuation exists then.

Writes are atomic: a temporary file in the same folder, flushed and fsynced, then ``os.replace``. A failed write
(e.g. disk full) removes the temporary file, leaves the previous checkpoint untouched and raises
``CheckpointSaveError`` naming the file and the reason.

Sharded checkpoints (``TRAIN.FSDP.ENABLE``) are directories of ``torch.distributed.checkpoint`` (DCP) shards:

- ``ckpt_epoch_{e}/``: state after epoch ``e``; ``ckpt_epoch_{e}_update_{u}/``: a mid-epoch save, ``u``
  updates into epoch ``e`` (only the newest is kept);
- ``ckpt_last``: a symbolic link to the newest of them (replaced atomically); ``ckpt_best/``: the best epoch's
  files as hard links (so pruning the epoch directory does not remove it).

Each holds DCP's ``*.distcp`` shards and ``.metadata`` (model, optimizer moments and EMA, every rank writing
its own shard) and ``train_state.pth``, the checkpoint dict above without those tensors (scheduler, scaler,
RNG, counters, config, data order) plus ``optimizer_groups`` (the optimizer's hyper-parameters and parameter
names), written by rank 0. A directory is written as ``.<name>.tmp`` and renamed when complete, so a kill
mid-save leaves only a temporary directory (removed at the next start) and the previous checkpoints intact. It
loads with any number of processes, with or without FSDP; ``export_sharded_model`` writes its weights as one
official ``{'model': state_dict}`` file.

Loading always uses ``torch.load(weights_only=True)``; a file that needs arbitrary unpickling (old official
checkpoints with a pickled config, or anything malicious) is refused with ``UnsafeCheckpointError`` unless the
caller opts in (``TRUST_CHECKPOINTS`` / ``--trust-checkpoint``); nothing from a refused file is executed.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .distributed import DistInfo, all_gather_objects, get_rank, get_world_size, is_sharded, unwrap_model

_LOG = logging.getLogger(__name__)
EPOCH_FILE = re.compile(r'^ckpt_epoch_(\d+)\.pth$')
EPOCH_DIR = re.compile(r'^ckpt_epoch_(\d+)$')
MID_DIR = re.compile(r'^ckpt_epoch_(\d+)_update_(\d+)$')
SHARDED_LAST = 'ckpt_last'
SHARDED_BEST = 'ckpt_best'
TRAIN_STATE_NAME = 'train_state.pth'

BEST_NAME = 'ckpt_best.pth'
LAST_NAME = 'ckpt_last.pth'
TRUST_HINT = "set TRUST_CHECKPOINTS True (--trust-checkpoint) only if you trust where the file came from"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or used; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs arbitrary unpickling, which is refused without an explicit opt-in."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed; the previous file of that name is intact."""


# ----------------------------------------------------------------------------- reading and writing files

def load_checkpoint_file(path: str, trust: bool = False, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Read a checkpoint (``.pth`` with ``weights_only=True``, or ``.safetensors``) into a dict.

    Raises ``CheckpointError`` for a missing, truncated or unreadable file and ``UnsafeCheckpointError`` for a
    file that would need full unpickling (unless ``trust``).
    """
    if os.path.isdir(path):
        return load_sharded_checkpoint(path, trust=trust)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return dict(load_file(path, device=str(map_location)))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights only' not in str(e).lower() and 'weights_only' not in str(e).lower():
            raise CheckpointError(f"checkpoint file {path} is corrupt or truncated: {_first_line(e)}") from None
        if not trust:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it contains objects that need arbitrary code to unpickle "
                f"({_first_line(e)}); {TRUST_HINT}") from None
        _LOG.warning("loading %s with full unpickling because TRUST_CHECKPOINTS is set", path)
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged files fail in many ways (zip, pickle opcodes, storages)
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated: {type(e).__name__}: "
                              f"{_first_line(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(obj).__name__}, not a dict")
    return obj


def load_sharded_checkpoint(path: str, trust: bool = False) -> Dict[str, Any]:
    """A sharded checkpoint directory's ``train_state.pth`` with ``'sharded_dir': path`` added; its tensors are
    read by ``restore_training_state`` / ``load_model_state``. Raises ``CheckpointError`` for an incomplete
    directory (no metadata, a missing or truncated shard) or an unreadable ``train_state.pth``."""
    from .fsdp import METADATA_NAME, ShardedCheckpointError, verify_sharded
    if not os.path.isfile(os.path.join(path, METADATA_NAME)):
        raise CheckpointError(f"sharded checkpoint {path} is incomplete: no {METADATA_NAME} (a save that did not "
                              f"finish?)")
    meta = load_checkpoint_file(os.path.join(path, TRAIN_STATE_NAME), trust=trust)
    try:
        verify_sharded(path)
    except ShardedCheckpointError as e:
        raise CheckpointError(str(e)) from None
    meta['sharded_dir'] = path
    return meta


def _first_line(e: BaseException) -> str:
    """The start of an exception's message for a one-line report.

    A first line that ends with a colon only introduces the detail (PyTorch's ``Error(s) in loading state_dict
    for X:``), so the next line comes with it and the rest is counted rather than dropped silently.
    """
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if len(lines) > 1 and lines[0].endswith(':'):
        more = len(lines) - 2
        return f"{lines[0]} {lines[1]}" + (f" (and {more} more line{'s' if more > 1 else ''})" if more else '')
    return lines[0]


# Tensors whose shape follows the window size, image size or class count rather than the architecture: the ones
# load_pretrained (--pretrained) resizes or re-initialises. The window-derived buffers (attn_mask, index and
# coords tables) are never compared: the model recomputes them. (Used by load_model_state.)
_ADAPTABLE_SUFFIXES = ('relative_position_bias_table', 'absolute_pos_embed')
_ADAPTABLE_PREFIXES = ('head.',)
_SHOWN = 10  # keys listed per kind of mismatch; the rest are counted


def _listed(lines: List[str]) -> List[str]:
    more = len(lines) - _SHOWN
    return lines[:_SHOWN] + ([f"  ... and {more} more"] if more > 0 else [])


def _adaptable(key: str, in_file: Any, in_model: Any) -> bool:
    """Whether ``load_pretrained`` can adapt this mismatch: a size-dependent tensor whose width is unchanged."""
    if not (key.endswith(_ADAPTABLE_SUFFIXES) or key.startswith(_ADAPTABLE_PREFIXES)):
        return False
    a, b = getattr(in_file, 'shape', None), getattr(in_model, 'shape', None)
    # the last dim is the heads (position tables) or channels (pos embed, head weight); a bias has only classes
    return a is not None and b is not None and len(a) == len(b) and (len(a) == 1 or a[-1] == b[-1])


def _shape(value: Any) -> str:
    shape = getattr(value, 'shape', None)
    return str(tuple(shape)) if shape is not None else type(value).__name__


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint_file(obj: Mapping[str, Any], path: str) -> None:
    """Write ``obj`` to ``path`` atomically (same-folder temp file, flush + fsync, ``os.replace``)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp.{os.getpid()}')
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except OSError as e:
        _remove_quietly(tmp)
        previous = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else \
            "no earlier file of that name existed"
        raise CheckpointSaveError(f"could not write checkpoint {path}: {e.strerror or e} ({previous})") from e
    except BaseException:
        _remove_quietly(tmp)
        raise


_TEMP_FILE = re.compile(r'^\.(ckpt_[A-Za-z0-9_]+\.pth)\.tmp\.(\d+)$')
_TEMP_DIR = re.compile(r'^\.ckpt_[A-Za-z0-9_]+\.(tmp|old)$')  # sharded saves (one name for all ranks)


def remove_stale_temp_files(output_dir: str, logger: Optional[logging.Logger] = None) -> List[str]:
    """Delete the temporary files and directories of saves that never finished (``.ckpt_*.pth.tmp.<pid>``,
    sharded ``.ckpt_*.tmp``), never a finished file. The training run calls it while it holds the output
    folder's run lock (``utils.run_lock``), so no other run is writing there; a file whose writer PID is still
    alive on this host is kept all the same."""
    log = logger or _LOG
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for name in os.listdir(output_dir):
        match = _TEMP_FILE.match(name)
        if match and not _process_alive(int(match.group(2))):
            _remove_quietly(os.path.join(output_dir, name))
            removed.append(name)
        elif _TEMP_DIR.match(name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
            removed.append(name)
    if removed:
        log.info("removed %d temporary checkpoint file(s) of a save that did not finish (its process is gone): %s",
                 len(removed), removed[:5])
    return removed


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (this process counts as alive: its own saves are not stale)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _link_or_copy(src: str, dst: str) -> None:
    """Make ``dst`` a hard link to ``src`` (a copy where links are not supported), replacing it atomically."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f'.{os.path.basename(dst)}.tmp.{os.getpid()}')
    _remove_quietly(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        _remove_quietly(tmp)
        raise CheckpointSaveError(f"could not write checkpoint {dst}: {e.strerror or e} "
                                  f"(the previous {os.path.basename(dst)}, if any, is intact)") from e


def export_safetensors(state_dict: Mapping[str, torch.Tensor], path: str,
                       metadata: Optional[Dict[str, str]] = None) -> None:
    """Write model weights to a ``.safetensors`` file (contiguous CPU copies; shared tensors are cloned).

    Atomic like ``save_checkpoint_file``, and the file gets the mode the user's umask gives a new file (e.g. 0644
    under umask 022), as ``torch.save`` files do.
    """
    from safetensors.torch import save_file
    tensors = {k: v.detach().to('cpu').clone().contiguous() for k, v in state_dict.items()
               if isinstance(v, torch.Tensor)}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp.{os.getpid()}')
    try:
        # The file created here has the umask's mode; save_file then replaces it with its own private temp file
        # (mode 0600), so that mode is put back before the rename. Reading the umask with os.umask() would
        # briefly change it for every thread of the process.
        _remove_quietly(tmp)  # a leftover of a killed export would keep its old mode
        with open(tmp, 'wb'):
            pass
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        _remove_quietly(tmp)
        raise


# ----------------------------------------------------------------------------- RNG state

def capture_rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors and plain Python values (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'algorithm': np_state[0], 'keys': torch.from_numpy(np_state[1].astype(np.int64)),
                  'pos': int(np_state[2]), 'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': {'version': version, 'state': list(py_state), 'gauss': gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set this process's RNGs from ``capture_rng_state`` output."""
    torch.set_rng_state(state['torch'].cpu())
    n = state['numpy']
    np.random.set_state((n['algorithm'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state']), p['gauss']))
    if 'cuda' in state and torch.cuda.is_available():
        saved = state['cuda']
        for index in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[index].cpu(), index)


def gather_rng_states() -> Dict[str, Any]:
    """Every rank's RNG state (a collective: all ranks must call it)."""
    per_rank = all_gather_objects(capture_rng_state())
    return {'world_size': len(per_rank), 'per_rank': per_rank}


def restore_rank_rng(rng: Optional[Mapping[str, Any]], fallback_seed: int,
                     logger: Optional[logging.Logger] = None) -> bool:
    """Restore this rank's saved RNG state; reseed with ``fallback_seed`` when none was saved for it.

    Returns True when the saved state was restored.
    """
    log = logger or _LOG
    rank = get_rank()
    if rng and rng.get('world_size') == get_world_size() and rank < len(rng.get('per_rank', [])):
        restore_rng_state(rng['per_rank'][rank])
        return True
    saved = rng.get('world_size') if rng else None
    log.info("rank %d: no saved RNG state for this world size (saved %s, now %d); reseeding with %d",
             rank, saved, get_world_size(), fallback_seed)
    random.seed(fallback_seed)
    np.random.seed(fallback_seed % 2 ** 32)
    torch.manual_seed(fallback_seed)
    return False


# ----------------------------------------------------------------------------- building and restoring state

@dataclass
class TrainState:
    """Everything a training checkpoint restores, in one object (big_vision's train state).

    ``epoch`` is the epoch in progress (or the next to start) and ``update`` the optimizer updates done in it;
    ``updates_per_epoch`` is set by the engine from the loader and is not saved. ``model`` is the plain module
    (no DDP or compile wrapper); ``ema`` a ``timm.utils.ModelEmaV3``.
    """
    model: torch.nn.Module
    optimizer: Any = None
    lr_scheduler: Any = None
    scaler: Any = None
    ema: Any = None
    epoch: int = 0
    update: int = 0
    max_accuracy: float = 0.0
    updates_per_epoch: int = 0
    # The epoch's running log sums so far (``engine.TrainLog.sums``: numbers or 0-dim device tensors), saved with a
    # mid-epoch checkpoint so that a resumed epoch reports the same mean loss, skips and time as an uninterrupted
    # one; None: none (a fresh epoch, or a checkpoint from before they were saved).
    running_sums: Optional[Dict[str, Any]] = None
    # The experiment trackers' run ids (``utils.trackers.Trackers.run_ids``: ``{'wandb': id, 'mlflow': run_id}``),
    # saved with every checkpoint so that a resumed run continues the same tracker runs; empty: none.
    tracker_runs: Dict[str, str] = field(default_factory=dict)
    # The fast-path choices the run took (``models.fast_paths``: ``{'train'|'eval': {path: on}}``, chosen by
    # ``engine.select_fast_paths``), saved with every checkpoint so that a resumed run takes the same paths (the
    # same arithmetic: exact resume stays exact) instead of measuring again; None: not chosen (yet).
    fast_paths: Optional[Dict[str, Dict[str, bool]]] = None
    # The loader that trained the run ('torch' | 'fast' | 'gpu': ``DATA.LOADER``, or what 'auto' picked,
    # ``data.choose_loaders``), saved with every checkpoint: the loaders draw the same augmentation but give other
    # pixels, so a resume on another one is not exact (``data.check_resumed_loader`` refuses or warns); None: not
    # known (a fresh run before the engine sets it, or a checkpoint that does not say).
    data_loader: Optional[str] = None

    @property
    def global_update(self) -> int:
        """Optimizer updates since the start of training (the schedulers' and the EMA's step index)."""
        return self.epoch * self.updates_per_epoch + self.update


def build_checkpoint(state: TrainState, config_dict: Dict[str, Any], rng: Optional[Dict[str, Any]] = None,
                     weights: bool = True, sampler: Optional[str] = None) -> Dict[str, Any]:
    """The checkpoint dict of ``state``: the one place that decides what a checkpoint holds (official keys plus
    ours; see the module docstring for their meaning).

    ``weights=False``: the file part of a sharded checkpoint: the model, optimizer and EMA tensors are left to
    DCP, and the optimizer's groups (hyper-parameters, parameter names) are kept here. ``sampler``: the training
    sampler's class name; with it, ``data_order`` records where in the epoch's fixed, ``(SEED, epoch)``-seeded
    sample order the state stands, so that a resume can check that it replays the same order (``config_dict``
    then holds ``SEED``, ``DATA.BATCH_SIZE`` and ``TRAIN.ACCUMULATION_STEPS``)."""
    def state_dict(obj: Any) -> Any:
        return obj.state_dict() if obj is not None else None

    checkpoint: Dict[str, Any] = {
        'model': unwrap_model(state.model).state_dict() if weights else None,
        'optimizer': state_dict(state.optimizer) if weights else None,
        'lr_scheduler': state_dict(state.lr_scheduler),
        'scaler': state_dict(state.scaler),
        'ema': unwrap_model(state.ema).state_dict() if state.ema is not None and weights else None,
        'max_accuracy': float(state.max_accuracy),
        'epoch': int(state.epoch) - 1,  # the last completed epoch, as the official code reads it
        'step': int(state.update),
        'config': config_dict,
    }
    if state.update and state.running_sums:  # mid-epoch: the epoch's log sums so far, as plain numbers
        checkpoint['running_sums'] = {k: float(v) for k, v in state.running_sums.items()}
    if state.fast_paths:
        checkpoint['fast_paths'] = {str(m): {str(k): bool(v) for k, v in paths.items()}
                                    for m, paths in state.fast_paths.items()}
    if state.data_loader:
        checkpoint['data_loader'] = str(state.data_loader)
    if state.tracker_runs:
        checkpoint['tracker_runs'] = {str(k): str(v) for k, v in state.tracker_runs.items()}
    if rng is not None:
        checkpoint['rng'] = rng
    if sampler is not None:
        accum = int(config_dict['TRAIN']['ACCUMULATION_STEPS'])
        checkpoint['data_order'] = {'sampler': sampler, 'seed': int(config_dict['SEED']), 'epoch': int(state.epoch),
                                    'batches_done': int(state.update) * accum,
                                    'batch_size': int(config_dict['DATA']['BATCH_SIZE']),
                                    'world_size': get_world_size()}
    if not weights:
        from .fsdp import optimizer_param_groups
        checkpoint['optimizer_groups'] = optimizer_param_groups(unwrap_model(state.model), state.optimizer)
    return checkpoint


def load_model_state(model: torch.nn.Module, checkpoint: Mapping[str, Any], path: str = '<checkpoint>') -> None:
    """Load ``checkpoint['model']`` strictly (derived buffers such as ``attn_mask`` may be absent or extra).

    Keys and shapes are compared here, before ``load_state_dict``, so that a mismatch raises one
    ``CheckpointError`` listing every tensor that does not fit (name, shape in the file, shape in the model; the
    first 10 of each kind, then a count), and saying when ``--pretrained`` is the flag that adapts the weights.
    """
    if checkpoint.get('sharded_dir'):
        _load_sharded_tensors(checkpoint, model, None, None)
        return
    if 'model' not in checkpoint or not isinstance(checkpoint['model'], Mapping):
        raise CheckpointError(f"{path} has no 'model' state dict (keys: {sorted(checkpoint)[:10]})")
    target = unwrap_model(model)
    own = target.state_dict()
    derived = _derived_buffers(target)
    state = {k: v for k, v in checkpoint['model'].items() if not k.endswith(derived)}
    missing = [k for k in own if k not in state and not k.endswith(derived)]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and _shape(state[k]) != _shape(own[k])]
    if missing or unexpected or mismatched:
        lines = [f"{path} does not match the model ({type(target).__name__}):"]
        if mismatched:
            lines.append(f"{len(mismatched)} tensor(s) have another shape (name: in the file -> in the model):")
            lines += _listed([f"  {k}: {_shape(state[k])} -> {_shape(own[k])}" for k in mismatched])
        if missing:
            lines.append(f"{len(missing)} tensor(s) of the model are missing from the file:")
            lines += _listed([f"  {k} {_shape(own[k])}" for k in missing])
        if unexpected:
            lines.append(f"{len(unexpected)} tensor(s) in the file are not in the model:")
            lines += _listed([f"  {k} {_shape(state[k])}" for k in unexpected])
        adaptable = all(_adaptable(k, state[k], own[k]) for k in mismatched)
        if mismatched and adaptable and not (missing or unexpected):
            lines.append(f"These shapes follow the window size, image size or class count, not the architecture. "
                         f"To fine-tune from these weights at this model's size, use --pretrained {path} instead "
                         f"(it resizes the position tables and re-initialises a head of another class count); to "
                         f"resume or evaluate the model as it was saved, use the config it was trained with.")
        else:
            lines.append("The file holds another architecture (widths, depths, heads or model type): use the config "
                         "it was trained with (--pretrained adapts only the window size, image size and class "
                         "count).")
        raise CheckpointError('\n'.join(lines))
    try:
        _load_full_weights(target, state, strict=False)
    except RuntimeError as e:  # shapes and keys fit; e.g. a non-tensor entry where a tensor belongs
        raise CheckpointError(f"{path} does not fit the model: {_first_line(e)}") from None


def _derived_buffers(model: torch.nn.Module) -> Tuple[str, ...]:
    """Name endings of the buffers ``model`` rebuilds from its geometry (``model.derived_buffer_names()``, e.g.
    Swin's ``attn_mask``): official files carry them, ours do not, so they are neither compared nor required."""
    names = getattr(model, 'derived_buffer_names', None)
    return tuple(names()) if callable(names) else ()


def _load_full_weights(module: torch.nn.Module, state: Mapping[str, torch.Tensor], strict: bool) -> None:
    """A full state dict into a plain module, or into a sharded one (each rank keeps its slice; not strict)."""
    if is_sharded(module):
        from .fsdp import load_full_state
        load_full_state(module, state)
    else:
        module.load_state_dict(state, strict=strict)


def _load_sharded_tensors(checkpoint: Mapping[str, Any], model: torch.nn.Module, optimizer: Any, ema: Any) -> bool:
    """Model (and optimizer state, EMA when given) from a sharded checkpoint's DCP shards; returns whether the
    EMA was restored."""
    from .fsdp import ShardedCheckpointError, load_sharded
    try:
        return load_sharded(unwrap_model(model), optimizer, ema, checkpoint['sharded_dir'],
                            checkpoint.get('optimizer_groups'))
    except ShardedCheckpointError as e:
        raise CheckpointError(str(e)) from None


_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DDP / torch.compile, should a name carry them


def _plain(name: str) -> str:
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split('.', 1)[1]
    return name


def _saved_trained_names(checkpoint: Mapping[str, Any]) -> Optional[set]:
    """The names of the parameters the checkpoint's optimizer trained: ``param_names`` of a file's optimizer
    groups, or the FQNs of a sharded checkpoint's ``optimizer_groups``; None when it does not record them."""
    if checkpoint.get('sharded_dir'):
        groups = (checkpoint.get('optimizer_groups') or {}).get('param_groups') or []
        key = 'params'
    else:
        groups = (checkpoint.get('optimizer') or {}).get('param_groups') or []
        key = 'param_names'
    if not groups or not all(isinstance(g, Mapping) and key in g for g in groups):
        return None
    return {_plain(str(n)) for g in groups for n in g[key]}


def check_same_trainable(checkpoint: Mapping[str, Any], model: torch.nn.Module, path: str = '<checkpoint>') -> None:
    """Refuse to resume optimizer state into a model whose trainable parameters (``requires_grad``) are not the
    ones the checkpoint's optimizer trained, e.g. after changing ``TRAIN.FREEZE`` / ``TRAIN.LINEAR_PROBE``:
    torch's ``Optimizer.load_state_dict`` matches parameters by position and group size only, so it would load
    one tensor's moments into another without a word, or fail on a group size. Nothing to check when the
    checkpoint does not record the names."""
    saved = _saved_trained_names(checkpoint)
    if saved is None:
        return
    now = {_plain(n) for n, p in unwrap_model(model).named_parameters() if p.requires_grad}
    if saved == now:
        return
    frozen_now, trained_now = sorted(saved - now), sorted(now - saved)
    parts = []
    if frozen_now:
        parts.append(f"{len(frozen_now)} tensor(s) it trained do not train now (e.g. {', '.join(frozen_now[:3])})")
    if trained_now:
        parts.append(f"{len(trained_now)} tensor(s) train now that it did not (e.g. {', '.join(trained_now[:3])})")
    train_cfg = (checkpoint.get('config') or {}).get('TRAIN') or {}
    then = (f" (it was saved with TRAIN.FREEZE {list(train_cfg.get('FREEZE') or [])}, TRAIN.LINEAR_PROBE "
            f"{bool(train_cfg.get('LINEAR_PROBE'))})" if isinstance(train_cfg, Mapping) else '')
    raise CheckpointError(f"{path}: its optimizer state is for other trainable parameters: {'; '.join(parts)}"
                          f"{then}. Resume with the frozen parameters it was saved with, or, to change what "
                          f"trains, start a new run (another --output or --tag) with --pretrained {path}: its "
                          f"weights load and the optimizer starts fresh")


def recorded_data_loader(checkpoint: Mapping[str, Any]) -> Optional[str]:
    """The loader that trained the checkpoint's run: its ``data_loader``, or for a checkpoint from before that was
    recorded the ``DATA.LOADER`` of its config when that names a loader (before 'auto' every run named one,
    'torch' by default); None when the file does not say."""
    recorded = checkpoint.get('data_loader')
    if isinstance(recorded, str) and recorded:
        return recorded
    config = checkpoint.get('config')
    section = config.get('DATA') if isinstance(config, Mapping) else None
    named = section.get('LOADER', 'torch') if isinstance(section, Mapping) else None
    return named if named in ('torch', 'fast', 'gpu') else None


def restore_training_state(checkpoint: Mapping[str, Any], state: TrainState, path: str = '<checkpoint>',
                           logger: Optional[logging.Logger] = None) -> None:
    """Restore ``state`` (model, optimizer, scheduler, scaler, EMA, epoch, update, best accuracy) in place.

    A checkpoint without optimizer state (e.g. weights only) restores the model and starts at epoch 0. A sharded
    checkpoint (a directory) loads into any world size, sharded or not.
    """
    log = logger or _LOG
    runs = checkpoint.get('tracker_runs')  # absent before trackers were saved: the trackers start new runs
    state.tracker_runs = {str(k): str(v) for k, v in runs.items()} if isinstance(runs, Mapping) else {}
    recorded = checkpoint.get('fast_paths')  # absent before choices were recorded: the run chooses afresh
    state.fast_paths = {str(m): {str(k): bool(v) for k, v in paths.items()} for m, paths in recorded.items()
                        if isinstance(paths, Mapping)} if isinstance(recorded, Mapping) else None
    sharded = bool(checkpoint.get('sharded_dir'))
    if state.optimizer is not None:  # before any tensor loads: a sharded load takes model and optimizer together
        check_same_trainable(checkpoint, state.model, path)
    if sharded:
        with_optimizer = state.optimizer is not None and bool(checkpoint.get('optimizer_groups'))
        ema_restored = _load_sharded_tensors(checkpoint, state.model, state.optimizer if with_optimizer else None,
                                             state.ema)
    else:
        load_model_state(state.model, checkpoint, path)
        with_optimizer = state.optimizer is not None and bool(checkpoint.get('optimizer'))
    if not with_optimizer:
        log.info("resume: %s holds model weights only; training starts at epoch 0", path)
        state.epoch, state.update = 0, 0
        state.max_accuracy = float(checkpoint.get('max_accuracy', 0.0) or 0.0)
        return
    state.data_loader = recorded_data_loader(checkpoint)
    try:
        if not sharded and is_sharded(state.model):  # a single file into sharded modules
            from .fsdp import load_full_state
            load_full_state(unwrap_model(state.model), checkpoint['model'], state.optimizer, checkpoint['optimizer'])
        elif not sharded:
            state.optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit this model/optimizer: {e}") from None
    try:
        if state.lr_scheduler is not None and checkpoint.get('lr_scheduler'):
            state.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        if state.scaler is not None and checkpoint.get('scaler'):
            state.scaler.load_state_dict(checkpoint['scaler'])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: scheduler/scaler state is unusable: {type(e).__name__}: {e}") from None
    if state.scaler is not None and not checkpoint.get('scaler'):
        log.info("resume: %s has no loss-scaler state; the scaler starts fresh", path)
    if state.ema is not None and sharded:
        if not ema_restored:
            log.info("resume: %s has no EMA weights; the EMA starts from the resumed model", path)
            _copy_into_ema(state)
    elif state.ema is not None:
        if checkpoint.get('ema'):
            try:
                _load_full_weights(unwrap_model(state.ema), checkpoint['ema'], strict=True)
            except (RuntimeError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{path}: EMA weights do not fit the model: {_first_line(e)}") from None
        else:
            log.info("resume: %s has no EMA weights; the EMA starts from the resumed model", path)
            _copy_into_ema(state)
    try:
        epoch = int(checkpoint.get('epoch', -1))
        step = int(checkpoint.get('step', 0) or 0)
        max_accuracy = float(checkpoint.get('max_accuracy', 0.0) or 0.0)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: epoch/step/max_accuracy are not numbers: {e}") from None
    if epoch < -1 or step < 0:
        raise CheckpointError(f"{path}: impossible position epoch {epoch}, step {step}")
    state.epoch, state.update, state.max_accuracy = epoch + 1, step, max_accuracy
    sums = checkpoint.get('running_sums')  # absent in older checkpoints: the epoch's log restarts its sums
    state.running_sums = {str(k): float(v) for k, v in sums.items()} if step and isinstance(sums, Mapping) else None


def _copy_into_ema(state: TrainState) -> None:
    """EMA := model (for sharded modules too, shard by shard: model and EMA are sharded alike)."""
    if not is_sharded(state.model):
        state.ema.set(unwrap_model(state.model))
        return
    with torch.no_grad():
        for e, m in zip(unwrap_model(state.ema).state_dict().values(), unwrap_model(state.model).state_dict().values()):
            e.copy_(m)


# ----------------------------------------------------------------------------- the output folder

def epoch_checkpoints(output_dir: str, suffix: str = '') -> List[Tuple[int, str]]:
    """``(epoch, path)`` of the ``ckpt_epoch_{e}.pth{suffix}`` files, by epoch number ascending."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    pattern = re.compile(r'^ckpt_epoch_(\d+)\.pth' + re.escape(suffix) + '$') if suffix else EPOCH_FILE
    for name in os.listdir(output_dir):
        match = pattern.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def sharded_checkpoints(output_dir: str) -> List[Tuple[Tuple[int, int], str]]:
    """``((epoch, step), path)`` of the sharded checkpoint directories, as the checkpoint dict counts them
    (``epoch`` completed, ``step`` updates into the next), from their names; unordered."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        match = EPOCH_DIR.match(name)
        if match:
            found.append(((int(match.group(1)), 0), path))
        match = MID_DIR.match(name)
        if match:
            found.append(((int(match.group(1)) - 1, int(match.group(2))), path))
    return found


def auto_resume(output_dir: str, trust: bool = False, logger: Optional[logging.Logger] = None, suffix: str = '',
                at_most: Optional[Tuple[int, int]] = None) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The furthest readable checkpoint in ``output_dir`` and its contents, or ``(None, None)``.

    Epoch files and sharded directories are ranked by the numbers in their names (never by mtime);
    ``ckpt_last.pth`` is used when it is further along (a mid-epoch save). A checkpoint that does not load (or a
    sharded directory without its metadata) is skipped with a logged reason and the next one tried. An unsafe
    file (needs unpickling) is an error rather than a skip. ``at_most``: only checkpoints at or before that
    position ``(epoch completed, updates into the next)`` (``agreed_auto_resume``'s later rounds).
    """
    log = logger or _LOG
    candidates: List[Tuple[Tuple[int, int], str]] = [((e, 0), p) for e, p in epoch_checkpoints(output_dir, suffix)]
    if not suffix:
        candidates += sharded_checkpoints(output_dir)
    candidates = sorted((c for c in candidates if at_most is None or c[0] <= at_most), reverse=True)
    last = os.path.join(output_dir, LAST_NAME + suffix)
    if os.path.isfile(last) and not any(_same_file(last, p) for _, p in candidates):
        try:
            checkpoint = load_checkpoint_file(last, trust=trust)
            progress = (int(checkpoint.get('epoch', -1)), int(checkpoint.get('step', 0) or 0))
            if (not candidates or progress > candidates[0][0]) and (at_most is None or progress <= at_most):
                log.info("auto-resume: %s (epoch %d done, %d updates into the next)", last, *progress)
                return last, checkpoint
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            log.warning("auto-resume: skipping %s: %s", last, e)
    for (epoch, step), path in candidates:
        try:
            checkpoint = load_checkpoint_file(path, trust=trust)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            log.warning("auto-resume: skipping %s: %s; trying the previous one", path, e)
            continue
        if step == 0 and int(checkpoint.get('epoch', epoch)) != epoch:
            log.warning("auto-resume: %s says epoch %s inside; using it as epoch %d", path,
                        checkpoint.get('epoch'), epoch)
            checkpoint['epoch'] = epoch
        log.info("auto-resume: %s (epoch %d%s)", path, epoch,
                 f" done, {step} updates into the next" if step else '')
        return path, checkpoint
    if candidates:
        log.warning("auto-resume: no readable checkpoint in %s; training starts from scratch", output_dir)
    return None, None


def checkpoint_position(checkpoint: Mapping[str, Any]) -> Tuple[int, int]:
    """``(epoch completed, updates into the next)``: where training stands in a checkpoint."""
    return int(checkpoint.get('epoch', -1)), int(checkpoint.get('step', 0) or 0)


def agreed_auto_resume(output_dir: str, trust: bool = False, logger: Optional[logging.Logger] = None,
                       suffix: str = '') -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """``auto_resume`` for per-rank files (Swin-MoE's ``<name>.pth.rank<r>``), the same position on every rank: a
    collective. Each rank finds the furthest checkpoint it can read; the ranks all-gather those positions and,
    while they differ, every rank looks again at or before the earliest of them. A rank killed after another
    had written its file (or whose newest file is damaged) so makes every rank go back to the newest position
    all of them hold, instead of the ranks resuming from different points; a rank with none makes every rank
    start fresh. Each round only lowers the bound, so it ends after at most one round per distinct position."""
    log = logger or _LOG
    bound: Optional[Tuple[int, int]] = None
    path, checkpoint = auto_resume(output_dir, trust, log, suffix)
    while True:
        mine = checkpoint_position(checkpoint) if checkpoint is not None else None
        positions = all_gather_objects(mine)
        if any(p is None for p in positions):
            if mine is not None:
                log.warning("auto-resume: rank(s) %s have no readable checkpoint in %s: every rank starts from "
                            "scratch (this rank's %s is not used)", [r for r, p in enumerate(positions) if p is None],
                            output_dir, path)
            return None, None
        agreed = min(positions)
        if all(p == agreed for p in positions):
            if bound is not None:
                log.warning("auto-resume: every rank resumes from epoch %d done, %d updates into the next (%s here): "
                            "the newest position all ranks can read", agreed[0], agreed[1], path)
            return path, checkpoint
        log.warning("auto-resume: the ranks' newest readable checkpoints stand at %s (epoch done, updates into the "
                    "next); looking at or before %s on every rank", positions, agreed)
        bound = tuple(agreed)
        if mine != bound:
            path, checkpoint = auto_resume(output_dir, trust, log, suffix, at_most=bound)


def _rank_files(path: str) -> int:
    """How many consecutive ``<path>.rank<r>`` files exist, from rank 0."""
    count = 0
    while os.path.exists(f'{path}.rank{count}'):
        count += 1
    return count


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class CheckpointManager:
    """Writes checkpoints into ``output_dir`` with the naming, best/last links and pruning described above."""

    def __init__(self, output_dir: str, keep: int = 0, logger: Optional[logging.Logger] = None, suffix: str = ''):
        self.output_dir = output_dir
        self.keep = int(keep)
        self.log = logger or _LOG
        self.suffix = suffix  # '.rank<r>' / '.global': the official Swin-MoE layout

    def save_epoch(self, checkpoint: Mapping[str, Any], epoch: int, is_best: bool = False) -> str:
        """Write ``ckpt_epoch_{epoch}.pth``, point ``ckpt_last.pth`` (and ``ckpt_best.pth`` if best) at it, prune."""
        path = os.path.join(self.output_dir, f'ckpt_epoch_{epoch}.pth{self.suffix}')
        save_checkpoint_file(checkpoint, path)
        _link_or_copy(path, os.path.join(self.output_dir, LAST_NAME + self.suffix))
        if is_best:
            _link_or_copy(path, os.path.join(self.output_dir, BEST_NAME + self.suffix))
        self.log.info("saved %s%s", path, " (best so far)" if is_best else "")
        self.prune()
        return path

    def save_best(self, checkpoint: Mapping[str, Any]) -> str:
        """Write ``ckpt_best.pth`` on its own (an epoch that is best but not on the SAVE_FREQ schedule)."""
        path = os.path.join(self.output_dir, BEST_NAME + self.suffix)
        save_checkpoint_file(checkpoint, path)
        self.log.info("saved %s", path)
        return path

    def save_last(self, checkpoint: Mapping[str, Any]) -> str:
        """Write a mid-epoch ``ckpt_last.pth``."""
        path = os.path.join(self.output_dir, LAST_NAME + self.suffix)
        save_checkpoint_file(checkpoint, path)
        self.log.info("saved %s (epoch %d done, %d updates into the next)", path, checkpoint['epoch'],
                      checkpoint['step'])
        return path

    def prune(self) -> List[str]:
        """Delete all but the last ``keep`` epoch files (``keep`` 0: keep all); best/last are separate links."""
        if self.keep <= 0:
            return []
        removed = []
        for _, path in epoch_checkpoints(self.output_dir, self.suffix)[:-self.keep]:
            try:
                os.remove(path)
                removed.append(path)
            except OSError as e:
                self.log.warning("could not remove old checkpoint %s: %s", path, e)
        return removed

    # ------------------------------------------------------------------------- sharded (FSDP) checkpoints

    def save_sharded(self, checkpoint: Dict[str, Any], state: TrainState, kind: str, is_best: bool = False) -> str:
        """Write a sharded checkpoint directory; a collective (every rank writes its shards).

        ``checkpoint``: ``build_checkpoint(..., weights=False)`` (rank 0's is written). ``kind``: ``epoch``
        (``ckpt_epoch_{checkpoint['epoch']}``, also ``ckpt_best`` when ``is_best``), ``last`` (a mid-epoch
        ``ckpt_epoch_{e}_update_{u}``) or ``best`` (``ckpt_best`` only). Raises ``CheckpointSaveError`` on every
        rank when any rank failed; the previous checkpoints are then intact.
        """
        from .distributed import all_gather_objects, barrier, broadcast_object
        from .fsdp import save_sharded
        epoch, step = int(checkpoint['epoch']), int(checkpoint['step'])
        name = {'epoch': f'ckpt_epoch_{epoch}', 'last': f'ckpt_epoch_{epoch + 1}_update_{step}',
                'best': SHARDED_BEST}[kind]
        final = os.path.join(self.output_dir, name)
        tmp = os.path.join(self.output_dir, f'.{name}.tmp')
        main = get_rank() == 0
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # a save killed half-way
            os.makedirs(self.output_dir, exist_ok=True)
        barrier()
        error = None
        try:
            save_sharded(unwrap_model(state.model), state.optimizer, state.ema, tmp)
        except Exception as e:  # noqa: BLE001 - DCP reports any rank's failure on every rank
            error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        errors = [e for e in all_gather_objects(error) if e]
        if not errors and main:
            try:
                save_checkpoint_file(checkpoint, os.path.join(tmp, TRAIN_STATE_NAME))
                _fsync_dir(tmp)
                _replace_dir(tmp, final)
                _fsync_dir(self.output_dir)
                if kind != 'best':
                    _point_link(name, os.path.join(self.output_dir, SHARDED_LAST))
                if is_best and kind == 'epoch':
                    best_tmp = os.path.join(self.output_dir, f'.{SHARDED_BEST}.tmp')
                    shutil.rmtree(best_tmp, ignore_errors=True)
                    shutil.copytree(final, best_tmp, copy_function=_link_or_copy_file)
                    _replace_dir(best_tmp, os.path.join(self.output_dir, SHARDED_BEST))
            except (OSError, CheckpointSaveError) as e:
                errors.append(str(e))
        if main and errors:
            shutil.rmtree(tmp, ignore_errors=True)
        errors = broadcast_object(errors)
        if errors:
            raise CheckpointSaveError(f"could not write sharded checkpoint {final}: {errors[0]} (the previous "
                                      f"checkpoints are intact)")
        if main:
            self.log.info("saved %s%s", final, " (best so far)" if is_best else "")
            self.prune_sharded()
        barrier()  # nobody starts the next save (which clears its temporary directory) before this one is done
        return final

    def prune_sharded(self) -> List[str]:
        """Delete mid-epoch directories other than ``ckpt_last``'s target, and epoch directories beyond the last
        ``keep`` (``ckpt_best`` holds its own hard links, so it survives)."""
        last = os.path.realpath(os.path.join(self.output_dir, SHARDED_LAST))
        found = sorted(sharded_checkpoints(self.output_dir))
        epochs = [p for (e, s), p in found if s == 0 and EPOCH_DIR.match(os.path.basename(p))]
        doomed = [p for (e, s), p in found if MID_DIR.match(os.path.basename(p)) and os.path.realpath(p) != last]
        if self.keep > 0:
            doomed += [p for p in epochs[:-self.keep] if os.path.realpath(p) != last]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        return doomed


def _link_or_copy_file(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _replace_dir(src: str, dst: str) -> None:
    """Rename directory ``src`` to ``dst``. An existing ``dst`` is moved aside first (POSIX cannot rename over a
    non-empty directory); a kill between the two renames leaves ``dst`` missing but ``src`` complete."""
    old = os.path.join(os.path.dirname(dst), f'.{os.path.basename(dst)}.old')
    if os.path.lexists(dst):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _point_link(target_name: str, link: str) -> None:
    """Make ``link`` a relative symbolic link to ``target_name`` (same folder), replaced atomically."""
    tmp = os.path.join(os.path.dirname(link), f'.{os.path.basename(link)}.link.tmp')
    _remove_quietly(tmp)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def read_sharded_model(sharded_dir: str, ema: bool = False) -> Dict[str, torch.Tensor]:
    """The full model (or EMA) state dict of a sharded checkpoint, read in this process onto the CPU."""
    from .fsdp import ShardedCheckpointError, read_full_tensors
    try:
        return read_full_tensors(sharded_dir, 'ema' if ema else 'model')
    except ShardedCheckpointError as e:
        raise CheckpointError(str(e)) from None


def export_sharded_model(sharded_dir: str, path: str, ema: bool = False) -> Dict[str, torch.Tensor]:
    """Write the model (or EMA) weights of sharded checkpoint ``sharded_dir`` as one official checkpoint file
    ``{'model': state_dict}`` (readable by ``--eval --resume``, ``--pretrained``, ``load_pretrained`` and
    ``torch.load(weights_only=True)``). Runs in one process on the CPU: no GPU ever holds the full model; it
    needs host memory for one copy of the weights. Returns the state dict."""
    state_dict = read_sharded_model(sharded_dir, ema)
    save_checkpoint_file({'model': state_dict}, path)
    return state_dict


# ----------------------------------------------------------------------------- the training run's checkpointer

def load_weights(model: torch.nn.Module, path: str, trust: bool = False) -> None:
    """The model weights of checkpoint ``path`` (a file or a sharded directory) into ``model``, strictly
    (``load_model_state``): what ``--eval --resume`` loads."""
    load_model_state(model, load_checkpoint_file(path, trust=trust), path)


def checkpoint_suffix(config: Any, rank: int) -> str:
    """What rank ``rank`` appends to a checkpoint's ``<name>.pth``: ``.rank<r>`` for Swin-MoE (each rank owns its
    experts and writes its own file, the official layout), ``.global`` with ``TRAIN.MOE.SAVE_MASTER`` (rank 0
    writes it, every rank reads it), nothing for the other models and for sharded (FSDP) checkpoints."""
    if config.MODEL.TYPE != 'swin_moe' or config.TRAIN.FSDP.ENABLE:
        return ''
    return '.global' if config.TRAIN.MOE.SAVE_MASTER else f'.rank{rank}'


def rank_checkpoint_file(config: Any, path: str, rank: int, world_size: int) -> str:
    """The file rank ``rank`` reads for ``--resume path``: for Swin-MoE ``<name>.pth`` -> ``<name>.pth.rank<r>``
    (or ``.global``), as the official main_moe.py reads it; another name as it is. Raises ``CheckpointError``
    when the per-rank files are there but not this rank's (saved by fewer processes)."""
    suffix = checkpoint_suffix(config, rank)
    if not suffix or not path.endswith('.pth'):
        return path
    mine = path + suffix
    if suffix != '.global' and not os.path.exists(mine):
        ranks = _rank_files(path)
        if ranks:
            raise CheckpointError(
                f"{path} was saved per rank by {ranks} processes ({path}.rank0 .. .rank{ranks - 1}), and "
                f"{mine} is not there: each rank's experts live in its own file, so resume with {ranks} "
                f"processes (this run has {world_size})")
    return mine


def saved_files_description(config: Any, path: str, world_size: int) -> str:
    """The file(s) a save to ``path`` (``<name>.pth``) writes, for messages: ``path`` itself, or for Swin-MoE
    ``<path>.rank0 .. .rank<W-1>`` / ``<path>.global``."""
    suffix = checkpoint_suffix(config, 0)
    if suffix == '.rank0' and world_size > 1:
        return f"{path}.rank0 .. .rank{world_size - 1}, one per rank"
    return path + suffix


def read_pretrained(config: Any, path: str, rank: int) -> Tuple[Dict[str, Any], str]:
    """The checkpoint ``--pretrained path`` names for rank ``rank``, read with ``weights_only``: ``path`` itself,
    or for Swin-MoE as the official ``utils_moe.load_pretrained``: ``<name>.pth`` -> this rank's
    ``<name>.pth.rank<r>`` (its experts), merged with ``<name>.pth.master`` when that exists (the official
    zero-redundancy layout keeps the shared weights there, the rank files only the experts), or
    ``<name>.pth.global`` with ``TRAIN.MOE.SAVE_MASTER``. A name not ending ``.pth`` is read as it is. The
    fine-tune adaptation (dropped buffers, resized tables, head) is ``models.load_pretrained``'s, on the result.

    Returns the checkpoint and the file(s) read (for the log). Raises ``CheckpointError`` naming the files it
    expected when they are not there, or when the rank files were saved by another number of processes (each
    holds its rank's experts).
    """
    trust = bool(config.TRUST_CHECKPOINTS)
    suffix = checkpoint_suffix(config, rank)
    if not suffix or not path.endswith('.pth'):
        return load_checkpoint_file(path, trust=trust), path
    mine = path + suffix
    if not os.path.isfile(mine):
        ranks = _rank_files(path)
        found = (f"; there are {path}.rank0 .. .rank{ranks - 1}, saved by {ranks} processes" if ranks else
                 f"; {path} itself is there: a name ending in .pth means per-rank files, so to fine-tune from that "
                 f"one file give it under a name without that ending (e.g. a link)"
                 if os.path.isfile(path) else '')
        expected = (f"{path}.global (TRAIN.MOE.SAVE_MASTER)" if suffix == '.global' else
                    f"one file per rank, {path}.rank<r>, and this is rank {rank}")
        raise CheckpointError(f"--pretrained {path}: Swin-MoE reads {mine}, which is not there (it expects "
                              f"{expected}){found}")
    checkpoint = load_checkpoint_file(mine, trust=trust)
    saved = (checkpoint.get('rng') or {}).get('world_size')
    world = get_world_size()
    if suffix != '.global' and saved is not None and saved != world:
        raise CheckpointError(f"--pretrained {path}: {mine} is one of {saved} per-rank Swin-MoE files (each with "
                              f"its rank's experts); this run has {world} processes: fine-tune from it with "
                              f"{saved} processes")
    master = path + '.master'
    if suffix != '.global' and os.path.isfile(master):
        shared = load_checkpoint_file(master, trust=trust)
        # official merge_moe_model_state_dict: the experts from the rank file, then the shared weights over them
        checkpoint = dict(checkpoint, model={**dict(checkpoint.get('model') or {}), **dict(shared.get('model') or {})})
        return checkpoint, f"{mine} with the shared weights of {master}"
    return checkpoint, mine


def last_checkpoint_name(sharded: bool) -> str:
    """The output folder's newest checkpoint: ``ckpt_last`` (a link to a directory) when sharded, else
    ``ckpt_last.pth``."""
    return SHARDED_LAST if sharded else LAST_NAME


class Checkpointer:
    """Saves a training run's ``TrainState`` into ``config.OUTPUT`` and restores it from there (or from
    ``--resume``): the one object the engine asks about checkpoints, as big_vision's loop sees only
    ``save_checkpoint`` / ``load_checkpoint`` around its train state.

    The backend is picked once, here: single ``.pth`` files written by rank 0 (one process or DDP), or sharded
    DCP directories written by every rank (``TRAIN.FSDP.ENABLE``). What a checkpoint holds is ``build_checkpoint``'s
    business alone. ``sampler``: the training sampler's class name, recorded with the position in the epoch.
    """

    def __init__(self, config: Any, dist_info: DistInfo, sampler: Optional[str] = None,
                 logger: Optional[logging.Logger] = None):
        from config import config_to_dict  # the config as plain data: a file that loads with weights_only
        self.config, self.dist_info, self.sampler = config, dist_info, sampler
        self.log = logger or _LOG
        self.config_dict = config_to_dict(config)
        self.trust = bool(config.TRUST_CHECKPOINTS)
        self.sharded = bool(config.TRAIN.FSDP.ENABLE)
        # Swin-MoE: each rank owns its experts, so every rank writes its own file <name>.pth.rank<r> (the official
        # layout), or, with TRAIN.MOE.SAVE_MASTER, rank 0 writes <name>.pth.global and every rank reads it
        self.suffix = checkpoint_suffix(config, dist_info.rank)
        self.per_rank = self.suffix.startswith('.rank')
        self.files = CheckpointManager(config.OUTPUT, config.TRAIN.KEEP_CHECKPOINTS, self.log, self.suffix)
        self._write = self._write_sharded if self.sharded else self._write_file
        self._found: Optional[Tuple[Optional[str], Optional[Dict[str, Any]]]] = None  # (path, contents)
        self._saved_rng: Optional[Mapping[str, Any]] = None  # set by restore
        if dist_info.is_main:
            remove_stale_temp_files(config.OUTPUT, self.log)

    # ------------------------------------------------------------------------- restoring

    def find(self) -> Optional[str]:
        """The checkpoint ``restore`` resumes from: ``MODEL.RESUME`` (``--resume``), else (``TRAIN.AUTO_RESUME``)
        the furthest readable one in the output folder (``auto_resume``; per-rank Swin-MoE files: the furthest
        position every rank can read, ``agreed_auto_resume``, a collective), else None. Read once, on the first
        call, so that the caller can decide before building the rest (e.g. whether ``--pretrained`` applies)."""
        if self._found is None:
            if self.config.MODEL.RESUME:
                path = self.rank_file(self.config.MODEL.RESUME)
                self._found = path, load_checkpoint_file(path, trust=self.trust)
            elif self.config.TRAIN.AUTO_RESUME and self.per_rank:  # every rank the same position: a collective
                self._found = agreed_auto_resume(self.config.OUTPUT, self.trust, self.log, self.suffix)
            elif self.config.TRAIN.AUTO_RESUME:
                self._found = auto_resume(self.config.OUTPUT, trust=self.trust, logger=self.log, suffix=self.suffix)
            else:
                self._found = None, None
            if self.suffix and self._found[1] is not None:
                self._check_world_size(*self._found)
        return self._found[0]

    def rank_file(self, path: str) -> str:
        """``--resume <name>.pth`` names this rank's ``<name>.pth.rank<r>`` (or ``.global``) for Swin-MoE, as the
        official main_moe.py reads it; another name is used as it is (``rank_checkpoint_file``)."""
        return rank_checkpoint_file(self.config, path, self.dist_info.rank, self.dist_info.world_size)

    def _check_world_size(self, path: Optional[str], checkpoint: Mapping[str, Any]) -> None:
        saved = (checkpoint.get('rng') or {}).get('world_size')
        world = self.dist_info.world_size
        if self.per_rank and saved is not None and saved != world:
            raise CheckpointError(
                f"{path} is one of {saved} per-rank Swin-MoE checkpoint files (one per process, each with its own "
                f"experts); this run has {world} processes: resume it with {saved} processes "
                f"(torchrun --nproc_per_node {saved}, or that many over the nodes)")

    def restore(self, state: TrainState) -> Optional[str]:
        """Restore ``state`` in place from the checkpoint ``find`` names (model, optimizer, scheduler, scaler,
        EMA, epoch, update, best accuracy); returns its path, or None when training starts fresh. The RNG
        states wait for ``restore_rng``.

        A mid-epoch checkpoint saved by another number of processes restarts its epoch from the beginning (the
        rest of the epoch's order is per rank); one saved with another seed or batch size goes on with a warning.
        """
        path = self.find()
        checkpoint = self._found[1] if self._found else None
        if checkpoint is None:
            return None
        self._found = path, None  # its tensors are in ``state`` now; the loaded copy can go
        restore_training_state(checkpoint, state, path, self.log)
        world = self.dist_info.world_size
        saved_world = (checkpoint.get('rng') or {}).get('world_size')
        if state.update and saved_world not in (None, world):
            self.log.info(f"resume: {path} was saved mid-epoch with {saved_world} processes, now {world}: epoch "
                          f"{state.epoch} restarts from its beginning")
            state.update = 0
        order = checkpoint.get('data_order') or {}
        seed, batch_size = self.config.SEED, self.config.DATA.BATCH_SIZE
        if state.update and order and (order.get('seed'), order.get('batch_size')) != (seed, batch_size):
            self.log.warning(f"resume: {path} was saved mid-epoch with SEED {order.get('seed')} and batch size "
                             f"{order.get('batch_size')}, now {seed} and {batch_size}: the rest of epoch "
                             f"{state.epoch} follows another sample order")
        self.log.info(f"resumed from {path}: starting at epoch {state.epoch}"
                      + (f", update {state.update}" if state.update else '')
                      + f", max accuracy {state.max_accuracy:.2f}%")
        self._saved_rng = checkpoint.get('rng') or {}
        return path

    def restore_rng(self, state: TrainState) -> None:
        """This rank's RNG states from the restored checkpoint (reseeded from ``SEED + rank + 1000 * epoch`` when
        it holds none for this world size); nothing when training started fresh. Call it right before training:
        whatever is set up after it (a TensorBoard writer...) may draw random numbers."""
        if self._saved_rng is not None:
            restore_rank_rng(self._saved_rng, self.config.SEED + self.dist_info.rank + 1000 * state.epoch, self.log)

    # ------------------------------------------------------------------------- saving

    def save(self, state: TrainState, kind: str, is_best: bool = False) -> None:
        """Checkpoint ``state``. ``kind``: ``epoch`` (after an epoch, on the ``SAVE_FREQ`` schedule; also the
        best when ``is_best``), ``best`` (the best only) or ``last`` (mid-epoch). A collective: every rank calls
        it. A failed write is logged and training goes on: the previous checkpoint is intact and the next save
        may succeed."""
        if kind not in ('epoch', 'best', 'last'):
            raise ValueError(f"checkpoint kind {kind!r} is not one of 'epoch', 'best', 'last'")
        rng = gather_rng_states()  # a collective: every rank takes part
        if not (self.dist_info.is_main or self.sharded or self.per_rank):
            return
        checkpoint = build_checkpoint(state, self.config_dict, rng, weights=not self.sharded, sampler=self.sampler)
        try:
            self._write(checkpoint, state, kind, is_best)
        except CheckpointSaveError as e:
            self.log.error(f"checkpoint not saved: {e}")

    def _write_file(self, checkpoint: Dict[str, Any], state: TrainState, kind: str, is_best: bool) -> None:
        if kind == 'epoch':
            self.files.save_epoch(checkpoint, state.epoch - 1, is_best)
        elif kind == 'best':
            self.files.save_best(checkpoint)
        else:
            self.files.save_last(checkpoint)

    def _write_sharded(self, checkpoint: Dict[str, Any], state: TrainState, kind: str, is_best: bool) -> None:
        self.files.save_sharded(checkpoint, state, kind, is_best)  # a collective: every rank writes its shards
