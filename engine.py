"""The training engine: ``UpdateStep``, ``train_one_epoch``, ``validate``, ``throughput`` and ``run`` (wires it all).

No argument parsing here: ``main.py`` builds the config and the process group and calls ``run``.

The shape follows nanoGPT's update and big_vision's ``update_fn(train_state, batch)``: a ``TrainState``
(``utils.checkpoint``) holds everything a checkpoint restores; ``UpdateStep`` turns the micro-batches of one
optimizer update into that update (precision, accumulation, clipping, non-finite guard); ``train_one_epoch`` is
a short loop that yields after every update. ``run`` wires: ``build_training`` sets the run up, ``train_epoch``
trains an epoch (logging, the non-finite stop, ``save_or_stop_mid_epoch`` between updates) and ``end_of_epoch``
validates, records, saves and checks for a stop. Checkpoints go through one ``utils.checkpoint.Checkpointer``
(``save(state, kind, is_best)``, ``restore(state)``); what they contain is its business.

Host syncs: none inside an update. The host reads device values only in ``TrainLog.log`` (every ``PRINT_FREQ``
batches), at the end of an epoch and in validation's progress lines.

Failure behaviour (see README "Failure behaviour"): SIGTERM/SIGUSR1/SIGINT make every rank finish the current
update, write ``ckpt_last.pth`` and raise ``Preempted`` (``main.py`` exits with its ``exit_code``: 143, or 130
for Ctrl-C); a kill at any point loses at most the work since the last checkpoint, and with ``DETERMINISTIC``
on CPU the resumed run ends with the same weights as an uninterrupted one (checkpoints hold every rank's RNG
state and the position in the epoch's fixed, ``(SEED, epoch)``-seeded sample order).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import data
import models
from config import ConfigError, img_size_hw, is_multi_label, model_in_chans, validate_config
from data import batch_to_device, loader_from
from lr_scheduler import build_scheduler
from models import fast_path_select, fast_paths
from models.swin_common import SwinBlock
from optimizer import build_optimizer
from utils import fast_path_cache
from utils.checkpoint import (CheckpointError, Checkpointer, TrainState, load_weights, rank_checkpoint_file,
                              read_pretrained)
from utils.distributed import (DistInfo, all_reduce_sum, broadcast_object, get_world_size, is_distributed, is_sharded,
                               unwrap_model)
from utils.fsdp import shard_model
from utils.logger import MetricsFile
from utils.misc import format_seconds, memory_label
from utils.preemption import Preempted, PreemptionGuard
from utils.trackers import EPOCH_AXIS, Trackers, start_trackers

_LOG = logging.getLogger('swin')
Batch = Sequence[torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


class NonFiniteLossError(RuntimeError):
    """Training stopped after TRAIN.MAX_NONFINITE_STEPS non-finite losses in a row."""


# ----------------------------------------------------------------------------- precision

@dataclass
class Precision:
    """How forward passes run: autocast dtype (None = fp32), whether fp16 needs a loss scaler, or apex amp."""
    device: torch.device
    dtype: Optional[torch.dtype] = None
    apex_amp: Any = None  # the apex.amp module when AMP_OPT_LEVEL O1/O2 and apex is installed

    @property
    def needs_scaler(self) -> bool:
        return self.apex_amp is None and self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        if self.apex_amp is not None:
            return 'apex amp'
        if self.dtype is None:
            tf32 = self.device.type == 'cuda' and torch.backends.cuda.matmul.allow_tf32
            return 'fp32' + (' (TF32 matmuls)' if tf32 else '')
        return f"{str(self.dtype).replace('torch.', '')} autocast" + (' + GradScaler' if self.needs_scaler else '')


def resolve_precision(config: Any, device: torch.device, apex_amp: Any = None) -> Precision:
    """AMP_ENABLE / AMP_DTYPE -> autocast dtype. ``auto``: fp16 (with a GradScaler) on CUDA, bf16 on CPU."""
    if apex_amp is not None:
        return Precision(device, apex_amp=apex_amp)
    if not config.AMP_ENABLE:
        return Precision(device)
    name = config.AMP_DTYPE
    if name == 'auto':
        name = 'float16' if device.type == 'cuda' else 'bfloat16'
    return Precision(device, torch.float16 if name == 'float16' else torch.bfloat16)


def apex_amp_module(config: Any) -> Any:
    """apex.amp when AMP_OPT_LEVEL is O1/O2 (AMP on) and apex is installed; otherwise None (torch.amp is used)."""
    if config.AMP_OPT_LEVEL not in ('O1', 'O2') or not config.AMP_ENABLE:
        return None
    try:
        from apex import amp  # type: ignore[import-not-found]
        return amp
    except ImportError:
        return None


# ----------------------------------------------------------------------------- losses

def build_criterion(config: Any, mixup_fn: Any) -> nn.Module:
    """The training loss, chosen here only. ``TRAIN.LOSS ce`` (official): soft-target CE with Mixup/CutMix,
    label-smoothing CE when MODEL.LABEL_SMOOTHING > 0, else plain CE. ``bce``: timm's ``BinaryCrossEntropy`` as
    timm's ``train.py --bce-loss`` builds it (and ``timm.loss.create_classification_loss``): Mixup/CutMix's soft
    targets as they come (the smoothing is in them); without Mixup, class ids one-hot encoded with
    MODEL.LABEL_SMOOTHING, and multi-label (B, C) targets (``DATA.LABELS csv``) smoothed towards 0.5."""
    smoothing = config.MODEL.LABEL_SMOOTHING
    if config.TRAIN.LOSS == 'bce':
        if mixup_fn is not None:
            return BinaryCrossEntropy(smoothing=0.0)
        dense = {'smooth_dense': True} if is_multi_label(config) else {}  # a timm keyword since its multi-label
        return BinaryCrossEntropy(smoothing=smoothing, **dense)  # support (data.build.check_timm_multi_label)
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # label smoothing is folded into Mixup's soft targets
    if smoothing > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def classification_loss(criterion: nn.Module, mixup_fn: Optional[Callable], device: torch.device) -> LossFn:
    """``loss_fn(model, (images, targets))``: to the device (``batch_to_device``), Mixup/CutMix there, then the
    criterion, plus the model's auxiliary loss of that forward when it has one (Swin-MoE's ``aux_loss()``, already
    weighted by ``MODEL.SWIN_MOE.AUX_LOSS_WEIGHT``: the official ``loss = criterion(outputs, targets) + l_aux``)."""
    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        images, targets = batch_to_device(batch, device)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        loss = criterion(model(images).float(), targets)
        aux_loss = getattr(unwrap_model(model), 'aux_loss', None)
        return loss if aux_loss is None else loss + aux_loss().float()
    return loss_fn


def masked_image_loss(device: torch.device) -> LossFn:
    """``loss_fn(model, (images, mask, ...))`` for models that return their own loss (SimMIM)."""
    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True))
    return loss_fn


# ----------------------------------------------------------------------------- the update

def find_ddp(model: nn.Module) -> Optional[DistributedDataParallel]:
    """The DDP module under any ``torch.compile`` wrapper (``no_sync`` lives there), or None."""
    return unwrap_model(model, DistributedDataParallel)


def _step_unless(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``bad`` (a device bool): skipped on the device when the optimizer can.

    Fused optimizers (``_step_supports_amp_scaling``) read GradScaler's ``found_inf`` flag inside their kernel and
    leave weights, moments and step counts untouched when it is set; giving them that flag ourselves skips a
    non-finite update with no host sync. torch has no public API for this without a loss scaler, hence the two
    attributes, set and removed exactly as ``GradScaler.step`` does. Other optimizers need one sync per update.
    """
    if getattr(optimizer, '_step_supports_amp_scaling', False):
        optimizer.grad_scale, optimizer.found_inf = None, bad.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(bad):
        optimizer.step()


