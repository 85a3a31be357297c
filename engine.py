"""The training engine: ``train_one_epoch``, ``validate``, ``throughput`` and ``run`` (wires everything).

No argument parsing here: ``main.py`` builds the config and the process group and calls ``run``.

Failure behaviour (see README "Failure behaviour"): SIGTERM/SIGUSR1 make every rank finish the current update,
write ``ckpt_last.pth`` and raise ``Preempted`` (``main.py`` exits with ``PREEMPTED_EXIT_CODE`` = 143, see
``utils.preemption``); a kill at any point loses at most the work since the last checkpoint, and with
``DETERMINISTIC`` on CPU the resumed run ends with the same weights as an uninterrupted one (checkpoints hold
every rank's RNG state and the position in the epoch's fixed, ``(SEED, epoch)``-seeded sample order).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from config import ConfigError, config_to_dict
from utils.checkpoint import (CheckpointError, CheckpointManager, CheckpointSaveError, auto_resume,
                              build_checkpoint, gather_rng_states, load_checkpoint_file, load_model_state,
                              remove_stale_temp_files, restore_rank_rng, restore_training_state, unwrap_model)
from utils.distributed import DistInfo, all_reduce_sum
from utils.logger import MetricsFile, create_tb_writer
from utils.misc import format_seconds, memory_mb
from utils.preemption import Preempted, PreemptionGuard

_LOG = logging.getLogger('swin')


class NonFiniteLossError(RuntimeError):
    """Training stopped after TRAIN.MAX_NONFINITE_STEPS non-finite losses in a row."""


# ----------------------------------------------------------------------------- precision

@dataclass
class Precision:
    """How forward passes run: autocast dtype (None = fp32), and the fp16 loss scaler or apex amp."""
    device: torch.device
    dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    apex_amp: Any = None  # the apex.amp module when AMP_OPT_LEVEL O1/O2 and apex is installed

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        if self.apex_amp is not None:
            return 'apex amp'
        if self.dtype is None:
            return 'fp32'
        return f"{str(self.dtype).replace('torch.', '')} autocast" + (' + GradScaler' if self.scaler else '')


def resolve_precision(config: Any, device: torch.device, apex_amp: Any = None) -> Precision:
    """AMP_ENABLE / AMP_DTYPE -> autocast dtype and scaler. ``auto``: fp16 + scaler on CUDA, bf16 on CPU."""
    if apex_amp is not None:
        return Precision(device, apex_amp=apex_amp)
    if not config.AMP_ENABLE:
        return Precision(device)
    name = config.AMP_DTYPE
    if name == 'auto':
        name = 'float16' if device.type == 'cuda' else 'bfloat16'
    dtype = torch.float16 if name == 'float16' else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return Precision(device, dtype, scaler)


# ----------------------------------------------------------------------------- losses and helpers

def build_criterion(config: Any, mixup_fn: Any) -> nn.Module:
    """Soft-target CE with Mixup/CutMix, label-smoothing CE when MODEL.LABEL_SMOOTHING > 0, else plain CE."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # label smoothing is folded into Mixup's soft targets
    if config.MODEL.LABEL_SMOOTHING > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


class _SkipSampler(Sampler):
    """The first epoch after a mid-epoch resume: the epoch's order with the already-trained part removed."""

    def __init__(self, indices: list):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _loader_skipping(loader: DataLoader, skip_batches: int, seed: int = 0) -> DataLoader:
    """A loader like ``loader`` that starts ``skip_batches`` batches into the current epoch's order.

    It gets its own generator (seeded with ``seed``): starting an iterator draws a worker base seed from the
    loader's generator, and drawing it from the global RNG would shift the restored RNG stream by one draw
    compared with the uninterrupted run, which drew it at the start of the epoch, before the checkpoint.
    """
    indices = list(loader.sampler)[skip_batches * loader.batch_size:]
    kwargs = dict(batch_size=loader.batch_size, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                  pin_memory=loader.pin_memory, drop_last=loader.drop_last, worker_init_fn=loader.worker_init_fn,
                  generator=torch.Generator().manual_seed(seed))
    if loader.num_workers > 0:
        kwargs['prefetch_factor'] = loader.prefetch_factor
    return DataLoader(loader.dataset, sampler=_SkipSampler(indices), **kwargs)


