"""The device path on fake CUDA (tests/fake_cuda.py): every device step traced without a GPU, with its host
reads, blocking host-to-device copies and device ops counted.

- V1 and V2 forwards at Swin-T and Swin-B sizes under CUDA autocast fp16 and bf16;
- ``engine.UpdateStep`` on batches of each loader (torch, fast, gpu; finished by ``data.batch_to_device`` inside
  the update), in fp32, bf16 and fp16 with a GradScaler: two updates, the second with no host read and no
  blocking copy (backward is replaced by zero gradients, see the harness);
- validation's per-batch work, the SimMIM forward, the EMA update;
- the loaders' device finish: blocking copies and a device-op budget for ``DATA.LOADER gpu``.

Faults 1 and 2 (blocking ``torch.tensor(..., device=...)`` copies in the fast/gpu finish; gpu's per-sample loop on
the device) failed these checks before the batched device finish (data/device_batch.py, data/gpu.py); each check
raises its own AssertionError subclass so that a failure names the fault.
"""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch._subclasses.fake_tensor import DataDependentOutputException

import data
import data.gpu
import engine
import models
from config import load_config
from fake_cuda import DEVICE, DeviceOps, fake_cuda, on_fake_cuda
from lr_scheduler import build_scheduler
from optimizer import build_optimizer
from utils.checkpoint import TrainState

pytestmark = pytest.mark.fake_cuda


class BlockingCopies(AssertionError):
    """A blocking host-to-device copy where none may be (fault 1 in the fast/gpu finish)."""


class OverBudget(AssertionError):
    """More device ops than the budget (fault 2: gpu's per-sample loop)."""


LOADERS = ['torch', 'fast', 'gpu']
SMALL = ['MODEL.SWIN.EMBED_DIM', '32', 'MODEL.SWIN.DEPTHS', '[2,2]', 'MODEL.SWIN.NUM_HEADS', '[2,4]']
SIZES = {'tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
         'base': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))}


def assert_no_host_reads(ops: DeviceOps) -> None:
    assert not ops.host_reads, ops.report()


def assert_no_blocking_copies(ops: DeviceOps) -> None:
    if ops.blocking_copies:
        raise BlockingCopies(ops.report())


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """128 training and 16 validation JPEGs (4 classes) of two photo-like sizes."""
    root = tmp_path_factory.mktemp('fake_cuda_data')
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:320, 0:320].astype(np.float32)
    for split, n in (('train', 128), ('val', 16)):
        for i in range(n):
            folder = root / split / f'c{i % 4}'
            folder.mkdir(parents=True, exist_ok=True)
            base = np.stack([np.sin(xx * (0.01 + 0.003 * c) + i) * np.cos(yy * 0.02 + c) for c in range(3)], -1)
            pixels = (base * 80 + 120 + rng.normal(0, 4, base.shape)).clip(0, 255).astype(np.uint8)
            crop = pixels[:240] if i % 2 else pixels[:, :240]  # 320 x 240 or 240 x 320
            Image.fromarray(crop).save(folder / f'{i:03d}.jpg', quality=85)
    return str(root)


def config_for(folder, loader, batch_size, *opts):
    return load_config(None, ['DATA.DATA_PATH', folder, 'DATA.LOADER', loader, 'DATA.BATCH_SIZE', str(batch_size),
                              'DATA.NUM_WORKERS', '0', 'MODEL.NUM_CLASSES', '4', 'PRINT_FREQ', '1000', *SMALL,
                              *opts])


_BATCHES = {}


def first_batch(folder, loader, batch_size, train=True):
    """The first training (or validation) batch of ``DATA.LOADER loader``, as the DataLoader yields it (cached)."""
    key = (folder, loader, batch_size, train)
    if key not in _BATCHES:
        _, _, loader_train, loader_val, _ = data.build_loader(config_for(folder, loader, batch_size))
        _BATCHES[key] = next(iter(loader_train if train else loader_val))
    return _BATCHES[key]


@pytest.fixture
def nvjpeg_stand_in(monkeypatch):
    """nvJPEG cannot run on fake CUDA: ``data.gpu``'s batched decode returns empty (3, H, W) uint8 device images
    of each JPEG's header size instead. Call with the batches the test will finish, in order."""
    sizes = []

    def decode(payloads, device):
        return [torch.empty((3, h, w), dtype=torch.uint8, device=device) for w, h in
                (sizes.pop(0) for _ in payloads)]

    def expect(*batches):
        for batch in batches:
            if isinstance(batch, data.DeviceBatch) and isinstance(batch.images, data.gpu.PackedImages):
                sizes.extend(batch.extras.sizes)
    monkeypatch.setattr(data.gpu, '_decode_jpegs', decode)
    return expect


# ----------------------------------------------------------------------------- forwards

