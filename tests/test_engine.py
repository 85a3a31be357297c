"""The engine's update step on CPU: no host syncs inside an update, accumulation without extra all-reduces under
torch.compile, DDP without buffer broadcasts, exact validation without per-batch copies, EMA precision under
apex O2, and the distributed set-up (issue 11, faults 1-4, 8 and 9)."""
import contextlib
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

import engine
from utils.checkpoint import TrainState

TINY = ['DATA.DATASET', 'folder', 'MODEL.SWIN.EMBED_DIM', '16', 'MODEL.SWIN.DEPTHS', '[1,1]',
        'MODEL.SWIN.NUM_HEADS', '[1,2]', 'MODEL.SWIN.WINDOW_SIZE', '4', 'DATA.IMG_SIZE', '32',
        'MODEL.NUM_CLASSES', '4', 'DATA.NUM_WORKERS', '0', 'MODEL.DROP_PATH_RATE', '0.0',
        'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EPOCHS', '2', 'PRINT_FREQ', '1000']
CPU = torch.device('cpu')


class HostReads(TorchFunctionMode):
    """Counts the calls that read a device value on the host (a sync on CUDA) or copy a host value to the
    device: what a GPU run would wait for. On the CPU the same calls run, so they can be counted here."""
    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.nonzero}
    CREATES = {torch.tensor, torch.as_tensor}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS or func in self.CREATES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _config(*extra):
    from config import load_config
    return load_config(opts=[*TINY, *extra])