class UpdateStep:
    """One optimizer update from the micro-batches of ``TRAIN.ACCUMULATION_STEPS`` (nanoGPT's update).

    Owns precision (fp32, bf16, fp16 with the state's GradScaler, apex), accumulation (DDP or FSDP gradient sync
    only on the last micro-batch, through the DDP/FSDP module whatever wraps it), clipping (``TRAIN.CLIP_GRAD``;
    the norm of the whole gradient, also under FSDP, is returned either way) and the non-finite guard: an update
    with non-finite gradients is skipped on the device (GradScaler does so for fp16; ``_step_unless`` for the
    rest). The EMA follows every update; after a skipped one it moves towards unchanged weights, which is harmless
    and needs no sync.

    ``__call__(micro_batches) -> (mean loss, grad norm, skipped)``, all device tensors.
    """

    def __init__(self, train_model: nn.Module, state: TrainState, precision: Precision, loss_fn: LossFn,
                 clip_grad: Optional[float] = None):
        self.model, self.state, self.precision, self.loss_fn = train_model, state, precision, loss_fn
        self.ddp, self.fsdp = find_ddp(train_model), unwrap_model(train_model, FSDPModule)
        self.max_norm = float(clip_grad) if clip_grad else math.inf
        self.params = [p for p in state.model.parameters() if p.requires_grad]
        # Swin-MoE: each rank's experts (their gradients are not all-reduced, so they differ between ranks)
        self.expert_params = expert_parameters(unwrap_model(state.model)) if is_distributed() else []

    def __call__(self, micro_batches: Sequence[Batch]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state, precision, n = self.state, self.precision, len(micro_batches)
        loss_sum = torch.zeros((), device=precision.device)
        for i, batch in enumerate(micro_batches):
            last = i == n - 1
            if self.fsdp is not None:
                self.fsdp.set_requires_gradient_sync(last)  # reduce-scatter only after the last micro-batch
            with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                with precision.autocast():
                    loss = self.loss_fn(self.model, batch)
                self._backward(loss / n, delay_unscale=not last)
            loss_sum += loss.detach()
        optimizer = state.optimizer
        if state.scaler is not None:
            state.scaler.unscale_(optimizer)
        params = list(precision.apex_amp.master_params(optimizer)) if precision.apex_amp else self.params
        if self.expert_params and not precision.apex_amp:
            grad_norm = clip_grad_norm_with_experts(params, self.expert_params, self.max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        if hasattr(grad_norm, 'full_tensor'):  # FSDP: a replicated DTensor (the norm of the whole gradient)
            grad_norm = grad_norm.full_tensor()
        bad = ~torch.isfinite(grad_norm)  # the same on every rank: gradients are all-reduced (or the norm is)
        if state.scaler is not None:
            state.scaler.step(optimizer)  # skips on inf/nan without a sync (fused optimizers)
            state.scaler.update()
        elif precision.apex_amp is not None:
            optimizer.step()
        else:
            _step_unless(optimizer, bad)
        optimizer.zero_grad(set_to_none=True)
        state.update += 1
        if state.ema is not None:
            state.ema.update(state.model, step=state.global_update)
        return loss_sum / n, grad_norm, bad

    def _backward(self, loss: torch.Tensor, delay_unscale: bool) -> None:
        if self.precision.apex_amp is not None:
            with self.precision.apex_amp.scale_loss(loss, self.state.optimizer, delay_unscale=delay_unscale) as s:
                s.backward()
        elif self.state.scaler is not None:
            self.state.scaler.scale(loss).backward()
        else:
            loss.backward()


# ----------------------------------------------------------------------------- train / validate / throughput

def expert_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters a model lists in ``_ddp_params_and_buffers_to_ignore`` (Swin-MoE's experts: DDP does not
    all-reduce them, each rank owns its own)."""
    ignored = set(getattr(model, '_ddp_params_and_buffers_to_ignore', ()))
    return [p for n, p in model.named_parameters() if n in ignored]


def clip_grad_norm_with_experts(params: Sequence[nn.Parameter], expert_params: Sequence[nn.Parameter],
                                max_norm: float) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient: the shared parameters' (equal on every rank after DDP's
    all-reduce) and every rank's experts' (their squares summed over the ranks). The official code clips each rank
    by its local norm, which differs between ranks; this one is the same everywhere, so every rank skips a
    non-finite step together."""
    experts = {id(p) for p in expert_params}
    shared = [p.grad for p in params if p.grad is not None and id(p) not in experts]
    local = [p.grad for p in params if p.grad is not None and id(p) in experts]
    device = (shared or local)[0].device
    shared_sq = torch.nn.utils.get_total_norm(shared).float() ** 2 if shared else torch.zeros((), device=device)
    expert_sq = torch.nn.utils.get_total_norm(local).float() ** 2 if local else torch.zeros((), device=device)
    total = (shared_sq + all_reduce_sum(expert_sq)).sqrt()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def train_one_epoch(state: TrainState, update_step: UpdateStep, data_loader: DataLoader,
                    accumulation_steps: int = 1) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Train epoch ``state.epoch`` from update ``state.update`` on; yields ``update_step``'s result after each.

    ``data_loader`` yields the epoch's batches from that update on (``loader_from``). The LR of update k is the
    schedule's value at the global update index k. Batches past the last full update are not used.
    """
    state.model.train()
    updates_per_epoch = state.updates_per_epoch
    batches = iter(data_loader)
    while state.update < updates_per_epoch:
        micro_batches = [next(batches) for _ in range(accumulation_steps)]
        state.lr_scheduler.step_update(state.global_update)
        yield update_step(micro_batches)


class LogWindow(NamedTuple):
    """What ``TrainLog`` read on the host at its last log line (``batch`` 0-based, of ``num_batches``)."""
    loss: float
    lr: float
    loss_scale: Optional[float]
    batch: int
    num_batches: int
    longest_bad_run: int  # the most consecutive skipped (non-finite) updates of the epoch so far


class TrainLog:
    """An epoch's running loss sums, kept on the device and logged every ``PRINT_FREQ`` batches (the only host
    syncs of training), and the count of consecutive skipped (non-finite) updates; ``last_window`` holds what
    the last log line read (``stop_if_nonfinite`` stops the run from it)."""

    def __init__(self, config: Any, state: TrainState, device: torch.device, log: logging.Logger,
                 trackers: Optional[Trackers] = None):
        self.config, self.state, self.device, self.log, self.trackers = config, state, device, log, trackers
        self.accum = config.TRAIN.ACCUMULATION_STEPS
        self.every = max(1, config.PRINT_FREQ // self.accum)
        self.images_per_update = config.DATA.BATCH_SIZE * self.accum * get_world_size()
        # A mid-epoch resume carries on with the sums of the updates before it (``state.running_sums``, from the
        # checkpoint), so the epoch's mean loss, skips and time are the uninterrupted run's; an old checkpoint
        # without them restarts the sums at the resumed update.
        saved = state.running_sums if state.update else None
        self.first_update = 0 if saved else state.update
        saved = saved or {}

        def tensor(name: str) -> torch.Tensor:
            return torch.tensor(float(saved.get(name, 0.0)), device=device)

        self.epoch_loss, self.window_loss, self.skipped = tensor('epoch_loss'), tensor('window_loss'), tensor('skipped')
        self.bad_run, self.longest_bad_run = tensor('bad_run'), tensor('longest_bad_run')
        self.grad_norm = torch.zeros((), device=device)
        self.time_before = float(saved.get('time', 0.0))  # the epoch's training time before the resume
        self.epoch_start = self.window_start = time.time()
        self.window_updates = int(saved.get('window_updates', 0))
        self.last_window: Optional[LogWindow] = None
        state.running_sums = self.sums()

    def sums(self) -> Dict[str, Any]:
        """The epoch's running sums so far (device tensors, no sync), which a mid-epoch checkpoint saves."""
        return {'epoch_loss': self.epoch_loss, 'window_loss': self.window_loss, 'skipped': self.skipped,
                'bad_run': self.bad_run, 'longest_bad_run': self.longest_bad_run,
                'window_updates': self.window_updates, 'time': self.time_before + time.time() - self.epoch_start}

    def record(self, loss: torch.Tensor, grad_norm: torch.Tensor, bad: torch.Tensor) -> None:
        """Add one update's results (device ops only); logs when the window is full or the epoch ends."""
        self.epoch_loss, self.window_loss = self.epoch_loss + loss, self.window_loss + loss
        self.skipped = self.skipped + bad
        self.bad_run = (self.bad_run + 1) * bad
        self.longest_bad_run = torch.maximum(self.longest_bad_run, self.bad_run)
        self.grad_norm = grad_norm
        self.window_updates += 1
        if self.state.update % self.every == 0 or self.state.update == self.state.updates_per_epoch:
            self._log_window()
        self.state.running_sums = self.sums()

    def _log_window(self) -> None:
        state, config, optimizer = self.state, self.config, self.state.optimizer
        window_loss, epoch_loss, norm, longest = torch.stack(
            [self.window_loss, self.epoch_loss, self.grad_norm.float(), self.longest_bad_run]).tolist()
        window_loss /= self.window_updates
        epoch_loss /= state.update - self.first_update
        lr = optimizer.param_groups[0]['lr']
        scale = state.scaler.get_scale() if state.scaler is not None else None
        num_batches = state.updates_per_epoch * self.accum
        batch = state.update * self.accum - 1
        self.last_window = LogWindow(window_loss, lr, scale, batch, num_batches, int(longest))
        now = time.time()
        update_time = (now - self.window_start) / self.window_updates
        epoch_eta = update_time * (state.updates_per_epoch - state.update)
        run_eta = epoch_eta + update_time * state.updates_per_epoch * (config.TRAIN.EPOCHS - state.epoch - 1)
        images_per_s = self.window_updates * self.images_per_update / max(now - self.window_start, 1e-9)
        wd = max(g['weight_decay'] for g in optimizer.param_groups)
        self.log.info(
            f"Train: [{state.epoch}/{config.TRAIN.EPOCHS}][{batch}/{num_batches}]\t"
            f"eta {format_seconds(epoch_eta)} (run left {format_seconds(run_eta)})\tlr {lr:.6f}\twd {wd:.4f}\t"
            f"loss {window_loss:.4f} ({epoch_loss:.4f})\tgrad_norm {norm:.4f}\t"
            f"loss_scale {f'{scale:.1f}' if scale is not None else '-'}\t{memory_label(self.device)}\t"
            f"{images_per_s:.1f} img/s")
        if self.trackers:
            values = {'train/loss': window_loss, 'train/lr': lr, 'train/grad_norm': norm,
                      'train/throughput': images_per_s}
            if scale is not None:
                values['train/loss_scale'] = scale
            self.trackers.log(values, state.global_update)
        self.window_loss = torch.zeros((), device=self.device)
        self.window_updates = 0
        self.window_start = time.time()

    def summary(self) -> Dict[str, float]:
        """The epoch's mean loss, last LR, updates, skipped updates and time (logged)."""
        epoch_loss, skipped = torch.stack([self.epoch_loss, self.skipped.float()]).tolist()
        updates = self.state.update - self.first_update
        epoch_time = self.time_before + time.time() - self.epoch_start
        self.log.info(f"EPOCH {self.state.epoch} training takes {format_seconds(epoch_time)}"
                      + (f"; {int(skipped)} updates skipped for non-finite loss/gradients" if skipped else ''))
        return {'loss': epoch_loss / max(updates, 1), 'lr': float(self.state.optimizer.param_groups[0]['lr']),
                'updates': updates, 'skipped': int(skipped), 'time': epoch_time}


def stop_if_nonfinite(config: Any, train_log: TrainLog) -> None:
    """Raise ``NonFiniteLossError`` once ``TRAIN.MAX_NONFINITE_STEPS`` updates in a row were skipped for non-finite
    losses or gradients, as the last log line read it (no host sync of its own)."""
    window, limit = train_log.last_window, config.TRAIN.MAX_NONFINITE_STEPS
    if window is None or window.longest_bad_run < limit:
        return
    scale = f"{window.loss_scale:.1f}" if window.loss_scale is not None else 'none (no loss scaler)'
    raise NonFiniteLossError(
        f"stopping: {limit} consecutive non-finite losses/gradients (TRAIN.MAX_NONFINITE_STEPS) by epoch "
        f"{train_log.state.epoch} step {window.batch}/{window.num_batches}: lr {window.lr:.3e}, loss {window.loss}, "
        f"loss scale {scale}. Lower TRAIN.BASE_LR, enable TRAIN.CLIP_GRAD, or train in bf16/fp32 (AMP_DTYPE "
        f"bfloat16 or --disable_amp)")


class Accuracy(NamedTuple):
    """Single-label validation: top-1 and top-5 accuracy (%), mean cross-entropy."""
    acc1: float
    acc5: float
    loss: float


class MultiLabelScores(NamedTuple):
    """Multi-label validation (``DATA.LABELS csv``): mAP (macro average precision over the classes, %), micro and
    macro F1 (%) at ``TEST.THRESHOLD``, mean binary cross-entropy (over images and classes)."""
    mAP: float
    f1_micro: float
    f1_macro: float
    loss: float


ValMetrics = Any  # Accuracy or MultiLabelScores: field 0 is the metric that picks ckpt_best


def metric_name(config: Any) -> str:
    """The name of the validation metric that picks ``ckpt_best`` (field 0 of ``validate``'s result)."""
    return 'mAP' if is_multi_label(config) else 'accuracy'


def _forward_batches(data_loader: DataLoader, model: nn.Module, device: torch.device,
                     autocast: contextlib.AbstractContextManager) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
    """``(batch index, float logits, targets)`` of every batch with images, on ``device``.

    FSDP: every forward gathers weights from all ranks, so every rank must run as many as the others; ranks with
    fewer (or empty) batches run spare forwards on an image they already saw, after the last batch, and count
    nothing."""
    lockstep = is_sharded(model) and is_distributed()
    spare: Optional[torch.Tensor] = None
    forwards = 0
    for idx, batch in enumerate(data_loader):
        if len(batch[1]) == 0:
            continue  # every image of the batch was unreadable and dropped
        images, targets = batch_to_device(batch, device)
        if lockstep and spare is None:
            spare = images[:1]
        with autocast:
            outputs = model(images)
        yield idx, outputs.float(), targets
        forwards += 1
    if lockstep:
        most = torch.tensor([forwards], device=device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        spare = spare if spare is not None else torch.zeros((1, *_input_shape(model)), device=device)
        with autocast:
            for _ in range(int(most.item()) - forwards):
                model(spare)


@torch.no_grad()
def validate(config: Any, data_loader: DataLoader, model: nn.Module, precision: Optional[Precision] = None,
             logger: Optional[logging.Logger] = None, prefix: str = '') -> ValMetrics:
    """Top-1, top-5 accuracy (%) and mean CE loss over the whole validation set, exact across ranks
    (``Accuracy``); for multi-label data (``DATA.LABELS csv``) ``validate_multi_label``'s ``MultiLabelScores``.

    Each rank evaluates its own images (no padding); correct counts, loss sums and image counts are summed over
    ranks before dividing. Every ``PRINT_FREQ`` batches a ``Test: [i/n]`` line shows this rank's running figures
    and the time left (the only host syncs before the end). Prints `` * Acc@1 .. Acc@5 ..`` as the official
    code, then the loss (``prefix`` for EMA lines).
    """
    if is_multi_label(config):
        return validate_multi_label(config, data_loader, model, precision, logger, prefix)
    log = logger or _LOG
    device = precision.device if precision is not None else next(model.parameters()).device
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits
    count = 0  # images, counted on the host: no host-to-device copy per batch
    criterion = nn.CrossEntropyLoss(reduction='sum')
    start, num_batches = time.time(), len(data_loader)
    for idx, outputs, targets in _forward_batches(data_loader, model, device, autocast):
        hits = outputs.topk(min(5, outputs.shape[1]), dim=1).indices.eq(targets[:, None])
        totals += torch.stack([criterion(outputs, targets), hits[:, :1].sum(), hits.sum()]).double()
        count += outputs.shape[0]
        if (idx + 1) % config.PRINT_FREQ == 0 and idx + 1 < num_batches:
            loss_sum, top1, top5 = totals.tolist()
            eta = (time.time() - start) / (idx + 1) * (num_batches - idx - 1)
            log.info(f"{prefix + ' ' if prefix else ''}Test: [{idx + 1}/{num_batches}]\teta {format_seconds(eta)}\t"
                     f"loss {loss_sum / count:.4f}\tAcc@1 {100 * top1 / count:.3f}\tAcc@5 {100 * top5 / count:.3f}"
                     f"\t{memory_label(device)}")
    totals = all_reduce_sum(torch.cat([totals, torch.tensor([float(count)], dtype=torch.float64).to(device)]))
    loss_sum, correct1, correct5, count = totals.tolist()
    if count == 0:
        raise RuntimeError("the validation set has no readable images")
    acc1, acc5, loss = 100.0 * correct1 / count, 100.0 * correct5 / count, loss_sum / count
    if prefix:
        log.info(f"{prefix} Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.4f}")
    else:
        log.info(f' * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.4f}')  # the official line, then the loss
    return Accuracy(acc1, acc5, loss)


def multi_label_scores(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5,
                       distributed: bool = False) -> MultiLabelScores:
    """mAP, micro/macro F1 (%) and mean BCE of ``logits`` (N, C) against multi-hot ``targets`` (N, C) through
    timm's ``MultiLabelClassificationEvaluator``: AP per class as scikit-learn's ``average_precision_score``
    (ranked by the logits, tied scores one threshold, a class without positives counting 0), F1 of
    ``sigmoid(logits) >= threshold`` as ``f1_score`` (a class never predicted nor present counting 0).
    ``distributed``: every rank passes its own rows, all ranks' rows are gathered (uneven counts, none included)
    and every rank gets the metrics of all of them; a collective."""
    from timm.task import MultiLabelClassificationEvaluator  # timm's multi-label support: check_timm_multi_label
    evaluator = MultiLabelClassificationEvaluator(device=logits.device, threshold=threshold)
    if logits.shape[0]:
        evaluator.update(logits, targets)  # one device-to-host copy of the rows
    metrics = evaluator.compute(distributed=distributed)
    return MultiLabelScores(metrics['map'], metrics['micro_f1'], metrics['macro_f1'], metrics['loss'])


@torch.no_grad()
def validate_multi_label(config: Any, data_loader: DataLoader, model: nn.Module,
                         precision: Optional[Precision] = None, logger: Optional[logging.Logger] = None,
                         prefix: str = '') -> MultiLabelScores:
    """``multi_label_scores`` over the whole validation set at ``TEST.THRESHOLD``, exact across ranks: each rank
    keeps its own images' logits on the device (no padding), then all of them are gathered once, so the mAP and F1
    are those of the whole set as one array. ``Test: [i/n]`` lines show this rank's running loss; the last line is
    `` * mAP .. F1 micro .. macro .. loss ..`` (``prefix`` for EMA lines)."""
    log = logger or _LOG
    device = precision.device if precision is not None else next(model.parameters()).device
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    model.eval()
    logits, targets = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # for the progress lines only
    count = 0
    start, num_batches = time.time(), len(data_loader)
    for idx, outputs, batch_targets in _forward_batches(data_loader, model, device, autocast):
        if batch_targets.shape != outputs.shape:
            raise ValueError(f"multi-label validation needs (B, C) multi-hot targets like the (B, C) logits "
                             f"{tuple(outputs.shape)}, got {tuple(batch_targets.shape)} (DATA.LABELS csv data)")
        logits.append(outputs)  # (B, C)
        targets.append(batch_targets)  # (B, C)
        loss_sum += F.binary_cross_entropy_with_logits(outputs, batch_targets.float(), reduction='sum').double() \
            / outputs.shape[1]
        count += outputs.shape[0]
        if (idx + 1) % config.PRINT_FREQ == 0 and idx + 1 < num_batches:
            eta = (time.time() - start) / (idx + 1) * (num_batches - idx - 1)
            log.info(f"{prefix + ' ' if prefix else ''}Test: [{idx + 1}/{num_batches}]\teta {format_seconds(eta)}\t"
                     f"loss {loss_sum.item() / count:.4f}\t{memory_label(device)}")
    total = all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64).to(device))
    if total.item() == 0:
        raise RuntimeError("the validation set has no readable images")
    num_classes = config.MODEL.NUM_CLASSES
    all_logits = torch.cat(logits) if logits else torch.zeros((0, num_classes), device=device)
    all_targets = torch.cat(targets) if targets else torch.zeros((0, num_classes), device=device)
    scores = multi_label_scores(all_logits, all_targets, config.TEST.THRESHOLD, is_distributed())
    line = (f"mAP {scores.mAP:.3f} F1 micro {scores.f1_micro:.3f} macro {scores.f1_macro:.3f} "
            f"loss {scores.loss:.4f}")
    log.info(f"{prefix} {line}" if prefix else f" * {line}")
    return scores