class _NonFiniteGuard:
    """Counts consecutive non-finite updates on the device (no host sync) and stops the run at the limit."""

    def __init__(self, limit: int, device: torch.device):
        self.limit = limit
        self.run = torch.zeros((), dtype=torch.long, device=device)
        self.longest = torch.zeros((), dtype=torch.long, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)

    def record(self, bad: torch.Tensor) -> None:
        bad = bad.to(torch.long)
        self.run = (self.run + 1) * bad
        self.longest = torch.maximum(self.longest, self.run)
        self.skipped = self.skipped + bad

    def check(self, where: str, lr: float, loss: float, scale: Optional[float]) -> None:
        if int(self.longest.item()) >= self.limit:
            scale_text = f"{scale:.1f}" if scale is not None else 'none (no loss scaler)'
            raise NonFiniteLossError(
                f"stopping: {self.limit} consecutive non-finite losses/gradients (TRAIN.MAX_NONFINITE_STEPS) by "
                f"{where}: lr {lr:.3e}, loss {loss}, loss scale {scale_text}. Lower TRAIN.BASE_LR, enable "
                f"TRAIN.CLIP_GRAD, or train in bf16/fp32 (AMP_DTYPE bfloat16 or --disable_amp)")


# ----------------------------------------------------------------------------- train / validate / throughput

