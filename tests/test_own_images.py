"""Issue 21, the image-shape items: any channel count (MODEL.SWIN.IN_CHANS, DATA.MEAN / DATA.STD) and non-square
DATA.IMG_SIZE [height, width]: config, decoding, transforms, models, fine-tune loading, training runs, ONNX.

Data: scikit-image's photographs; a class is a photograph, its images random crops of it (made grey, RGBA or
N-channel .npy, cropped non-square)."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import PHOTOS, float_resize_of_each_image, parse_eval_line, photo_crops, run_side_by_side, subprocess_env
from PIL import Image

from config import ConfigError, default_mean_std, img_size_hw, load_config, mean_std

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['DATA.DATASET', 'folder', 'MODEL.SWIN.EMBED_DIM', '16', 'MODEL.SWIN.DEPTHS', '[1,1]',
        'MODEL.SWIN.NUM_HEADS', '[1,2]', 'MODEL.SWIN.WINDOW_SIZE', '4', 'MODEL.NUM_CLASSES', '4',
        'DATA.NUM_WORKERS', '0', 'MODEL.DROP_PATH_RATE', '0.0', 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0',
        'AUG.AUTO_AUGMENT', 'none', 'AUG.REPROB', '0.0', 'AUG.COLOR_JITTER', '0.0', 'TRAIN.WARMUP_EPOCHS', '0',
        'TRAIN.BASE_LR', '0.02', 'PRINT_FREQ', '2', 'TRAIN.LR_SCHEDULER.NAME', 'step',
        'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '100', 'AUG.RRC_SCALE', '[0.5, 1.0]']


def write_folder(root, kind: str, train: int = 12, val: int = 8) -> str:
    """``root/{train,val}/<photo>/<i>.<ext>``; kind: 'rgb' / 'grey' PNG, 'rgba' PNG, 'npy5' 5-channel arrays."""
    for split, n, seed in (('train', train, 0), ('val', val, 1)):
        for i, (pixels, label) in enumerate(photo_crops(n, seed)):
            folder = os.path.join(str(root), split, PHOTOS[label])
            os.makedirs(folder, exist_ok=True)
            if kind == 'rgb':
                Image.fromarray(pixels).save(os.path.join(folder, f'{i}.png'))
            elif kind == 'grey':
                Image.fromarray(pixels).convert('L').save(os.path.join(folder, f'{i}.png'))
            elif kind == 'rgba':
                alpha = (np.arange(pixels.shape[1], dtype=np.uint8) * 4)[None, :, None].repeat(pixels.shape[0], 0)
                Image.fromarray(np.concatenate([pixels, alpha], 2), 'RGBA').save(os.path.join(folder, f'{i}.png'))
            elif kind == 'npy5':
                extra = np.stack([pixels.mean(2), 255 - pixels.mean(2)], 2).astype(np.uint8)
                np.save(os.path.join(folder, f'{i}.npy'), np.concatenate([pixels, extra], 2))
    return str(root)


# ----------------------------------------------------------------------------- config

def test_img_size_int_or_pair_in_yaml_and_opts(tmp_path):
    assert img_size_hw(load_config()) == (224, 224)
    assert img_size_hw(load_config(None, ['DATA.IMG_SIZE', '[48, 32]'])) == (48, 32)
    (tmp_path / 'a.yaml').write_text("DATA:\n  IMG_SIZE: [40, 64]\n")
    (tmp_path / 'b.yaml').write_text("BASE: ['a.yaml']\nDATA:\n  IMG_SIZE: 96\n")
    assert load_config(str(tmp_path / 'a.yaml')).DATA.IMG_SIZE == [40, 64]
    assert load_config(str(tmp_path / 'b.yaml')).DATA.IMG_SIZE == 96
    # the resolved config as saved loads again
    (tmp_path / 'c.yaml').write_text(load_config(str(tmp_path / 'a.yaml')).dump())
    assert img_size_hw(load_config(str(tmp_path / 'c.yaml'))) == (40, 64)


@pytest.mark.parametrize('opts, named', [
    (['DATA.IMG_SIZE', '[48]'], 'DATA.IMG_SIZE'),
    (['DATA.IMG_SIZE', '[48, 0]'], 'DATA.IMG_SIZE'),
    (['DATA.IMG_SIZE', '[48.0, 32]'], 'DATA.IMG_SIZE'),
    (['DATA.MEAN', '[0.5]'], 'MODEL.SWIN.IN_CHANS'),
    (['MODEL.TYPE', 'swinv2', 'MODEL.SWINV2.IN_CHANS', '1', 'DATA.STD', '[0.2, 0.2, 0.2]'], 'MODEL.SWINV2.IN_CHANS'),
    (['MODEL.SWIN.IN_CHANS', '1', 'DATA.STD', '[0.0]'], 'DATA.STD'),
    (['MODEL.SWIN.IN_CHANS', '4'], 'AUG.AUTO_AUGMENT'),
    (['MODEL.SWIN.IN_CHANS', '4', 'AUG.AUTO_AUGMENT', 'none'], 'AUG.COLOR_JITTER'),
    (['MODEL.SWIN.IN_CHANS', '1', 'DATA.DATASET', 'wds'], "DATA.DATASET 'wds'"),
    (['MODEL.SWIN.IN_CHANS', '1', 'DATA.LOADER', 'gpu', 'DATA.IMG_SIZE', '64'], "DATA.LOADER 'gpu'"),
    (['MODEL.SWIN.IN_CHANS', '4', 'DATA.LOADER', 'gpu', 'AUG.COLOR_JITTER', '0.0'], 'AUG.AUTO_AUGMENT'),
    (['MODEL.SWIN.IN_CHANS', '4', 'DATA.LOADER', 'fast', 'AUG.AUTO_AUGMENT', 'none'], 'AUG.COLOR_JITTER'),
])
def test_impossible_combinations_are_named(opts, named):
    with pytest.raises(ConfigError, match=named.replace('.', r'\.')):
        load_config(None, opts)


def test_default_mean_std_rule():
    assert default_mean_std(3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert default_mean_std(1) == ((0.449,), (0.226,))
    assert default_mean_std(5) == ((0.485, 0.456, 0.406, 0.5, 0.5), (0.229, 0.224, 0.225, 0.5, 0.5))
    config = load_config(None, ['MODEL.SWIN.IN_CHANS', '1', 'DATA.MEAN', '[0.3]'])
    assert mean_std(config) == ((0.3,), (0.226,))


# ----------------------------------------------------------------------------- data

def test_square_list_gives_todays_transforms():
    from data import build_transform
    pixels = photo_crops(1, 0)[0][0]
    img = Image.fromarray(pixels)
    for crop in ('True', 'False'):
        a = build_transform(False, load_config(None, ['DATA.IMG_SIZE', '48', 'TEST.CROP', crop]))(img)
        b = build_transform(False, load_config(None, ['DATA.IMG_SIZE', '[48, 48]', 'TEST.CROP', crop]))(img)
        assert torch.equal(a, b)


def test_non_square_eval_keeps_the_aspect_and_crops_the_centre():
    """[H, W] with TEST.CROP: scaled (aspect kept) to cover int(256/224 * side) per side, then centre-cropped;
    checked against a crop worked out here with Pillow."""
    from data import build_transform
    pixels = photo_crops(1, 0, crop=(60, 90))[0][0]  # 60 x 90 px
    config = load_config(None, ['DATA.IMG_SIZE', '[48, 32]', 'DATA.INTERPOLATION', 'bilinear'])
    got = build_transform(False, config)(Image.fromarray(pixels))
    assert got.shape == (3, 48, 32)
    cover_h, cover_w = int(256 / 224 * 48), int(256 / 224 * 32)  # 54 x 36
    ratio = min(60 / cover_h, 90 / cover_w)  # the side that needs the least scaling fits exactly
    rh, rw = round(60 / ratio), round(90 / ratio)
    resized = np.asarray(Image.fromarray(pixels).resize((rw, rh), Image.BILINEAR), dtype=np.float32) / 255
    top, left = int(round((rh - 48) / 2.0)), int(round((rw - 32) / 2.0))
    mean, std = np.array(mean_std(config)[0]), np.array(mean_std(config)[1])
    expected = ((resized[top:top + 48, left:left + 32] - mean) / std).transpose(2, 0, 1)
    assert np.abs(got.numpy() - expected).max() < 1e-5


@pytest.mark.parametrize('kind, chans', [('grey', 1), ('rgb', 3), ('rgba', 4), ('npy5', 5)])
def test_each_channel_count_through_the_torch_loader(kind, chans, tmp_path):
    from data import build_loader
    root = write_folder(tmp_path, kind, train=4, val=2)
    opts = ['DATA.DATA_PATH', root, 'DATA.BATCH_SIZE', '4', 'MODEL.SWIN.IN_CHANS', str(chans),
            'DATA.IMG_SIZE', '[48, 32]', 'TEST.CROP', 'False', 'DATA.LOADER', 'torch',  # (auto trains RGB on fast)
            *TINY]  # no crop: eval keeps the whole image
    _, dataset_val, loader_train, loader_val, _ = build_loader(load_config(None, opts))
    images, _ = next(iter(loader_train))
    assert images.shape == (4, chans, 48, 32)
    images, targets = next(iter(loader_val))
    assert images.shape == (4, chans, 48, 32) and targets.tolist() == [0, 0, 1, 1]
    # the eval images are the files' pixels: channel by channel, the image's own mean (normalisation undone)
    mean, std = mean_std(load_config(None, opts))
    first = images[0] * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    folder = os.path.join(root, 'val', sorted(PHOTOS)[0])  # label 0: the first class folder by name
    means = []
    for name in os.listdir(folder):  # the sample is one of its class's files
        raw = np.load(os.path.join(folder, name)) if name.endswith('.npy') else \
            np.asarray(Image.open(os.path.join(folder, name)))
        means.append(raw.reshape(raw.shape[0], raw.shape[1], -1).astype(np.float64).mean((0, 1)) / 255)
    assert min(np.abs(first.mean((1, 2)).numpy() - m).max() for m in means) < 0.03, (first.mean((1, 2)), means)


def test_a_channel_count_the_data_cannot_give_is_named(tmp_path):
    from data import build_loader
    from data.datasets import DatasetLayoutError
    root = write_folder(tmp_path, 'npy5', train=4, val=2)
    opts = ['DATA.DATA_PATH', root, 'DATA.BATCH_SIZE', '4', 'MODEL.SWIN.IN_CHANS', '4', 'DATA.IMG_SIZE', '48',
            *TINY]
    with pytest.raises(DatasetLayoutError, match=r'MODEL\.SWIN\.IN_CHANS is 4.*\.npy.*5 channels'):
        build_loader(load_config(None, opts))


# ----------------------------------------------------------------------------- DATA.LOADER fast and gpu

def _first_batches(root, loader, chans, *opts):
    """The finished first training batch (epoch 0) and first eval batch of ``DATA.LOADER loader`` at 48 x 32."""
    from data import batch_to_device, build_loader
    config = load_config(None, ['DATA.DATA_PATH', root, 'DATA.BATCH_SIZE', '4', 'MODEL.SWIN.IN_CHANS', str(chans),
                                'DATA.IMG_SIZE', '[48, 32]', *TINY, 'DATA.LOADER', loader, *opts])
    _, _, loader_train, loader_val, _ = build_loader(config)
    loader_train.sampler.set_epoch(0)
    cpu = torch.device('cpu')
    return config, batch_to_device(next(iter(loader_train)), cpu), batch_to_device(next(iter(loader_val)), cpu)


@pytest.mark.parametrize('loader', ['fast', 'gpu'])
@pytest.mark.parametrize('kind, chans', [('grey', 1), ('rgba', 4), ('npy5', 5), ('rgb', 3)])
@pytest.mark.parametrize('crop', ['True', 'False'])
def test_fast_and_gpu_batches_are_the_torch_loaders(loader, kind, chans, crop, tmp_path):
    """Grey, RGBA, 5-channel .npy and RGB images at DATA.IMG_SIZE [48, 32]: fast and gpu batches have the torch
    loader's shapes, labels and pixels, training (the same crop and flip draws per sample) and eval (its resize and
    centre crop per side, or the plain resize). In pixel levels of 255, after clamping to 0..255: within 1 for grey
    and RGB (Pillow's kernels there, torchvision's uint8 ones here); within 5 for the float-tensor channel counts,
    whose torch-loader resize keeps float values between its two passes (bicubic overshoot below 0 included)
    where Pillow's and torchvision's uint8 kernels clamp and round (fast and gpu do the latter for every count)."""
    root = write_folder(tmp_path, kind, train=4, val=2)
    _, (t_ref, y_ref), (v_ref, vy_ref) = _first_batches(root, 'torch', chans, 'TEST.CROP', crop)
    config, (t_got, y_got), (v_got, vy_got) = _first_batches(root, loader, chans, 'TEST.CROP', crop)
    assert t_got.shape == v_got.shape == (4, chans, 48, 32) and t_got.dtype == v_got.dtype == torch.float32
    assert torch.equal(y_got, y_ref) and torch.equal(vy_got, vy_ref)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) * 255 for v in mean_std(config))

    def levels(x):
        return (x * std + mean).clamp(0, 255)
    tolerance = 1.01 if chans in (1, 3) else 5.01
    for got, ref in ((t_got, t_ref), (v_got, v_ref)):
        diff = (levels(got) - levels(ref)).abs()
        assert float(diff.max()) <= tolerance and float(diff.mean()) < 0.5, (float(diff.max()), float(diff.mean()))


def test_fast_grey_randaugment_is_the_torch_loaders(tmp_path):
    """Grey with RandAugment (DATA.LOADER fast runs timm's ops on the grey Pillow image, its affine ops through
    OpenCV): sample by sample the torch loader's augmentation (the same op draws), each image within 3 levels of
    255 on average (OpenCV's cubic kernel is a = -0.75, Pillow's -0.5), the batch within 1."""
    root = write_folder(tmp_path, 'grey', train=8, val=2)
    opts = ('AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-inc1', 'DATA.BATCH_SIZE', '32')
    _, (ref, y_ref), _ = _first_batches(root, 'torch', 1, *opts)
    config, (got, y_got), _ = _first_batches(root, 'fast', 1, *opts)
    assert got.shape == (32, 1, 48, 32) and torch.equal(y_got, y_ref)
    mean, std = mean_std(config)
    diff = (got - ref).abs() * std[0] * 255
    assert float(diff.mean((1, 2, 3)).max()) < 3.0 and float(diff.mean()) < 1.0


@pytest.mark.parametrize('loader', ['fast', 'gpu'])
def test_grey_datasets_pickle_for_spawned_workers(loader, tmp_path):
    """A spawned DataLoader worker gets the dataset pickled: the channel count travels with the transform (the
    fast loader's decoder re-imports simplejpeg there), and a sample is the same there."""
    import pickle

    from data.build import build_dataset
    from data.seeding import SampleKey
    root = write_folder(tmp_path, 'grey', train=2, val=1)
    config = load_config(None, ['DATA.DATA_PATH', root, 'MODEL.SWIN.IN_CHANS', '1', 'DATA.IMG_SIZE', '[48, 32]',
                                *TINY, 'DATA.LOADER', loader])
    ds, _ = build_dataset(True, config)
    copy = pickle.loads(pickle.dumps(ds))
    a, b = copy[SampleKey(1, 0, 3)], ds[SampleKey(1, 0, 3)]
    assert a[0][0].shape[0] == 1 and torch.equal(a[0][0], b[0][0])


@pytest.mark.parametrize('loader', ['fast', 'gpu'])
def test_grey_jpeg_is_its_luma_on_fast_and_gpu(loader, tmp_path):
    """A colour JPEG read with 1 channel: libjpeg's (nvJPEG's) grey output, the JPEG's luma, on both loaders, and
    close to the torch loader's Pillow RGB -> 'L' (mean below 0.1 level; single pixels differ where Pillow's
    RGB clipped)."""
    from data.datasets import decode_image
    from data.fast import Decoder
    from data.gpu import decode_batch, encoded_or_pixels
    for pixels, _ in photo_crops(1, 0, crop=(120, 90)):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, 'JPEG', quality=90)
        data = buf.getvalue()
        reference = np.asarray(decode_image(data, 1)).astype(np.float64)  # (H, W) Pillow 'L'
        if loader == 'fast':
            got = Decoder('fast', 1).decode(data)  # (H, W, 1)
        else:
            payload, wh = encoded_or_pixels(data, 1)
            assert payload.dim() == 1  # sent encoded, decoded on the device
            got = decode_batch([payload], torch.device('cpu'), [wh], 1)[0].permute(1, 2, 0).numpy()
        assert got.shape == reference.shape + (1,)
        assert np.abs(got[:, :, 0] - reference).mean() < 0.1


