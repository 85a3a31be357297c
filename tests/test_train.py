"""End-to-end training through ``main.py``: checkpoints, resume, eval, DDP, exact distributed eval, errors.

Data: scikit-learn digits (4 classes) written as 32 px PNGs; model: a one-block-per-stage Swin with embed dim 16.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from helpers import (folder_images, parse_eval_line, plain_accuracy, run_side_by_side, subprocess_env,
                     write_digits_folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join('swin_tiny_patch4_window7_224', 'default')  # <OUTPUT>/<MODEL.NAME>/<TAG>
TINY = ['DATA.DATASET', 'folder', 'MODEL.SWIN.EMBED_DIM', '16', 'MODEL.SWIN.DEPTHS', '[1,1]',
        'MODEL.SWIN.NUM_HEADS', '[1,2]', 'MODEL.SWIN.WINDOW_SIZE', '4', 'DATA.IMG_SIZE', '32',
        'MODEL.NUM_CLASSES', '4', 'DATA.NUM_WORKERS', '0', 'MODEL.DROP_PATH_RATE', '0.0']
# Plain training: no augmentation randomness that would make the tiny runs slow or noisy.
PLAIN = ['AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0', 'AUG.AUTO_AUGMENT', 'none', 'AUG.REPROB', '0.0',
         'AUG.COLOR_JITTER', '0.0', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.BASE_LR', '0.02', 'PRINT_FREQ', '2',
         'DETERMINISTIC', 'True',
         # A constant LR, so that a 2-epoch run resumed to 3 epochs follows the 3-epoch run's schedule.
         'TRAIN.LR_SCHEDULER.NAME', 'step', 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '100']
BASE_LR, BATCH = 0.02, 16


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """train/ (64 images) and val/ (32 images) class folders of 4 digit classes, 32 px RGB."""
    return write_digits_folder(tmp_path_factory.mktemp('digits'), 4, 16, 8)


def _env():
    return subprocess_env()


def _command(args, nproc=1, port_offset=0):
    if nproc > 1:
        return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port',
                str(29500 + os.getpid() % 1000 + port_offset), 'main.py'] + args
    return [sys.executable, 'main.py'] + args


def _main(args, nproc=1, timeout=240):
    return subprocess.run(_command(args, nproc), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _train_args(data, out, epochs, extra=()):
    return ['--data-path', data, '--output', out, '--batch-size', str(BATCH), '--device', 'cpu', '--disable_amp',
            '--opts', *TINY, *PLAIN, 'TRAIN.EPOCHS', str(epochs), *extra]


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def _weights(path):
    return torch.load(path, weights_only=True)['model']


@pytest.mark.slow
def test_train_resume_eval_single_process(digits, tmp_path):
    out = str(tmp_path / 'out')
    run_dir = os.path.join(out, MODEL_DIR)
    _ok(_main(_train_args(digits, out, 2)))

    names = set(os.listdir(run_dir))
    assert {'ckpt_epoch_0.pth', 'ckpt_epoch_1.pth', 'ckpt_best.pth', 'ckpt_last.pth', 'config.yaml',
            'log_rank0.txt', 'metrics.jsonl'} <= names
    assert glob.glob(os.path.join(run_dir, 'events.out.tfevents.*'))
    log = open(os.path.join(run_dir, 'log_rank0.txt')).read()
    assert 'Train: [1/2]' in log and 'grad_norm' in log and 'img/s' in log and ' * Acc@1 ' in log
    assert 'malloc keeps freed blocks' not in log  # utils.misc.keep_freed_cpu_memory: CPU inference runs only
    metrics = _metrics(run_dir)
    assert [m['epoch'] for m in metrics] == [0, 1]
    assert set(metrics[0]) >= {'epoch', 'train_loss', 'val_acc1', 'val_acc5', 'val_loss', 'lr', 'time'}
    # Linear scaling applied exactly once: 0.02 * 16 * 1 process * 1 accumulation step / 512.
    saved = yaml.safe_load(open(os.path.join(run_dir, 'config.yaml')))
    assert saved['TRAIN']['BASE_LR'] == pytest.approx(BASE_LR * BATCH / 512)
    assert torch.load(os.path.join(run_dir, 'ckpt_epoch_1.pth'), weights_only=True)['config']['TRAIN']['BASE_LR'] \
        == pytest.approx(BASE_LR * BATCH / 512)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(run_dir)
    events.Reload()
    assert {'train/loss', 'train/lr', 'train/grad_norm', 'train/throughput', 'val/acc1', 'val/acc5',
            'val/loss'} <= set(events.Tags()['scalars'])

    # --eval of the epoch-1 checkpoint reproduces that epoch's logged accuracy.
    result = _ok(_main(['--data-path', digits, '--output', str(tmp_path / 'eval'), '--batch-size', str(BATCH),
                        '--device', 'cpu', '--disable_amp', '--eval', '--resume',
                        os.path.join(run_dir, 'ckpt_epoch_1.pth'), '--opts', *TINY]))
    assert f" * Acc@1 {metrics[1]['val_acc1']:.3f} Acc@5 {metrics[1]['val_acc5']:.3f}" in result.stdout
    eval_log = open(os.path.join(tmp_path, 'eval', MODEL_DIR, 'log_rank0.txt')).read()
    assert 'CPU inference: malloc keeps freed blocks of up to 32 MiB' in eval_log
    assert 'Train:' not in result.stdout and not glob.glob(str(tmp_path / 'eval' / MODEL_DIR / '*.pth'))
    # ... and what a plain loop over the 32 images with the checkpoint's weights gives (not the same code)
    _assert_eval_matches_plain_loop(result.stdout, os.path.join(run_dir, 'ckpt_epoch_1.pth'),
                                    os.path.join(digits, 'val'), 32)

    # Resume to 3 epochs (auto-resume) == an uninterrupted 3-epoch run, bit for bit.
    result = _ok(_main(_train_args(digits, out, 3)))
    assert 'starting at epoch 2' in result.stdout and 'Train: [0/3]' not in result.stdout
    assert [m['epoch'] for m in _metrics(run_dir)] == [0, 1, 2]
    straight = str(tmp_path / 'straight')
    _ok(_main(_train_args(digits, straight, 3)))
    resumed = _weights(os.path.join(run_dir, 'ckpt_epoch_2.pth'))
    reference = _weights(os.path.join(straight, MODEL_DIR, 'ckpt_epoch_2.pth'))
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


@pytest.mark.slow
def test_torchrun_two_processes_train_resume_and_exact_eval(digits, tmp_path):
    out = str(tmp_path / 'ddp')
    run_dir = os.path.join(out, MODEL_DIR)
    _ok(_main(_train_args(digits, out, 2), nproc=2))
    assert os.path.exists(os.path.join(run_dir, 'log_rank1.txt'))
    saved = yaml.safe_load(open(os.path.join(run_dir, 'config.yaml')))
    assert saved['TRAIN']['BASE_LR'] == pytest.approx(BASE_LR * BATCH * 2 / 512)  # world size 2, once
    metrics = _metrics(run_dir)
    checkpoint = os.path.join(run_dir, 'ckpt_epoch_1.pth')
    odd = str(tmp_path / 'odd')  # 31 images for the 2-process --eval: shards of 16 and 15, uneven last batches
    shutil.copytree(digits, odd)
    os.remove(os.path.join(odd, 'val', 'digit2', sorted(os.listdir(os.path.join(odd, 'val', 'digit2')))[0]))
    # Side by side (none writes what another reads; the resume only adds epoch 2's files): --eval in one
    # process, --eval over 2 ranks on the odd set, and the 2-process resume to a third epoch.
    eval_one, eval_two, resumed = run_side_by_side([
        _command(['--data-path', digits, '--output', str(tmp_path / 'eval'), '--batch-size', str(BATCH),
                  '--device', 'cpu', '--disable_amp', '--eval', '--resume', checkpoint, '--opts', *TINY]),
        _command(['--data-path', odd, '--output', str(tmp_path / 'eval2'), '--batch-size', '5', '--device', 'cpu',
                  '--disable_amp', '--eval', '--resume', checkpoint, '--opts', *TINY], nproc=2, port_offset=1000),
        _command(_train_args(digits, out, 3), nproc=2)], ROOT, timeout=300)
    # Exact distributed eval: 2 ranks summing counts give the single-process accuracy of the same weights.
    assert f" * Acc@1 {metrics[1]['val_acc1']:.3f} Acc@5 {metrics[1]['val_acc5']:.3f}" in _ok(eval_one).stdout
    _assert_eval_matches_plain_loop(eval_one.stdout, checkpoint, os.path.join(digits, 'val'), 32)
    _assert_eval_matches_plain_loop(_ok(eval_two).stdout, checkpoint, os.path.join(odd, 'val'), 31)

    result = _ok(resumed)
    assert 'starting at epoch 2' in result.stdout
    assert [m['epoch'] for m in _metrics(run_dir)] == [0, 1, 2]
    assert torch.load(os.path.join(run_dir, 'ckpt_epoch_2.pth'), weights_only=True)['rng']['world_size'] == 2

    # Another world size: one process carries on from the 2-process checkpoint.
    result = _ok(_main(_train_args(digits, out, 4)))
    assert 'starting at epoch 3' in result.stdout
    assert [m['epoch'] for m in _metrics(run_dir)] == [0, 1, 2, 3]


def _assert_eval_matches_plain_loop(output, checkpoint, val_dir, count):
    """The `` * Acc@1 .. Acc@5 .. loss ..`` line of ``--eval`` against ``helpers.plain_accuracy`` of the
    checkpoint's weights over the images of ``val_dir`` (one image at a time, the eval transform, no engine)."""
    acc1, acc5, loss, n = plain_accuracy(_weights(checkpoint), TINY, folder_images(val_dir))
    assert n == count
    print(f"plain loop over {n} images: top-1 {acc1:.3f}, top-5 {acc5:.3f}, loss {loss:.4f}")
    assert f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss " in output, output[-2000:]
    assert parse_eval_line(output)[2] == pytest.approx(loss, abs=2e-4)


