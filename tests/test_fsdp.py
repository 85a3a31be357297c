"""FSDP2 sharded training and sharded checkpoints (issue 14), on CPU with gloo.

- in-process (``torch.multiprocessing.spawn``, 2 ranks): FSDP trains Swin V1 and V2 to DDP's weights (and EMA)
  with accumulation and clipping on; the sharded checkpoint's export gives the FSDP model's logits in a plain
  model; per-rank bytes of parameters + gradients + optimizer state are at most 0.55 of DDP's;
- through ``main.py`` under ``torchrun --nproc_per_node 2``: a sharded checkpoint resumes bit-exactly with 2
  processes and carries on in 1; SIGKILL (of the whole launch, mid-training or mid-save) then auto-resume ends
  with the uninterrupted run's weights;
- fast checks: errors that name the key, kill-mid-save leftovers, refused pickles in a DCP directory.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import subprocess_env, write_digits_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join('swin_tiny_patch4_window7_224', 'default')
TINY = ['DATA.DATASET', 'folder', 'MODEL.SWIN.EMBED_DIM', '16', 'MODEL.SWIN.DEPTHS', '[1,1]',
        'MODEL.SWIN.NUM_HEADS', '[1,2]', 'MODEL.SWIN.WINDOW_SIZE', '4', 'DATA.IMG_SIZE', '32',
        'MODEL.NUM_CLASSES', '4', 'DATA.NUM_WORKERS', '0', 'MODEL.DROP_PATH_RATE', '0.0']
PLAIN = ['AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0', 'AUG.AUTO_AUGMENT', 'none', 'AUG.REPROB', '0.0',
         'AUG.COLOR_JITTER', '0.0', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.BASE_LR', '0.02', 'PRINT_FREQ', '1',
         'DETERMINISTIC', 'True', 'TRAIN.LR_SCHEDULER.NAME', 'step', 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '100',
         'TRAIN.ACCUMULATION_STEPS', '2', 'TRAIN.EMA.ENABLE', 'True', 'TRAIN.EMA.DECAY', '0.9']
BATCH = 4  # 32 training images, 2 ranks x 4 x 2 accumulation -> 2 updates per epoch


# ----------------------------------------------------------------------------- in process: FSDP vs DDP

def _config(model_type, extra=()):
    from config import load_config
    arch = 'MODEL.SWIN' if model_type == 'swin' else 'MODEL.SWINV2'
    return load_config(opts=['MODEL.TYPE', model_type, f'{arch}.EMBED_DIM', '16', f'{arch}.DEPTHS', '[1,2]',
                             f'{arch}.NUM_HEADS', '[1,2]', f'{arch}.WINDOW_SIZE', '4', 'DATA.IMG_SIZE', '32',
                             'MODEL.NUM_CLASSES', '4', 'MODEL.DROP_PATH_RATE', '0.0', 'DATA.BATCH_SIZE', '4',
                             'TRAIN.ACCUMULATION_STEPS', '2', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EPOCHS', '2',
                             'TRAIN.BASE_LR', '2e-3', 'TRAIN.CLIP_GRAD', '0.3', 'MODEL.LABEL_SMOOTHING', '0.0',
                             *(['MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', '[0,0]'] if model_type == 'swinv2' else []),
                             *extra])


def _train(config, fsdp, rank, world, train=True):
    """2 updates (accumulation 2) of a fixed random data set in fp32, with EMA; returns (state, grad norms).
    ``train=False``: the state as built, untrained."""
    import engine
    import models
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer
    from timm.utils import ModelEmaV3
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 4, (32,), generator=g)
    torch.manual_seed(0)
    model = models.build_model(config)
    ema = ModelEmaV3(model, decay=0.5)
    dist_info = SimpleNamespace(distributed=True, device=torch.device('cpu'), world_size=world)
    cpu = torch.device('cpu')
    precision = engine.Precision(cpu)
    if fsdp:  # as engine.run: shard (model and EMA) before building the optimizer
        model = engine.fsdp_shard(model, config, precision)
        engine.fsdp_shard(ema.module, config, precision)
    optimizer = build_optimizer(config, model)
    dataset = TensorDataset(images, labels)
    loader = DataLoader(dataset, batch_size=config.DATA.BATCH_SIZE, drop_last=True,
                        sampler=DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False))
    accum = config.TRAIN.ACCUMULATION_STEPS
    state = engine.TrainState(model, optimizer, build_scheduler(config, optimizer, len(loader) // accum), ema=ema,
                              updates_per_epoch=len(loader) // accum)
    train_model = engine.wrap_for_training(model, config, dist_info)
    loss_fn = engine.classification_loss(torch.nn.CrossEntropyLoss(), None, cpu)
    update_step = engine.UpdateStep(train_model, state, precision, loss_fn, config.TRAIN.CLIP_GRAD)
    if not train:
        return state, []
    norms = [float(norm) for _, norm, _ in engine.train_one_epoch(state, update_step, loader, accum)]
    return state, norms


def _full(module):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _equivalence_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        from utils.checkpoint import CheckpointManager, build_checkpoint, gather_rng_states
        results = {}
        for model_type, extra in (('swin', ['TRAIN.USE_CHECKPOINT', 'True', 'TRAIN.LAYER_DECAY', '0.8']),
                                  ('swinv2', ['TRAIN.OPTIMIZER.NAME', 'sgd', 'TRAIN.BASE_LR', '0.1'])):
            config = _config(model_type, extra)
            ddp_state, ddp_norms = _train(config, False, rank, world)
            fsdp_state, fsdp_norms = _train(config, True, rank, world)
            results[model_type] = {'ddp': ddp_state.model.state_dict(), 'ddp_ema': ddp_state.ema.module.state_dict(),
                                   'fsdp': _full(fsdp_state.model), 'fsdp_ema': _full(fsdp_state.ema.module),
                                   'ddp_norms': ddp_norms, 'fsdp_norms': fsdp_norms}
            if model_type == 'swin':  # DDP's single-file checkpoint resumed by FSDP
                results['from_file'] = _file_into_fsdp(config, ddp_state, rank, world)
            if model_type == 'swinv2':  # a sharded checkpoint of it, and its logits, for the export check
                checkpoint = build_checkpoint(fsdp_state, {}, gather_rng_states(), weights=False)
                CheckpointManager(out_dir, 0).save_sharded(checkpoint, fsdp_state, 'epoch')
                fsdp_state.model.eval()
                with torch.no_grad():
                    results['logits'] = fsdp_state.model(torch.randn(3, 3, 32, 32,
                                                                     generator=torch.Generator().manual_seed(5)))
        results['memory'] = _memory(rank, world)
        results['nonfinite'] = _nonfinite_on_one_rank(rank, world)
        results['reductions'] = _reductions_per_update(rank, world)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, 'results.pt'))
    finally:
        dist.destroy_process_group()


def _file_into_fsdp(config, ddp_state, rank, world):
    """restore_training_state of DDP's checkpoint dict (full tensors, optimizer by index) into a fresh sharded
    state: model, AdamW moments and EMA as full tensors, for comparison with DDP's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from utils.checkpoint import build_checkpoint, restore_training_state
    checkpoint = build_checkpoint(ddp_state, {})
    fresh, _ = _train(config, True, rank, world, train=False)
    restore_training_state(checkpoint, fresh)
    optim = get_optimizer_state_dict(fresh.model, fresh.optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = [n for g in ddp_state.optimizer.param_groups for n in g['param_names']]
    ddp_moments = {n: ddp_state.optimizer.state[p]['exp_avg_sq'] for g in ddp_state.optimizer.param_groups
                   for n, p in zip(g['param_names'], g['params'])}
    return {'model': _full(fresh.model), 'ema': _full(fresh.ema.module), 'position': (fresh.epoch, fresh.update),
            'moments': {n: optim['state'][n]['exp_avg_sq'] for n in names} if rank == 0 else {},  # gathered on 0
            'ddp_moments': ddp_moments}


def _nonfinite_on_one_rank(rank, world):
    """Two UpdateStep calls under FSDP; in the second only rank 1's loss is inf. Returns, per precision (fp32, and
    fp16 with GradScaler), every rank's (skipped flags, whether its shards changed in the bad update, scale)."""
    import engine
    import models
    from optimizer import build_optimizer
    from utils.distributed import all_gather_objects
    cpu = torch.device('cpu')
    out = {}
    for name, dtype in (('fp32', None), ('fp16', torch.float16)):
        config = _config('swin')
        torch.manual_seed(0)
        precision = engine.Precision(cpu, dtype)
        model = engine.fsdp_shard(models.build_model(config), config, precision)
        scaler = torch.amp.GradScaler('cpu') if dtype else None
        state = engine.TrainState(model, build_optimizer(config, model), scaler=scaler, updates_per_epoch=10)

        def loss_fn(m, batch):
            loss = torch.nn.functional.cross_entropy(m(batch[0]).float(), batch[1])
            return loss * float('inf') if batch[2] and rank == 1 else loss
        step = engine.UpdateStep(model, state, precision, loss_fn, config.TRAIN.CLIP_GRAD)
        g = torch.Generator().manual_seed(rank)
        images, labels = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 4, (2,), generator=g)
        flags = [bool(step([(images, labels, False)])[2])]
        before = [p.to_local().clone() for p in model.parameters()]
        flags.append(bool(step([(images, labels, True)])[2]))
        changed = any(not torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))
        out[name] = all_gather_objects((flags, changed, scaler.get_scale() if scaler else None))
    return out