@pytest.mark.parametrize('size', ['tiny', 'base'])
@pytest.mark.parametrize('cls', [models.SwinTransformer, models.SwinTransformerV2], ids=['v1', 'v2'])
def test_forward_under_cuda_autocast_fp16_and_bf16(cls, size):
    """Logits in the autocast dtype on the device and no host read, in fp16 then bf16; the first forward builds
    the cached window geometry (its only blocking copies), the second copies nothing blocking."""
    with fake_cuda():
        model = on_fake_cuda(lambda: cls(img_size=224, window_size=7, **SIZES[size]))
        x = torch.empty(8, 3, 224, 224, device=DEVICE)
        counts = []
        for dtype in (torch.float16, torch.bfloat16):
            with DeviceOps() as ops, torch.autocast('cuda', dtype=dtype):
                logits = model(x)
            assert logits.shape == (8, 1000) and logits.dtype == dtype and logits.device == DEVICE
            assert_no_host_reads(ops)
            counts.append(ops)
    first, second = counts
    assert first.blocking_copies and all('models/window_ops.py' in c for c in first.blocking_copies), first.report()
    assert_no_blocking_copies(second)
    assert second.launches['addmm'] > 0 and second.total > 100, second.report()


# ----------------------------------------------------------------------------- the update

def _update_step(config, dtype):
    """A UpdateStep as engine.run builds one (fused AdamW, EMA, Mixup, clipping), the model on fake CUDA."""
    model = on_fake_cuda(lambda: models.build_model(config))
    optimizer = build_optimizer(config, model)
    precision = engine.Precision(DEVICE, dtype)
    state = TrainState(model, optimizer, build_scheduler(config, optimizer, 10),
                       scaler=torch.amp.GradScaler('cuda') if precision.needs_scaler else None,
                       ema=ModelEmaV3(model, decay=0.999), updates_per_epoch=10)
    mixup = data.build_mixup(config)
    loss_fn = engine.classification_loss(SoftTargetCrossEntropy(), mixup, DEVICE)
    return engine.UpdateStep(model, state, precision, loss_fn, config.TRAIN.CLIP_GRAD), state


def _update_params():
    for loader in LOADERS:
        for name, dtype in (('fp32', None), ('bf16', torch.bfloat16), ('fp16-scaler', torch.float16)):
            yield pytest.param(loader, dtype, id=f'{loader}-{name}')


@pytest.mark.parametrize('loader,dtype', list(_update_params()))
def test_update_step_has_no_host_read_and_no_blocking_copy(folder, nvjpeg_stand_in, loader, dtype):
    """Two updates on the loader's batches (finished on the device inside the update); the second one (optimizer
    state, loss scale and window geometry exist by then) reads nothing on the host and copies nothing blocking."""
    config = config_for(folder, loader, 16, 'TRAIN.CLIP_GRAD', '5.0')
    batch = first_batch(folder, loader, 16)
    nvjpeg_stand_in(batch, batch)
    with fake_cuda():
        update_step, state = _update_step(config, dtype)
        update_step([batch])
        with DeviceOps() as ops:
            loss, grad_norm, skipped = update_step([batch])
    assert state.update == 2
    assert loss.device == grad_norm.device == skipped.device == DEVICE and loss.dtype == torch.float32
    moments = [s['exp_avg'] for s in state.optimizer.state.values()]
    assert moments and all(m.device == DEVICE for m in moments)
    if dtype == torch.float16:  # GradScaler's unscale and update ran on the device
        assert ops.launches['_amp_foreach_non_finite_check_and_unscale_'] == 1, ops.report()
        assert ops.launches['_amp_update_scale_'] == 1, ops.report()
    assert ops.launches['_fused_adamw_'] >= 1, ops.report()  # fused AdamW: one launch per group and dtype
    assert_no_host_reads(ops)
    assert_no_blocking_copies(ops)


# ----------------------------------------------------------------------------- validation, SimMIM, EMA

class _Batches:
    """Yields ``batches``; on running out, notes how many host reads and blocking copies there were so far."""

    def __init__(self, batches, ops):
        self.batches, self.ops = batches, ops
        self.at_end = None

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        yield from self.batches
        self.at_end = (list(self.ops.host_reads), list(self.ops.blocking_copies))


