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
from helpers import parse_eval_line, subprocess_env
from PIL import Image

from config import ConfigError, default_mean_std, img_size_hw, load_config, mean_std

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ('camera', 'astronaut', 'coffee', 'chelsea')  # one class each
TINY = ['DATA.DATASET', 'folder', 'MODEL.SWIN.EMBED_DIM', '16', 'MODEL.SWIN.DEPTHS', '[1,1]',
        'MODEL.SWIN.NUM_HEADS', '[1,2]', 'MODEL.SWIN.WINDOW_SIZE', '4', 'MODEL.NUM_CLASSES', '4',
        'DATA.NUM_WORKERS', '0', 'MODEL.DROP_PATH_RATE', '0.0', 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0',
        'AUG.AUTO_AUGMENT', 'none', 'AUG.REPROB', '0.0', 'AUG.COLOR_JITTER', '0.0', 'TRAIN.WARMUP_EPOCHS', '0',
        'TRAIN.BASE_LR', '0.02', 'PRINT_FREQ', '2', 'TRAIN.LR_SCHEDULER.NAME', 'step',
        'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '100', 'AUG.RRC_SCALE', '[0.5, 1.0]']


def photo_crops(per_class: int, seed: int, crop=(72, 56)):
    """(RGB uint8 (h, w, 3) array, label) pairs: random crops of h x w px of each photograph, halved in size."""
    from skimage import data as skdata
    from skimage.color import gray2rgb
    rng = np.random.default_rng(seed)
    out = []
    for label, name in enumerate(PHOTOS):
        photo = getattr(skdata, name)()
        photo = gray2rgb(photo) if photo.ndim == 2 else photo[:, :, :3]
        small = np.asarray(Image.fromarray(photo).resize((photo.shape[1] // 2, photo.shape[0] // 2)))
        for _ in range(per_class):
            top = rng.integers(0, small.shape[0] - crop[0])
            left = rng.integers(0, small.shape[1] - crop[1])
            out.append((small[top:top + crop[0], left:left + crop[1]].copy(), label))
    return out


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
            'DATA.IMG_SIZE', '[48, 32]', 'TEST.CROP', 'False', *TINY]  # no crop: eval keeps the whole image
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
    """Grey 48 x 32 from scratch learns (above 25 % chance); an RGB run's checkpoint fine-tunes into a grey model
    that learns too (ONNX of this size: test_onnx_dynamic_batch_with_padded_grid)."""
    grey = write_folder(tmp_path / 'grey', 'grey')
    common = ['--batch-size', '8', '--device', 'cpu', '--disable_amp', '--opts', *TINY, 'TRAIN.EPOCHS', '6',
              'DATA.IMG_SIZE', '[48, 32]']
    out = str(tmp_path / 'out_grey')
    result = _ok(_main(['--data-path', grey, '--output', out, *common, 'MODEL.SWIN.IN_CHANS', '1']))
    acc1 = parse_eval_line(result.stdout + result.stderr)[0]
    assert acc1 > 40.0, acc1
    run_dir = os.path.join(out, 'swin_tiny_patch4_window7_224', 'default')
    checkpoint = os.path.join(run_dir, 'ckpt_last.pth')

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