@pytest.mark.parametrize('kind, chans', [('grey', 1), ('rgba', 4)])
@pytest.mark.parametrize('is_train', [True, False], ids=['train', 'eval'])
def test_gpu_batched_resize_any_channels_non_square(kind, chans, is_train, tmp_path):
    """What CUDA runs for the gpu loader's crop-resize (``resize_batched``, run here on the CPU) for 1 and 4
    channels at [48, 32] against torchvision's float32 resize of each image: the same but for rounding ties,
    also split into chunks. (The CPU's per-image uint8 kernels, ``resize_per_sample``, round between their two
    passes: up to a few levels off on these small crops, a fraction of a level on average.)"""

    import data.gpu
    from data.build import build_dataset, loader_collate
    from data.seeding import SampleKey
    root = write_folder(tmp_path, kind, train=4, val=2)
    config = load_config(None, ['DATA.DATA_PATH', root, 'MODEL.SWIN.IN_CHANS', str(chans), 'DATA.IMG_SIZE',
                                '[48, 32]', *TINY, 'DATA.LOADER', 'gpu', 'AUG.REPROB', '0.25'])
    ds, _ = build_dataset(is_train, config)
    samples = [ds[SampleKey(k, 0, 3)] if is_train else ds[k] for k in range(len(ds))]
    batch = loader_collate(is_train, config)(samples)
    plan = batch.extras
    images = data.gpu.decode_batch(batch.images.unpack(), torch.device('cpu'), plan.sizes, chans)
    assert all(img.shape[0] == chans for img in images)
    want = float_resize_of_each_image(images, plan, 48, 32)
    got = torch.empty_like(want)
    data.gpu.resize_batched(images, plan.chunks, plan.packed.to('cpu'), got)
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    per_sample = torch.empty_like(want)
    data.gpu.resize_per_sample(images, plan.plans, plan.order, per_sample)
    assert (per_sample.float() - got.float()).abs().mean() < 0.5
    data.gpu.RESIZE_BUDGET, budget = 4_000, data.gpu.RESIZE_BUDGET  # a few samples per chunk
    try:
        split = data.gpu.BatchPlan(plan.plans, (48, 32), channels=chans)
    finally:
        data.gpu.RESIZE_BUDGET = budget
    assert len(split.chunks) > 2
    chunked = torch.empty_like(want)
    data.gpu.resize_batched(images, split.chunks, split.packed.to('cpu'), chunked)
    assert torch.equal(chunked, got)