@pytest.mark.parametrize('loader', LOADERS)
def test_validation_reads_the_host_only_after_its_last_batch(folder, nvjpeg_stand_in, loader):
    """``engine.validate`` over two batches: the first host read is its final sum (which raises here: fake
    tensors hold no values), after the last batch; no blocking copy before it either."""
    config = config_for(folder, loader, 8)
    batch = first_batch(folder, loader, 8, train=False)
    nvjpeg_stand_in(batch, batch)
    with fake_cuda():
        model = on_fake_cuda(lambda: models.build_model(config))
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
            model.eval()(torch.empty(8, 3, 224, 224, device=DEVICE))  # builds the cached geometry and bias
        with DeviceOps() as ops:
            batches = _Batches([batch, batch], ops)
            with pytest.raises(DataDependentOutputException):
                engine.validate(config, batches, model, engine.Precision(DEVICE, torch.bfloat16))
    assert batches.at_end is not None, 'validation read a device value before its last batch: ' + ops.report()
    reads, copies = batches.at_end
    assert not reads and len(ops.host_reads) == 1 and 'engine.py' in ops.host_reads[0], ops.report()
    if copies:
        raise BlockingCopies(ops.report())


@pytest.mark.parametrize('arch', ['swin', 'swinv2'])
def test_simmim_forward(arch):
    """SimMIM's loss (mask token, decoder, L1 on masked pixels; V2 with the normalised target) on the device."""
    v2 = arch == 'swinv2'
    prefix = 'MODEL.SWINV2' if v2 else 'MODEL.SWIN'
    config = load_config(None, ['MODEL.TYPE', arch, f'{prefix}.EMBED_DIM', '32', f'{prefix}.DEPTHS', '[2,2]',
                                f'{prefix}.NUM_HEADS', '[2,4]', 'DATA.IMG_SIZE', '192', f'{prefix}.WINDOW_SIZE', '6',
                                'MODEL.SIMMIM.NORM_TARGET.ENABLE', str(v2),
                                *(['MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', '[0,0]'] if v2 else [])])
    with fake_cuda():
        model = on_fake_cuda(lambda: models.build_model(config, is_pretrain=True))
        images = torch.empty(4, 3, 192, 192, device=DEVICE)
        mask = torch.empty(4, 48, 48, dtype=torch.int64, device=DEVICE)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            model(images, mask)
            with DeviceOps() as ops:
                loss = model(images, mask)
    assert loss.shape == () and loss.device == DEVICE and loss.is_floating_point()
    assert_no_host_reads(ops)
    assert_no_blocking_copies(ops)


def test_ema_update_is_a_few_multi_tensor_ops():
    """ModelEmaV3 after an update: foreach lerps of the weights (and copies of the buffers), nothing on the host."""
    with fake_cuda():
        model = on_fake_cuda(lambda: models.SwinTransformer(img_size=224, window_size=7, **SIZES['tiny']))
        ema = ModelEmaV3(model, decay=0.9998, use_warmup=True)
        ema.update(model, step=1)
        with DeviceOps() as ops:
            ema.update(model, step=2)
    assert_no_host_reads(ops)
    assert_no_blocking_copies(ops)
    assert 0 < ops.total <= 4 and ops.launches['_foreach_lerp_'] >= 1, ops.report()


# ----------------------------------------------------------------------------- the loaders' device finish

def test_torch_loader_batch_is_two_non_blocking_copies(folder):
    batch = first_batch(folder, 'torch', 16)
    with fake_cuda():
        with DeviceOps() as ops:
            images, targets = data.batch_to_device(batch, DEVICE)
    assert images.device == targets.device == DEVICE
    assert dict(ops.launches) == {'_to_copy': 2} and not ops.blocking_copies and not ops.host_reads


@pytest.mark.parametrize('loader', ['fast', 'gpu'])
def test_device_finish_of_a_training_batch_has_no_blocking_copy(folder, nvjpeg_stand_in, loader):
    """One batch of 128 at 224 px (RandAugment, random erasing) finished by ``data.batch_to_device``."""
    batch = first_batch(folder, loader, 128)
    nvjpeg_stand_in(batch)
    with fake_cuda():
        with DeviceOps() as ops:
            images, targets = data.batch_to_device(batch, DEVICE)
    assert images.shape == (128, 3, 224, 224) and images.dtype == torch.float32 and images.device == DEVICE
    assert_no_host_reads(ops)
    assert_no_blocking_copies(ops)


def test_gpu_finish_of_a_training_batch_stays_within_150_device_ops(folder, nvjpeg_stand_in):
    """``DATA.LOADER gpu``'s device side for a batch of 128 at 224 px: batched work, not a loop over samples."""
    batch = first_batch(folder, 'gpu', 128)
    nvjpeg_stand_in(batch)
    with fake_cuda():
        with DeviceOps() as ops:
            data.batch_to_device(batch, DEVICE)
    assert_no_host_reads(ops)
    if ops.total > 150:
        raise OverBudget(ops.report())


# ----------------------------------------------------------------------------- fault 3: FSDP CPU offload on CUDA
# (no GPU needed, so in this file: NCCL cannot start here, the rest of a CUDA run's group set-up is checked)

