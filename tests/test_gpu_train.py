"""GPU self-check for training (issue 11): full train steps for V1 and V2 in bf16 and in fp16 with a GradScaler,
no host sync inside an update, DDP over a one-process NCCL group, a compiled train step, and checkpoint save and
exact resume on CUDA with the CUDA RNG. Every test needs CUDA and is skipped without it."""
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import engine
from utils.checkpoint import TrainState, build_checkpoint, capture_rng_state, restore_rng_state, \
    restore_training_state

DEVICE = torch.device('cuda', 0) if torch.cuda.is_available() else torch.device('cpu')
TINY = ['DATA.DATASET', 'folder', 'MODEL.SWIN.EMBED_DIM', '32', 'MODEL.SWIN.DEPTHS', '[2,2]',
        'MODEL.SWIN.NUM_HEADS', '[2,4]', 'MODEL.SWIN.WINDOW_SIZE', '4', 'DATA.IMG_SIZE', '32',
        'MODEL.NUM_CLASSES', '4', 'DATA.NUM_WORKERS', '0', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EPOCHS', '2',
        'PRINT_FREQ', '1000']
V2 = ['MODEL.TYPE', 'swinv2', 'MODEL.SWINV2.EMBED_DIM', '32', 'MODEL.SWINV2.DEPTHS', '[2,2]',
      'MODEL.SWINV2.NUM_HEADS', '[2,4]', 'MODEL.SWINV2.WINDOW_SIZE', '4', 'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', '[0,0]']
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
pytestmark = [pytest.mark.gpu]


def _config(*extra):
    from config import load_config
    return load_config(opts=[*TINY, *extra])


def _loader(n_batches, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n_batches * batch_size, 3, 32, 32, generator=g),
                         torch.randint(0, 4, (n_batches * batch_size,), generator=g))
    return DataLoader(data, batch_size=batch_size, pin_memory=torch.cuda.is_available())


def _state(config, dtype, train_model=None, updates_per_epoch=4):
    import models
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer
    torch.manual_seed(0)
    model = models.build_model(config).to(DEVICE)
    optimizer = build_optimizer(config, model)
    precision = engine.Precision(DEVICE, dtype)
    state = TrainState(model, optimizer, build_scheduler(config, optimizer, updates_per_epoch),
                       scaler=torch.amp.GradScaler(DEVICE.type) if precision.needs_scaler else None,
                       updates_per_epoch=updates_per_epoch)
    loss_fn = engine.classification_loss(torch.nn.CrossEntropyLoss(), None, DEVICE)
    step = engine.UpdateStep(train_model(model) if train_model else model, state, precision, loss_fn,
                             config.TRAIN.CLIP_GRAD)
    return state, step