def _input_shape(model: nn.Module) -> Tuple[int, int, int]:
    """(channels, height, width) of the images ``model`` was built for (a rank with no image at all)."""
    plain = unwrap_model(model)
    plain = getattr(plain, 'encoder', plain)  # SimMIM
    h, w = plain.img_size
    return plain.patch_embed.in_chans, h, w


@torch.no_grad()
def throughput(data_loader: DataLoader, model: nn.Module, precision: Optional[Precision] = None,
               logger: Optional[logging.Logger] = None, warmup_iters: int = 50, timed_iters: int = 30) -> float:
    """The official measurement: eval mode, one batch, ``warmup_iters`` warm-up passes then ``timed_iters``
    timed ones; logs ``batch_size {b} throughput {x}`` (images/s) and returns x."""
    log = logger or _LOG
    device = precision.device if precision is not None else next(model.parameters()).device
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    model.eval()
    images = batch_to_device(next(b for b in data_loader if len(b[1]) > 0), device)[0]
    batch_size = images.shape[0]

    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    with autocast:
        for _ in range(warmup_iters):
            model(images)
        sync()
        log.info(f"throughput averaged with {timed_iters} times")
        start = time.time()
        for _ in range(timed_iters):
            model(images)
        sync()
    images_per_s = timed_iters * batch_size / (time.time() - start)
    log.info(f"batch_size {batch_size} throughput {images_per_s}")
    return images_per_s