def _state_and_step(config, train_model=None, loader_len=4, dtype=None):
    import models
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer
    torch.manual_seed(0)
    model = models.build_model(config)
    optimizer = build_optimizer(config, model)
    accum = config.TRAIN.ACCUMULATION_STEPS
    precision = engine.Precision(CPU, dtype)
    state = TrainState(model, optimizer, build_scheduler(config, optimizer, loader_len // accum),
                       scaler=torch.amp.GradScaler('cpu') if precision.needs_scaler else None,
                       updates_per_epoch=loader_len // accum)
    loss_fn = engine.classification_loss(torch.nn.CrossEntropyLoss(), None, CPU)
    return state, engine.UpdateStep(model if train_model is None else train_model, state, precision, loss_fn, config.TRAIN.CLIP_GRAD)


def _loader(n_batches, batch_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n_batches * batch_size, 3, 32, 32, generator=g),
                         torch.randint(0, 4, (n_batches * batch_size,), generator=g))
    return DataLoader(data, batch_size=batch_size)


# ----------------------------------------------------------------------------- fault 4: no host sync per update

@pytest.mark.parametrize('dtype,clip', [(None, '5.0'), (torch.bfloat16, '0.0'), (torch.float16, '5.0')],
                         ids=['fp32-clip', 'bf16', 'fp16-scaler-clip'])
def test_update_step_reads_nothing_on_the_host(dtype, clip):
    """fp32 and bf16 skip non-finite updates on the device (fused AdamW's found_inf); fp16 through GradScaler."""
    config = _config('TRAIN.CLIP_GRAD', clip)
    state, update_step = _state_and_step(config, dtype=dtype)
    assert state.optimizer.defaults.get('fused'), "AdamW must be fused: it skips on the device"
    batches = list(_loader(4))
    update_step([batches[0]])  # warm-up: lazy state creation may read the host once
    with HostReads() as reads:
        for batch in batches[1:]:
            update_step([batch])
    assert reads.count == 0
    assert state.update == 4


def test_nonfinite_update_is_skipped_on_the_device():
    config = _config()
    state, update_step = _state_and_step(config)
    images, targets = next(iter(_loader(1)))
    update_step([(images, targets)])
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    moments = {k: v.clone() for k, v in state.optimizer.state[next(iter(state.optimizer.state))].items()}
    loss, norm, bad = update_step([(images * float('nan'), targets)])
    assert bool(bad) and not torch.isfinite(norm)
    for key, value in state.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in state.optimizer.state[next(iter(state.optimizer.state))].items():
        assert torch.equal(value, moments[key]), key  # step count and moments untouched too
    loss, norm, bad = update_step([(images, targets)])
    assert not bool(bad)
    assert any(not torch.equal(v, before[k]) for k, v in state.model.state_dict().items())


def test_sgd_falls_back_to_one_read_per_update():
    """An optimizer that cannot skip on the device still skips non-finite updates (with one host read)."""
    config = _config('TRAIN.OPTIMIZER.NAME', 'sgd')
    state, update_step = _state_and_step(config)
    images, targets = next(iter(_loader(1)))
    update_step([(images, targets)])  # warm-up: lazy state creation may read the host once
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    with HostReads() as reads:
        _, _, bad = update_step([(images * float('nan'), targets)])
    assert reads.count == 1  # the skip decision
    assert bool(bad)
    assert all(torch.equal(v, before[k]) for k, v in state.model.state_dict().items())
    batches = list(_loader(3, seed=1))
    with HostReads() as reads:
        for batch in batches:
            update_step([batch])
    assert reads.count == 3  # one per finite update too
    assert not all(torch.equal(v, before[k]) for k, v in state.model.state_dict().items())


# ----------------------------------------------------------------------------- fault 3: validation copies

def test_validate_does_not_copy_a_host_number_per_batch():
    config = _config()
    state, _ = _state_and_step(config)
    counts = []
    for n_batches in (2, 6):
        with HostReads() as reads:
            engine.validate(config, _loader(n_batches), state.model, engine.Precision(CPU))
        counts.append(reads.count)
    assert counts[0] == counts[1], f"host reads/copies grow with the batch count: {counts}"


def _known_loader(batch_size):
    from helpers import known_logits_case
    images, targets, logits, expected = known_logits_case()
    return DataLoader(TensorDataset(images, targets), batch_size=batch_size), logits, expected


@pytest.mark.parametrize('batch_size', [1, 4, 13])
def test_validate_gives_known_top1_top5_and_loss(batch_size):
    """10 classes, 13 images whose true labels rank 0..9 by design (tests/helpers.py): top-1 4/13, top-5 10/13
    and the mean CE worked out by hand, whatever the batching (a last batch of 1 included)."""
    from helpers import fixed_logits_model
    loader, logits, (acc1, acc5, loss) = _known_loader(batch_size)
    config = _config('MODEL.NUM_CLASSES', '10')
    got = engine.validate(config, loader, fixed_logits_model(logits), engine.Precision(CPU))
    assert (acc1, acc5) == (100.0 * 4 / 13, 100.0 * 10 / 13)  # the case is what its comment says
    assert got[:2] == (acc1, acc5)
    assert got[2] == pytest.approx(loss, rel=1e-6)


def test_validate_prints_progress_with_eta(caplog):
    from helpers import TRUE_LABEL_RANKS, fixed_logits_model, known_figures
    config = _config('PRINT_FREQ', '2', 'MODEL.NUM_CLASSES', '10')
    loader, logits, _ = _known_loader(3)  # 5 batches: 3, 3, 3, 3, 1 images
    with caplog.at_level('INFO', logger='swin'):
        acc1, acc5, loss = engine.validate(config, loader, fixed_logits_model(logits), engine.Precision(CPU))
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith('Test: [2/5]\teta ') and 'loss ' in line and 'Acc@1 ' in line for line in lines)
    assert any(line.startswith('Test: [4/5]') for line in lines)
    assert lines[-1] == f' * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.4f}'
    # the running figures of the progress lines: this rank's first 6 and 12 images
    for done, images in ((2, 6), (4, 12)):
        line = next(x for x in lines if x.startswith(f'Test: [{done}/5]'))
        run1, run5, run_loss = known_figures(TRUE_LABEL_RANKS[:images])
        assert f'\tloss {run_loss:.4f}\tAcc@1 {run1:.3f}\tAcc@5 {run5:.3f}' in line, line
    assert lines[-1] == ' * Acc@1 {:.3f} Acc@5 {:.3f} loss {:.4f}'.format(*known_figures(TRUE_LABEL_RANKS))


@pytest.mark.slow
def test_validate_under_torchrun_with_uneven_shards_gives_the_whole_sets_figures(tmp_path):
    """torchrun, 2 CPU processes (gloo): rank 0 validates 8 of the known-logits images, rank 1 the other 5 (and
    an empty batch); both return the figures of all 13, not of their own shard or a mean of the two."""
    import json
    import subprocess
    import sys

    from helpers import known_logits_case, subprocess_env
    out = tmp_path / 'result.json'
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                             '--master_port', str(_free_port()), os.path.join(root, 'tests', 'validate_worker.py'),
                             str(out)], cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    acc1, acc5, loss = json.loads(out.read_text())
    expected = known_logits_case()[3]
    assert (acc1, acc5) == expected[:2]
    assert loss == pytest.approx(expected[2], rel=1e-6)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- faults 1, 2: DDP

def _broadcasts_buffers(ddp):
    """Whether DDP re-sends buffers before every forward (the attribute was renamed in torch 2.12)."""
    return getattr(ddp, 'forward_sync_buffers', None) or getattr(ddp, 'broadcast_buffers', None)


