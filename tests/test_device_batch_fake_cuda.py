"""The loaders' device-side finish (``data.batch_to_device`` for DATA.LOADER fast and gpu), traced on fake CUDA
(``tests/fake_cuda.py``) and checked on the CPU.

On fake CUDA, one batch of 128 at 224 px: no blocking host-to-device copy and no host read; a fixed number of
kernels, the same for a batch twice as large (no loop over samples), at most 150 for a gpu training batch with
RandAugment and erasing; the nvJPEG decode made on a stream of its own and handed over with ``wait_stream`` /
``record_stream`` (pytorch/vision#9606). On the CPU: the batched crop-resize (what CUDA runs) equals the float
resize per image, the batched ops equal torchvision's per-image kernels, a batch's layers give each sample its own
ops in order, the erasing fill is the old per-box one, and autocast around the finish changes nothing.
"""
import contextlib
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F2

import data.gpu
import data.transforms
from config import load_config
from data import batch_to_device
from data.build import build_dataset, loader_collate
from data.device_batch import DeviceFinish, erase_params
from data.gpu import TENSOR_OPS, apply_op, resize_batched, resize_per_sample
from data.seeding import SampleKey
from fake_cuda import DeviceOps, fake_cuda
from helpers import float_resize_of_each_image
from timm.data.random_erasing import RandomErasing

SIZES = [(500, 375), (375, 500), (500, 333), (640, 427), (333, 500), (800, 600), (500, 400), (300, 200)]