# ----------------------------------------------------------------------------- wiring

def set_matmul_precision(config: Any, device: torch.device) -> None:
    """fp32 matmuls and convolutions on CUDA use TF32 tensor cores unless ``TF32`` is off (PyTorch's default is
    full fp32, which leaves an fp32 run, ``--disable_amp``, several times slower on Ampere and later)."""
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = bool(config.TF32)
        torch.backends.cudnn.allow_tf32 = bool(config.TF32)


_DDP_PARAMETERS = inspect.signature(DistributedDataParallel.__init__).parameters


def wrap_for_training(model: nn.Module, config: Any, dist_info: DistInfo) -> nn.Module:
    """DDP when distributed (not for a model already sharded by ``fsdp_shard``), then ``torch.compile`` when
    ``COMPILE``.

    ``broadcast_buffers=False`` as in the official code: Swin's buffers are tables derived from the geometry (no
    BatchNorm statistics), identical on every rank, and re-sending them before every forward costs up to 56 MiB
    (SwinV2-B 12to24) per step.
    """
    train_model = model
    if dist_info.distributed and not is_sharded(model):
        device = dist_info.device
        # torch >= 2.12 names the per-forward broadcast `forward_sync_buffers` and deprecates the old keyword.
        no_broadcast = {'forward_sync_buffers' if 'forward_sync_buffers' in _DDP_PARAMETERS else
                        'broadcast_buffers': False}
        # Swin-MoE's experts are in model._ddp_params_and_buffers_to_ignore (DDP reads it): not all-reduced. Their
        # gradients sum every rank's tokens (the all-to-all's backward) while DDP averages the shared ones, so they
        # are divided by the world size, as the official main_moe.py does (hook_scale_grad).
        world = get_world_size()
        for p in expert_parameters(model):
            if p.requires_grad:
                p.register_hook(lambda grad, world=world: grad / world)
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None,
                                              find_unused_parameters=False, **no_broadcast)
    return torch.compile(train_model) if config.COMPILE else train_model