def train_one_epoch(config: Any, model: nn.Module, criterion: nn.Module, data_loader: DataLoader,
                    optimizer: torch.optim.Optimizer, epoch: int, mixup_fn: Optional[Callable],
                    lr_scheduler: Any, precision: Precision, *, model_ema: Optional[ModelEmaV3] = None,
                    start_step: int = 0, tb_writer: Any = None, save_fn: Optional[Callable[[int], None]] = None,
                    logger: Optional[logging.Logger] = None, run_started: Optional[float] = None,
                    start_epoch: int = 0, preemption: Optional[PreemptionGuard] = None) -> Dict[str, float]:
    """Train ``model`` for one epoch (or its rest, from update ``start_step``); returns loss/lr/update counts.

    One optimizer update per ``TRAIN.ACCUMULATION_STEPS`` batches (DDP gradient sync only on the last micro-batch,
    via ``no_sync``); the LR is set per update from the global update index. Batches past the last full update
    are not used. The host reads device values only every ``PRINT_FREQ`` batches (and once per update when
    there is no loss scaler, to skip non-finite updates).

    With ``preemption``, a stop signal agreed by all ranks (checked after every update in one process, every
    ``PRINT_FREQ`` updates with several) ends the epoch after the current update: ``save_fn`` writes the
    mid-epoch checkpoint and ``Preempted`` is raised. A signal during the epoch's last update lets the epoch
    finish (the caller checks again after validation and the epoch checkpoint).
    """
    log = logger or _LOG
    device = precision.device
    accum = config.TRAIN.ACCUMULATION_STEPS
    updates_per_epoch = len(data_loader) // accum
    if updates_per_epoch < 1:
        raise ConfigError(f"TRAIN.ACCUMULATION_STEPS = {accum} exceeds the {len(data_loader)} training batches "
                          f"per epoch; lower it or DATA.BATCH_SIZE")
    num_batches = updates_per_epoch * accum
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    loader = (_loader_skipping(data_loader, start_step * accum, seed=(epoch * 100003 + start_step) * 1009 + rank)
              if start_step else data_loader)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = config.TRAIN.CLIP_GRAD
    max_norm = float(clip) if clip else math.inf
    guard = _NonFiniteGuard(config.TRAIN.MAX_NONFINITE_STEPS, device)
    print_freq = config.PRINT_FREQ
    is_ddp = isinstance(model, DistributedDataParallel)
    world = torch.distributed.get_world_size() if is_ddp else 1
    preempt_every = print_freq if torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1 else 1

    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    window_loss = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    seen_batches = 0
    window_batches = 0
    window_start = epoch_start = time.time()
    lr = optimizer.param_groups[0]['lr']
    run_started = run_started or epoch_start

    for idx, (samples, targets) in enumerate(loader, start=start_step * accum):
        if idx >= num_batches:
            break
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update_idx, micro = divmod(idx, accum)
        is_update = micro == accum - 1
        global_update = epoch * updates_per_epoch + update_idx
        if micro == 0:
            lr_scheduler.step_update(global_update)  # the LR of update k is the schedule's value at k

        sync = contextlib.nullcontext() if (is_update or not is_ddp) else model.no_sync()
        with sync:
            with precision.autocast():
                outputs = model(samples)
            loss = criterion(outputs.float(), targets)
            scaled = loss / accum
            if precision.apex_amp is not None:
                with precision.apex_amp.scale_loss(scaled, optimizer, delay_unscale=not is_update) as s:
                    s.backward()
            elif precision.scaler is not None:
                precision.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        loss_detached = loss.detach()
        loss_sum += loss_detached
        window_loss += loss_detached
        seen_batches += 1
        window_batches += 1

        if is_update:
            if precision.scaler is not None:
                precision.scaler.unscale_(optimizer)
            clip_params = list(precision.apex_amp.master_params(optimizer)) if precision.apex_amp else params
            grad_norm = torch.nn.utils.clip_grad_norm_(clip_params, max_norm)
            # grad_norm is the same on every rank (gradients are all-reduced), so all ranks skip together.
            bad = ~torch.isfinite(grad_norm)
            guard.record(bad)
            if precision.scaler is not None:
                precision.scaler.step(optimizer)  # skips the step itself on inf/nan
                precision.scaler.update()
                stepped = None
            elif precision.apex_amp is not None:
                optimizer.step()
                stepped = None
            else:
                stepped = not bool(bad.item())
                if stepped:
                    optimizer.step()
                else:
                    guard.check(f"epoch {epoch} step {idx}/{num_batches}", optimizer.param_groups[0]['lr'],
                                float(loss_detached.item()), None)
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None and stepped is not False:
                model_ema.update(unwrap_model(model), step=global_update + 1)
            saved_now = False
            if save_fn is not None and config.TRAIN.SAVE_EVERY_STEPS and \
                    (update_idx + 1) % config.TRAIN.SAVE_EVERY_STEPS == 0 and update_idx + 1 < updates_per_epoch:
                save_fn(update_idx + 1)
                saved_now = True
            # Same update indices on every rank, so the collective inside agreed_stop() always pairs up.
            if preemption is not None and update_idx + 1 < updates_per_epoch and \
                    (update_idx + 1) % preempt_every == 0 and preemption.agreed_stop():
                log.warning(f"{preemption.received}: stopping after update {update_idx + 1}/{updates_per_epoch} "
                            f"of epoch {epoch}; saving a checkpoint")
                if save_fn is not None and not saved_now:
                    save_fn(update_idx + 1)
                raise Preempted(f"preempted ({preemption.received}) in epoch {epoch} after update "
                                f"{update_idx + 1}/{updates_per_epoch}")

        if (idx + 1) % print_freq == 0 or idx + 1 == num_batches:
            lr = optimizer.param_groups[0]['lr']
            wd = max(g['weight_decay'] for g in optimizer.param_groups)
            avg_window = window_loss.item() / max(window_batches, 1)  # syncs the device once per window
            avg_epoch = loss_sum.item() / max(seen_batches, 1)
            norm = float(grad_norm.item())
            scale = precision.scaler.get_scale() if precision.scaler is not None else None
            guard.check(f"epoch {epoch} step {idx}/{num_batches}", lr, float(loss_detached.item()), scale)
            now = time.time()
            step_time = (now - window_start) / max(window_batches, 1)
            images_per_s = window_batches * samples.shape[0] * world / max(now - window_start, 1e-9)
            epoch_eta = step_time * (num_batches - idx - 1)
            run_eta = epoch_eta + step_time * num_batches * (config.TRAIN.EPOCHS - epoch - 1)
            scale_text = f"{scale:.1f}" if scale is not None else '-'
            log.info(f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_batches}]\t"
                     f"eta {format_seconds(epoch_eta)} (run {format_seconds(run_eta)})\tlr {lr:.6f}\twd {wd:.4f}\t"
                     f"loss {avg_window:.4f} ({avg_epoch:.4f})\tgrad_norm {norm:.4f}\tloss_scale {scale_text}\t"
                     f"mem {memory_mb(device):.0f}MB\t{images_per_s:.1f} img/s")
            if tb_writer is not None:
                tb_step = epoch * updates_per_epoch + idx // accum
                tb_writer.add_scalar('train/loss', avg_window, tb_step)
                tb_writer.add_scalar('train/lr', lr, tb_step)
                tb_writer.add_scalar('train/grad_norm', norm, tb_step)
                tb_writer.add_scalar('train/throughput', images_per_s, tb_step)
                if scale is not None:
                    tb_writer.add_scalar('train/loss_scale', scale, tb_step)
            window_loss.zero_()
            window_batches = 0
            window_start = time.time()

    epoch_time = time.time() - epoch_start
    skipped = int(guard.skipped.item())
    avg = loss_sum.item() / max(seen_batches, 1)
    log.info(f"EPOCH {epoch} training takes {format_seconds(epoch_time)}"
             + (f"; {skipped} updates skipped for non-finite loss/gradients" if skipped else ''))
    return {'loss': avg, 'lr': float(optimizer.param_groups[0]['lr']), 'updates': updates_per_epoch - start_step,
            'skipped': skipped, 'time': epoch_time}