# ----------------------------------------------------------------------------- DDP equivalence (in process)

def _equivalence_config(batch_size, accumulation):
    from config import load_config
    return load_config(opts=TINY + ['DATA.BATCH_SIZE', str(batch_size), 'TRAIN.ACCUMULATION_STEPS',
                                    str(accumulation), 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EPOCHS', '2',
                                    'TRAIN.BASE_LR', '1e-3', 'MODEL.LABEL_SMOOTHING', '0.0', 'PRINT_FREQ', '100'])


def _train_steps(config, rank, world, out_path):
    """Train one epoch of a fixed random data set in fp32; rank 0 writes the weights to ``out_path``."""
    import engine
    import models
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    torch.manual_seed(0)
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 4, (32,))
    model = models.build_model(config)  # same seed -> same initial weights on every rank
    sampler = DistributedSampler(TensorDataset(images, labels), num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(TensorDataset(images, labels), batch_size=config.DATA.BATCH_SIZE, sampler=sampler,
                        drop_last=True)
    optimizer = build_optimizer(config, model)
    accum = config.TRAIN.ACCUMULATION_STEPS
    state = engine.TrainState(model, optimizer, build_scheduler(config, optimizer, len(loader) // accum),
                              updates_per_epoch=len(loader) // accum)
    train_model = engine.wrap_for_training(model, config, SimpleNamespace(distributed=world > 1,
                                                                          device=torch.device('cpu')))
    cpu = torch.device('cpu')
    loss_fn = engine.classification_loss(torch.nn.CrossEntropyLoss(), None, cpu)
    update_step = engine.UpdateStep(train_model, state, engine.Precision(cpu), loss_fn)
    results = list(engine.train_one_epoch(state, update_step, loader, accum))
    assert len(results) == state.update == 2
    if rank == 0:
        torch.save(model.state_dict(), out_path)


def _ddp_worker(rank, world, init_file, out_path):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        _train_steps(_equivalence_config(batch_size=4, accumulation=2), rank, world, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_with_double_batch(tmp_path):
    """2 ranks x batch 4 x 2 accumulation steps (no_sync on the first) == 1 process x batch 8 x 2 steps."""
    ddp_out, single_out = str(tmp_path / 'ddp.pt'), str(tmp_path / 'single.pt')
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'pg_init'), ddp_out), nprocs=2, join=True)
    _train_steps(_equivalence_config(batch_size=8, accumulation=2), 0, 1, single_out)
    ddp, single = torch.load(ddp_out, weights_only=True), torch.load(single_out, weights_only=True)
    initial = _equivalence_model_init()
    changed = 0
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-5, msg=key)
        changed += int(not torch.equal(single[key], initial[key]))
    assert changed > 10  # the steps really moved the weights