def build_fsdp_model(config: Any, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with the same initial weights on every rank (FSDP keeps each rank's own slice of what it holds,
    and ranks are seeded ``SEED + rank``): built under ``SEED`` on a forked RNG, so the ranks' own streams are
    untouched. Built on the CPU: ``fully_shard`` then moves one block at a time to the device and keeps only its
    shard there, so no GPU holds the whole model (each rank's host memory does, briefly, and the EMA's copy)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.SEED)
        return build()


def fsdp_shard(model: nn.Module, config: Any, precision: 'Precision') -> nn.Module:
    """``utils.fsdp.shard_model`` with the config's precision, offload and resharding; the unit is a Swin block."""
    return shard_model(model, (SwinBlock,), param_dtype=precision.dtype, cpu_offload=config.TRAIN.FSDP.CPU_OFFLOAD,
                       reshard_after_forward=config.TRAIN.FSDP.RESHARD_AFTER_FORWARD, device=precision.device)


# ----------------------------------------------------------------------------- the fast paths

# Overrides MODEL.FAST_PATHS_SELECT for every run of the process and its children: fixed paths for CI and
# benchmarks (the test suite runs with 'all', today's paths, so that its runs spend no time measuring).
SELECT_ENV_VAR = 'SWIN_FAST_PATHS_SELECT'

def select_fast_paths(config: Any, model: nn.Module, precision: 'Precision', log: logging.Logger,
                      modes: Sequence[str] = fast_paths.MODES, recorded: Optional[Dict[str, Dict[str, bool]]] = None,
                      timer: Callable[[], float] = time.perf_counter) -> Dict[str, Dict[str, bool]]:
    """Choose the named fast paths (``models.fast_paths``) for this run, apply them process-wide, log them once
    and return them (for ``TrainState.fast_paths``, i.e. every checkpoint).

    ``recorded`` (the choices in the checkpoint a run resumes from) wins: the resumed run takes the same paths
    as the run it resumes, whatever this machine would measure. Else ``SWIN_FAST_PATHS_SELECT`` if set, or
    ``MODEL.FAST_PATHS_SELECT``: ``all`` / ``none``,
    or ``measure``: the cache (``utils.fast_path_cache``) or, on a miss, a timing on rank 0 of the model's own
    blocks at the run's batch size, image size and autocast dtype (``models.fast_path_select``), broadcast so
    that every rank takes the same paths. Nothing is timed off the CPU, for SimMIM pre-training, for Swin-MoE
    (its experts' all-to-all needs every rank in each forward; rank 0 times alone), sharded (FSDP), or with the
    fast paths switched off (``MODEL.FAST_PATHS False`` / ``SWIN_FAST_PATHS=0``: nothing runs either way).
    """
    how = os.environ.get(SELECT_ENV_VAR) or config.MODEL.FAST_PATHS_SELECT
    if how not in ('measure', 'all', 'none'):
        raise ConfigError(f"environment variable {SELECT_ENV_VAR}={how!r} must be measure, all or none (or unset)")
    device = precision.device
    if recorded is not None:
        # a path the recorded run did not have (a checkpoint from before it existed) stays off: that run ran without it
        recorded = {mode: {**dict.fromkeys(fast_paths.PATHS, False), **paths} for mode, paths in recorded.items()}
        choices, source = fast_paths.check_choices(recorded), 'recorded in the checkpoint resumed from'
    elif how == 'none':
        choices, source = {m: dict.fromkeys(fast_paths.PATHS, False) for m in fast_paths.MODES}, \
            'MODEL.FAST_PATHS_SELECT none'
    elif how == 'all' or not fast_paths.use_fast_paths() or is_sharded(model) or config.MODEL.TYPE == 'swin_moe' or \
            not any(fast_path_select.applicable_paths(m, precision.dtype, device) for m in modes) or \
            not any(isinstance(m, SwinBlock) for m in model.modules()):
        choices, source = fast_paths.all_on(), 'all (nothing to measure)' if how == 'measure' else \
            'MODEL.FAST_PATHS_SELECT all'
    else:
        result = None
        if not is_distributed() or torch.distributed.get_rank() == 0:
            result = _measure_fast_paths(config, model, precision, modes, timer)
        choices, source = broadcast_object(result)
    fast_paths.set_fast_path_choices(choices)
    if not fast_paths.use_fast_paths():
        source += '; the fast-path switch is off, so none runs'
    described = '; '.join(f"{mode}: off " + (', '.join(n for n, on in paths.items() if not on) or 'none')
                          for mode, paths in choices.items())
    log.info(f"fast paths ({source}): {described}")
    return choices


