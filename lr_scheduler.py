"""Learning-rate schedules stepped per optimizer update, with the official Swin semantics, on timm's schedulers.

Call ``scheduler.step_update(num_updates)`` after every optimizer update (``num_updates`` counts updates from
the start of training, so ``epoch * n_iter_per_epoch + i + 1`` style counters resume exactly). ``step(epoch)``
does nothing: every schedule here runs in updates, not epochs. Learning rates come from the config as they
are (scale them once before, with ``config.apply_linear_scaling``).

Layer decay (groups with ``lr_scale``, see ``optimizer.build_optimizer``): each group follows the schedule from
its own base value, the group's ``lr`` = ``BASE_LR * lr_scale``, while ``WARMUP_LR`` and ``MIN_LR`` are the same
for every group. That is how the official SimMIM fine-tune ran on the timm it pinned (0.4.12), whose schedulers
ignore ``lr_scale``. Current timm multiplies every scheduled value by ``lr_scale``, which on the official groups
applies the decay twice (``BASE_LR * lr_scale**2``) and also scales the warmup start and the floor; our
schedulers therefore set each group's value as computed (``_UnscaledGroups``).
"""
from __future__ import annotations

import bisect
from typing import Any, List, Sequence, Union

import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

from config import CHOICES, ConfigError


class _UnscaledGroups(Scheduler):
    """Writes each group's scheduled value as it is, ignoring ``lr_scale`` (timm 0.4.12's ``update_groups``).

    The scale is already in the group's base value (its initial ``lr``). Listed after a timm scheduler class in
    the bases, so that the scheduler's own ``super().update_groups`` calls (its warmup start) resolve here too.
    """

    def update_groups(self, values: Union[float, List[float]]) -> None:
        if not isinstance(values, (list, tuple)):
            values = [values] * len(self.optimizer.param_groups)
        for group, value in zip(self.optimizer.param_groups, values):
            group[self.param_group_field] = value


class OfficialCosineLRScheduler(CosineLRScheduler, _UnscaledGroups):
    """timm's cosine schedule with the official (timm 0.4.12) per-group semantics."""


class OfficialStepLRScheduler(StepLRScheduler, _UnscaledGroups):
    """timm's step schedule with the official (timm 0.4.12) per-group semantics."""


class _WarmupScheduler(_UnscaledGroups):
    """A timm scheduler with the official linear warmup from ``warmup_lr_init`` over ``warmup_t`` steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_t: int = 0, warmup_lr_init: float = 0.0,
                 t_in_epochs: bool = True, initialize: bool = True) -> None:
        super().__init__(optimizer, param_group_field='lr', t_in_epochs=t_in_epochs, initialize=initialize)
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        if warmup_t:
            self.warmup_steps = [(v - warmup_lr_init) / warmup_t for v in self.base_values]
            self.update_groups(warmup_lr_init)
        else:
            self.warmup_steps = [1.0 for _ in self.base_values]

    def _warmup_lrs(self, t: int) -> list[float]:
        return [self.warmup_lr_init + t * s for s in self.warmup_steps]


class LinearLRScheduler(_WarmupScheduler):
    """Linear warmup, then a straight line from each base LR down to ``base * lr_min_rate`` at ``t_initial``.

    As the official: the decay runs over ``t_initial - warmup_t`` steps starting at ``warmup_t``; past
    ``t_initial`` the rate stays at its floor.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, t_initial: int, lr_min_rate: float, warmup_t: int = 0,
                 warmup_lr_init: float = 0.0, t_in_epochs: bool = True, initialize: bool = True) -> None:
        if t_initial <= warmup_t:
            raise ValueError(f"t_initial ({t_initial}) must be larger than warmup_t ({warmup_t})")
        super().__init__(optimizer, warmup_t, warmup_lr_init, t_in_epochs, initialize)
        self.t_initial = t_initial
        self.lr_min_rate = lr_min_rate

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return self._warmup_lrs(t)
        decay_t = self.t_initial - self.warmup_t
        frac = min(t - self.warmup_t, decay_t) / decay_t
        return [v - (v - v * self.lr_min_rate) * frac for v in self.base_values]