def _equivalence_model_init():
    import models
    torch.manual_seed(0)
    torch.randn(32, 3, 32, 32), torch.randint(0, 4, (32,))
    return models.build_model(_equivalence_config(8, 2)).state_dict()


# ----------------------------------------------------------------------------- clear errors (in process)

def _run_main(args, capsys):
    import main
    code = main.main(args)
    return code, capsys.readouterr().err


def test_unknown_flag_is_named(capsys):
    import main
    with pytest.raises(SystemExit) as info:
        main.parse_args(['--data-path', 'x', '--bogus-flag'])
    assert info.value.code == 2 and '--bogus-flag' in capsys.readouterr().err


def test_help_works(capsys):
    import main
    with pytest.raises(SystemExit) as info:
        main.parse_args(['--help'])
    text = capsys.readouterr().out
    assert info.value.code == 0
    for flag in ('--cfg', '--opts', '--batch-size', '--data-path', '--zip', '--cache-mode', '--pretrained',
                 '--resume', '--accumulation-steps', '--use-checkpoint', '--disable_amp', '--amp-opt-level',
                 '--output', '--tag', '--eval', '--throughput', '--optim', '--fused_window_process',
                 '--fused_layernorm', '--local_rank', '--device', '--trust-checkpoint'):
        assert flag in text, flag