def _measure_fast_paths(config: Any, model: nn.Module, precision: 'Precision', modes: Sequence[str],
                        timer: Callable[[], float]) -> Tuple[Dict[str, Dict[str, bool]], str]:
    """The cached choices for this machine, torch, dtype and the model's block shapes, or measured and cached."""
    device, dtype = precision.device, precision.dtype
    height, width = img_size_hw(config)
    with torch.random.fork_rng(devices=[]):  # the run's random streams stay untouched (exact resume, seeds)
        sample = torch.randn(config.DATA.BATCH_SIZE, model_in_chans(config), height, width, device=device)
        plain = unwrap_model(model)
        was_training = plain.training
        plain.eval()
        with precision.autocast():
            samples = fast_path_select.capture_blocks(plain, lambda: plain(sample))
        plain.train(was_training)
        key = fast_path_cache.cache_key({
            'cpu': fast_path_cache.cpu_identity(), 'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'device': device.type, 'dtype': str(dtype or torch.float32), 'modes': sorted(modes),
            'paths': list(fast_paths.PATHS),  # a new path: measured again, not taken on from an older entry
            'revision': fast_paths.REVISION,  # changed path code: the same
            'blocks': fast_path_select.signature(samples)})
        cached = fast_path_cache.lookup(key)
        if cached is not None:
            return fast_paths.check_choices(cached), f"cached in {fast_path_cache.cache_path()}"
        start = time.perf_counter()
        choices, timings = fast_path_select.measure_choices(plain, samples, dtype, device, modes, timer=timer,
                                                            forward=lambda: plain(sample))
        spent = time.perf_counter() - start
    where = fast_path_cache.store(key, choices, timings) or 'not cached: the cache file is not writable'
    def base(times: Dict[str, float], label: str) -> float:  # a together-timing against its own all-on run
        return times[fast_path_select.BASELINE_OF.get(label, 'all on')]
    ratios = '; '.join(f"{mode}: " + ', '.join(f"{label} {t / base(times, label):.2f}x" for label, t in times.items()
                                               if not label.startswith('all on')) for mode, times in timings.items())
    return choices, f"measured in {spent:.1f} s, time without each relative to all on: {ratios}; saved to {where}"


# ----------------------------------------------------------------------------- building a run

class Loaders(NamedTuple):
    """The training loader, the validation loader and set (None for SimMIM pre-training), Mixup/CutMix or None."""
    train: Optional[DataLoader]
    val: Optional[DataLoader]
    dataset_val: Any
    mixup_fn: Optional[Callable]


def build_loaders(config: Any, pretrain: bool) -> Loaders:
    """``data.build_loader``'s loaders: classification, or SimMIM pre-training (``pretrain``)."""
    if pretrain:
        return Loaders(data.build_loader(config, simmim=True, is_pretrain=True), None, None, None)
    _, dataset_val, loader_train, loader_val, mixup_fn = data.build_loader(config)
    return Loaders(loader_train, loader_val, dataset_val, mixup_fn)


def create_model(config: Any, device: torch.device, pretrain: bool, fsdp: bool, log: logging.Logger) -> nn.Module:
    """``models.build_model`` on ``device``; for FSDP on the CPU with the same weights on every rank
    (``build_fsdp_model``), sharded later by ``build_training``."""
    if fsdp:
        model = build_fsdp_model(config, lambda: models.build_model(config, is_pretrain=pretrain))
    else:
        model = models.build_model(config, is_pretrain=pretrain).to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"model {config.MODEL.TYPE}/{config.MODEL.NAME}: {n_parameters} trainable parameters")
    return model


@dataclass
class Training:
    """A training run as ``build_training`` sets it up: the train state and what the loop needs around it."""
    config: Any
    dist_info: DistInfo
    state: TrainState
    update_step: UpdateStep
    eval_model: nn.Module
    precision: Precision
    loaders: Loaders
    checkpointer: Checkpointer
    log: logging.Logger
    trackers: Trackers = field(default_factory=Trackers)  # TensorBoard, wandb, MLflow (rank 0)
    metrics: Optional[MetricsFile] = None