@torch.no_grad()
def validate(config: Any, data_loader: DataLoader, model: nn.Module, precision: Optional[Precision] = None,
             logger: Optional[logging.Logger] = None, prefix: str = '') -> Tuple[float, float, float]:
    """Top-1, top-5 accuracy (%) and mean CE loss over the whole validation set, exact across ranks.

    Each rank evaluates its own images (no padding); correct counts, loss sums and image counts are summed over
    ranks before dividing. Prints `` * Acc@1 .. Acc@5 ..`` as the official code (``prefix`` for EMA lines).
    """
    log = logger or _LOG
    device = precision.device if precision is not None else next(model.parameters()).device
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, images
    criterion = nn.CrossEntropyLoss(reduction='sum')
    for images, targets in data_loader:
        if images.shape[0] == 0:
            continue  # every image of the batch was unreadable and dropped
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast:
            outputs = model(images)
        outputs = outputs.float()
        k = min(5, outputs.shape[1])
        top = outputs.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        totals += torch.stack([criterion(outputs, targets).double(), hits[:, :1].sum().double(),
                               hits.sum().double(), torch.tensor(float(images.shape[0]), device=device,
                                                                 dtype=torch.float64)])
    all_reduce_sum(totals)
    loss_sum, correct1, correct5, count = totals.tolist()
    if count == 0:
        raise RuntimeError("the validation set has no readable images")
    acc1, acc5, loss = 100.0 * correct1 / count, 100.0 * correct5 / count, loss_sum / count
    if prefix:
        log.info(f"{prefix} Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.4f}")
    else:
        log.info(f' * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}')
    return acc1, acc5, loss