def _reductions_per_update(rank, world):
    """(gradient reductions in one update of 3 micro-batches, FSDP parameter groups). FSDP2 has no public hook
    for its reduce-scatters, so its private ``foreach_reduce`` is counted (one call per group and reduction)."""
    import engine
    import models
    from optimizer import build_optimizer
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_module
    config = _config('swin')
    precision = engine.Precision(torch.device('cpu'))
    model = engine.fsdp_shard(models.build_model(config), config, precision)
    state = engine.TrainState(model, build_optimizer(config, model), updates_per_epoch=10)
    step = engine.UpdateStep(model, state, precision, engine.classification_loss(
        torch.nn.CrossEntropyLoss(), None, torch.device('cpu')))
    calls = []
    original = group_module.foreach_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    group_module.foreach_reduce = counting
    try:
        step([(torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2,))) for _ in range(3)])
    finally:
        group_module.foreach_reduce = original
    return len(calls), sum(isinstance(m, FSDPModule) for m in model.modules())


def _memory(rank, world):
    """Per-rank bytes of params, grads and AdamW state after one step, DDP (plain tensors) vs FSDP (shards)."""
    import engine
    import models
    from optimizer import build_optimizer
    from utils.fsdp import train_state_bytes
    config = _config('swinv2', ['MODEL.SWINV2.EMBED_DIM', '32', 'MODEL.SWINV2.DEPTHS', '[2,2]',
                                'MODEL.SWINV2.NUM_HEADS', '[2,4]'])
    out = {}
    for fsdp in (False, True):
        torch.manual_seed(0)
        model = models.build_model(config)
        if fsdp:
            model = engine.fsdp_shard(model, config, engine.Precision(torch.device('cpu')))
            train_model = model
        else:
            train_model = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = build_optimizer(config, model)
        train_model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
        out['fsdp' if fsdp else 'ddp'] = train_state_bytes(model, optimizer)
    return out