def test_cuda_run_with_fsdp_cpu_offload_asks_for_a_cpu_backend(monkeypatch, tmp_path):
    """main.py passes FSDP CPU offload on to init_distributed, which then creates a 'cpu:gloo,cuda:nccl' group
    for a CUDA run (NCCL alone otherwise), bound to the rank's GPU."""
    import main
    import torch.distributed as dist

    import utils.distributed as distributed
    asked = {}

    def record(*args, **kwargs):
        asked.update(kwargs)
        raise RuntimeError('stop here')
    monkeypatch.setattr(distributed, 'init_distributed', lambda *a, **k: record(**k))
    for split in ('train', 'val'):  # main.py checks that the data folders exist before the process group
        (tmp_path / split).mkdir()
    args = ['--data-path', str(tmp_path), '--output', str(tmp_path), '--fsdp', '--opts', 'TRAIN.FSDP.CPU_OFFLOAD']
    assert main.main(args + ['True']) == 2 and asked['cpu_collectives'] is True
    assert main.main(args + ['False']) == 2 and asked['cpu_collectives'] is False
    monkeypatch.undo()

    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: None)
    monkeypatch.setattr(dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(dist, 'init_process_group', lambda **kwargs: calls.append(kwargs))
    for name, value in (('WORLD_SIZE', '2'), ('RANK', '1'), ('LOCAL_RANK', '1')):
        monkeypatch.setenv(name, value)
    for cpu_collectives, backend in ((True, 'cpu:gloo,cuda:nccl'), (False, 'nccl')):
        info = distributed.init_distributed('cuda', cpu_collectives=cpu_collectives)
        assert info.device == torch.device('cuda', 1) and calls[-1]['device_id'] == info.device
        assert calls[-1]['backend'] == backend


def _clip_cpu_dtensor_gradients(backend):
    """clip_grad_norm_ of CPU DTensor gradients (what CPU offload leaves) in a one-rank group of ``backend``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from utils.distributed import cleanup_distributed
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh.from_group(dist.group.WORLD, 'cpu')
        weight = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
        weight.grad = distribute_tensor(torch.full((4, 3), 2.0), mesh, [Shard(0)])
        return float(torch.nn.utils.clip_grad_norm_([weight], 1.0).full_tensor())
    finally:
        cleanup_distributed()


def test_cpu_offloaded_gradients_clip_in_the_group_of_a_cuda_run():
    """pytorch#148532 and its fix: the norm of CPU DTensor gradients is reduced on the CPU, which a group
    without a CPU backend cannot do (NCCL alone; 'cuda:gloo' stands in for it on this GPU-less machine), and the
    group a CUDA run with CPU offload creates can (its NCCL part stands in as gloo here)."""
    from utils.distributed import process_group_backend
    backend = process_group_backend(torch.device('cuda'), cpu_collectives=True)
    assert backend.split(',')[0] == 'cpu:gloo'
    assert _clip_cpu_dtensor_gradients(backend.replace('nccl', 'gloo')) == pytest.approx(48 ** 0.5)  # 12 gradients of 2
    with pytest.raises(RuntimeError, match='No backend type associated with device type cpu'):
        _clip_cpu_dtensor_gradients('cuda:gloo')


def test_shard_model_refuses_cpu_offload_from_cuda_in_a_group_without_a_cpu_backend():
    import torch.distributed as dist

    from utils.distributed import cleanup_distributed
    from utils.fsdp import shard_model
    dist.init_process_group('cuda:gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match=r"CPU_OFFLOAD.*no CPU backend.*cpu:gloo,cuda:nccl"):
            shard_model(torch.nn.Linear(3, 3), (torch.nn.Linear,), cpu_offload=True, device=torch.device('cuda'))
    finally:
        cleanup_distributed()


def test_swin_moe_forward_and_aux_loss_without_host_reads():
    """Swin-MoE on one process: routing, capacity, dispatch and combine run on the device under autocast with no
    host read (dropped tokens go to a spare row, not through a boolean mask)."""
    from models.swin_moe import SwinTransformerMoE
    with fake_cuda():
        model = on_fake_cuda(lambda: SwinTransformerMoE(
            img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, mlp_ratio=2.0,
            pretrained_window_sizes=(0, 0), moe_blocks=((1,), (0, 1)), num_local_experts=4, top_value=2,
            capacity_factor=0.75, cosine_router=True, cosine_router_dim=8, is_gshard_loss=False,
            num_classes=10))
        x = torch.empty(4, 3, 32, 32, device=DEVICE)
        for _ in range(2):  # the second forward: window geometry cached
            with DeviceOps() as ops, torch.autocast('cuda', dtype=torch.bfloat16):
                logits = model(x)
                aux = model.aux_loss()
        assert logits.shape == (4, 10) and logits.device == DEVICE and aux.device == DEVICE
        assert_no_host_reads(ops)
        assert_no_blocking_copies(ops)
