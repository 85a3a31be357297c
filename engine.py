"""The training engine: ``UpdateStep``, ``train_one_epoch``, ``validate``, ``throughput`` and ``run`` (wires it all).

No argument parsing here: ``main.py`` builds the config and the process group and calls ``run``.

The shape follows nanoGPT's update and big_vision's ``update_fn(train_state, batch)``: a ``TrainState``
(``utils.checkpoint``) holds everything a checkpoint restores; ``UpdateStep`` turns the micro-batches of one
optimizer update into that update (precision, accumulation, clipping, non-finite guard); ``train_one_epoch`` is
a short loop that yields after every update, and ``run`` decides logging, saving and preemption between updates.

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
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from config import ConfigError, config_to_dict
from data.fast import batch_to_device
from utils.checkpoint import (CheckpointError, CheckpointManager, CheckpointSaveError, TrainState, auto_resume,
                              build_checkpoint, gather_rng_states, load_checkpoint_file, load_model_state,
                              remove_stale_temp_files, restore_rank_rng, restore_training_state, unwrap_model)
from utils.distributed import DistInfo, all_reduce_sum, get_world_size, is_distributed
from utils.fsdp import find_fsdp, shard_model
from utils.logger import MetricsFile, create_tb_writer
from utils.misc import format_seconds, memory_label
from utils.preemption import Preempted, PreemptionGuard

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
    """Soft-target CE with Mixup/CutMix, label-smoothing CE when MODEL.LABEL_SMOOTHING > 0, else plain CE."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # label smoothing is folded into Mixup's soft targets
    if config.MODEL.LABEL_SMOOTHING > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def classification_loss(criterion: nn.Module, mixup_fn: Optional[Callable], device: torch.device) -> LossFn:
    """``loss_fn(model, (images, targets))``: to the device (``batch_to_device``), Mixup/CutMix there, then the
    criterion."""
    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        images, targets = batch_to_device(batch, device)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        return criterion(model(images).float(), targets)
    return loss_fn


def masked_image_loss(device: torch.device) -> LossFn:
    """``loss_fn(model, (images, mask, ...))`` for models that return their own loss (SimMIM)."""
    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True))
    return loss_fn


# ----------------------------------------------------------------------------- the update

def find_ddp(model: nn.Module) -> Optional[DistributedDataParallel]:
    """The DDP module under any ``torch.compile`` wrapper (``no_sync`` lives there), or None."""
    while not isinstance(model, DistributedDataParallel):
        if not hasattr(model, '_orig_mod'):
            return None
        model = model._orig_mod
    return model


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
        self.ddp, self.fsdp = find_ddp(train_model), find_fsdp(train_model)
        self.max_norm = float(clip_grad) if clip_grad else math.inf
        self.params = [p for p in state.model.parameters() if p.requires_grad]

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


class _SkipSampler(Sampler):
    """The first epoch after a mid-epoch resume: the epoch's order with the already-trained part removed."""

    def __init__(self, indices: list):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loader_from(loader: DataLoader, skip_batches: int, seed: int = 0) -> DataLoader:
    """``loader`` itself, or one like it that starts ``skip_batches`` batches into the current epoch's order.

    The new loader gets its own generator (seeded with ``seed``): starting an iterator draws a worker base seed
    from the loader's generator, and drawing it from the global RNG would shift the restored RNG stream by one
    draw compared with the uninterrupted run, which drew it at the start of the epoch, before the checkpoint.
    """
    if not skip_batches:
        return loader
    indices = list(loader.sampler)[skip_batches * loader.batch_size:]
    kwargs = dict(batch_size=loader.batch_size, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                  pin_memory=loader.pin_memory, drop_last=loader.drop_last, worker_init_fn=loader.worker_init_fn,
                  generator=torch.Generator().manual_seed(seed))
    if loader.num_workers > 0:
        kwargs['prefetch_factor'] = loader.prefetch_factor
    return DataLoader(loader.dataset, sampler=_SkipSampler(indices), **kwargs)


