"""Frozen parameters (``TRAIN.FREEZE``, ``TRAIN.LINEAR_PROBE``; issue 21).

- fast: pattern rules (fnmatch, ``P`` or ``P.*``), the errors (config types and combinations before torch; a
  pattern that matches nothing, nothing left to train, at model build; through ``main.py``: exit 2 and one
  line), the optimizer's groups (also per layer)
  hold no frozen tensor, an update through ``engine.UpdateStep`` leaves frozen tensors bit-identical with no
  gradient and no optimizer state (EMA on, clipping on), resume refuses optimizer state of another freeze set;
- slow, in process (``mp.spawn``, 2 ranks, gloo): DDP's buckets (its comm hook) and FSDP2's reduce-scatters
  carry no frozen tensor, frozen shards stay bit-identical, FSDP trains the rest as DDP does;
- slow, ``torchrun --nproc_per_node 2`` through ``main.py`` on scikit-learn digits: ``--pretrained`` from a
  10-class checkpoint (head re-initialised) with ``TRAIN.FREEZE ['patch_embed', 'layers.0']``: both ranks end
  with the same weights, frozen tensors equal the file's (``torch.equal``), the others moved, the log says how
  many parameters train; resuming with another freeze set is an error naming it. With ``--fsdp``: the sharded
  checkpoint's frozen tensors (model and EMA, all ranks' shards) are the initial ones after a resumed run.
"""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import subprocess_env, write_digits_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join('swin_tiny_patch4_window7_224', 'default')
TINY = ['MODEL.SWIN.EMBED_DIM', '16', 'MODEL.SWIN.DEPTHS', '[1,1]', 'MODEL.SWIN.NUM_HEADS', '[1,2]',
        'MODEL.SWIN.WINDOW_SIZE', '4', 'DATA.IMG_SIZE', '32', 'MODEL.NUM_CLASSES', '4', 'MODEL.DROP_PATH_RATE',
        '0.0']
PLAIN = ['AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0', 'AUG.AUTO_AUGMENT', 'none', 'AUG.REPROB', '0.0',
         'AUG.COLOR_JITTER', '0.0', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.BASE_LR', '0.02', 'PRINT_FREQ', '2',
         'DATA.NUM_WORKERS', '0', 'DATA.DATASET', 'folder']
FREEZE = ['patch_embed', 'layers.0']
FREEZE_OPT = ['TRAIN.FREEZE', "['patch_embed', 'layers.0']"]
CPU = torch.device('cpu')


def _config(*extra):
    from config import load_config
    return load_config(opts=[*TINY, *extra])


def _is_frozen(name, patterns=FREEZE):
    return any(name == p or name.startswith(p + '.') for p in patterns)


# ----------------------------------------------------------------------------- patterns and errors

@pytest.mark.parametrize('name,pattern,expected', [
    ('layers.0.blocks.0.attn.qkv.weight', 'layers.0', True),       # a module path covers what is below it
    ('layers.10.blocks.0.attn.qkv.weight', 'layers.0', False),     # ... at a dot, not as a string prefix
    ('layers.0', 'layers.0', True),                                # an exact name
    ('patch_embed.proj.weight', 'patch_embed', True),
    ('patch_embed_x.weight', 'patch_embed', False),
    ('layers.1.downsample.norm.weight', 'layers.*.downsample', True),  # fnmatch globs
    ('layers.1.blocks.0.attn.relative_position_bias_table', '*.relative_position_bias_table', True),
    ('layers.1.blocks.0.attn.relative_position_bias_table', 'layers.[01].blocks.0.attn', True),
    ('head.weight', 'Head', False),                                # case-sensitive
    ('norm.weight', 'norm', True),
    ('layers.0.blocks.0.norm1.weight', 'norm', False),             # not anywhere in the name
])
def test_pattern_rule(name, pattern, expected):
    from models.freeze import matches
    assert matches(name, pattern) is expected