def build_training(config: Any, dist_info: DistInfo, model: nn.Module, loaders: Loaders, pretrain: bool,
                   log: logging.Logger) -> Training:
    """The train state around ``model`` (restored from a checkpoint, else with ``MODEL.PRETRAINED`` weights;
    sharded under FSDP) with its optimizer, schedule, loss scaler and EMA; the update step, the model to validate,
    the checkpointer and the run's outputs (the trackers: TensorBoard, wandb, MLflow; ``metrics.jsonl``)."""
    device, fsdp, accum = dist_info.device, bool(config.TRAIN.FSDP.ENABLE), config.TRAIN.ACCUMULATION_STEPS
    updates_per_epoch = len(loaders.train) // accum
    if updates_per_epoch < 1:
        raise ConfigError(f"TRAIN.ACCUMULATION_STEPS = {accum} exceeds the {len(loaders.train)} training batches "
                          f"per epoch; lower it or DATA.BATCH_SIZE")
    checkpointer = Checkpointer(config, dist_info, sampler=type(loaders.train.sampler).__name__, logger=log)
    if checkpointer.find() is None and config.MODEL.PRETRAINED:  # into the plain model: before the EMA copies
        _load_pretrained(model, config, dist_info.rank, log)  # it, and sharding
    apply_freeze(model, config, log)  # before FSDP shards it and the optimizer and DDP take its parameters
    # The EMA copies the fp32 weights before apex O2 casts the model to fp16 (an fp16 EMA at decay 0.9998 would
    # round its updates away); ModelEmaV3 then adds the fp16 weights into its fp32 copy. Under FSDP the copy is
    # sharded like the model, so its update is a shard-by-shard lerp with no communication.
    ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY, use_warmup=config.TRAIN.EMA.WARMUP) \
        if config.TRAIN.EMA.ENABLE else None
    apex_amp = None if fsdp else apex_amp_module(config)
    precision = resolve_precision(config, device, apex_amp)
    if fsdp:  # before the optimizer: it must hold the sharded (DTensor) parameters
        model = fsdp_shard(model, config, precision)
        if ema is not None:
            fsdp_shard(ema.module, config, precision)
    optimizer = build_optimizer(config, model, simmim=True, is_pretrain=True) if pretrain else \
        build_optimizer(config, model)
    if apex_amp is not None:
        model, optimizer = apex_amp.initialize(model, optimizer, opt_level=config.AMP_OPT_LEVEL)
    log.info(f"precision: {precision.describe()} on {device}" + (
        f"; FSDP over {dist_info.world_size} processes (cpu offload {config.TRAIN.FSDP.CPU_OFFLOAD}, reshard after "
        f"forward {config.TRAIN.FSDP.RESHARD_AFTER_FORWARD})" if fsdp else ''))
    state = TrainState(model=model, optimizer=optimizer,
                       lr_scheduler=build_scheduler(config, optimizer, updates_per_epoch),
                       scaler=torch.amp.GradScaler(device.type) if precision.needs_scaler else None, ema=ema,
                       epoch=config.TRAIN.START_EPOCH, updates_per_epoch=updates_per_epoch)
    checkpointer.restore(state)
    # the loader that trains (DATA.LOADER auto: data.choose_loaders) against the one the checkpoint recorded
    state.data_loader = data.check_resumed_loader(config, state.data_loader, checkpointer.find(), pretrain)
    # after the restore: a resumed run takes the choices its checkpoint recorded (state.fast_paths)
    state.fast_paths = select_fast_paths(config, model, precision, log, modes=() if pretrain else fast_paths.MODES,
                                         recorded=state.fast_paths)
    train_model = wrap_for_training(model, config, dist_info)
    eval_model = torch.compile(model) if config.COMPILE else model
    loss_fn = masked_image_loss(device) if pretrain else \
        classification_loss(build_criterion(config, loaders.mixup_fn), loaders.mixup_fn, device)
    update_step = UpdateStep(train_model, state, precision, loss_fn, config.TRAIN.CLIP_GRAD)
    finished = state.epoch >= config.TRAIN.EPOCHS  # run() stops at once: no new (empty) event file or run
    # After the restore: the checkpoint names the tracker runs to continue; their ids go into every later one.
    trackers = Trackers() if finished else start_trackers(config, dist_info.is_main, state.tracker_runs, log)
    state.tracker_runs.update(trackers.run_ids())
    metrics = MetricsFile(f"{config.OUTPUT}/metrics.jsonl", state.epoch) if dist_info.is_main else None
    return Training(config, dist_info, state, update_step, eval_model, precision, loaders, checkpointer, log,
                    trackers, metrics)


def apply_freeze(model: nn.Module, config: Any, log: logging.Logger) -> Optional[models.FreezeSummary]:
    """Freeze the parameters ``TRAIN.FREEZE`` names, or all but the head for ``TRAIN.LINEAR_PROBE``
    (``models.freeze_parameters``), and log how many train; None when neither is set. A pattern that matches no
    parameter, or nothing left to train, is a ``ConfigError`` naming the key."""
    patterns, probe = [str(p) for p in config.TRAIN.FREEZE], bool(config.TRAIN.LINEAR_PROBE)
    if not (patterns or probe):
        return None
    reason = 'TRAIN.LINEAR_PROBE: all but the head' if probe else f"TRAIN.FREEZE {patterns}"
    try:
        summary = models.freeze_parameters(model, patterns, probe)
    except models.FreezeError as e:
        raise ConfigError(f"{'TRAIN.LINEAR_PROBE' if probe else 'TRAIN.FREEZE'}: {e}") from None
    log.info(summary.describe(reason))
    return summary


def _load_pretrained(model: nn.Module, config: Any, rank: int, log: logging.Logger) -> None:
    """``MODEL.PRETRAINED`` into ``model`` for fine-tuning: the file(s) as ``read_pretrained`` names them (Swin-MoE:
    this rank's ``<name>.pth.rank<r>``), adapted by ``models.load_pretrained``."""
    path = config.MODEL.PRETRAINED
    checkpoint, read = read_pretrained(config, path, rank)
    try:
        models.load_pretrained(model, checkpoint, logger=log)
    except ValueError as e:
        raise CheckpointError(f"--pretrained {path}: {e}") from None
    log.info(f"loaded pretrained weights from {path}" + (f" ({read})" if read != path else ''))


# ----------------------------------------------------------------------------- the epochs

def train_epoch(t: Training, epoch: int, preemption: PreemptionGuard) -> Dict[str, Any]:
    """Train epoch ``epoch`` from update ``state.update`` on (after a mid-epoch resume: the rest of the epoch's
    order), with its log lines, the non-finite stop and the mid-epoch saves and stops. Returns the epoch's
    training summary (``TrainLog.summary``, plus ``broken``: unreadable images skipped)."""
    config, state, loader_train = t.config, t.state, t.loaders.train
    accum = config.TRAIN.ACCUMULATION_STEPS
    state.epoch = epoch
    if hasattr(loader_train.sampler, 'set_epoch'):
        loader_train.sampler.set_epoch(epoch)
    loader = loader_from(loader_train, state.update * accum,
                         seed=(epoch * 100003 + state.update) * 1009 + t.dist_info.rank)
    train_log = TrainLog(config, state, t.dist_info.device, t.log, t.trackers)
    for result in train_one_epoch(state, t.update_step, loader, accum):
        train_log.record(*result)
        stop_if_nonfinite(config, train_log)
        if state.update == state.updates_per_epoch:
            break  # the epoch's end: validation, checkpoint and the stop check follow
        save_or_stop_mid_epoch(t, preemption)
    stats: Dict[str, Any] = dict(train_log.summary())
    stats['broken'] = data.pop_broken_count(loader_train) if hasattr(loader_train.dataset, 'broken_images') else 0
    if stats['broken']:
        t.log.warning(f"epoch {epoch}: {stats['broken']} unreadable training images were skipped")
    return stats


def save_or_stop_mid_epoch(t: Training, preemption: PreemptionGuard) -> None:
    """Between two updates: the ``TRAIN.SAVE_EVERY_STEPS`` checkpoint, then the stop check. When any rank got a
    stop signal, every rank saves ``ckpt_last`` (unless it was just saved) and raises ``Preempted``.

    The check is a collective with several processes, so there it runs every ``PRINT_FREQ`` updates (the same
    updates on every rank); in one process it is free and runs after every update.
    """
    config, state = t.config, t.state
    save_every = config.TRAIN.SAVE_EVERY_STEPS
    saved = bool(save_every) and state.update % save_every == 0
    if saved:
        t.checkpointer.save(state, 'last')
    check_every = config.PRINT_FREQ if t.dist_info.distributed else 1
    if state.update % check_every == 0 and preemption.agreed_stop():
        position = f"{state.update}/{state.updates_per_epoch}"
        t.log.warning(f"{preemption.received}: stopping after update {position} of epoch {state.epoch}; saving a "
                      f"checkpoint")
        if not saved:
            t.checkpointer.save(state, 'last')
        raise Preempted(f"preempted ({preemption.received}) in epoch {state.epoch} after update {position}",
                        preemption.exit_code)