@pytest.mark.parametrize('mode', ['pixel', 'rand', 'const'])
def test_device_erasing_fills_every_channel_as_timm(mode):
    """Erasing on 4 channels: the drawn box gets timm's fill of shape (C, h, w) (from the sample's seed), and
    the normalisation takes the 4 per-channel means/stds."""
    from data.device_batch import DeviceFinish
    mean, std = (0.1, 0.2, 0.3, 0.4), (0.5, 0.25, 0.2, 0.1)
    finish = DeviceFinish(mode, mean, std)
    images = torch.randint(0, 256, (2, 4, 40, 36), dtype=torch.uint8)
    params = torch.zeros((2, 5), dtype=torch.int64)
    params[1] = torch.tensor([3, 5, 10, 7, 1234])  # sample 1: one box at (3, 5), 10 x 7; sample 0 none
    out = finish(images, params)
    want = (images.float() / 255 - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    g = torch.Generator().manual_seed(1234)
    fill = {'pixel': lambda: torch.randn((4, 10, 7), generator=g),
            'rand': lambda: torch.randn((4, 1, 1), generator=g).expand(4, 10, 7),
            'const': lambda: torch.zeros((4, 10, 7))}[mode]()
    want[1, :, 3:13, 5:12] = fill
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.fake_cuda
@pytest.mark.parametrize('loader', ['fast', 'gpu'])
@pytest.mark.parametrize('kind, chans', [('grey', 1), ('rgba', 4)])
def test_non_rgb_non_square_finish_on_fake_cuda(loader, kind, chans, tmp_path):
    """The device finish of a 1- or 4-channel [48, 32] training batch with erasing: no blocking copy, no host
    read, a few kernels (the RGB budgets of tests/test_device_batch_fake_cuda.py), as many for twice the batch
    (the worker-decoded pixels go over in one copy, not one per image)."""
    from fake_cuda import DeviceOps, fake_cuda

    from data import batch_to_device
    from data.build import build_dataset, loader_collate
    from data.seeding import SampleKey
    root = write_folder(tmp_path, kind, train=4, val=2)
    config = load_config(None, ['DATA.DATA_PATH', root, 'MODEL.SWIN.IN_CHANS', str(chans), 'DATA.IMG_SIZE',
                                '[48, 32]', *TINY, 'DATA.LOADER', loader, 'AUG.REPROB', '1.0'])
    ds, _ = build_dataset(True, config)
    totals = []
    for n in (len(ds), 2 * len(ds)):
        batch = loader_collate(True, config)([ds[SampleKey(k % len(ds), k // len(ds), 3)] for k in range(n)])
        with fake_cuda():
            with DeviceOps() as ops:
                images, targets = batch_to_device(batch, torch.device('cuda'))
        assert images.shape == (n, chans, 48, 32) and images.device.type == 'cuda'
        assert not ops.blocking_copies and not ops.host_reads, ops.report()
        assert ops.total <= {'fast': 8, 'gpu': 16}[loader], ops.report()
        totals.append(ops.total)
    assert totals[0] == totals[1], totals


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('loader', ['fast', 'gpu'])
@pytest.mark.parametrize('kind, chans', [('jpeg', 1), ('rgba', 4)])
def test_non_rgb_non_square_finish_on_cuda_like_on_cpu(loader, kind, chans, tmp_path):
    """Colour JPEGs read grey (nvJPEG's grey output on CUDA) and RGBA PNGs at [48, 32]: the batches finished on
    CUDA and on the CPU agree (decoders and kernels differ by rounding; erasing off)."""
    from data import batch_to_device, build_loader
    root = write_folder(tmp_path, 'rgb' if kind == 'jpeg' else kind, train=4, val=2)
    if kind == 'jpeg':
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                Image.open(path).convert('RGB').save(path[:-4] + '.jpg', quality=90)
                os.remove(path)
    config = load_config(None, ['DATA.DATA_PATH', root, 'DATA.BATCH_SIZE', '8', 'MODEL.SWIN.IN_CHANS', str(chans),
                                'DATA.IMG_SIZE', '[48, 32]', *TINY, 'DATA.LOADER', loader])
    _, _, train, val, _ = build_loader(config)
    train.sampler.set_epoch(0)
    std = torch.tensor(mean_std(config)[1]).view(1, -1, 1, 1) * 255
    for batch in [*train, *val]:
        a, ya = batch_to_device(batch, torch.device('cuda'))
        b, yb = batch_to_device(batch, torch.device('cpu'))
        assert a.is_cuda and a.shape == b.shape == (8, chans, 48, 32) and torch.equal(ya.cpu(), yb)
        assert float(((a.cpu() - b) * std).abs().mean()) < 1.5


# ----------------------------------------------------------------------------- models

def test_flops_non_square_scale_with_the_tokens():
    """A 224 x 448 Swin-T has twice the windows of the 224 one at every stage: twice its count, head aside."""
    from models import SwinTransformer
    square, wide = SwinTransformer(img_size=224), SwinTransformer(img_size=(224, 448))
    head = square.num_features * square.num_classes
    assert wide.flops() - head == 2 * (square.flops() - head)
    tall = SwinTransformer(img_size=(448, 224))
    assert tall.flops() == wide.flops()


def test_pretrained_rgb_into_grey_and_rgba_models():
    from timm.models import adapt_input_conv

    from models import SwinTransformer, load_pretrained
    arch = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=4, ape=True)
    rgb = SwinTransformer(img_size=32, **arch)
    weight = rgb.state_dict()['patch_embed.proj.weight']
    for chans, size in ((1, (48, 32)), (4, 32)):
        model = SwinTransformer(img_size=size, in_chans=chans, **arch)
        result = load_pretrained(model, {'model': rgb.state_dict()})
        assert 'patch_embed.proj.weight' in result['adapted']
        got = model.state_dict()['patch_embed.proj.weight']
        assert torch.equal(got, adapt_input_conv(chans, weight))
        if chans == 1:
            assert torch.allclose(got, weight.sum(1, keepdim=True))
            assert model.absolute_pos_embed.shape == (1, 12 * 8, 16)  # a 12 x 8 patch grid
        assert model(torch.randn(2, chans, *model.img_size)).shape == (2, 4)


# ----------------------------------------------------------------------------- end to end

def _main(args, timeout=400):
    return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_grey_non_square_trains_learns_exports_and_fine_tunes_from_rgb(tmp_path):
    """Grey 48 x 32 from scratch learns (above 25 % chance) and its checkpoint exports to ONNX with the same
    logits through ONNX Runtime (scripts/export.py, the config stored in the checkpoint); an RGB run's checkpoint
    fine-tunes into a grey model that learns too."""
    grey = write_folder(tmp_path / 'grey', 'grey')
    common = ['--batch-size', '8', '--device', 'cpu', '--disable_amp', '--opts', *TINY, 'TRAIN.EPOCHS', '6',
              'DATA.IMG_SIZE', '[48, 32]']
    out = str(tmp_path / 'out_grey')
    result = _ok(_main(['--data-path', grey, '--output', out, *common, 'MODEL.SWIN.IN_CHANS', '1']))
    acc1 = parse_eval_line(result.stdout + result.stderr)[0]
    assert acc1 > 40.0, acc1
    run_dir = os.path.join(out, 'swin_tiny_patch4_window7_224', 'default')
    checkpoint = os.path.join(run_dir, 'ckpt_last.pth')
    onnx_path = str(tmp_path / 'grey.onnx')
    exported = _ok(subprocess.run([sys.executable, 'scripts/export.py', '--resume', checkpoint, '--onnx', onnx_path],
                                  cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300))
    assert 'batch x 1 x 48 x 32' in exported.stdout and os.path.isfile(onnx_path)
    assert float(exported.stdout.split('max abs diff ')[1].split()[0]) < 1e-3, exported.stdout

    # fine-tune: an RGB run's weights into the grey model (patch embedding summed over RGB, logged)
    rgb = write_folder(tmp_path / 'rgb', 'rgb')
    out_rgb = str(tmp_path / 'out_rgb')
    _ok(_main(['--data-path', rgb, '--output', out_rgb, *common[:-2], 'TRAIN.EPOCHS', '3', 'DATA.IMG_SIZE', '32']))
    rgb_ckpt = os.path.join(out_rgb, 'swin_tiny_patch4_window7_224', 'default', 'ckpt_last.pth')
    result = _ok(_main(['--data-path', grey, '--output', str(tmp_path / 'out_ft'), '--pretrained', rgb_ckpt,
                        *common[:-2], 'TRAIN.EPOCHS', '3', 'DATA.IMG_SIZE', '[48, 32]', 'MODEL.SWIN.IN_CHANS', '1']))
    text = result.stdout + result.stderr
    assert 'adapted the patch embedding from 3 to 1 input channels' in text
    assert parse_eval_line(text)[0] > 40.0


@pytest.mark.slow
@pytest.mark.parametrize('kind, chans, loaders', [('grey', 1, ('torch', 'fast', 'gpu')), ('rgba', 4, ('fast', 'gpu'))])
def test_fast_and_gpu_loaders_train_non_square_non_rgb_like_torch(kind, chans, loaders, tmp_path):
    """48 x 32 grey (and RGBA) from scratch with DATA.LOADER fast and gpu learns (above 25 % chance); the loaders
    share the sampler and the augmentation draws, so grey runs end within two images (of 32) of the torch
    loader's run; the gpu run's checkpoint evaluated by the torch loader (--eval) scores the gpu loader's accuracy
    within one image (their eval pixels differ by at most a level or so)."""
    root = write_folder(tmp_path / kind, kind)
    common = ['--data-path', root, '--batch-size', '8', '--device', 'cpu', '--disable_amp', '--opts', *TINY,
              'TRAIN.EPOCHS', '10', 'DATA.IMG_SIZE', '[48, 32]', 'MODEL.SWIN.IN_CHANS', str(chans)]
    runs = run_side_by_side([[sys.executable, 'main.py', '--output', str(tmp_path / f'out_{loader}'), *common,
                              'DATA.LOADER', loader] for loader in loaders], ROOT, timeout=600)
    final = {loader: parse_eval_line(_ok(result).stdout + result.stderr)[0] for loader, result in zip(loaders, runs)}
    assert all(acc > 40.0 for acc in final.values()), final
    if 'torch' in final:
        assert all(abs(acc - final['torch']) <= 2 * 100 / 32 + 1e-6 for acc in final.values()), final
    checkpoint = os.path.join(str(tmp_path / 'out_gpu'), 'swin_tiny_patch4_window7_224', 'default', 'ckpt_last.pth')
    result = _ok(_main(['--eval', '--resume', checkpoint, '--output', str(tmp_path / 'eval'), *common,
                        'DATA.LOADER', 'torch']))
    evaluated = parse_eval_line(result.stdout + result.stderr)[0]
    assert abs(evaluated - final['gpu']) <= 100 / 32 + 1e-6, (evaluated, final)


@pytest.mark.parametrize('model_type, size, fast', [('swin', (48, 32), True), ('swin', (48, 32), False),
                                                   ('swinv2', (48, 32), True), ('swin', (50, 36), True)])
def test_onnx_dynamic_batch_with_padded_grid(model_type, size, fast, tmp_path):
    """A stage grid that needs window padding (48 x 32 px, window 4: a 6 x 4 stage; 50 x 36: odd maps, shifted
    windows padded) exports and gives PyTorch's logits through ONNX Runtime at another batch size, on the fast
    paths and the official ones. It did not: the window geometry was traced from shape tensors into an Expand
    that ONNX Runtime rejected."""
    from models import SwinTransformer, SwinTransformerV2
    from models.fast_paths import fast_paths_enabled
    from scripts.export import check_onnx, export_onnx
    cls, extra = (SwinTransformer, {}) if model_type == 'swin' else \
        (SwinTransformerV2, {'pretrained_window_sizes': (0, 0)})
    with fast_paths_enabled(fast):
        model = cls(img_size=size, in_chans=1, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
                    num_classes=4, **extra).eval()
        export_onnx(model, str(tmp_path / 'm.onnx'), size, 1)
        assert check_onnx(model, str(tmp_path / 'm.onnx'), size, 1, batch=3) < 1e-3
        assert check_onnx(model, str(tmp_path / 'm.onnx'), size, 1, batch=1) < 1e-3