@needs_cuda
@pytest.mark.parametrize('arch', ['v1', 'v2'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16-scaler'])
def test_train_steps_lower_the_loss_and_touch_every_weight(arch, dtype):
    config = _config(*(V2 if arch == 'v2' else []))
    state, step = _state(config, dtype)
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    batch = next(iter(_loader(1)))
    results = [step([batch]) for _ in range(8)]  # the same batch: the loss must fall
    losses = [float(loss) for loss, _, _ in results]
    skipped = sum(bool(bad) for _, _, bad in results)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    unchanged = [n for n, p in state.model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"never updated: {unchanged[:5]}"
    if dtype == torch.float16:  # GradScaler's defaults: 2^16, halved per overflow, no growth before 2000 steps
        assert state.scaler.get_scale() == 65536.0 * 0.5 ** skipped, (state.scaler.get_scale(), skipped)
    else:
        assert skipped == 0


@needs_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=['fp32', 'bf16', 'fp16'])
def test_no_host_sync_inside_an_update(dtype):
    """torch.cuda.set_sync_debug_mode('error') raises on any synchronizing call inside the updates."""
    config = _config('TRAIN.CLIP_GRAD', '5.0')
    state, step = _state(config, dtype)
    batches = [tuple(t.to(DEVICE, non_blocking=True) for t in b) for b in _loader(4)]
    step([batches[0]])  # warm-up: lazy optimizer state, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for batch in batches[1:]:
            step([batch])
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert state.update == 4


# SGD where two runs' weights are compared: its update follows the gradient, so kernels' rounding differences
# stay that small; AdamW's first step (lr * g / |g|) turns them into +-lr on gradients that are zero in theory
# (the key bias).
SGD = ['TRAIN.OPTIMIZER.NAME', 'sgd', 'TRAIN.BASE_LR', '0.1', 'MODEL.DROP_PATH_RATE', '0.0']


def _relative_update_error(state, reference, initial):
    """||update - reference update|| / ||reference update|| over all parameters, and the reference's norm."""
    diff = ref = 0.0
    for name, p in state.model.named_parameters():
        expected = dict(reference.model.named_parameters())[name].detach().double() - initial[name]
        diff += float((p.detach().double() - initial[name] - expected).square().sum())
        ref += float(expected.square().sum())
    return (diff / ref) ** 0.5, ref ** 0.5


@needs_cuda
def test_ddp_over_a_one_process_nccl_group(tmp_path):
    """DDP over NCCL (one process, accumulation 2 with no_sync on the first micro-batch) trains to the weights of
    the plain model on the same batches."""
    from types import SimpleNamespace

    from torch.nn.parallel import DistributedDataParallel
    config = _config('TRAIN.ACCUMULATION_STEPS', '2', *SGD)
    plain, plain_step = _state(config, torch.bfloat16, updates_per_epoch=2)
    initial = {n: p.detach().double().clone() for n, p in plain.model.named_parameters()}
    assert len(list(engine.train_one_epoch(plain, plain_step, _loader(4), 2))) == 2
    dist.init_process_group('nccl', init_method=f'file://{tmp_path / "pg"}', rank=0, world_size=1,
                            device_id=DEVICE)
    try:
        state, step = _state(config, torch.bfloat16, lambda m: engine.wrap_for_training(
            m, config, SimpleNamespace(distributed=True, device=DEVICE)), updates_per_epoch=2)
        assert isinstance(step.model, DistributedDataParallel) and engine.find_ddp(step.model) is step.model
        results = list(engine.train_one_epoch(state, step, _loader(4), 2))
        assert len(results) == 2 and all(torch.isfinite(r[0]) for r in results)
    finally:
        dist.destroy_process_group()
    error, size = _relative_update_error(state, plain, initial)
    print(f"DDP vs plain: relative update difference {error:.2e} of an update of norm {size:.3f}")
    assert size > 1e-2 and error < 1e-3, (error, size)
    for name, p in state.model.named_parameters():
        torch.testing.assert_close(p, dict(plain.model.named_parameters())[name], rtol=1e-4, atol=1e-5, msg=name)


@needs_cuda
@pytest.mark.parametrize('dtype, tolerance', [(None, 1e-3), (torch.bfloat16, 5e-2)], ids=['fp32', 'bf16'])
def test_compiled_train_step_matches_eager(dtype, tolerance):
    """Three updates with a torch.compile'd model give the eager updates: the weights' change agrees to
    ``tolerance`` of its size (frozen weights are 1 off, a step at 60% of the learning rate 0.4), the losses
    agree, and the weights moved."""
    config = _config(*SGD)
    eager_state, eager = _state(config, dtype)
    initial = {n: p.detach().double().clone() for n, p in eager_state.model.named_parameters()}
    compiled_state, compiled = _state(config, dtype, torch.compile)
    batch = next(iter(_loader(1)))
    for _ in range(3):
        eager_loss = eager([batch])[0]
        compiled_loss = compiled([batch])[0]
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=2e-2, atol=2e-2)
    error, size = _relative_update_error(compiled_state, eager_state, initial)
    print(f"compiled vs eager: relative update difference {error:.2e} of an update of norm {size:.3f}")
    assert size > 1e-2 and error < tolerance, (error, size)


@needs_cuda
def test_checkpoint_resume_on_cuda_is_exact(tmp_path):
    """Two updates, save (with the CUDA RNG: drop path draws from it), two more; a fresh state restored from
    the file gives the same weights after the same two updates."""
    config = _config('MODEL.DROP_PATH_RATE', '0.2')
    batches = list(_loader(4))
    state, step = _state(config, torch.bfloat16)
    for batch in batches[:2]:
        step([batch])
    path = tmp_path / 'ckpt.pth'
    torch.save(dict(build_checkpoint(state, {}), rng=capture_rng_state()), path)
    for batch in batches[2:]:
        step([batch])
    expected = {k: v.clone() for k, v in state.model.state_dict().items()}

    resumed, resumed_step = _state(config, torch.bfloat16)
    saved = torch.load(path, weights_only=True)
    restore_training_state(saved, resumed)
    restore_rng_state(saved['rng'])
    assert 'cuda' in saved['rng']
    for batch in batches[2:]:
        resumed_step([batch])
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