def end_of_epoch(t: Training, epoch: int, train_stats: Dict[str, Any],
                 preemption: PreemptionGuard) -> Optional[ValMetrics]:
    """After the last update of epoch ``epoch``: validation (also of the EMA), the best accuracy (multi-label:
    the best mAP, kept in ``state.max_accuracy``), the metrics line, the checkpoint (on the ``SAVE_FREQ``
    schedule, else the best only), the trackers, then, before another epoch, the stop check (a collective).
    Returns the validation's ``Accuracy`` (top-1, top-5, loss) or ``MultiLabelScores``, None without one."""
    config, state, log = t.config, t.state, t.log
    val = ema_val = is_best = None
    if t.loaders.val is not None:
        name = metric_name(config)
        val = validate(config, t.loaders.val, t.eval_model, t.precision, log)
        log.info(f"{name[0].upper() + name[1:]} of the network on the {len(t.loaders.dataset_val)} test images: "
                 f"{val[0]:.1f}%")
        if state.ema is not None:
            ema_val = validate(config, t.loaders.val, unwrap_model(state.ema), t.precision, log, prefix='EMA')
        is_best = val[0] > state.max_accuracy
        state.max_accuracy = max(state.max_accuracy, val[0])
        log.info(f"Max {name}: {state.max_accuracy:.2f}%")
    state.epoch, state.update = epoch + 1, 0
    # Metrics first: a kill between the two then re-runs the epoch (whose line is dropped on resume) instead of
    # resuming after an epoch whose line was never written.
    if t.metrics is not None:
        t.metrics.append(_metrics_record(epoch, train_stats, val, ema_val))
    is_last = epoch == config.TRAIN.EPOCHS - 1
    on_schedule = (epoch + 1) % config.SAVE_FREQ == 0 or is_last
    if on_schedule:
        t.checkpointer.save(state, 'epoch', bool(is_best))
    elif is_best:
        t.checkpointer.save(state, 'best')
    if t.trackers and val is not None:
        # val/acc1, val/acc5, val/loss; val/mAP, val/f1_micro, ...; the EMA's first metric as val/ema_<name>
        scalars = {f'val/{name}': value for name, value in val._asdict().items()}
        if ema_val is not None:
            scalars[f'val/ema_{ema_val._fields[0]}'] = ema_val[0]
        t.trackers.log(scalars, epoch, EPOCH_AXIS)
        t.trackers.flush()
    if not is_last and preemption.agreed_stop():  # collective: every rank reaches it
        log.warning(f"{preemption.received}: stopping after epoch {epoch}; saving a checkpoint")
        if not on_schedule:
            t.checkpointer.save(state, 'last')
        raise Preempted(f"preempted ({preemption.received}) after epoch {epoch}", preemption.exit_code)
    return val


def _metrics_record(epoch: int, train: Dict[str, Any], val: Optional[ValMetrics],
                    ema: Optional[ValMetrics]) -> Dict[str, Any]:
    """One metrics.jsonl line: val_acc1, val_acc5, val_loss (multi-label: val_mAP, val_f1_micro, val_f1_macro,
    val_loss), the EMA's as ema_*."""
    record = {'epoch': epoch, 'train_loss': train['loss'], 'lr': train['lr'], 'time': train['time'],
              'skipped_updates': train['skipped'], 'broken_images': train['broken']}
    if val is not None:
        record.update({f'val_{name}': value for name, value in val._asdict().items()})
    if ema is not None:
        record.update({f'ema_{name}': value for name, value in ema._asdict().items()})
    return record


def _evaluate_only(config: Any, model: nn.Module, loaders: Loaders, dist_info: DistInfo,
                   log: logging.Logger) -> Dict[str, Any]:
    """``--eval`` / ``--throughput``: load the weights, then validate or time."""
    precision = resolve_precision(config, dist_info.device)
    trust = bool(config.TRUST_CHECKPOINTS)
    if config.MODEL.RESUME:  # Swin-MoE: <name>.pth -> this rank's <name>.pth.rank<r>, as a training resume
        path = rank_checkpoint_file(config, config.MODEL.RESUME, dist_info.rank, dist_info.world_size)
        load_weights(model, path, trust=trust)
        log.info(f"loaded weights from {path}")
    elif config.MODEL.PRETRAINED:
        _load_pretrained(model, config, dist_info.rank, log)
    elif config.EVAL_MODE:
        log.warning("--eval without --resume or --pretrained: evaluating randomly initialised weights")
    select_fast_paths(config, model, precision, log, modes=('eval',))
    eval_model = torch.compile(model) if config.COMPILE else model
    if config.THROUGHPUT_MODE:
        return {'throughput': throughput(loaders.val, eval_model, precision, log)}
    val = validate(config, loaders.val, eval_model, precision, log)
    name = metric_name(config)
    log.info(f"{name[0].upper() + name[1:]} of the network on the {len(loaders.dataset_val)} test images: "
             f"{val[0]:.1f}%")
    return val._asdict()


# ----------------------------------------------------------------------------- the run

def run(config: Any, dist_info: DistInfo, logger: Optional[logging.Logger] = None,
        pretrain: bool = False) -> Dict[str, Any]:
    """Build model, data, train state and checkpoints from ``config``, then evaluate (``EVAL_MODE``), measure
    throughput (``THROUGHPUT_MODE``) or train. ``pretrain``: SimMIM pre-training (the model returns its loss;
    no validation). Returns a small summary dict. ``config`` must already have the linear LR scaling applied.
    """
    log = logger or _LOG
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    validate_config(config, pretrain, device=dist_info.device.type)
    set_matmul_precision(config, dist_info.device)
    loaders = build_loaders(config, pretrain)
    model = create_model(config, dist_info.device, pretrain, training and bool(config.TRAIN.FSDP.ENABLE), log)
    if not training:
        return _evaluate_only(config, model, loaders, dist_info, log)
    t = build_training(config, dist_info, model, loaders, pretrain, log)
    if t.state.epoch >= config.TRAIN.EPOCHS:  # a finished run started again: say so rather than train 0 epochs
        log.info(f"training is already finished: {t.checkpointer.find()} holds epoch {t.state.epoch - 1}, the last "
                 f"of TRAIN.EPOCHS {config.TRAIN.EPOCHS} (max {metric_name(config)} {t.state.max_accuracy:.2f}%); "
                 f"nothing to do. Raise TRAIN.EPOCHS to train on, or use another --tag or --output for a new run")
        return {'max_accuracy': t.state.max_accuracy, **dict.fromkeys(_val_fields(config)), 'finished': True}
    t.checkpointer.restore_rng(t.state)  # last: whatever is set up after it may draw random numbers
    log.info("start training")
    run_start, val = time.time(), None
    status = 'FAILED'  # what the tracker runs end as: FINISHED, KILLED (preempted; resumes) or FAILED
    try:
        with PreemptionGuard(dist_info.device) as preemption:
            for epoch in range(t.state.epoch, config.TRAIN.EPOCHS):
                train_stats = train_epoch(t, epoch, preemption)
                val = end_of_epoch(t, epoch, train_stats, preemption)
        status = 'FINISHED'
    except Preempted:
        status = 'KILLED'
        raise
    finally:
        t.trackers.close(status)
    log.info(f"Training time {format_seconds(time.time() - run_start)}")
    result = val._asdict() if val is not None else dict.fromkeys(_val_fields(config))
    return {'max_accuracy': t.state.max_accuracy, **result}


def _val_fields(config: Any) -> Tuple[str, ...]:
    return MultiLabelScores._fields if is_multi_label(config) else Accuracy._fields