@pytest.mark.parametrize('opts, expected', [
    (['TRAIN.EPOCHZ', '3'], 'TRAIN.EPOCHZ'),
    (['TRAIN.EPOCHS', 'abc'], 'TRAIN.EPOCHS'),
])
def test_bad_opts_exit_2_with_one_line(opts, expected, capsys, tmp_path):
    code, err = _run_main(['--data-path', str(tmp_path), '--output', str(tmp_path), '--opts', *opts], capsys)
    assert code == 2 and expected in err and err.startswith('error: ') and err.count('\n') == 1


def test_missing_data_path_is_named(capsys, tmp_path):
    missing = str(tmp_path / 'no_such_dataset')
    code, err = _run_main(['--data-path', missing, '--output', str(tmp_path / 'o'), '--device', 'cpu',
                           '--opts', *TINY], capsys)
    assert code == 2 and 'no_such_dataset' in err


def test_odd_batch_with_mixup_is_refused(digits, capsys, tmp_path):
    code, err = _run_main(['--data-path', digits, '--output', str(tmp_path), '--device', 'cpu', '--batch-size', '7',
                           '--opts', *TINY], capsys)
    assert code == 2 and 'DATA.BATCH_SIZE = 7' in err and 'even' in err


@pytest.mark.parametrize('precision', [['--disable_amp'], ['--opts', 'AMP_DTYPE', 'float16']])
def test_non_finite_loss_stops_with_message(precision, digits, capsys, tmp_path, monkeypatch):
    import engine

    class NaNLoss(torch.nn.CrossEntropyLoss):
        def forward(self, outputs, targets):
            return super().forward(outputs, targets) * float('nan')
    monkeypatch.setattr(engine, 'build_criterion', lambda config, mixup_fn: NaNLoss())
    args = _train_args(digits, str(tmp_path), 2, ['TRAIN.MAX_NONFINITE_STEPS', '3'])
    if precision[0] != '--disable_amp':
        args = [a for a in args if a != '--disable_amp'] + precision[1:]
    code, err = _run_main(args, capsys)
    assert code == 1
    assert '3 consecutive non-finite' in err and 'epoch 0 step' in err and 'lr ' in err and 'loss nan' in err
    assert 'loss scale' in err
    weights = glob.glob(str(tmp_path / MODEL_DIR / '*.pth'))
    assert not weights  # stopped before any epoch finished