def _count_allreduces(rank, world, init_file, results, accum, compile_model):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        config = _config('TRAIN.ACCUMULATION_STEPS', str(accum), 'COMPILE', str(compile_model))
        calls = []

        def counting_hook(state, bucket):
            calls.append(bucket.index())
            return allreduce_hook(state, bucket)

        import models
        torch.manual_seed(0)
        model = models.build_model(config)
        original = torch.compile
        torch.compile = lambda m, **kw: original(m, backend='eager', **kw)  # no C++ toolchain needed
        try:
            train_model = engine.wrap_for_training(model, config, SimpleNamespace(distributed=True, device=CPU))
        finally:
            torch.compile = original
        ddp = engine.find_ddp(train_model)
        assert ddp is not None and not _broadcasts_buffers(ddp)
        ddp.register_comm_hook(dist.group.WORLD, counting_hook)
        state, update_step = _state_and_step(config, train_model, loader_len=2 * accum)
        state.model = model
        for _ in engine.train_one_epoch(state, update_step, _loader(2 * accum, seed=rank), accum):
            pass
        results[(accum, rank)] = len(calls)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_ddp_accumulation_all_reduces_once_per_update(tmp_path):
    """COMPILE True + accumulation 2: gradients are all-reduced on the last micro-batch only, as without
    accumulation (the DDP module is found under the compile wrapper)."""
    results = mp.Manager().dict()
    for accum in (1, 2):
        mp.spawn(_count_allreduces, args=(2, str(tmp_path / f'pg{accum}'), results, accum, True), nprocs=2)
    # a model of ~100 KB fills one gradient bucket (DDP's first bucket holds 1 MB): one all-reduce per update
    assert results[(1, 0)] == results[(1, 1)] == 2, dict(results)
    assert results[(2, 0)] == results[(1, 0)] and results[(2, 1)] == results[(1, 1)], dict(results)


def test_ddp_does_not_broadcast_buffers(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "pg"}', rank=0, world_size=1)
    try:
        config = _config()
        import models
        ddp = engine.wrap_for_training(models.build_model(config), config,
                                       SimpleNamespace(distributed=True, device=CPU))
        assert not _broadcasts_buffers(ddp) and engine.find_ddp(ddp) is ddp
        assert engine.find_ddp(torch.nn.Linear(2, 2)) is None
    finally:
        dist.destroy_process_group()


def test_images_per_second_counts_every_rank(monkeypatch, caplog):
    config = _config('PRINT_FREQ', '1', 'DATA.BATCH_SIZE', '4')
    state, update_step = _state_and_step(config)
    monkeypatch.setattr(engine, 'get_world_size', lambda: 8)
    clock = [0.0]
    monkeypatch.setattr(engine.time, 'time', lambda: clock[0])
    train_log = engine.TrainLog(config, state, CPU, engine._LOG, None)
    with caplog.at_level('INFO', logger='swin'):
        for result in engine.train_one_epoch(state, update_step, _loader(4), 1):
            clock[0] += 1.0  # one update a second
            train_log.record(*result)
            break
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Train:')][0]
    assert line.endswith('\t32.0 img/s'), line  # 4 images x 8 ranks in 1 s
    assert '(run left ' in line and '\trss ' in line


# ----------------------------------------------------------------------------- the EMA, through engine.run

def _ema_run(tmp_path, decay, *extra):
    """engine.run for one epoch of 4 updates (16 digits, batch 4) with TRAIN.EMA on; returns the weights before
    and after every update (recorded from outside the engine) and the epoch checkpoint."""
    from helpers import RecordedUpdates, write_digits_folder
    from utils.distributed import DistInfo
    digits = write_digits_folder(tmp_path / 'digits', 4, 4, 2)
    config = _config('TRAIN.EMA.ENABLE', 'True', 'TRAIN.EMA.DECAY', str(decay), 'TRAIN.EPOCHS', '1',
                     'DATA.BATCH_SIZE', '4', 'DATA.DATA_PATH', digits, 'OUTPUT', str(tmp_path / 'out'),
                     'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0', 'TENSORBOARD', 'False', 'TRAIN.BASE_LR', '1e-3', *extra)
    os.makedirs(config.OUTPUT)
    with RecordedUpdates() as recorded:
        engine.run(config, DistInfo(0, 1, 0, CPU))
    return recorded.weights, torch.load(tmp_path / 'out' / 'ckpt_epoch_0.pth', weights_only=True)