class MultiStepLRScheduler(_WarmupScheduler):
    """Linear warmup, then each base LR times ``gamma ** (number of milestones <= t)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float = 0.1,
                 warmup_t: int = 0, warmup_lr_init: float = 0.0, t_in_epochs: bool = True,
                 initialize: bool = True) -> None:
        milestones = sorted(int(m) for m in milestones)
        if not milestones:
            raise ValueError("the multistep schedule needs at least one milestone")
        if warmup_t > milestones[0]:
            raise ValueError(f"warmup ({warmup_t} steps) must end before the first milestone ({milestones[0]})")
        super().__init__(optimizer, warmup_t, warmup_lr_init, t_in_epochs, initialize)
        self.milestones = milestones
        self.gamma = gamma

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return self._warmup_lrs(t)
        factor = self.gamma ** bisect.bisect_right(self.milestones, t)
        return [v * factor for v in self.base_values]


def build_scheduler(config: Any, optimizer: torch.optim.Optimizer, n_iter_per_epoch: int) -> Scheduler:
    """The schedule of ``TRAIN.LR_SCHEDULER.NAME`` (cosine | linear | step | multistep), counted in updates.

    Lengths are the official ones: total ``EPOCHS * n_iter_per_epoch``, warmup ``WARMUP_EPOCHS * n``, step
    decay every ``DECAY_EPOCHS * n``, multistep milestones ``MULTISTEPS[k] * n`` (``n = n_iter_per_epoch``,
    which counts optimizer updates, i.e. batches / accumulation steps).
    """
    n_iter_per_epoch = int(n_iter_per_epoch)
    if n_iter_per_epoch < 1:
        raise ValueError(f"n_iter_per_epoch must be >= 1, got {n_iter_per_epoch}")
    sched = config.TRAIN.LR_SCHEDULER
    name = sched.NAME
    num_steps = int(config.TRAIN.EPOCHS * n_iter_per_epoch)
    warmup_steps = int(config.TRAIN.WARMUP_EPOCHS * n_iter_per_epoch)
    decay_steps = int(sched.DECAY_EPOCHS * n_iter_per_epoch)
    multi_steps = [int(m * n_iter_per_epoch) for m in sched.MULTISTEPS]
    warmup_lr = float(config.TRAIN.WARMUP_LR)

    if name == 'cosine':
        t_initial = num_steps - warmup_steps if sched.WARMUP_PREFIX else num_steps
        if t_initial < 1:
            raise ConfigError(f"the cosine schedule has no decay steps left: TRAIN.EPOCHS ({config.TRAIN.EPOCHS})"
                              f" must exceed TRAIN.WARMUP_EPOCHS ({config.TRAIN.WARMUP_EPOCHS}) with "
                              f"TRAIN.LR_SCHEDULER.WARMUP_PREFIX")
        return OfficialCosineLRScheduler(optimizer, t_initial=t_initial, lr_min=float(config.TRAIN.MIN_LR),
                                 cycle_mul=1.0, cycle_limit=1, warmup_lr_init=warmup_lr, warmup_t=warmup_steps,
                                 warmup_prefix=bool(sched.WARMUP_PREFIX), t_in_epochs=False)
    if name == 'linear':
        if num_steps <= warmup_steps:
            raise ConfigError(f"the linear schedule needs TRAIN.EPOCHS ({config.TRAIN.EPOCHS}) > "
                              f"TRAIN.WARMUP_EPOCHS ({config.TRAIN.WARMUP_EPOCHS})")
        return LinearLRScheduler(optimizer, t_initial=num_steps, lr_min_rate=0.01, warmup_lr_init=warmup_lr,
                                 warmup_t=warmup_steps, t_in_epochs=False)
    if name == 'step':
        if decay_steps < 1:
            raise ConfigError(f"TRAIN.LR_SCHEDULER.DECAY_EPOCHS = {sched.DECAY_EPOCHS} gives no decay steps")
        # warmup_prefix=False: the official (timm 0.4) step schedule counts decay periods from update 0.
        return OfficialStepLRScheduler(optimizer, decay_t=decay_steps, decay_rate=float(sched.DECAY_RATE),
                               warmup_lr_init=warmup_lr, warmup_t=warmup_steps, warmup_prefix=False,
                               t_in_epochs=False)
    if name == 'multistep':
        if not multi_steps:
            raise ConfigError("TRAIN.LR_SCHEDULER.MULTISTEPS is empty; the multistep schedule needs milestones "
                              "(epochs)")
        if warmup_steps > min(multi_steps):
            raise ConfigError(f"TRAIN.WARMUP_EPOCHS ({config.TRAIN.WARMUP_EPOCHS}) must not exceed the first of "
                              f"TRAIN.LR_SCHEDULER.MULTISTEPS {list(sched.MULTISTEPS)}")
        return MultiStepLRScheduler(optimizer, milestones=multi_steps, gamma=float(sched.GAMMA),
                                    warmup_lr_init=warmup_lr, warmup_t=warmup_steps, t_in_epochs=False)
    raise ConfigError(f"TRAIN.LR_SCHEDULER.NAME = {name!r} is not one of {list(CHOICES['TRAIN.LR_SCHEDULER.NAME'])}")


def current_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each parameter group (for logging)."""
    return [float(g['lr']) for g in optimizer.param_groups]


__all__ = ['build_scheduler', 'LinearLRScheduler', 'MultiStepLRScheduler', 'OfficialCosineLRScheduler',
           'OfficialStepLRScheduler', 'current_lrs']