def test_frozen_names_and_linear_probe():
    from models.freeze import frozen_names
    names = ['patch_embed.proj.weight', 'layers.0.blocks.0.w', 'layers.1.blocks.0.w', 'layers.10.x', 'norm.weight',
             'head.weight', 'head.bias']
    assert frozen_names(names, FREEZE) == ['patch_embed.proj.weight', 'layers.0.blocks.0.w']
    assert frozen_names(names, ['layers.1*']) == ['layers.1.blocks.0.w', 'layers.10.x']
    assert frozen_names(names, linear_probe=True) == names[:5]
    assert frozen_names(names) == []


def test_pattern_matching_nothing_names_it_and_real_names():
    from models.freeze import FreezeError, frozen_names
    names = ['patch_embed.proj.weight', 'layers.0.blocks.0.w', 'layers.1.blocks.0.w', 'norm.weight', 'head.weight']
    with pytest.raises(FreezeError) as e:
        frozen_names(names, ['patch_embed', 'layer.0'])
    msg = str(e.value)
    assert "'layer.0'" in msg and 'did you mean layers.0' in msg
    assert 'patch_embed, layers.0, layers.1, norm, head' in msg


def test_freezing_everything_is_an_error():
    from models.freeze import FreezeError, frozen_names
    names = ['patch_embed.proj.weight', 'head.weight']
    with pytest.raises(FreezeError, match='nothing to train'):
        frozen_names(names, ['patch_embed', 'head'])
    with pytest.raises(FreezeError, match='no parameter named head'):
        frozen_names(['patch_embed.proj.weight', 'norm.weight'], linear_probe=True)


@pytest.mark.parametrize('opts,message', [
    (['TRAIN.FREEZE', 'patch_embed'], "TRAIN.FREEZE must be of type list like its default [], got patch_embed (a list"),
    (['TRAIN.FREEZE', '[1, 2]'], 'TRAIN.FREEZE must hold str values, got [1, 2]'),
    (['TRAIN.FREEZE', "['']"], "TRAIN.FREEZE holds ''"),
    (['TRAIN.FREEZE', "['layers.0 ']"], "TRAIN.FREEZE holds 'layers.0 '"),
    (['TRAIN.LINEAR_PROBE', '1'], 'TRAIN.LINEAR_PROBE must be of type bool'),
    (['TRAIN.LINEAR_PROBE', 'True', *FREEZE_OPT], 'TRAIN.LINEAR_PROBE freezes everything but the head already'),
])
def test_bad_freeze_config_is_refused_before_torch(opts, message):
    from config import ConfigError, load_config, validate_config
    with pytest.raises(ConfigError) as e:
        validate_config(load_config(opts=opts))
    assert message in str(e.value)


def test_linear_probe_for_simmim_pretraining_is_refused():
    from config import ConfigError, load_config, validate_config
    with pytest.raises(ConfigError, match='SimMIM pre-training has none'):
        validate_config(load_config(opts=['TRAIN.LINEAR_PROBE', 'True']), pretrain=True)


def test_good_freeze_config_passes_and_yaml_list_loads(tmp_path):
    from config import load_config, validate_config
    cfg = tmp_path / 'f.yaml'
    cfg.write_text("TRAIN:\n  FREEZE: [patch_embed, 'layers.*.downsample']\n")
    config = load_config(str(cfg))
    validate_config(config)
    assert list(config.TRAIN.FREEZE) == ['patch_embed', 'layers.*.downsample']
    validate_config(load_config(opts=['TRAIN.LINEAR_PROBE', 'True']))


def test_unmatched_pattern_at_model_build_is_a_config_error_naming_the_key():
    import engine
    import models
    from config import ConfigError
    model = models.build_model(_config())
    log = SimpleNamespace(info=lambda *a: None)
    with pytest.raises(ConfigError, match=r"^TRAIN.FREEZE: pattern 'layers.5' matches no parameter"):
        engine.apply_freeze(model, _config('TRAIN.FREEZE', "['layers.5']"), log)
    with pytest.raises(ConfigError, match='^TRAIN.FREEZE: .*nothing to train'):
        engine.apply_freeze(model, _config('TRAIN.FREEZE', "['*']"), log)
    assert all(p.requires_grad for p in model.parameters())  # a refused request changes nothing