@torch.no_grad()
def throughput(data_loader: DataLoader, model: nn.Module, precision: Optional[Precision] = None,
               logger: Optional[logging.Logger] = None, warmup_iters: int = 50, timed_iters: int = 30) -> float:
    """The official measurement: eval mode, one batch, ``warmup_iters`` warm-up passes then ``timed_iters``
    timed ones; logs ``batch_size {b} throughput {x}`` (images/s) and returns x."""
    log = logger or _LOG
    device = precision.device if precision is not None else next(model.parameters()).device
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    model.eval()
    images = next(img for img, _ in data_loader if img.shape[0] > 0).to(device, non_blocking=True)
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

def apex_amp_module(config: Any) -> Any:
    """apex.amp when AMP_OPT_LEVEL is O1/O2 (AMP on) and apex is installed; otherwise None (torch.amp is used)."""
    if config.AMP_OPT_LEVEL not in ('O1', 'O2') or not config.AMP_ENABLE:
        return None
    try:
        from apex import amp  # type: ignore[import-not-found]
        return amp
    except ImportError:
        return None


def _metrics_record(epoch: int, train: Dict[str, float], acc1: float, acc5: float, loss: float,
                    ema: Optional[Tuple[float, float, float]]) -> Dict[str, Any]:
    record = {'epoch': epoch, 'train_loss': train['loss'], 'val_acc1': acc1, 'val_acc5': acc5, 'val_loss': loss,
              'lr': train['lr'], 'time': train['time'], 'skipped_updates': train['skipped']}
    if ema is not None:
        record.update(ema_acc1=ema[0], ema_acc5=ema[1], ema_loss=ema[2])
    return record