class TrainLog:
    """An epoch's running loss sums, kept on the device and logged every ``PRINT_FREQ`` batches (the only host
    syncs of training), and the count of consecutive skipped (non-finite) updates, which stops the run at
    ``TRAIN.MAX_NONFINITE_STEPS`` when it is read."""

    def __init__(self, config: Any, state: TrainState, device: torch.device, log: logging.Logger, tb_writer: Any):
        self.config, self.state, self.device, self.log, self.tb_writer = config, state, device, log, tb_writer
        self.accum = config.TRAIN.ACCUMULATION_STEPS
        self.every = max(1, config.PRINT_FREQ // self.accum)
        self.images_per_update = config.DATA.BATCH_SIZE * self.accum * get_world_size()
        self.first_update = state.update
        zero = torch.zeros((), device=device)
        self.epoch_loss, self.window_loss, self.skipped, self.grad_norm = zero, zero, zero, zero
        self.bad_run = self.longest_bad_run = zero
        self.epoch_start = self.window_start = time.time()
        self.window_updates = 0

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
        if longest >= config.TRAIN.MAX_NONFINITE_STEPS:
            scale_text = f"{scale:.1f}" if scale is not None else 'none (no loss scaler)'
            raise NonFiniteLossError(
                f"stopping: {config.TRAIN.MAX_NONFINITE_STEPS} consecutive non-finite losses/gradients "
                f"(TRAIN.MAX_NONFINITE_STEPS) by epoch {state.epoch} step {batch}/{num_batches}: lr {lr:.3e}, "
                f"loss {window_loss}, loss scale {scale_text}. Lower TRAIN.BASE_LR, enable TRAIN.CLIP_GRAD, or "
                f"train in bf16/fp32 (AMP_DTYPE bfloat16 or --disable_amp)")
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
        if self.tb_writer is not None:
            values = {'loss': window_loss, 'lr': lr, 'grad_norm': norm, 'throughput': images_per_s}
            if scale is not None:
                values['loss_scale'] = scale
            for name, value in values.items():
                self.tb_writer.add_scalar(f'train/{name}', value, state.global_update)
        self.window_loss = torch.zeros((), device=self.device)
        self.window_updates = 0
        self.window_start = time.time()

    def summary(self) -> Dict[str, float]:
        """The epoch's mean loss, last LR, updates, skipped updates and time (logged)."""
        epoch_loss, skipped = torch.stack([self.epoch_loss, self.skipped.float()]).tolist()
        updates = self.state.update - self.first_update
        epoch_time = time.time() - self.epoch_start
        self.log.info(f"EPOCH {self.state.epoch} training takes {format_seconds(epoch_time)}"
                      + (f"; {int(skipped)} updates skipped for non-finite loss/gradients" if skipped else ''))
        return {'loss': epoch_loss / max(updates, 1), 'lr': float(self.state.optimizer.param_groups[0]['lr']),
                'updates': updates, 'skipped': int(skipped), 'time': epoch_time}


@torch.no_grad()
def validate(config: Any, data_loader: DataLoader, model: nn.Module, precision: Optional[Precision] = None,
             logger: Optional[logging.Logger] = None, prefix: str = '') -> Tuple[float, float, float]:
    """Top-1, top-5 accuracy (%) and mean CE loss over the whole validation set, exact across ranks.

    Each rank evaluates its own images (no padding); correct counts, loss sums and image counts are summed over
    ranks before dividing. Every ``PRINT_FREQ`` batches a ``Test: [i/n]`` line shows this rank's running figures
    and the time left (the only host syncs before the end). Prints `` * Acc@1 .. Acc@5 ..`` as the official
    code, then the loss (``prefix`` for EMA lines).
    """
    log = logger or _LOG
    device = precision.device if precision is not None else next(model.parameters()).device
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits
    count = 0  # images, counted on the host: no host-to-device copy per batch
    criterion = nn.CrossEntropyLoss(reduction='sum')
    start, num_batches = time.time(), len(data_loader)
    # FSDP: every forward gathers weights from all ranks, so every rank must run as many as the others; ranks
    # with fewer (or empty) batches run spare forwards on an image they already saw, and count nothing.
    lockstep = find_fsdp(model) is not None and is_distributed()
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
        outputs = outputs.float()
        hits = outputs.topk(min(5, outputs.shape[1]), dim=1).indices.eq(targets[:, None])
        totals += torch.stack([criterion(outputs, targets), hits[:, :1].sum(), hits.sum()]).double()
        count += images.shape[0]
        if (idx + 1) % config.PRINT_FREQ == 0 and idx + 1 < num_batches:
            loss_sum, top1, top5 = totals.tolist()
            eta = (time.time() - start) / (idx + 1) * (num_batches - idx - 1)
            log.info(f"{prefix + ' ' if prefix else ''}Test: [{idx + 1}/{num_batches}]\teta {format_seconds(eta)}\t"
                     f"loss {loss_sum / count:.4f}\tAcc@1 {100 * top1 / count:.3f}\tAcc@5 {100 * top5 / count:.3f}"
                     f"\t{memory_label(device)}")
        forwards += 1
    if lockstep:
        most = torch.tensor([forwards], device=device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        spare = spare if spare is not None else torch.zeros((1, *_input_shape(model)), device=device)
        with autocast:
            for _ in range(int(most.item()) - forwards):
                model(spare)
    totals = all_reduce_sum(torch.cat([totals, torch.tensor([float(count)], dtype=torch.float64).to(device)]))
    loss_sum, correct1, correct5, count = totals.tolist()
    if count == 0:
        raise RuntimeError("the validation set has no readable images")
    acc1, acc5, loss = 100.0 * correct1 / count, 100.0 * correct5 / count, loss_sum / count
    if prefix:
        log.info(f"{prefix} Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.4f}")
    else:
        log.info(f' * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.4f}')  # the official line, then the loss
    return acc1, acc5, loss


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
    if dist_info.distributed and find_fsdp(model) is None:
        device = dist_info.device
        # torch >= 2.12 names the per-forward broadcast `forward_sync_buffers` and deprecates the old keyword.
        no_broadcast = {'forward_sync_buffers' if 'forward_sync_buffers' in _DDP_PARAMETERS else
                        'broadcast_buffers': False}
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
    """``utils.fsdp.shard_model`` with the config's precision, offload and resharding."""
    return shard_model(model, param_dtype=precision.dtype, cpu_offload=config.TRAIN.FSDP.CPU_OFFLOAD,
                       reshard_after_forward=config.TRAIN.FSDP.RESHARD_AFTER_FORWARD, device=precision.device)


def _metrics_record(epoch: int, train: Dict[str, float], broken: int,
                    val: Optional[Tuple[float, float, float]], ema: Optional[Tuple[float, float, float]]
                    ) -> Dict[str, Any]:
    record = {'epoch': epoch, 'train_loss': train['loss'], 'lr': train['lr'], 'time': train['time'],
              'skipped_updates': train['skipped'], 'broken_images': broken}
    if val is not None:
        record.update(val_acc1=val[0], val_acc5=val[1], val_loss=val[2])
    if ema is not None:
        record.update(ema_acc1=ema[0], ema_acc5=ema[1], ema_loss=ema[2])
    return record


def _load_pretrained(models: Any, model: nn.Module, path: str, log: logging.Logger, trust: bool) -> None:
    try:
        models.load_pretrained(model, path, logger=log, trust=trust)
    except ValueError as e:
        raise CheckpointError(f"--pretrained {path}: {e}") from None
    log.info(f"loaded pretrained weights from {path}")


def _evaluate_only(config: Any, model: nn.Module, loader_val: DataLoader, dataset_val: Any, device: torch.device,
                   log: logging.Logger) -> Dict[str, Any]:
    """``--eval`` / ``--throughput``: load the weights, then validate or time."""
    import models
    precision = resolve_precision(config, device)
    trust = bool(config.TRUST_CHECKPOINTS)
    if config.MODEL.RESUME:
        load_model_state(model, load_checkpoint_file(config.MODEL.RESUME, trust=trust), config.MODEL.RESUME)
        log.info(f"loaded weights from {config.MODEL.RESUME}")
    elif config.MODEL.PRETRAINED:
        _load_pretrained(models, model, config.MODEL.PRETRAINED, log, trust)
    elif config.EVAL_MODE:
        log.warning("--eval without --resume or --pretrained: evaluating randomly initialised weights")
    eval_model = torch.compile(model) if config.COMPILE else model
    if config.THROUGHPUT_MODE:
        return {'throughput': throughput(loader_val, eval_model, precision, log)}
    acc1, acc5, loss = validate(config, loader_val, eval_model, precision, log)
    log.info(f"Accuracy of the network on the {len(dataset_val)} test images: {acc1:.1f}%")
    return {'acc1': acc1, 'acc5': acc5, 'loss': loss}


def _find_resume(config: Any, log: logging.Logger) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The checkpoint of ``--resume`` or auto-resume (path, contents), or (None, None)."""
    trust = bool(config.TRUST_CHECKPOINTS)
    if config.MODEL.RESUME:
        return config.MODEL.RESUME, load_checkpoint_file(config.MODEL.RESUME, trust=trust)
    if config.TRAIN.AUTO_RESUME:
        return auto_resume(config.OUTPUT, trust=trust, logger=log)
    return None, None


def _resume(config: Any, state: TrainState, dist_info: DistInfo, log: logging.Logger, path: Optional[str],
            checkpoint: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Restore ``state`` from ``checkpoint`` (``_find_resume``); returns its saved RNG states (None when not
    resuming), to be restored right before training starts."""
    if checkpoint is None:
        return None
    restore_training_state(checkpoint, state, path, log)
    saved_world = (checkpoint.get('rng') or {}).get('world_size')
    if state.update and saved_world not in (None, dist_info.world_size):
        log.info(f"resume: {path} was saved mid-epoch with {saved_world} processes, now {dist_info.world_size}: "
                 f"epoch {state.epoch} restarts from its beginning")
        state.update = 0
    order = checkpoint.get('data_order') or {}
    if state.update and order and (order.get('seed'), order.get('batch_size')) != \
            (config.SEED, config.DATA.BATCH_SIZE):
        log.warning(f"resume: {path} was saved mid-epoch with SEED {order.get('seed')} and batch size "
                    f"{order.get('batch_size')}, now {config.SEED} and {config.DATA.BATCH_SIZE}: the rest of epoch "
                    f"{state.epoch} follows another sample order")
    log.info(f"resumed from {path}: starting at epoch {state.epoch}"
             + (f", update {state.update}" if state.update else '') + f", max accuracy {state.max_accuracy:.2f}%")
    return checkpoint.get('rng') or {}


def run(config: Any, dist_info: DistInfo, logger: Optional[logging.Logger] = None,
        pretrain: bool = False) -> Dict[str, Any]:
    """Build model, data, train state and checkpoints from ``config``, then evaluate (``EVAL_MODE``), measure
    throughput (``THROUGHPUT_MODE``) or train. ``pretrain``: SimMIM pre-training (the model returns its loss;
    no validation). Returns a small summary dict. ``config`` must already have the linear LR scaling applied.
    """
    import data
    import models
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer

    log = logger or _LOG
    device = dist_info.device
    set_matmul_precision(config, device)

    # ---------------------------------------------------------------- data and model
    if config.TRAIN.FSDP.ENABLE and config.TRAIN.FSDP.CPU_OFFLOAD and device.type != 'cuda':
        raise ConfigError("TRAIN.FSDP.CPU_OFFLOAD moves the shards from GPU to host memory; this run is on the CPU "
                          "already (DEVICE / --device), so set TRAIN.FSDP.CPU_OFFLOAD False")
    if pretrain:
        loader_train, dataset_val, loader_val, mixup_fn = data.build_loader(config, simmim=True, is_pretrain=True), \
            None, None, None
    else:
        _, dataset_val, loader_train, loader_val, mixup_fn = data.build_loader(config)
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    if mixup_fn is not None and training and config.DATA.BATCH_SIZE % 2:
        raise ConfigError(f"DATA.BATCH_SIZE = {config.DATA.BATCH_SIZE} must be even when Mixup/CutMix is on "
                          f"(AUG.MIXUP = {config.AUG.MIXUP}, AUG.CUTMIX = {config.AUG.CUTMIX}); use an even batch "
                          f"size or set AUG.MIXUP 0 AUG.CUTMIX 0")
    fsdp = bool(config.TRAIN.FSDP.ENABLE) and training
    if fsdp:
        model = build_fsdp_model(config, lambda: models.build_model(config, is_pretrain=pretrain))
    else:
        model = models.build_model(config, is_pretrain=pretrain).to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"model {config.MODEL.TYPE}/{config.MODEL.NAME}: {n_parameters} trainable parameters")
    if not training:
        return _evaluate_only(config, model, loader_val, dataset_val, device, log)

    # ---------------------------------------------------------------- train state
    accum = config.TRAIN.ACCUMULATION_STEPS
    updates_per_epoch = len(loader_train) // accum
    if updates_per_epoch < 1:
        raise ConfigError(f"TRAIN.ACCUMULATION_STEPS = {accum} exceeds the {len(loader_train)} training batches "
                          f"per epoch; lower it or DATA.BATCH_SIZE")
    resume_path, checkpoint = _find_resume(config, log)
    if checkpoint is None and config.MODEL.PRETRAINED:  # into the plain model: before the EMA copies it, and
        _load_pretrained(models, model, config.MODEL.PRETRAINED, log, bool(config.TRUST_CHECKPOINTS))  # sharding
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
    saved_rng = _resume(config, state, dist_info, log, resume_path, checkpoint)
    train_model = wrap_for_training(model, config, dist_info)
    eval_model = torch.compile(model) if config.COMPILE else model
    loss_fn = masked_image_loss(device) if pretrain else \
        classification_loss(build_criterion(config, mixup_fn), mixup_fn, device)
    update_step = UpdateStep(train_model, state, precision, loss_fn, config.TRAIN.CLIP_GRAD)

    # ---------------------------------------------------------------- outputs
    tb_writer = create_tb_writer(config.OUTPUT, config.TENSORBOARD, dist_info.is_main)
    metrics = MetricsFile(f"{config.OUTPUT}/metrics.jsonl", state.epoch) if dist_info.is_main else None
    manager = CheckpointManager(config.OUTPUT, config.TRAIN.KEEP_CHECKPOINTS, log)
    config_dict = config_to_dict(config)
    if dist_info.is_main:
        remove_stale_temp_files(config.OUTPUT, log)

    def save(kind: str, is_best: bool = False) -> None:
        rng = gather_rng_states()  # collective: every rank takes part
        if not (dist_info.is_main or fsdp):
            return
        checkpoint = build_checkpoint(state, config_dict, rng, weights=not fsdp)
        # The epoch's sample order is a pure function of (seed, epoch) (the samplers' set_epoch); recording
        # where in it the checkpoint stands lets a resume check that it replays the same order.
        checkpoint['data_order'] = {'sampler': type(loader_train.sampler).__name__, 'seed': int(config.SEED),
                                    'epoch': state.epoch, 'batches_done': state.update * accum,
                                    'batch_size': int(config.DATA.BATCH_SIZE), 'world_size': dist_info.world_size}
        try:
            if fsdp:  # a collective: every rank writes its shards
                manager.save_sharded(checkpoint, state, kind, is_best)
            elif kind == 'epoch':
                manager.save_epoch(checkpoint, state.epoch - 1, is_best)
            elif kind == 'best':
                manager.save_best(checkpoint)
            else:
                manager.save_last(checkpoint)
        except CheckpointSaveError as e:
            # Training goes on: the previous checkpoint is intact and the next save may succeed.
            log.error(f"checkpoint not saved: {e}")

    # ---------------------------------------------------------------- train
    if saved_rng is not None:  # last: anything set up after it (a TensorBoard writer...) may draw random numbers
        restore_rank_rng(saved_rng, config.SEED + dist_info.rank + 1000 * state.epoch, log)
    log.info("start training")
    run_start = time.time()
    val = None
    # Stop-signal checks are collectives with several processes: every PRINT_FREQ updates (same indices on
    # every rank); in one process they are free, so after every update.
    preempt_every = config.PRINT_FREQ if dist_info.distributed else 1
    save_every = config.TRAIN.SAVE_EVERY_STEPS
    try:
        with PreemptionGuard(device) as preemption:
            for epoch in range(state.epoch, config.TRAIN.EPOCHS):
                state.epoch = epoch
                if hasattr(loader_train.sampler, 'set_epoch'):
                    loader_train.sampler.set_epoch(epoch)
                loader = loader_from(loader_train, state.update * accum,
                                     seed=(epoch * 100003 + state.update) * 1009 + dist_info.rank)
                train_log = TrainLog(config, state, device, log, tb_writer)
                for result in train_one_epoch(state, update_step, loader, accum):
                    train_log.record(*result)
                    if state.update == updates_per_epoch:
                        break  # the epoch's end: validation, checkpoint and the stop check follow
                    saved = bool(save_every) and state.update % save_every == 0
                    if saved:
                        save('last')
                    if state.update % preempt_every == 0 and preemption.agreed_stop():
                        log.warning(f"{preemption.received}: stopping after update {state.update}/"
                                    f"{updates_per_epoch} of epoch {epoch}; saving a checkpoint")
                        if not saved:
                            save('last')
                        raise Preempted(f"preempted ({preemption.received}) in epoch {epoch} after update "
                                        f"{state.update}/{updates_per_epoch}", preemption.exit_code)
                train_stats = train_log.summary()
                broken = data.pop_broken_count(loader_train) if hasattr(loader_train.dataset, 'broken_images') \
                    else 0
                if broken:
                    log.warning(f"epoch {epoch}: {broken} unreadable training images were skipped")

                ema_val = is_best = None
                if loader_val is not None:
                    val = validate(config, loader_val, eval_model, precision, log)
                    log.info(f"Accuracy of the network on the {len(dataset_val)} test images: {val[0]:.1f}%")
                    if state.ema is not None:
                        ema_val = validate(config, loader_val, unwrap_model(state.ema), precision, log,
                                           prefix='EMA')
                    is_best = val[0] > state.max_accuracy
                    state.max_accuracy = max(state.max_accuracy, val[0])
                    log.info(f"Max accuracy: {state.max_accuracy:.2f}%")
                state.epoch, state.update = epoch + 1, 0

                # Metrics first: a kill between the two then re-runs the epoch (whose line is dropped on resume)
                # instead of resuming after an epoch whose line was never written.
                if metrics is not None:
                    metrics.append(_metrics_record(epoch, train_stats, broken, val, ema_val))
                is_last = epoch == config.TRAIN.EPOCHS - 1
                on_schedule = (epoch + 1) % config.SAVE_FREQ == 0 or is_last
                if on_schedule:
                    save('epoch', bool(is_best))
                elif is_best:
                    save('best')
                if tb_writer is not None and val is not None:
                    for name, value in zip(('acc1', 'acc5', 'loss'), val):
                        tb_writer.add_scalar(f'val/{name}', value, epoch)
                    if ema_val is not None:
                        tb_writer.add_scalar('val/ema_acc1', ema_val[0], epoch)
                    tb_writer.flush()
                if not is_last and preemption.agreed_stop():  # collective: every rank reaches it
                    log.warning(f"{preemption.received}: stopping after epoch {epoch}; saving a checkpoint")
                    if not on_schedule:
                        save('last')
                    raise Preempted(f"preempted ({preemption.received}) after epoch {epoch}", preemption.exit_code)
    finally:
        if tb_writer is not None:
            tb_writer.close()
    log.info(f"Training time {format_seconds(time.time() - run_start)}")
    acc1, acc5, loss = val if val is not None else (None, None, None)
    return {'max_accuracy': state.max_accuracy, 'acc1': acc1, 'acc5': acc5, 'loss': loss}