def test_main_with_a_pattern_matching_nothing_exits_2_with_one_line(digits, capsys, tmp_path):
    import main
    code = main.main(['--data-path', digits, '--output', str(tmp_path), '--device', 'cpu', '--batch-size', '8',
                      '--disable_amp', '--opts', *TINY, *PLAIN, 'TRAIN.EPOCHS', '1',
                      'TRAIN.FREEZE', "['patch_embed', 'layers.0.block']"])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1, err
    assert err.startswith("error: TRAIN.FREEZE: pattern 'layers.0.block' matches no parameter") and \
        'did you mean layers.0.blocks' in err
    assert not [f for f in os.listdir(os.path.join(tmp_path, MODEL_DIR)) if f.endswith('.pth')]


# ----------------------------------------------------------------------------- optimizer, update, EMA

@pytest.mark.parametrize('layer_decay', ['1.0', '0.8'])
def test_optimizer_groups_hold_only_trainable_parameters(layer_decay):
    import engine
    import models
    from optimizer import build_optimizer
    config = _config(*FREEZE_OPT, 'TRAIN.LAYER_DECAY', layer_decay)
    model = models.build_model(config)
    lines = []
    summary = engine.apply_freeze(model, config, SimpleNamespace(info=lines.append))
    optimizer = build_optimizer(config, model)
    in_groups = [n for g in optimizer.param_groups for n in g['param_names']]
    trainable = [n for n, p in model.named_parameters() if not _is_frozen(n)]
    assert sorted(in_groups) == sorted(trainable) and len(in_groups) == len(set(in_groups))
    ids = {id(p) for g in optimizer.param_groups for p in g['params']}
    assert not any(id(p) in ids for n, p in model.named_parameters() if _is_frozen(n))
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for n, p in model.named_parameters() if not _is_frozen(n))
    assert (summary.trainable, summary.total) == (train, total) and 0 < train < total
    assert lines == [f"training {train:,} of {total:,} parameters (TRAIN.FREEZE {FREEZE}: "
                     f"{len(summary.frozen)} tensors frozen)"]