def run(config: Any, dist_info: DistInfo, logger: Optional[logging.Logger] = None) -> Dict[str, Any]:
    """Build model, data, optimizer, scheduler, losses, EMA and checkpoints from ``config``, then evaluate
    (``EVAL_MODE``), measure throughput (``THROUGHPUT_MODE``) or train. Returns a small summary dict.

    ``config`` must already have the linear LR scaling applied.
    """
    import data
    import models
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer

    log = logger or _LOG
    device = dist_info.device
    _, dataset_val, loader_train, loader_val, mixup_fn = data.build_loader(config)
    if mixup_fn is not None and not config.EVAL_MODE and not config.THROUGHPUT_MODE and config.DATA.BATCH_SIZE % 2:
        raise ConfigError(f"DATA.BATCH_SIZE = {config.DATA.BATCH_SIZE} must be even when Mixup/CutMix is on "
                          f"(AUG.MIXUP = {config.AUG.MIXUP}, AUG.CUTMIX = {config.AUG.CUTMIX}); use an even batch "
                          f"size or set AUG.MIXUP 0 AUG.CUTMIX 0")

    model = models.build_model(config)
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"model {config.MODEL.TYPE}/{config.MODEL.NAME}: {n_parameters} trainable parameters")
    trust = bool(config.TRUST_CHECKPOINTS)

    if config.EVAL_MODE or config.THROUGHPUT_MODE:
        precision = resolve_precision(config, device)
        path = config.MODEL.RESUME
        if path:
            load_model_state(model, load_checkpoint_file(path, trust=trust), path)
            log.info(f"loaded weights from {path}")
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

    optimizer = build_optimizer(config, model)
    apex_amp = apex_amp_module(config)
    if apex_amp is not None:
        model, optimizer = apex_amp.initialize(model, optimizer, opt_level=config.AMP_OPT_LEVEL)
    precision = resolve_precision(config, device, apex_amp)
    log.info(f"precision: {precision.describe()} on {device}")
    updates_per_epoch = len(loader_train) // config.TRAIN.ACCUMULATION_STEPS
    if updates_per_epoch < 1:
        raise ConfigError(f"TRAIN.ACCUMULATION_STEPS = {config.TRAIN.ACCUMULATION_STEPS} exceeds the "
                          f"{len(loader_train)} training batches per epoch")
    lr_scheduler = build_scheduler(config, optimizer, updates_per_epoch)
    criterion = build_criterion(config, mixup_fn)
    model_ema = None
    if config.TRAIN.EMA.ENABLE:
        # ModelEmaV3 averages floating-point tensors and copies integer buffers (e.g. index tables).
        model_ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY, use_warmup=config.TRAIN.EMA.WARMUP)

    # Resume: an explicit --resume wins over auto-resume; --pretrained only when not resuming.
    start_epoch, start_step, max_accuracy = config.TRAIN.START_EPOCH, 0, 0.0
    resume_path, checkpoint = config.MODEL.RESUME or None, None
    if resume_path:
        checkpoint = load_checkpoint_file(resume_path, trust=trust)
    elif config.TRAIN.AUTO_RESUME:
        resume_path, checkpoint = auto_resume(config.OUTPUT, trust=trust, logger=log)
    if checkpoint is not None:
        start_epoch, start_step, max_accuracy = restore_training_state(
            checkpoint, model, optimizer, lr_scheduler, precision.scaler, model_ema, resume_path, log)
        saved_world = (checkpoint.get('rng') or {}).get('world_size')
        if start_step and saved_world not in (None, dist_info.world_size):
            log.info(f"resume: {resume_path} was saved mid-epoch with {saved_world} processes, now "
                     f"{dist_info.world_size}: epoch {start_epoch} restarts from its beginning")
            start_step = 0
        log.info(f"resumed from {resume_path}: starting at epoch {start_epoch}"
                 + (f", update {start_step}" if start_step else '') + f", max accuracy {max_accuracy:.2f}%")
    elif config.MODEL.PRETRAINED:
        _load_pretrained(models, model, config.MODEL.PRETRAINED, log, trust)
        if model_ema is not None:
            model_ema.set(model)

    train_model: nn.Module = model
    if dist_info.distributed:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, find_unused_parameters=False)
    if config.COMPILE:
        train_model = torch.compile(train_model)
    eval_model = torch.compile(model) if config.COMPILE else model

    tb_writer = create_tb_writer(config.OUTPUT, config.TENSORBOARD, dist_info.is_main)
    metrics = MetricsFile(f"{config.OUTPUT}/metrics.jsonl", start_epoch) if dist_info.is_main else None
    manager = CheckpointManager(config.OUTPUT, config.TRAIN.KEEP_CHECKPOINTS, log)
    config_dict = config_to_dict(config)

    def save(epoch_done: int, step: int, kind: str, is_best: bool = False) -> None:
        rng = gather_rng_states()  # collective: every rank takes part
        if not dist_info.is_main:
            return
        state = build_checkpoint(config_dict, epoch_done, model, optimizer, lr_scheduler, precision.scaler,
                                 model_ema, max_accuracy, step, rng)
        # The epoch's sample order is a pure function of (seed, epoch) (the samplers' set_epoch); recording
        # where in it the checkpoint stands lets a resume check that it replays the same order.
        state['data_order'] = {'sampler': type(loader_train.sampler).__name__, 'seed': int(config.SEED),
                               'epoch': epoch_done + 1, 'batches_done': step * config.TRAIN.ACCUMULATION_STEPS,
                               'batch_size': int(config.DATA.BATCH_SIZE), 'world_size': dist_info.world_size}
        try:
            if kind == 'epoch':
                manager.save_epoch(state, epoch_done, is_best)
            elif kind == 'best':
                manager.save_best(state)
            else:
                manager.save_last(state)
        except CheckpointSaveError as e:
            # Training goes on: the previous checkpoint is intact and the next save may succeed.
            log.error(f"checkpoint not saved: {e}")

    if checkpoint is not None:
        order = checkpoint.get('data_order') or {}
        if start_step and order and (order.get('seed'), order.get('batch_size')) != \
                (config.SEED, config.DATA.BATCH_SIZE):
            log.warning(f"resume: {resume_path} was saved mid-epoch with SEED {order.get('seed')} and batch size "
                        f"{order.get('batch_size')}, now {config.SEED} and {config.DATA.BATCH_SIZE}: the rest of "
                        f"epoch {start_epoch} follows another sample order")
        restore_rank_rng(checkpoint.get('rng'), config.SEED + dist_info.rank + 1000 * start_epoch, log)
        del checkpoint
    if dist_info.is_main:
        remove_stale_temp_files(config.OUTPUT, log)

    log.info("start training")
    run_start = time.time()
    acc1 = acc5 = val_loss = None
    try:
        with PreemptionGuard(device) as preemption:
            for epoch in range(start_epoch, config.TRAIN.EPOCHS):
                if hasattr(loader_train.sampler, 'set_epoch'):
                    loader_train.sampler.set_epoch(epoch)
                step_offset = start_step if epoch == start_epoch else 0
                train_stats = train_one_epoch(
                    config, train_model, criterion, loader_train, optimizer, epoch, mixup_fn, lr_scheduler,
                    precision, model_ema=model_ema, start_step=step_offset, tb_writer=tb_writer, logger=log,
                    run_started=run_start, start_epoch=start_epoch, preemption=preemption,
                    save_fn=lambda step, e=epoch: save(e - 1, step, 'last'))
                broken = data.pop_broken_count(loader_train) if hasattr(loader_train.dataset, 'broken_images') else 0
                if broken:
                    log.warning(f"epoch {epoch}: {broken} unreadable training images were skipped")

                acc1, acc5, val_loss = validate(config, loader_val, eval_model, precision, log)
                log.info(f"Accuracy of the network on the {len(dataset_val)} test images: {acc1:.1f}%")
                ema_stats = None
                if model_ema is not None:
                    ema_stats = validate(config, loader_val, model_ema.module, precision, log, prefix='EMA')
                is_best = acc1 > max_accuracy
                max_accuracy = max(max_accuracy, acc1)
                log.info(f"Max accuracy: {max_accuracy:.2f}%")

                # Metrics first: a kill between the two then re-runs the epoch (whose line is dropped on resume)
                # instead of resuming after an epoch whose line was never written.
                if metrics is not None:
                    metrics.append(_metrics_record(epoch, train_stats, acc1, acc5, val_loss, ema_stats))
                is_last = epoch == config.TRAIN.EPOCHS - 1
                on_schedule = (epoch + 1) % config.SAVE_FREQ == 0 or is_last
                if on_schedule:
                    save(epoch, 0, 'epoch', is_best)
                elif is_best:
                    save(epoch, 0, 'best')
                if tb_writer is not None:
                    tb_writer.add_scalar('val/acc1', acc1, epoch)
                    tb_writer.add_scalar('val/acc5', acc5, epoch)
                    tb_writer.add_scalar('val/loss', val_loss, epoch)
                    if ema_stats is not None:
                        tb_writer.add_scalar('val/ema_acc1', ema_stats[0], epoch)
                    tb_writer.flush()
                if not is_last and preemption.agreed_stop():  # collective: every rank reaches it
                    log.warning(f"{preemption.received}: stopping after epoch {epoch}; saving a checkpoint")
                    if not on_schedule:
                        save(epoch, 0, 'last')
                    raise Preempted(f"preempted ({preemption.received}) after epoch {epoch}")
    finally:
        if tb_writer is not None:
            tb_writer.close()
    log.info(f"Training time {format_seconds(time.time() - run_start)}")
    return {'max_accuracy': max_accuracy, 'acc1': acc1, 'acc5': acc5, 'loss': val_loss}


def _load_pretrained(models: Any, model: nn.Module, path: str, log: logging.Logger, trust: bool) -> None:
    try:
        models.load_pretrained(model, path, logger=log, trust=trust)
    except ValueError as e:
        raise CheckpointError(f"--pretrained {path}: {e}") from None
    log.info(f"loaded pretrained weights from {path}")