@pytest.mark.parametrize('decay', [0.6, 1e-6])
def test_ema_is_the_average_of_the_trained_weights(tmp_path, decay):
    """TRAIN.EMA.DECAY d: after 4 updates the saved EMA is d^3 w1 + (1-d)(d^2 w2 + d w3 + w4) of the weights the
    optimizer produced (timm's ModelEmaV3 copies the first update's weights), far from the initial weights; at a
    decay near 0 it is the last weights themselves."""
    from helpers import closed_form_ema
    weights, saved = _ema_run(tmp_path, decay)
    assert len(weights) == 1 + 4
    expected = closed_form_ema(weights, decay)
    assert expected.keys() <= saved['ema'].keys()
    moved = 0
    for name, value in expected.items():
        assert torch.equal(saved['model'][name].double(), weights[-1][name]), name  # the recording is the model
        ema = saved['ema'][name].double()
        torch.testing.assert_close(ema, value, rtol=1e-5, atol=1e-6, msg=name)  # fp32 lerps
        moved += int((ema - weights[0][name]).abs().max() > 1e-4)
        if decay < 1e-3:
            torch.testing.assert_close(ema, weights[-1][name], rtol=0, atol=1e-7, msg=name)
    assert moved == len(expected), (moved, len(expected))  # every tensor left its initial value
    if decay > 0.5:  # and the average lags behind the last weights
        lag = max(float((saved['ema'][n].double() - weights[-1][n]).abs().max()) for n in expected)
        assert lag > 5e-5, lag


# ----------------------------------------------------------------------------- fault 8: EMA under apex O2

class _FakeApexO2:
    """apex.amp's interface as the engine uses it; initialize casts the model to fp16 as O2 does."""

    @staticmethod
    def initialize(model, optimizer, opt_level):
        forward = model.half().forward
        model.forward = lambda images: forward(images.half())  # O2 casts the inputs too
        return model, optimizer

    @staticmethod
    @contextlib.contextmanager
    def scale_loss(loss, optimizer, delay_unscale=False):
        yield loss

    @staticmethod
    def master_params(optimizer):
        for group in optimizer.param_groups:
            yield from group['params']


def test_ema_keeps_fp32_weights_under_apex_o2(tmp_path, monkeypatch):
    from helpers import write_digits_folder
    from utils.distributed import DistInfo
    digits = write_digits_folder(tmp_path / 'digits', 4, 4, 2)
    config = _config('TRAIN.EMA.ENABLE', 'True', 'TRAIN.EPOCHS', '1', 'AMP_OPT_LEVEL', 'O2', 'DATA.BATCH_SIZE',
                     '8', 'DATA.DATA_PATH', digits, 'OUTPUT', str(tmp_path / 'out'), 'AUG.MIXUP', '0.0',
                     'AUG.CUTMIX', '0.0', 'TENSORBOARD', 'False')
    monkeypatch.setattr(engine, 'apex_amp_module', lambda config: _FakeApexO2)
    os.makedirs(config.OUTPUT)
    from helpers import RecordedUpdates, closed_form_ema
    with RecordedUpdates() as recorded:
        engine.run(config, DistInfo(0, 1, 0, CPU))
    saved = torch.load(tmp_path / 'out' / 'ckpt_epoch_0.pth', weights_only=True)
    assert saved['model']['head.weight'].dtype == torch.float16  # the model was cast
    assert {v.dtype for v in saved['ema'].values() if v.is_floating_point()} == {torch.float32}
    # and it averages the fp16 weights the updates produced (2 updates: d w1 + (1 - d) w2), in fp32
    assert len(recorded.weights) == 1 + 2
    for name, value in closed_form_ema(recorded.weights, config.TRAIN.EMA.DECAY).items():
        ema = saved['ema'][name].double()
        torch.testing.assert_close(ema, value, rtol=0, atol=2e-7, msg=name)
        assert not torch.equal(ema, recorded.weights[0][name]), name


# ----------------------------------------------------------------------------- fault 9: distributed set-up

def test_local_rank_without_a_gpu_is_an_error(monkeypatch):
    from utils import distributed
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert distributed.resolve_device('auto', 1) == torch.device('cuda', 1)
    with pytest.raises(RuntimeError, match='LOCAL_RANK 2 has no GPU: this node shows 2'):
        distributed.resolve_device('auto', 2)


def test_process_group_gets_timeout_and_device(monkeypatch):
    from utils import distributed
    seen = {}
    monkeypatch.setattr(distributed.dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(distributed.dist, 'init_process_group', lambda **kw: seen.update(kw))
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('LOCAL_RANK', '1')
    info = distributed.init_distributed('cpu', timeout_minutes=90)
    assert info.rank == 1 and seen['backend'] == 'gloo' and seen['device_id'] is None
    assert seen['timeout'].total_seconds() == 90 * 60
    with pytest.raises(ValueError, match='DIST_TIMEOUT'):
        distributed.init_distributed('cpu', timeout_minutes=0)


def test_fp32_runs_use_tf32_on_cuda():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        engine.set_matmul_precision(SimpleNamespace(TF32=True), torch.device('cuda', 0))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        engine.set_matmul_precision(SimpleNamespace(TF32=False), torch.device('cuda', 0))
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