def _trained_state(config, updates=3, ema=True):
    """``engine.UpdateStep`` over ``updates`` updates of random data (accumulation 2, clipping on, EMA)."""
    import engine
    import models
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    model = models.build_model(config)
    engine.apply_freeze(model, config, SimpleNamespace(info=lambda *a: None))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(config, model)
    state = engine.TrainState(model, optimizer, build_scheduler(config, optimizer, updates),
                              ema=ModelEmaV3(model, decay=0.5) if ema else None, updates_per_epoch=updates)
    step = engine.UpdateStep(model, state, engine.Precision(CPU),
                             engine.classification_loss(torch.nn.CrossEntropyLoss(), None, CPU), 1.0)
    g = torch.Generator().manual_seed(1)
    grads_seen = {}  # the gradients as the optimizer sees them (a step pre-hook runs before zero_grad)
    optimizer.register_step_pre_hook(lambda opt, *a: grads_seen.update(
        {n: p.grad is not None for n, p in model.named_parameters()}))
    for _ in range(updates):
        step([(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(2)])
    return state, start, grads_seen


@pytest.mark.parametrize('opts,frozen', [
    (FREEZE_OPT, FREEZE),
    (['TRAIN.LINEAR_PROBE', 'True'], ['patch_embed', 'layers', 'norm']),
])
def test_update_leaves_frozen_parameters_bit_identical_without_grad_or_state(opts, frozen):
    config = _config(*opts, 'TRAIN.BASE_LR', '1e-2', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EPOCHS', '1')
    state, start, grads_seen = _trained_state(config)
    model, optimizer = state.model, state.optimizer
    with_state = {id(p) for p in optimizer.state}
    for name, param in model.named_parameters():
        if _is_frozen(name, frozen):
            assert not param.requires_grad and param.grad is None and not grads_seen[name], name
            assert id(param) not in with_state, name
            assert torch.equal(param.detach(), start[name]), name
            assert torch.equal(state.ema.module.state_dict()[name], start[name]), f'EMA {name}'
        else:
            assert grads_seen[name] and id(param) in with_state, name
            assert not torch.equal(param.detach(), start[name]), f'{name} did not train'
    assert len(optimizer.state) == sum(not _is_frozen(n, frozen) for n, _ in model.named_parameters())


def test_resume_with_another_freeze_set_is_an_error_and_the_same_one_resumes():
    import engine
    import models
    from optimizer import build_optimizer
    from utils.checkpoint import CheckpointError, build_checkpoint, restore_training_state
    from config import config_to_dict
    config = _config(*FREEZE_OPT, 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EPOCHS', '1')
    state, _, _ = _trained_state(config, updates=1, ema=False)
    checkpoint = build_checkpoint(state, config_to_dict(config))

    def fresh(opts):
        cfg = _config(*opts)
        model = models.build_model(cfg)
        engine.apply_freeze(model, cfg, SimpleNamespace(info=lambda *a: None))
        return engine.TrainState(model, build_optimizer(cfg, model))

    # 'layers.1' instead of 'layers.0': the same number of tensors per group, which torch would load silently
    for opts in (['TRAIN.FREEZE', "['patch_embed', 'layers.1']"], ['TRAIN.LINEAR_PROBE', 'True'], []):
        with pytest.raises(CheckpointError) as e:
            restore_training_state(checkpoint, fresh(opts), 'ckpt.pth')
        msg = str(e.value)
        assert 'optimizer state is for other trainable parameters' in msg, msg
        assert f"TRAIN.FREEZE {FREEZE}, TRAIN.LINEAR_PROBE False" in msg and '--pretrained ckpt.pth' in msg
    same = fresh(FREEZE_OPT)
    restore_training_state(checkpoint, same, 'ckpt.pth')
    for name, param in same.model.named_parameters():
        assert torch.equal(param, state.model.state_dict()[name]), name
    assert len(same.optimizer.state) == len(state.optimizer.state)


@pytest.mark.fake_cuda
@pytest.mark.parametrize('dtype', [None, torch.float16], ids=['fp32', 'fp16-scaler'])
def test_update_with_frozen_parameters_on_fake_cuda(dtype):
    """The device path with a frozen backbone (tests/fake_cuda.py): the second update (fused AdamW, EMA,
    clipping; GradScaler for fp16) reads nothing on the host and copies nothing blocking; frozen parameters get no
    gradient and no optimizer state there either."""
    import engine
    import models
    from fake_cuda import DEVICE, DeviceOps, fake_cuda, on_fake_cuda
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer
    from timm.utils import ModelEmaV3
    config = _config(*FREEZE_OPT, 'TRAIN.CLIP_GRAD', '5.0')
    with fake_cuda():
        model = on_fake_cuda(lambda: models.build_model(config))
        engine.apply_freeze(model, config, SimpleNamespace(info=lambda *a: None))
        optimizer = build_optimizer(config, model)
        precision = engine.Precision(DEVICE, dtype)
        state = engine.TrainState(model, optimizer, build_scheduler(config, optimizer, 10),
                                  scaler=torch.amp.GradScaler('cuda') if precision.needs_scaler else None,
                                  ema=ModelEmaV3(model, decay=0.999), updates_per_epoch=10)
        step = engine.UpdateStep(model, state, precision,
                                 engine.classification_loss(torch.nn.CrossEntropyLoss(), None, DEVICE), 5.0)
        batch = (torch.empty(4, 3, 32, 32, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE))
        step([batch])
        with DeviceOps() as ops:
            step([batch])
    assert not ops.host_reads and not ops.blocking_copies, ops.report()
    assert ops.launches['_fused_adamw_'] >= 1, ops.report()
    frozen = {id(p) for n, p in model.named_parameters() if _is_frozen(n)}
    assert frozen and not frozen & {id(p) for p in optimizer.state}
    assert len(optimizer.state) == sum(not _is_frozen(n) for n, _ in model.named_parameters())


def test_resume_check_reads_a_sharded_checkpoints_optimizer_groups():
    import engine
    import models
    from utils.checkpoint import CheckpointError, check_same_trainable
    config = _config(*FREEZE_OPT)
    model = models.build_model(config)
    engine.apply_freeze(model, config, SimpleNamespace(info=lambda *a: None))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    sharded = {'sharded_dir': 'ckpt_epoch_0', 'optimizer_groups': {'param_groups': [
        {'params': trainable[:3]}, {'params': trainable[3:]}]}}
    check_same_trainable(sharded, model, 'ckpt_epoch_0')  # the same set: fine
    sharded['optimizer_groups']['param_groups'][1]['params'] = trainable[3:] + ['layers.0.blocks.0.norm1.weight']
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) it trained do not train now \(e.g. layers.0.blocks.0"):
        check_same_trainable(sharded, model, 'ckpt_epoch_0')
    check_same_trainable({'optimizer': {'param_groups': [{'params': [0, 1]}]}}, model)  # no names recorded: no check


# ----------------------------------------------------------------------------- 2 ranks in process: DDP, FSDP2

def _ranks_worker(rank, world, init_file, out_dir):
    """DDP then FSDP2 (sharded Swin blocks), TRAIN.FREEZE patch_embed + layers.0, 2 updates of accumulation 2;
    records what DDP's comm hook and FSDP2's reduce-scatters carried, and the weights (full tensors)."""
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        import engine
        import models
        from lr_scheduler import build_scheduler
        from optimizer import build_optimizer
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_module
        config = _config(*FREEZE_OPT, 'DATA.BATCH_SIZE', '4', 'TRAIN.ACCUMULATION_STEPS', '2', 'TRAIN.EPOCHS', '1',
                         'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.BASE_LR', '1e-2', 'TRAIN.CLIP_GRAD', '0.5')
        g = torch.Generator().manual_seed(1)
        batches = [[(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 4, (4,), generator=g))
                    for _ in range(2)] for _ in range(2)]  # the same on both ranks: enough for these checks
        results = {}
        for kind in ('ddp', 'fsdp'):
            torch.manual_seed(0)
            model = models.build_model(config)
            engine.apply_freeze(model, config, SimpleNamespace(info=lambda *a: None))
            results['start'] = {k: v.clone() for k, v in model.state_dict().items()}
            precision = engine.Precision(CPU)
            if kind == 'fsdp':
                model = engine.fsdp_shard(model, config, precision)
            optimizer = build_optimizer(config, model)
            state = engine.TrainState(model, optimizer, build_scheduler(config, optimizer, 2), updates_per_epoch=2)
            train_model = engine.wrap_for_training(model, config, SimpleNamespace(distributed=True, device=CPU))
            names = {id(p): n for n, p in model.named_parameters()}
            carried = []
            if kind == 'ddp':
                def hook(process_group, bucket):
                    carried.extend(names[id(p)] for p in bucket.parameters())
                    return allreduce_hook(process_group, bucket)
                train_model.register_comm_hook(None, hook)
                original = None
            else:
                original = group_module.foreach_reduce

                def counting(fsdp_params, *args, **kwargs):
                    carried.extend(p._param_fqn for p in fsdp_params)
                    return original(fsdp_params, *args, **kwargs)
                group_module.foreach_reduce = counting
            try:
                step = engine.UpdateStep(train_model, state, precision,
                                         engine.classification_loss(torch.nn.CrossEntropyLoss(), None, CPU), 0.5)
                for micro in batches:
                    step(micro)
            finally:
                if original is not None:
                    group_module.foreach_reduce = original
            from utils.fsdp import optimizer_param_groups
            results[kind] = {
                'carried': carried,
                'groups': optimizer_param_groups(model, optimizer),  # what a sharded checkpoint records
                'requires_grad': {n: p.requires_grad for n, p in model.named_parameters()},
                'state_names': sorted(names[id(p)] for p in optimizer.state),
                # full tensors on every rank (with cpu_offload only rank 0 would get them)
                'weights': {k: v.clone() for k, v in get_model_state_dict(
                    model, options=StateDictOptions(full_state_dict=True)).items()},
            }
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp('freeze_ranks')
    mp.spawn(_ranks_worker, args=(2, str(out / 'pg_init'), str(out)), nprocs=2, join=True)
    return [torch.load(out / f'rank{r}.pt', weights_only=True) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['ddp', 'fsdp'])
def test_ddp_and_fsdp_reduce_no_frozen_gradient_and_keep_frozen_weights(kind, two_ranks):
    start = two_ranks[0]['start']
    params = [n for n in two_ranks[0][kind]['requires_grad']]
    frozen = [n for n in params if _is_frozen(n)]
    trainable = [n for n in params if not _is_frozen(n)]
    assert frozen and trainable
    for rank, result in enumerate(two_ranks):
        r = result[kind]
        assert r['carried'], f'rank {rank}: no gradient reduction recorded'
        assert not set(r['carried']) & set(frozen), f'rank {rank} reduced frozen gradients'
        assert set(r['carried']) == set(trainable), rank  # every trainable gradient is reduced
        assert [n for n, g in r['requires_grad'].items() if not g] == frozen  # sharding kept requires_grad
        assert r['state_names'] == sorted(trainable)
        for name in frozen:
            assert torch.equal(r['weights'][name], start[name]), f'rank {rank} {kind} {name}'
        for name in trainable:
            assert not torch.equal(r['weights'][name], start[name]), f'rank {rank} {kind} {name} did not train'
    for name in params:  # the ranks agree
        assert torch.equal(two_ranks[0][kind]['weights'][name], two_ranks[1][kind]['weights'][name]), name
    # the names a (sharded) checkpoint records for the optimizer are the trainable ones, as the resume check reads
    recorded = {n for g in two_ranks[0][kind]['groups']['param_groups'] for n in g['params']}
    assert recorded == set(trainable)
    if kind == 'fsdp':  # FSDP trains the trainable part as DDP does (up to the reduction order's rounding)
        for name in trainable:
            torch.testing.assert_close(two_ranks[0]['fsdp']['weights'][name], two_ranks[0]['ddp']['weights'][name],
                                       rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- torchrun through main.py

@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """train/ (64 images) and val/ (32 images) class folders of 4 digit classes, 32 px RGB."""
    return write_digits_folder(tmp_path_factory.mktemp('digits'), 4, 16, 8)


def _launch(args, nproc, out_prefix, timeout=300):
    """``main.py`` under torchrun through ``tests/freeze_worker.py``, which saves each rank's final weights."""
    port = str(29500 + (os.getpid() * 7) % 1000)
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', port]
           if nproc > 1 else [sys.executable])
    cmd += [os.path.join(ROOT, 'tests', 'freeze_worker.py'), out_prefix, *args]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_torchrun_two_processes_pretrained_with_frozen_backbone(digits, tmp_path):
    import models
    from config import load_config
    # a '10-class checkpoint' to fine-tune from: its head does not fit 4 classes and is re-initialised
    torch.manual_seed(123)
    source = models.build_model(load_config(opts=[*TINY, 'MODEL.NUM_CLASSES', '10']))
    pretrained = {k: v for k, v in source.state_dict().items() if 'relative_position_index' not in k
                  and 'attn_mask' not in k}
    torch.save({'model': pretrained}, tmp_path / 'pretrained.pth')
    out = str(tmp_path / 'out')
    args = ['--data-path', digits, '--output', out, '--batch-size', '8', '--device', 'cpu', '--disable_amp',
            '--pretrained', str(tmp_path / 'pretrained.pth'),
            '--opts', *TINY, *PLAIN, *FREEZE_OPT, 'TRAIN.EPOCHS', '2', 'TRAIN.EMA.ENABLE', 'True',
            'TRAIN.EMA.DECAY', '0.5']
    result = _ok(_launch(args, 2, str(tmp_path / 'final')))
    log = open(os.path.join(out, MODEL_DIR, 'log_rank0.txt')).read()
    model = models.build_model(load_config(opts=TINY))
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for n, p in model.named_parameters() if not _is_frozen(n))
    n_frozen = sum(_is_frozen(n) for n, _ in model.named_parameters())
    assert f"training {train:,} of {total:,} parameters (TRAIN.FREEZE {FREEZE}: {n_frozen} tensors frozen)" in log
    assert 'head is re-initialised' in log + result.stdout + result.stderr

    ranks = [torch.load(tmp_path / f'final_rank{r}.pt', weights_only=True) for r in range(2)]
    checkpoint = torch.load(os.path.join(out, MODEL_DIR, 'ckpt_epoch_1.pth'), weights_only=True)
    names = [n for n, _ in model.named_parameters()]
    for name in names:
        assert torch.equal(ranks[0][name], ranks[1][name]), f'ranks differ in {name}'
        assert torch.equal(checkpoint['model'][name], ranks[0][name]), name
        if _is_frozen(name):
            assert torch.equal(ranks[0][name], pretrained[name]), f'frozen {name} changed'
            assert torch.equal(checkpoint['ema'][name], pretrained[name]), f'EMA of frozen {name} changed'
        elif name.startswith('head.'):
            assert not torch.equal(ranks[0][name], torch.zeros_like(ranks[0][name])), f'{name} did not train'
        else:
            assert not torch.equal(ranks[0][name], pretrained[name]), f'{name} did not train'
    trained = sorted(n for g in checkpoint['optimizer']['param_groups'] for n in g['param_names'])
    assert trained == sorted(n for n in names if not _is_frozen(n))
    assert len(checkpoint['optimizer']['state']) == len(trained)

    # Auto-resume of the same folder with another freeze set: refused, naming both sets, nothing trained.
    other = args[:args.index('TRAIN.FREEZE')] + ['TRAIN.FREEZE', "['patch_embed']", 'TRAIN.EPOCHS', '3',
                                                 'TRAIN.EMA.ENABLE', 'True', 'TRAIN.EMA.DECAY', '0.5']
    result = _launch(other, 1, str(tmp_path / 'other'))
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'optimizer state is for other trainable parameters' in result.stderr
    assert "train now that it did not (e.g. layers.0." in result.stderr
    assert f"saved with TRAIN.FREEZE {FREEZE}" in result.stderr
    assert not os.path.exists(os.path.join(out, MODEL_DIR, 'ckpt_epoch_2.pth'))


@pytest.mark.slow
def test_torchrun_two_processes_fsdp_keeps_frozen_shards_and_resumes(digits, tmp_path):
    """``--fsdp`` under torchrun: the sharded checkpoint (every rank's shards) holds the initial weights for
    the frozen tensors, in the model and its EMA, after an epoch and after a resumed second one."""
    import engine
    import models
    from config import load_config
    from utils.checkpoint import read_sharded_model
    config = load_config(opts=TINY)
    initial = engine.build_fsdp_model(config, lambda: models.build_model(config)).state_dict()  # as engine.run
    out = str(tmp_path / 'out')
    args = ['--data-path', digits, '--output', out, '--batch-size', '8', '--device', 'cpu', '--disable_amp',
            '--fsdp', '--opts', *TINY, *PLAIN, *FREEZE_OPT, 'TRAIN.EMA.ENABLE', 'True', 'TRAIN.EMA.DECAY', '0.5']
    _ok(_launch([*args, 'TRAIN.EPOCHS', '1'], 2, str(tmp_path / 'one')))
    result = _ok(_launch([*args, 'TRAIN.EPOCHS', '2'], 2, str(tmp_path / 'two')))
    assert 'starting at epoch 1' in result.stdout + open(os.path.join(out, MODEL_DIR, 'log_rank0.txt')).read()
    directory = os.path.join(out, MODEL_DIR, 'ckpt_epoch_1')
    weights, ema = read_sharded_model(directory), read_sharded_model(directory, ema=True)
    for name, _ in models.build_model(config).named_parameters():
        if _is_frozen(name):
            assert torch.equal(weights[name], initial[name]), f'frozen {name} changed'
            assert torch.equal(ema[name], initial[name]), f'EMA of frozen {name} changed'
        else:
            assert not torch.equal(weights[name], initial[name]), f'{name} did not train'