def photo(w, h, seed):
    """Smooth colour fields with edges and noise (resamples like a photograph)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx * (0.01 + 0.004 * c) + seed) * np.cos(yy * 0.013 + c) for c in range(3)], -1)
    base += (((xx // 37) + (yy // 29)) % 2)[..., None] * 0.4
    return Image.fromarray((base * 80 + 120 + rng.normal(0, 6, base.shape)).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """train/ and val/: 16 JPEGs each of ImageNet-like sizes, 2 classes."""
    root = tmp_path_factory.mktemp('device_batch')
    for split in ('train', 'val'):
        for i in range(16):
            d = root / split / f'c{i % 2}'
            d.mkdir(parents=True, exist_ok=True)
            photo(*SIZES[i % len(SIZES)], seed=i).save(d / f'{i:02d}.jpg', quality=90)
    return str(root)


def batch_of(folder, loader, is_train, n=128, size=224, *opts):
    config = load_config(None, ['DATA.DATA_PATH', folder, 'DATA.IMG_SIZE', str(size), 'DATA.NUM_WORKERS', '0',
                                'MODEL.NUM_CLASSES', '2', 'DATA.BATCH_SIZE', str(n), 'DATA.LOADER', loader,
                                'SEED', '3', *opts])
    ds, _ = build_dataset(is_train, config)
    samples = [ds[SampleKey(k % len(ds), k // len(ds), 3)] if is_train else ds[k % len(ds)] for k in range(n)]
    return loader_collate(is_train, config)(samples)


def header_sizes(batch):
    """(w, h) of each JPEG of a gpu batch, read here (the fake decoder's output shapes)."""
    return [Image.open(io.BytesIO(bytes(p.numpy()))).size for p in batch.images.unpack()]


def fake_decoder(sizes, log=None):
    """Stands in for nvJPEG on fake CUDA: (3, H, W) uint8 of the headers' sizes, in the batch's order."""
    def decode(payloads, device):
        assert len(payloads) == len(sizes)
        if log is not None:
            log.append(('decode', torch.cuda.current_stream()))
        images = [torch.empty((3, h, w), dtype=torch.uint8, device=device) for w, h in sizes]
        if log is not None:
            log.extend(('decoded', id(img)) for img in images)
        return images
    return decode


def finish_on_fake_cuda(batch, monkeypatch):
    """DeviceOps of ``batch_to_device(batch, 'cuda')`` on fake CUDA, and the finished images."""
    if isinstance(batch.images, data.gpu.PackedImages):
        monkeypatch.setattr(data.gpu, '_decode_jpegs', fake_decoder(header_sizes(batch)))
    with fake_cuda():
        with DeviceOps() as ops:
            images, targets = batch_to_device(batch, torch.device('cuda'))
    assert images.device.type == 'cuda' and images.dtype == torch.float32 and targets.device.type == 'cuda'
    return ops, images


# ----------------------------------------------------------------------------- fake CUDA: copies and kernels

# (loader, training batch) -> most device ops for one batch of 128 at 224 px (measured: fast 6 / 5, gpu 124 / 13)
LIMITS = {('fast', True): 8, ('fast', False): 6, ('gpu', True): 150, ('gpu', False): 16}


@pytest.mark.fake_cuda
@pytest.mark.parametrize('loader', ['fast', 'gpu'])
@pytest.mark.parametrize('is_train', [True, False], ids=['train', 'eval'])
def test_finish_has_no_blocking_copy_and_a_few_kernels(folder, monkeypatch, loader, is_train):
    batch = batch_of(folder, loader, is_train)
    ops, images = finish_on_fake_cuda(batch, monkeypatch)
    assert images.shape == (128, 3, 224, 224)
    assert not ops.blocking_copies and not ops.host_reads, ops.report()
    assert ops.total <= LIMITS[(loader, is_train)], ops.report()


@pytest.mark.fake_cuda
@pytest.mark.parametrize('loader', ['fast', 'gpu'])
def test_kernels_do_not_grow_with_the_batch(folder, monkeypatch, loader):
    """The same 64 samples twice over (so the same kinds of op in every layer): as many kernels as once."""
    config = load_config(None, ['DATA.DATA_PATH', folder, 'DATA.IMG_SIZE', '224', 'DATA.NUM_WORKERS', '0',
                                'MODEL.NUM_CLASSES', '2', 'DATA.LOADER', loader, 'SEED', '3'])
    ds, _ = build_dataset(True, config)
    samples = [ds[SampleKey(k % len(ds), k // len(ds), 3)] for k in range(64)]
    collate = loader_collate(True, config)
    once, _ = finish_on_fake_cuda(collate(samples), monkeypatch)
    twice, images = finish_on_fake_cuda(collate(samples + samples), monkeypatch)
    assert images.shape[0] == 128
    assert twice.total == once.total, (once.report(), twice.report())


@pytest.mark.fake_cuda
def test_gpu_decode_runs_on_its_own_stream(folder, monkeypatch):
    """On CUDA the decode runs with a side stream current (torchvision allocates its outputs there, so never from
    memory the training stream's queued kernels still read), the training stream then waits for it, and every
    decoded image is recorded on the training stream before it is used; on the CPU no stream is touched."""
    log = []

    class Stream:
        def __init__(self, device=None):
            self.device = device

        def wait_stream(self, other):
            log.append(('wait', self, other))

    main = Stream()
    current = [main]

    @contextlib.contextmanager
    def stream(s):
        current[0], before = s, current[0]
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(data.gpu, 'has_cuda_streams', lambda: True)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch.cuda, 'Stream', Stream)
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, 'stream', stream)
    monkeypatch.setattr(torch.Tensor, 'record_stream', lambda self, s: log.append(('record', id(self), s)))
    monkeypatch.setattr(data.gpu, '_DECODE_STREAMS', {})
    batch = batch_of(folder, 'gpu', True, 16)
    monkeypatch.setattr(data.gpu, '_decode_jpegs', fake_decoder(header_sizes(batch), log))
    with fake_cuda():
        batch_to_device(batch, torch.device('cuda'))
    (_, side), decoded = log[0], [entry[1] for entry in log if entry[0] == 'decoded']
    assert log[0][0] == 'decode' and isinstance(side, Stream) and side is not main
    assert ('wait', main, side) in log
    wait = log.index(('wait', main, side))
    recorded = [entry[1] for entry in log[wait:] if entry[0] == 'record' and entry[2] is main]
    assert len(decoded) == 16 and sorted(recorded) == sorted(decoded)

    log.clear()
    monkeypatch.undo()  # the CPU: the real decoder, and no stream calls
    monkeypatch.setattr(torch.Tensor, 'record_stream', lambda self, s: log.append(('record', id(self), s)))
    images, _ = batch_to_device(batch, torch.device('cpu'))
    assert images.shape == (16, 3, 224, 224) and not log


# ----------------------------------------------------------------------------- the CPU: the same pixels

@pytest.mark.parametrize('interpolation, crop', [('bicubic', True), ('bilinear', False), ('random', True),
                                                 ('nearest', True)])
@pytest.mark.parametrize('is_train', [True, False], ids=['train', 'eval'])
def test_batched_resize_is_the_float_resize_of_each_image(folder, monkeypatch, interpolation, crop, is_train):
    """What CUDA runs (``resize_batched``, run here on the CPU) against torchvision's float32 resize of each
    image (what CUDA ran per image before): the same but for rounding ties (at most 1 level, 1 pixel in 10^4),
    also split into chunks; and within a level of the CPU's uint8 kernels (``resize_per_sample``)."""
    batch = batch_of(folder, 'gpu', is_train, 32, 64, 'DATA.INTERPOLATION', interpolation, 'TEST.CROP', str(crop))
    plan = batch.extras
    images = data.gpu.decode_batch(batch.images.unpack(), torch.device('cpu'))
    want = float_resize_of_each_image(images, plan, 64, 64)
    got = torch.empty_like(want)
    resize_batched(images, plan.chunks, plan.packed.to('cpu'), got)
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-4
    per_sample = torch.empty_like(want)
    resize_per_sample(images, plan.plans, plan.order, per_sample)
    assert (per_sample.int() - got.int()).abs().max() <= 1

    monkeypatch.setattr(data.gpu, 'RESIZE_BUDGET', 60_000)  # a few samples per chunk
    split = data.gpu.BatchPlan(plan.plans, 64)
    assert len(split.chunks) > 3
    chunked = torch.empty_like(want)
    resize_batched(images, split.chunks, split.packed.to('cpu'), chunked)
    assert torch.equal(chunked, got)


@pytest.mark.parametrize('name, factors', [('auto_contrast', [()]), ('equalize', [()]), ('invert', [()]),
                                           ('posterize', [(1,), (4,), (7,)]), ('solarize', [(0,), (100,), (255,)]),
                                           ('brightness', [(0.1,), (1.7,)]), ('color', [(0.2,), (1.8,)]),
                                           ('contrast', [(0.3,), (1.6,)]), ('sharpness', [(0.1,), (1.9,)])])
def test_batched_ops_give_torchvisions_pixels(name, factors):
    """The batched kernels (one image at a time through TENSOR_OPS) against torchvision's per-image kernels:
    the same pixels, also for a constant image and for noise."""
    reference = {'auto_contrast': F2.autocontrast, 'equalize': F2.equalize, 'invert': F2.invert,
                 'posterize': lambda x, b: F2.posterize(x, int(b)), 'solarize': lambda x, t: F2.solarize(x, float(t)),
                 'brightness': F2.adjust_brightness, 'color': F2.adjust_saturation, 'contrast': F2.adjust_contrast,
                 'sharpness': F2.adjust_sharpness}[name]
    images = [torch.from_numpy(np.array(photo(96, 80, seed=s))).permute(2, 0, 1) for s in range(3)]
    images += [torch.full((3, 80, 96), 77, dtype=torch.uint8), torch.randint(0, 256, (3, 80, 96), dtype=torch.uint8)]
    for x in images:
        for args in factors:
            assert torch.equal(TENSOR_OPS[name](x, *args), reference(x, *args)), (name, args)


@pytest.mark.parametrize('name, arg', [('rotate', 30.0), ('shear_x', -0.3), ('translate_y_rel', 0.25)])
@pytest.mark.parametrize('mode', ['bilinear', 'bicubic'])
def test_batched_affine_is_the_per_image_warp(name, arg, mode):
    """apply_op's affine (grid lines made in float64) against one ``affine_grid`` + ``grid_sample`` per image
    (the old per-image warp, float32): at most a level apart, on a few pixels (sample positions differ in the
    last float32 bits, which moves values that are rounding ties: bilinear shears land on half pixels)."""
    img = torch.from_numpy(np.array(photo(96, 80, seed=4))).permute(2, 0, 1)
    fill = (124, 116, 104)
    a, b, c, d, e, f = data.transforms.affine_matrix(name, arg, (96, 80))
    h, w = 80, 96
    theta = torch.tensor([[a, b * h / w, a + b * h / w + 2 * c / w - 1],
                          [d * w / h, e, d * w / h + e + 2 * f / h - 1]], dtype=torch.float32)
    grid = torch.nn.functional.affine_grid(theta[None], [1, 3, h, w], align_corners=False)
    fill_t = torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1)
    want = torch.nn.functional.grid_sample(img[None].float() - fill_t, grid, mode=mode, padding_mode='zeros',
                                           align_corners=False)
    want = (want + fill_t).round_().clamp_(0, 255).to(torch.uint8)[0]
    got = apply_op(img, (name, (arg,), mode, fill))
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02


def test_batch_layers_give_each_sample_its_own_ops_in_order(folder):
    """A batch's RandAugment, run as layers of samples sorted by kind, against each sample alone: its resize,
    then its recorded ops one by one (apply_op), in its order."""
    batch = batch_of(folder, 'gpu', True, 48, 64, 'AUG.REPROB', '0.0')
    plan = batch.extras
    payloads = batch.images.unpack()
    got = data.gpu.GpuFinish(64, 'pixel').images(payloads, plan.plans, torch.device('cpu'))
    images = data.gpu.decode_batch(payloads, torch.device('cpu'))
    resized = torch.empty_like(got)
    resize_per_sample(images, plan.plans, range(len(images)), resized)
    assert sum(len(p['ops']) >= 2 for p in plan.plans) >= 8  # p 0.5 per op: a quarter of the samples have two
    for b, p in enumerate(plan.plans):
        want = resized[b]
        for op in p['ops']:
            want = apply_op(want, op)
        assert torch.equal(got[b], want), (b, p['ops'])


@pytest.mark.parametrize('mode', ['pixel', 'rand', 'const'])
def test_erasing_fill_is_the_per_box_one(mode):
    """The fill drawn in the worker (``erase_fill``) written by ``DeviceFinish`` equals the per-box loop the
    device ran before: each box in its drawn order (overlaps overwritten), the noise from a generator seeded with
    the sample's drawn seed."""
    eraser = RandomErasing(0.6, mode=mode, max_count=3, device='cpu')
    params = []
    for seed in range(24):
        random.seed(seed)
        torch.manual_seed(seed)
        params.append(erase_params(eraser, 40, 56))
    params = torch.stack(params)
    images = torch.randint(0, 256, (24, 3, 40, 56), dtype=torch.uint8)
    finish = DeviceFinish(mode)
    want = finish(images, None)
    for b, row in enumerate(params.tolist()):
        boxes = [row[k:k + 4] for k in range(0, len(row) - 1, 4) if row[k + 2] > 0]
        g = torch.Generator().manual_seed(row[-1])
        for top, left, h, w in boxes:
            fill = (torch.randn((3, h, w), generator=g) if mode == 'pixel' else
                    torch.randn((3, 1, 1), generator=g) if mode == 'rand' else torch.zeros((3, 1, 1)))
            want[b, :, top:top + h, left:left + w] = fill
    assert (params[:, 2] > 0).sum() > 8 and torch.equal(finish(images, params), want)


@pytest.mark.parametrize('loader', ['fast', 'gpu'])
def test_finish_ignores_the_training_steps_autocast(folder, loader):
    """The engine calls batch_to_device inside the step's autocast; the finish (convolutions, grid_sample) must
    not run in bf16 there: the same batch with and without CPU autocast."""
    batch = batch_of(folder, loader, True, 32, 64)
    want, _ = batch_to_device(batch, torch.device('cpu'))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got, _ = batch_to_device(batch, torch.device('cpu'))
    assert got.dtype == torch.float32 and torch.equal(got, want)
