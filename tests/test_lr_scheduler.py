"""lr_scheduler.py against closed-form formulas of the official schedules, at every optimizer update."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from config import ConfigError, apply_linear_scaling, load_config
from lr_scheduler import LinearLRScheduler, MultiStepLRScheduler, build_scheduler, current_lrs
from optimizer import build_optimizer

IMAGENET_TRAIN = 1281167


def _optimizer(lr=1.0, scales=()):
    """One plain group (lr) plus one group per lr_scale, as build_optimizer makes them (lr = BASE_LR * lr_scale)."""
    groups = [{'params': [nn.Parameter(torch.zeros(1))], 'lr': lr}]
    for s in scales:
        groups.append({'params': [nn.Parameter(torch.zeros(1))], 'lr': lr * s, 'lr_scale': s})
    return torch.optim.SGD(groups, lr=lr)


def _run(scheduler, optimizer, num_updates, group=0):
    """The LR of one group after step_update(t), for t = 0 .. num_updates (inclusive)."""
    out = np.empty(num_updates + 1)
    g = optimizer.param_groups[group]
    for t in range(num_updates + 1):
        scheduler.step_update(t)
        out[t] = g['lr']
    return out


def official_cosine(t, base, warm, low, warmup, total, prefix=True):
    """Linear warmup from ``warm`` to ``base`` over ``warmup`` updates, then a half cosine to ``low``."""
    t = np.asarray(t, dtype=np.float64)
    span = total - warmup if prefix else total
    tc = t - warmup if prefix else t
    cos = low + 0.5 * (base - low) * (1.0 + np.cos(np.pi * np.minimum(tc, span) / span))
    return np.where(t < warmup, warm + t * (base - warm) / max(warmup, 1), cos)


def _recipe(cfg_file, batch=128, world=8, *opts):
    config = load_config(cfg_file, ['DATA.BATCH_SIZE', str(batch), *opts])
    config = apply_linear_scaling(config, world)
    n_iter = IMAGENET_TRAIN // (batch * world)
    return config, n_iter


@pytest.mark.parametrize('cfg_file, expect', [
    # Swin-T from scratch: 300 epochs, 20 warmup; 8 x 128 = 1024 images per update -> LRs x 2
    ('configs/swin/swin_tiny_patch4_window7_224.yaml', (300, 20, 1e-3, 1e-6, 1e-5)),
    # 384 fine-tune: 30 epochs, 5 warmup
    ('configs/swin/swin_base_patch4_window12_384_finetune.yaml', (30, 5, 4e-5, 4e-8, 4e-7)),
])
def test_official_cosine_recipe_at_every_update(cfg_file, expect):
    epochs, warmup_epochs, base, warm, low = expect
    config, n_iter = _recipe(cfg_file)
    assert n_iter == 1251
    assert (config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS) == (epochs, warmup_epochs)
    for got, want in zip((config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR, config.TRAIN.MIN_LR), (base, warm, low)):
        assert got == pytest.approx(want, rel=1e-15)
    if 'finetune' in cfg_file:
        assert config.TRAIN.WEIGHT_DECAY == 1e-8

    opt = _optimizer(lr=config.TRAIN.BASE_LR)
    sched = build_scheduler(config, opt, n_iter)
    total, warmup = epochs * n_iter, warmup_epochs * n_iter
    assert opt.param_groups[0]['lr'] == pytest.approx(warm, rel=1e-12)  # set at construction
    lrs = _run(sched, opt, total)
    want = official_cosine(np.arange(total + 1), base, warm, low, warmup, total)
    np.testing.assert_allclose(lrs, want, rtol=1e-12, atol=0)
    # key points
    assert lrs[0] == pytest.approx(warm, rel=1e-12)
    assert lrs[warmup - 1] == pytest.approx(warm + (warmup - 1) * (base - warm) / warmup, rel=1e-12)
    assert lrs[warmup] == pytest.approx(base, rel=1e-12)
    mid = warmup + (total - warmup) // 2 if (total - warmup) % 2 == 0 else None
    if mid is not None:
        assert lrs[mid] == pytest.approx((base + low) / 2, rel=1e-12)
    else:  # odd decay length: the midpoint falls between two updates
        half = warmup + (total - warmup) / 2
        assert lrs[int(half)] > (base + low) / 2 > lrs[int(half) + 1]
    assert lrs[total - 1] == pytest.approx(low + 0.5 * (base - low) * (1 + math.cos(math.pi * (total - warmup - 1)
                                                                                    / (total - warmup))), rel=1e-12)
    assert lrs[total] == pytest.approx(low, rel=1e-12)
    assert np.all(np.diff(lrs[:warmup + 1]) > 0) and np.all(np.diff(lrs[warmup:]) <= 0)


def test_cosine_without_warmup_prefix():
    config = load_config(None, ['TRAIN.EPOCHS', '10', 'TRAIN.WARMUP_EPOCHS', '2',
                                'TRAIN.LR_SCHEDULER.WARMUP_PREFIX', 'False'])
    opt = _optimizer(config.TRAIN.BASE_LR)
    sched = build_scheduler(config, opt, 7)
    lrs = _run(sched, opt, 70)
    want = official_cosine(np.arange(71), 5e-4, 5e-7, 5e-6, 14, 70, prefix=False)
    np.testing.assert_allclose(lrs, want, rtol=1e-12, atol=0)
    assert lrs[14] < 5e-4  # the cosine already ran during warmup


def test_linear_schedule():
    config = load_config(None, ['TRAIN.LR_SCHEDULER.NAME', 'linear', 'TRAIN.EPOCHS', '10',
                                'TRAIN.WARMUP_EPOCHS', '2', 'TRAIN.BASE_LR', '0.1', 'TRAIN.WARMUP_LR', '0.001'])
    opt = _optimizer(0.1)
    sched = build_scheduler(config, opt, 5)
    assert isinstance(sched, LinearLRScheduler)
    lrs = _run(sched, opt, 50)
    t = np.arange(51)
    want = np.where(t < 10, 0.001 + t * (0.1 - 0.001) / 10, 0.1 - (0.1 - 0.001) * np.minimum(t - 10, 40) / 40)
    np.testing.assert_allclose(lrs, want, rtol=1e-12)
    assert lrs[50] == pytest.approx(0.1 * 0.01, rel=1e-12)  # lr_min_rate 0.01 at the end


def test_step_schedule_counts_periods_from_zero():
    config = load_config(None, ['TRAIN.LR_SCHEDULER.NAME', 'step', 'TRAIN.EPOCHS', '10', 'TRAIN.WARMUP_EPOCHS', '1',
                                'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '3', 'TRAIN.LR_SCHEDULER.DECAY_RATE', '0.5'])
    opt = _optimizer(config.TRAIN.BASE_LR)
    sched = build_scheduler(config, opt, 4)
    lrs = _run(sched, opt, 40)
    t = np.arange(41)
    want = np.where(t < 4, 5e-7 + t * (5e-4 - 5e-7) / 4, 5e-4 * 0.5 ** (t // 12))
    np.testing.assert_allclose(lrs, want, rtol=1e-12)
    assert lrs[11] == 5e-4 and lrs[12] == 2.5e-4  # official: decay at DECAY_EPOCHS, not warmup + DECAY_EPOCHS


def test_multistep_schedule():
    config = load_config(None, ['TRAIN.LR_SCHEDULER.NAME', 'multistep', 'TRAIN.EPOCHS', '10',
                                'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.LR_SCHEDULER.MULTISTEPS', '[6, 3]',
                                'TRAIN.LR_SCHEDULER.GAMMA', '0.2'])
    opt = _optimizer(config.TRAIN.BASE_LR)
    sched = build_scheduler(config, opt, 5)
    assert isinstance(sched, MultiStepLRScheduler) and sched.milestones == [15, 30]
    lrs = _run(sched, opt, 50)
    t = np.arange(51)
    want = np.where(t < 5, 5e-7 + t * (5e-4 - 5e-7) / 5, 5e-4 * 0.2 ** ((t >= 15).astype(int) + (t >= 30)))
    np.testing.assert_allclose(lrs, want, rtol=1e-12)


@pytest.mark.parametrize('opts, match', [
    (['TRAIN.LR_SCHEDULER.NAME', 'multistep'], 'MULTISTEPS is empty'),
    (['TRAIN.LR_SCHEDULER.NAME', 'multistep', 'TRAIN.LR_SCHEDULER.MULTISTEPS', '[10]'], 'first of'),
    (['TRAIN.EPOCHS', '20'], 'no decay steps'),
    (['TRAIN.EPOCHS', '20', 'TRAIN.LR_SCHEDULER.NAME', 'linear'], 'EPOCHS'),
])
def test_bad_schedules_are_clear_errors(opts, match):
    config = load_config(None, opts)  # WARMUP_EPOCHS is 20 by default
    with pytest.raises(ConfigError, match=match):
        build_scheduler(config, _optimizer(), 10)


def test_zero_iterations_per_epoch_is_an_error():
    with pytest.raises(ValueError, match='n_iter_per_epoch'):
        build_scheduler(load_config(), _optimizer(), 0)


@pytest.mark.parametrize('name', ['cosine', 'linear', 'step', 'multistep'])
def test_layer_decay_group_follows_the_schedule_from_its_own_base(name):
    """Official (timm 0.4.12) semantics: a group with lr_scale s runs the schedule of BASE_LR * s with the same,
    unscaled WARMUP_LR and MIN_LR; lr_scale is not applied a second time (current timm would)."""
    opts = ['TRAIN.LR_SCHEDULER.NAME', name, 'TRAIN.EPOCHS', '6', 'TRAIN.WARMUP_EPOCHS', '1',
            'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '2', 'TRAIN.LR_SCHEDULER.MULTISTEPS', '[3]']
    config = load_config(None, opts)
    opt = _optimizer(config.TRAIN.BASE_LR, scales=(0.5, 0.25))
    sched = build_scheduler(config, opt, 10)
    plain = []
    for s in (0.5, 0.25):  # the same schedule run on its own at BASE_LR * s
        one = _optimizer(config.TRAIN.BASE_LR * s)
        plain.append((one, build_scheduler(config, one, 10)))
    for g in opt.param_groups:
        assert g['lr'] == config.TRAIN.WARMUP_LR  # the warmup starts from the unscaled WARMUP_LR
    for t in range(61):
        sched.step_update(t)
        for g, (one, one_sched) in zip(opt.param_groups[1:], plain):
            one_sched.step_update(t)
            assert g['lr'] == pytest.approx(one.param_groups[0]['lr'], rel=1e-12)


def test_layer_decay_optimizer_with_scheduler():
    model = nn.Module()
    model.patch_embed = nn.Linear(3, 4)
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].blocks = nn.ModuleList([nn.Linear(4, 4)])
    model.head = nn.Linear(4, 2)
    config = load_config(None, ['TRAIN.LAYER_DECAY', '0.5', 'TRAIN.EPOCHS', '4', 'TRAIN.WARMUP_EPOCHS', '1'])
    opt = build_optimizer(config, model)
    sched = build_scheduler(config, opt, 10)
    for t in (0, 10, 25, 40):
        sched.step_update(t)
        for g in opt.param_groups:
            want = official_cosine(t, 5e-4 * g['lr_scale'], 5e-7, 5e-6, 10, 40)
            assert g['lr'] == pytest.approx(want, rel=1e-12)
    assert sorted({g['lr_scale'] for g in opt.param_groups}) == [0.25, 0.5, 1.0]


def test_epoch_step_does_nothing():
    config = load_config(None, ['TRAIN.EPOCHS', '4', 'TRAIN.WARMUP_EPOCHS', '1'])
    opt = _optimizer(config.TRAIN.BASE_LR)
    sched = build_scheduler(config, opt, 10)
    sched.step_update(17)
    before = current_lrs(opt)
    sched.step(3)
    assert current_lrs(opt) == before


@pytest.mark.parametrize('name', ['cosine', 'linear', 'step', 'multistep'])
def test_state_dict_round_trip(tmp_path, name):
    opts = ['TRAIN.LR_SCHEDULER.NAME', name, 'TRAIN.EPOCHS', '8', 'TRAIN.WARMUP_EPOCHS', '2',
            'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '3', 'TRAIN.LR_SCHEDULER.MULTISTEPS', '[4, 6]']
    config = load_config(None, opts)
    opt = _optimizer(config.TRAIN.BASE_LR, scales=(0.3,))
    sched = build_scheduler(config, opt, 9)
    for t in range(31):
        sched.step_update(t)
    torch.save({'lr_scheduler': sched.state_dict(), 'optimizer': opt.state_dict()}, tmp_path / 'ck.pt')

    ck = torch.load(tmp_path / 'ck.pt', weights_only=True)  # plain data only
    # resume into a scheduler built from a different config: the saved state wins
    opt2 = _optimizer(1.0, scales=(0.3,))
    opt2.load_state_dict(ck['optimizer'])
    other = load_config(None, opts + ['TRAIN.BASE_LR', '0.1'])
    sched2 = build_scheduler(other, opt2, 9)
    sched2.load_state_dict(ck['lr_scheduler'])
    assert sched2.base_values == sched.base_values
    for t in range(31, 72):
        sched.step_update(t)
        sched2.step_update(t)
        assert current_lrs(opt2) == current_lrs(opt)