@pytest.fixture(scope='module')
def equivalence(tmp_path_factory):
    out = tmp_path_factory.mktemp('fsdp_equivalence')
    mp.spawn(_equivalence_worker, args=(2, str(out / 'pg_init'), str(out)), nprocs=2, join=True)
    return str(out), torch.load(out / 'results.pt', weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
def test_fsdp_trains_to_ddp_weights_with_accumulation_clipping_and_ema(model_type, equivalence):
    """V1 with activation checkpointing and layer-decay groups (AdamW), V2 with SGD (whose update, unlike
    AdamW's, scales with the clipped gradient): after 2 updates (2 micro-batches each, clipping at 0.3 active)
    FSDP's weights and EMA equal DDP's to 1e-5, and so do the grad norms."""
    r = equivalence[1][model_type]
    assert len(r['ddp_norms']) == 2 and min(r['ddp_norms']) > 0.3  # clipping really happened
    assert r['fsdp_norms'] == pytest.approx(r['ddp_norms'], rel=1e-5)
    assert r['ddp'].keys() == r['fsdp'].keys()
    initial = _initial_weights(model_type)
    worst = max(float((r['fsdp'][k] - v).abs().max()) for k, v in r['ddp'].items())
    print(f"{model_type}: FSDP vs DDP max |weight difference| {worst:.2e}, grad norms {r['fsdp_norms']} vs "
          f"{r['ddp_norms']}")
    moved = ema_moved = 0
    for key, value in r['ddp'].items():
        torch.testing.assert_close(r['fsdp'][key], value, rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(r['fsdp_ema'][key], r['ddp_ema'][key], rtol=1e-5, atol=1e-5, msg=key)
        moved += int(not torch.equal(value, initial[key]))
        ema_moved += int((r['ddp_ema'][key].double() - initial[key].double()).abs().max() > 1e-4)
    assert moved > 10
    assert ema_moved > 10  # the EMAs compared above are not both the initial weights


@pytest.mark.slow
def test_nonfinite_gradient_on_one_rank_skips_the_update_on_every_rank(equivalence):
    """The guard needs no host sync and agrees across ranks: the norm of the sharded gradient is global (fp32),
    and GradScaler's inf check over DTensor gradients is too (fp16): both ranks skip, the scale halves on both."""
    for name, ranks in equivalence[1]['nonfinite'].items():
        for flags, changed, scale in ranks:
            assert flags == [False, True] and not changed, (name, ranks)
        if name == 'fp16':
            assert ranks[0][2] == ranks[1][2] == 65536.0 / 2, ranks


@pytest.mark.slow
def test_accumulation_reduces_gradients_once_per_update(equivalence):
    """3 micro-batches: each FSDP group reduce-scatters its gradients once (after the last), not 3 times."""
    calls, groups = equivalence[1]['reductions']
    assert groups == 4 and calls == groups  # 3 blocks + the root


@pytest.mark.slow
def test_single_file_checkpoint_resumes_into_fsdp(equivalence):
    """A DDP checkpoint file (full tensors, optimizer state by index) loads into sharded model, AdamW and EMA."""
    r, ddp = equivalence[1]['from_file'], equivalence[1]['swin']
    assert r['position'] == (0, 2)  # 2 updates into epoch 0
    for key, value in ddp['ddp'].items():
        assert torch.equal(r['model'][key], value), key
        assert torch.equal(r['ema'][key], ddp['ddp_ema'][key]), key
    assert r['moments'].keys() == r['ddp_moments'].keys()
    for key, value in r['ddp_moments'].items():
        assert torch.equal(r['moments'][key], value) and value.abs().sum() > 0, key


def _initial_weights(model_type):
    import models
    torch.manual_seed(0)
    return models.build_model(_config(model_type)).state_dict()


@pytest.mark.slow
def test_export_of_sharded_checkpoint_gives_the_same_logits(equivalence, tmp_path):
    """export_sharded_model (one process, no process group) -> {'model': ...} loadable with weights_only, by
    load_pretrained and by load_state_dict; a plain model gives the FSDP model's logits."""
    import models
    from scripts import export_sharded
    out, results = equivalence
    path = str(tmp_path / 'exported.pth')
    assert export_sharded.main([os.path.join(out, 'ckpt_epoch_-1'), path]) == 0
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == ['model']
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for load in ('state_dict', 'pretrained'):
        model = models.build_model(_config('swinv2')).eval()
        if load == 'state_dict':
            model.load_state_dict(loaded['model'])
        else:
            models.load_pretrained(model, path)
        with torch.no_grad():
            torch.testing.assert_close(model(images), results['logits'], rtol=1e-6, atol=1e-6)
    ema_path = str(tmp_path / 'ema.pth')
    assert export_sharded.main([os.path.join(out, 'ckpt_epoch_-1'), ema_path, '--ema']) == 0
    ema = torch.load(ema_path, weights_only=True)['model']
    for key, value in results['swinv2']['fsdp_ema'].items():
        torch.testing.assert_close(ema[key], value, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.slow
def test_fsdp_memory_of_params_grads_and_optimizer_is_at_most_055_of_ddp(equivalence):
    memory = equivalence[1]['memory']
    ddp, fsdp = sum(memory['ddp'].values()), sum(memory['fsdp'].values())
    print(f"per-rank bytes, 2 ranks: DDP {memory['ddp']} = {ddp}; FSDP {memory['fsdp']} = {fsdp}; "
          f"ratio {fsdp / ddp:.3f}")
    assert memory['ddp']['grads'] == memory['ddp']['params'] and memory['ddp']['optimizer'] >= 2 * ddp // 4
    assert fsdp <= 0.55 * ddp


# ----------------------------------------------------------------------------- through main.py and torchrun

@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp('digits'), 4, 8, 4)


def _ema_worker(rank, world, init_file, data, out_dir):
    """engine.run (as main.py runs it: seeded SEED + rank) with the config's EMA, DDP then FSDP, 2 epochs of 2
    updates; rank 0 saves the weights every update produced (gathered full tensors under FSDP)."""
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        import engine
        from config import load_config
        from helpers import RecordedUpdates
        from utils.distributed import DistInfo
        recorded = {}
        for kind in ('ddp', 'fsdp'):
            # SGD: its update scales with the gradient, so FSDP's and DDP's rounding differences stay at their
            # size (AdamW's first step, lr * sign(g), turns them into +-lr on gradients that are zero in theory)
            config = load_config(opts=[*TINY, *PLAIN, 'TRAIN.OPTIMIZER.NAME', 'sgd', 'TRAIN.BASE_LR', '0.5',
                                       'TRAIN.EMA.DECAY', '0.5', 'TRAIN.EPOCHS', '2', 'AMP_ENABLE', 'False',
                                       'DATA.BATCH_SIZE', str(BATCH), 'DATA.DATA_PATH', data, 'TENSORBOARD',
                                       'False', 'OUTPUT', os.path.join(out_dir, kind), 'TRAIN.FSDP.ENABLE',
                                       str(kind == 'fsdp')])
            os.makedirs(config.OUTPUT, exist_ok=True)  # main.py makes it
            torch.manual_seed(config.SEED + rank)
            with RecordedUpdates() as updates:
                engine.run(config, DistInfo(rank, world, rank, torch.device('cpu')))
            recorded[kind] = updates.weights
        if rank == 0:
            torch.save(recorded, os.path.join(out_dir, 'recorded.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_ema_through_engine_run_is_ddps_and_the_average_of_the_weights(digits, tmp_path):
    """TRAIN.EMA.DECAY 0.5 through engine.run, 4 updates: under DDP and under FSDP (its sharded EMA exported from
    the checkpoint directory) the EMA is the closed-form average of the weights each run produced, it left the
    initial weights and lags behind the last ones, and FSDP's equals DDP's."""
    from helpers import closed_form_ema
    from utils.checkpoint import read_sharded_model
    mp.spawn(_ema_worker, args=(2, str(tmp_path / 'pg'), digits, str(tmp_path)), nprocs=2, join=True)
    recorded = torch.load(tmp_path / 'recorded.pt', weights_only=True)
    emas = {'ddp': torch.load(tmp_path / 'ddp' / 'ckpt_epoch_1.pth', weights_only=True)['ema'],
            'fsdp': read_sharded_model(str(tmp_path / 'fsdp' / 'ckpt_epoch_1'), ema=True)}
    for kind, ema in emas.items():
        weights = recorded[kind]
        assert len(weights) == 1 + 4, kind
        for name, value in closed_form_ema(weights, 0.5).items():
            torch.testing.assert_close(ema[name].double(), value, rtol=1e-5, atol=1e-6, msg=f'{kind} {name}')
            assert (ema[name].double() - weights[0][name]).abs().max() > 1e-4, f'{kind} {name} never moved'
        lag = max(float((ema[n].double() - weights[-1][n]).abs().max()) for n in weights[0])
        assert lag > 1e-4, (kind, lag)
    for name in recorded['ddp'][0]:
        torch.testing.assert_close(emas['fsdp'][name], emas['ddp'][name], rtol=1e-5, atol=1e-5, msg=name)


def _free_port():
    """A TCP port nobody listens on now (other suites' torchrun runs may be using fixed ones)."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _cmd(data, out, epochs, nproc=2, fsdp=True, extra=()):
    launch = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port',
              str(_free_port())] if nproc > 1 else [sys.executable]
    return launch + ['main.py', '--data-path', data, '--output', out, '--batch-size', str(BATCH), '--device', 'cpu',
                     '--disable_amp', *(['--fsdp'] if fsdp else []), '--opts', *TINY, *PLAIN,
                     'TRAIN.EPOCHS', str(epochs), *extra]


def _run(cmd, timeout=240):
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _exported(run_dir, name, tmp_path):
    from utils.checkpoint import export_sharded_model
    path = str(tmp_path / f'{os.path.basename(os.path.dirname(os.path.dirname(run_dir)))}_{name}.pth')
    return export_sharded_model(os.path.join(run_dir, name), path), path


def _metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [(m['epoch'], m['val_acc1'], m['val_loss']) for m in map(json.loads, f)]


@pytest.fixture(scope='module')
def reference(digits, tmp_path_factory):
    """An uninterrupted 3-epoch FSDP run (2 processes)."""
    out = str(tmp_path_factory.mktemp('fsdp_reference'))
    _run(_cmd(digits, out, 3))
    return os.path.join(out, MODEL_DIR)


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_sharded_checkpoint_resumes_exactly_with_2_and_carries_on_with_1(digits, reference, tmp_path):
    out = str(tmp_path / 'run')
    run_dir = os.path.join(out, MODEL_DIR)
    _run(_cmd(digits, out, 2))
    names = set(os.listdir(run_dir))
    assert {'ckpt_epoch_0', 'ckpt_epoch_1', 'ckpt_best', 'ckpt_last'} <= names
    assert os.readlink(os.path.join(run_dir, 'ckpt_last')) == 'ckpt_epoch_1'
    assert {'.metadata', 'train_state.pth', '__0_0.distcp', '__1_0.distcp'} <= set(
        os.listdir(os.path.join(run_dir, 'ckpt_epoch_1')))
    meta = torch.load(os.path.join(run_dir, 'ckpt_epoch_1', 'train_state.pth'), weights_only=True)
    assert meta['rng']['world_size'] == 2 and meta['model'] is None and meta['optimizer_groups']['param_groups']
    result = _run(_cmd(digits, out, 3))
    assert 'starting at epoch 2' in result.stdout
    assert _metrics(run_dir) == _metrics(reference)
    resumed, _ = _exported(run_dir, 'ckpt_epoch_2', tmp_path)
    straight, exported = _exported(reference, 'ckpt_epoch_2', tmp_path)
    _assert_same_weights(resumed, straight)
    # scripts/export.py (and predict.py) read a sharded directory directly, with the config stored in it
    from safetensors.torch import load_file

    from scripts import export
    assert export.main(['--resume', os.path.join(reference, 'ckpt_best'), '--safetensors',
                        str(tmp_path / 'best.safetensors')]) == 0
    best_epoch = max(_metrics(reference), key=lambda m: (m[1], -m[0]))[0]  # the first epoch with the top accuracy
    _assert_same_weights(load_file(str(tmp_path / 'best.safetensors')),
                         _exported(reference, f'ckpt_epoch_{best_epoch}', tmp_path)[0])
    # --eval of the exported file reproduces the epoch's logged accuracy (in one process, no FSDP)
    result = _run([sys.executable, 'main.py', '--data-path', digits, '--output', str(tmp_path / 'eval'),
                   '--batch-size', str(BATCH), '--device', 'cpu', '--disable_amp', '--eval', '--resume', exported,
                   '--opts', *TINY])
    epoch2 = json.loads(open(os.path.join(reference, 'metrics.jsonl')).read().splitlines()[2])
    assert f" * Acc@1 {epoch2['val_acc1']:.3f} Acc@5 {epoch2['val_acc5']:.3f}" in result.stdout
    # ... and what a plain loop over the 16 images with the exported weights gives
    from helpers import folder_images, parse_eval_line, plain_accuracy
    acc1, acc5, loss, n = plain_accuracy(torch.load(exported, weights_only=True)['model'], TINY,
                                         folder_images(os.path.join(digits, 'val')))
    assert n == 16 and f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss " in result.stdout
    assert parse_eval_line(result.stdout)[2] == pytest.approx(loss, abs=2e-4)
    # one process, no FSDP, from the 2-process sharded checkpoint (model, optimizer, EMA, scheduler)
    result = _run(_cmd(digits, out, 4, nproc=1, fsdp=False))
    assert 'starting at epoch 3' in result.stdout and 'EMA' in result.stdout
    assert [m[0] for m in _metrics(run_dir)] == [0, 1, 2, 3]


def _descendants(pid):
    """``pid``'s child processes, recursively (torchrun starts its workers in sessions of their own)."""
    found = []
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return found
    for child in children:
        found += [child] + _descendants(child)
    return found


def _kill_tree(pid):
    """SIGKILL torchrun and every worker at once, as a node failure would."""
    for p in [pid] + _descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_sigterm_then_sigkill_mid_training_or_mid_save_then_resume_matches_uninterrupted(digits, reference, tmp_path):
    """A sharded save after every update. SIGTERM to torchrun: the ranks finish the update, save a mid-epoch
    checkpoint and exit 143. Then the whole launch (torchrun and both ranks, found through /proc) is SIGKILLed at
    a random point (in training or in a save). Auto-resume ends with the uninterrupted run's weights and
    accuracies."""
    out = str(tmp_path)
    run_dir = os.path.join(out, MODEL_DIR)
    cmd = _cmd(digits, out, 3, extra=['TRAIN.SAVE_EVERY_STEPS', '1'])
    rng = random.Random(0)
    texts = []
    for sig, wanted in ((signal.SIGTERM, 3), (signal.SIGKILL, rng.randint(1, 2))):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        seen, lines = 0, []
        try:
            for line in proc.stdout:
                lines.append(line)
                if 'Train: [' in line:
                    seen += 1
                    if seen == wanted and sig == signal.SIGTERM:
                        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to the ranks
                    elif seen == wanted:
                        time.sleep(rng.uniform(0.0, 0.3))  # lands in the save that follows, or after it
                        _kill_tree(proc.pid)
                        break
            lines.append(proc.communicate(timeout=120)[0] or '')
        finally:
            if proc.poll() is None:
                _kill_tree(proc.pid)
                proc.wait()
        texts.append(''.join(lines))
        assert seen == wanted, texts[-1][-3000:]
    assert 'preempted (SIGTERM)' in texts[0] and '(exit code 143)' in texts[0], texts[0][-3000:]
    assert f"--resume {os.path.join(run_dir, 'ckpt_last')}" in texts[0]
    assert 'resumed from' in texts[1] and '_update_' in texts[1]  # the SIGTERM's mid-epoch checkpoint
    result = _run(cmd)
    assert 'resumed from' in result.stdout
    assert _metrics(run_dir) == _metrics(reference)
    _assert_same_weights(_exported(run_dir, 'ckpt_epoch_2', tmp_path)[0],
                         _exported(reference, 'ckpt_epoch_2', tmp_path)[0])
    assert not [n for n in os.listdir(run_dir) if n.endswith(('.tmp', '.old'))]
    mid = [n for n in os.listdir(run_dir) if '_update_' in n]
    assert not mid, mid  # superseded mid-epoch directories are pruned


# ----------------------------------------------------------------------------- fast checks

def test_fsdp_in_one_process_trains_like_plain_training_and_resumes(digits, tmp_path):
    """One process, no torchrun (a one-rank group and mesh): an epoch, then a resume for a second one, ends with
    the metrics and weights of two epochs of plain one-process training."""
    import main
    from utils.checkpoint import export_sharded_model

    def run(out, epochs, fsdp):
        code = main.main(['--data-path', digits, '--output', str(out), '--batch-size', str(BATCH), '--device', 'cpu',
                          '--disable_amp', *(['--fsdp'] if fsdp else []), '--opts', *TINY, *PLAIN,
                          'TRAIN.EPOCHS', str(epochs)])
        assert code == 0 and not dist.is_initialized()

    run(tmp_path / 'fsdp', 1, True)
    run(tmp_path / 'fsdp', 2, True)
    run(tmp_path / 'plain', 2, False)
    fsdp_dir, plain_dir = (os.path.join(tmp_path, name, MODEL_DIR) for name in ('fsdp', 'plain'))
    assert 'starting at epoch 1' in open(os.path.join(fsdp_dir, 'log_rank0.txt')).read()
    for a, b in zip(_metrics(fsdp_dir), _metrics(plain_dir), strict=True):
        assert a[0] == b[0] and a[1] == b[1] and a[2] == pytest.approx(b[2], rel=1e-5)
    sharded = export_sharded_model(os.path.join(fsdp_dir, 'ckpt_epoch_1'), str(tmp_path / 'exported.pth'))
    plain = torch.load(os.path.join(plain_dir, 'ckpt_epoch_1.pth'), weights_only=True)['model']
    assert sharded.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(sharded[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_two_process_sharded_checkpoint_resumes_with_fsdp_in_one_process(digits, reference, tmp_path):
    """The same --fsdp command carries a 2-process run on in one process (a one-rank mesh reads the shards)."""
    import shutil
    out = tmp_path / 'run'
    shutil.copytree(os.path.dirname(os.path.dirname(reference)), out)
    result = _run(_cmd(digits, str(out), 4, nproc=1))
    assert 'starting at epoch 3' in result.stdout and 'FSDP over 1 processes' in result.stdout
    run_dir = os.path.join(out, MODEL_DIR)
    assert [m[0] for m in _metrics(run_dir)] == [0, 1, 2, 3]
    assert 'ckpt_epoch_3' in os.listdir(run_dir)


def test_fsdp_cpu_offload_on_the_cpu_is_an_error_naming_the_key(digits, tmp_path, capsys, monkeypatch):
    import main
    monkeypatch.setenv('WORLD_SIZE', '2')  # past the process-count check; the offload check comes first
    monkeypatch.setattr('utils.distributed.init_distributed', lambda *a, **k: SimpleNamespace(
        rank=0, world_size=2, local_rank=0, device=torch.device('cpu'), is_main=True, distributed=True))
    code = main.main(['--data-path', digits, '--output', str(tmp_path), '--device', 'cpu', '--fsdp',
                      '--opts', *TINY, 'TRAIN.FSDP.CPU_OFFLOAD', 'True'])
    err = capsys.readouterr().err
    assert code == 2 and 'TRAIN.FSDP.CPU_OFFLOAD' in err and err.count('\n') == 1


def test_fsdp_with_apex_is_a_config_error():
    from config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r'TRAIN.FSDP.ENABLE \(--fsdp\).*AMP_OPT_LEVEL O1'):
        load_config(opts=['TRAIN.FSDP.ENABLE', 'True', 'AMP_OPT_LEVEL', 'O1'])


def _plain_sharded_checkpoint(path, epoch=0, step=0):
    """A sharded checkpoint directory as CheckpointManager writes it, from one process (no process group)."""
    import torch.nn as nn

    from utils import checkpoint as ckpt
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    optimizer.step()
    state = ckpt.TrainState(model, optimizer, epoch=epoch + 1, update=step)
    manager = ckpt.CheckpointManager(path, 2)
    manager.save_sharded(ckpt.build_checkpoint(state, {}, ckpt.gather_rng_states(), weights=False), state,
                         'last' if step else 'epoch')
    return model, optimizer


def test_kill_mid_save_leaves_previous_checkpoint_in_use(tmp_path):
    """What a kill during a sharded save leaves (a temporary directory with shards but no metadata, or a
    directory missing its metadata) is never resumed from; the next start removes the temporary directory."""
    from utils import checkpoint as ckpt
    _plain_sharded_checkpoint(str(tmp_path), epoch=0)
    _plain_sharded_checkpoint(str(tmp_path), epoch=0, step=1)  # a mid-epoch save, 1 update into epoch 1
    assert os.readlink(tmp_path / 'ckpt_last') == 'ckpt_epoch_1_update_1'
    partial = tmp_path / '.ckpt_epoch_1_update_2.tmp'
    partial.mkdir()
    (partial / '__0_0.distcp').write_bytes(b'half of a shard')
    broken = tmp_path / 'ckpt_epoch_1_update_3'  # e.g. copied by hand without its metadata
    broken.mkdir()
    (broken / 'train_state.pth').write_bytes(b'')
    path, state = ckpt.auto_resume(str(tmp_path))
    assert path == str(tmp_path / 'ckpt_epoch_1_update_1') and (state['epoch'], state['step']) == (0, 1)
    assert ckpt.remove_stale_temp_files(str(tmp_path)) == ['.ckpt_epoch_1_update_2.tmp']
    model = torch.nn.Linear(3, 2)
    saved, saved_optimizer = _plain_sharded_checkpoint(str(tmp_path / 'again'), epoch=2)
    restored = ckpt.TrainState(model, torch.optim.AdamW(model.parameters()))
    ckpt.restore_training_state(ckpt.load_checkpoint_file(str(tmp_path / 'again' / 'ckpt_epoch_2')), restored)
    assert restored.epoch == 3 and torch.equal(model.weight, saved.weight)
    for index, moments in saved_optimizer.state_dict()['state'].items():  # the saved moments, not fresh zeros
        for key, value in moments.items():
            assert torch.equal(restored.optimizer.state_dict()['state'][index][key], value), (index, key)


def test_auto_resume_skips_a_sharded_checkpoint_with_a_damaged_shard(tmp_path, caplog):
    from utils import checkpoint as ckpt
    _plain_sharded_checkpoint(str(tmp_path), epoch=0)
    _plain_sharded_checkpoint(str(tmp_path), epoch=1)
    shard = tmp_path / 'ckpt_epoch_1' / '__0_0.distcp'
    shard.write_bytes(shard.read_bytes()[:50])
    with caplog.at_level('WARNING'):
        path, state = ckpt.auto_resume(str(tmp_path))
    assert path == str(tmp_path / 'ckpt_epoch_0') and state['epoch'] == 0
    assert 'ckpt_epoch_1' in caplog.text and 'truncated' in caplog.text
    shard.unlink()
    with pytest.raises(ckpt.CheckpointError, match='__0_0.distcp is missing'):
        ckpt.load_checkpoint_file(str(tmp_path / 'ckpt_epoch_1'))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_pickles_in_a_sharded_checkpoint_are_refused(tmp_path):
    """A DCP directory whose .metadata (read by DCP with plain pickle) or train_state.pth carries code: refused
    with a CheckpointError naming the directory; the code never runs."""
    import pickle

    from utils import checkpoint as ckpt
    _plain_sharded_checkpoint(str(tmp_path), epoch=0)
    directory = tmp_path / 'ckpt_epoch_0'
    marker = str(tmp_path / 'PWNED')
    original = (directory / '.metadata').read_bytes()
    (directory / '.metadata').write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ckpt.CheckpointError, match=r'refusing to load (io|builtins)\.open'):
        ckpt.export_sharded_model(str(directory), str(tmp_path / 'out.pth'))
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ckpt.CheckpointError, match='ckpt_epoch_0'):
        ckpt.load_model_state(model, ckpt.load_checkpoint_file(str(directory)))
    (directory / '.metadata').write_bytes(original)
    torch.save({'epoch': 0, 'x': _Payload(marker)}, directory / 'train_state.pth')
    with pytest.raises(ckpt.UnsafeCheckpointError):
        ckpt.auto_resume(str(tmp_path))
    assert not os.path.exists(marker)


def test_swinv2_huge_and_giant_configs_have_the_paper_sizes():
    """SwinV2-H 658M and SwinV2-G 3.0B parameters with a 1000-class head (the SwinV2 paper's counts), built on
    the meta device; their 22K files as the official 22K configs are named and set up."""
    import models
    from config import load_config
    for name, millions in (('huge', 658.0), ('giant', 3001.9)):
        config = load_config(os.path.join(ROOT, f'configs/swinv2/swinv2_{name}_patch4_window12_192_22k.yaml'),
                             ['MODEL.NUM_CLASSES', '1000'])
        assert config.TRAIN.FSDP.ENABLE and config.TRAIN.USE_CHECKPOINT
        with torch.device('meta'):
            model = models.build_model(config)
        assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 0.1


def test_estimate_memory_divides_by_the_world_size_and_checkpointing_keeps_less(capsys):
    from scripts import estimate_memory
    from config import load_config
    config = load_config(opts=['MODEL.TYPE', 'swinv2', 'MODEL.SWINV2.EMBED_DIM', '32', 'MODEL.SWINV2.DEPTHS', '[2,2]',
                               'MODEL.SWINV2.NUM_HEADS', '[2,4]', 'MODEL.SWINV2.WINDOW_SIZE', '4',
                               'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', '[0,0]', 'DATA.IMG_SIZE', '64'])
    rows = estimate_memory.estimate(config, world_size=4, batch_size=2, amp_dtype=None)
    info, ddp, fsdp, ckpt = rows['_info'], rows['ddp'], rows['fsdp'], rows['fsdp_ckpt']
    # the bytes worked out by hand: fp32 weights and gradients (4 B), two fp32 AdamW moments (8 B) per parameter;
    # under FSDP a quarter of each, plus the largest block (the last stage's, width 64, 4 heads) gathered twice
    # in fp32 and its unsharded fp32 gradient
    from helpers import swin_block_parameter_count, swin_parameter_count
    n = swin_parameter_count('swinv2', 32, (2, 2), (2, 4), 4, 64, 1000)
    block = swin_block_parameter_count('swinv2', 64, 4, 4)
    assert (ddp['weights'], ddp['grads'], ddp['optimizer']) == (4 * n, 4 * n, 8 * n)
    assert (fsdp['weights'], fsdp['grads'], fsdp['optimizer']) == (n + (2 * 4 + 4) * block, n, 2 * n)
    assert (info['params'], info['block_params']) == (n, block)
    assert ddp['weights'] == ddp['grads'] == 4 * info['params'] and ddp['optimizer'] == 8 * info['params']
    assert fsdp['optimizer'] == ddp['optimizer'] / 4 and fsdp['weights'] == ddp['weights'] / 4 + info['gathered']
    assert 0 < ckpt['activations'] < fsdp['activations'] == ddp['activations']
    # twice the images: up to twice the saved bytes (V2's position-bias tables and masks are per model, not image)
    double = estimate_memory.estimate(config, world_size=4, batch_size=4, amp_dtype=None)['ddp']['activations']
    assert 1.5 < double / ddp['activations'] <= 2.0
    bf16_rows = estimate_memory.estimate(config, world_size=4, batch_size=2, amp_dtype='bfloat16')
    bf16 = bf16_rows['ddp']['activations']
    assert bf16 < 0.8 * ddp['activations']
    assert bf16_rows['fsdp']['weights'] == n + (2 * 2 + 4) * block  # blocks gathered in bf16, fp32 gradient
    cfg = os.path.join(ROOT, 'configs/swinv2/swinv2_tiny_patch4_window8_256.yaml')
    assert estimate_memory.main(['--cfg', cfg, '--world-size', '2', '--batch-size', '1']) == 0
    out = capsys.readouterr().out
    assert 'DDP' in out and 'FSDP + checkpointing' in out