def test_throughput_mode(digits, capsys, tmp_path, monkeypatch):
    import engine
    original = engine.throughput
    monkeypatch.setattr(engine, 'throughput', lambda *a, **k: original(*a, warmup_iters=2, timed_iters=3))
    import utils.misc
    kept = []  # the allocator setting is process-wide: recorded here, not applied to the test process
    monkeypatch.setattr(utils.misc, 'keep_freed_cpu_memory', lambda: kept.append(True) or True)
    code, _ = _run_main(['--data-path', digits, '--output', str(tmp_path), '--device', 'cpu', '--throughput',
                         '--batch-size', '8', '--amp-opt-level', 'O1', '--opts', *TINY], capsys)
    assert code == 0
    text = open(glob.glob(str(tmp_path / MODEL_DIR / 'log_rank0.txt'))[0]).read()
    assert 'batch_size 8 throughput ' in text
    assert kept == [True] and 'CPU inference: malloc keeps freed blocks' in text
    apex_missing = engine.apex_amp_module(SimpleNamespace(AMP_OPT_LEVEL='O1', AMP_ENABLE=True)) is None
    assert ('apex (apex.amp) is not installed; using native torch.amp' in text) == apex_missing


def test_mid_epoch_checkpoint_resumes_where_it_stopped(digits, capsys, tmp_path, monkeypatch):
    """SAVE_EVERY_STEPS writes ckpt_last.pth mid-epoch; a crash before the epoch ends resumes from it."""
    import engine

    def crash(*args, **kwargs):
        raise KeyboardInterrupt('simulated crash after training, before validation')
    monkeypatch.setattr(engine, 'validate', crash)
    args = _train_args(digits, str(tmp_path), 1, ['TRAIN.SAVE_EVERY_STEPS', '3'])
    with pytest.raises(KeyboardInterrupt):
        _run_main(args, capsys)
    run_dir = tmp_path / MODEL_DIR
    state = torch.load(run_dir / 'ckpt_last.pth', weights_only=True)
    assert (state['epoch'], state['step']) == (-1, 3)  # 64 images / 16 = 4 updates; saved after the 3rd
    monkeypatch.undo()
    code, _ = _run_main(args, capsys)
    assert code == 0
    log = open(run_dir / 'log_rank0.txt').read()
    assert 'starting at epoch 0, update 3' in log
    assert 'Train: [0/1][3/4]' in log.split('starting at epoch 0, update 3')[1]
    assert torch.load(run_dir / 'ckpt_epoch_0.pth', weights_only=True)['step'] == 0


def test_ema_copies_integer_buffers_and_averages_floats():
    """The EMA (timm ModelEmaV3, as the engine builds it) copies integer buffers instead of averaging them."""
    from timm.utils import ModelEmaV3
    model = torch.nn.Linear(2, 2)
    model.register_buffer('counter', torch.tensor([7], dtype=torch.long))
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(2.0)
        model.counter.fill_(10)
    before = ema.module.weight.clone()
    ema.update(model)
    assert ema.module.counter.item() == 10
    torch.testing.assert_close(ema.module.weight, before + 1.0)
