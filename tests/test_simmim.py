"""SimMIM pre-training and its layer-decay fine-tune against the official code (tests/fixtures/simmim, see its
README): loss, masks, transform, loader, parameter groups and every group's learning rate at every update."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision import transforms

import data
import data.build
import data.simmim
import models
from config import apply_linear_scaling, load_config
from data.simmim import CROP_RATIO, CROP_SCALE, MaskGenerator, SimMIMTransform
from lr_scheduler import build_scheduler
from models.simmim import SimMIM
from models.swin_common import DERIVED_BUFFERS
from optimizer import build_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'simmim')
SIMMIM_CONFIGS = {
    'finetune_swin': 'configs/simmim/simmim_finetune__swin_base__img224_window7__800ep.yaml',
    'finetune_swinv2': 'configs/simmim/simmim_finetune__swinv2_base__img224_window14__800ep.yaml',
    'pretrain_swin': 'configs/simmim/simmim_pretrain__swin_base__img192_window6__800ep.yaml',
    'pretrain_swinv2': 'configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml',
}


def fixture(name):
    return torch.load(os.path.join(FIXTURES, name), weights_only=True)


def official_state_dict(fx):
    """The official model's state dict from the packed fixture (parameters fp16-exact -> fp32)."""
    flat = fx['params_fp16'].float()
    state, offset = {}, 0
    for name, shape in json.loads(fx['param_layout']):
        n = math.prod(shape)
        state[name] = flat[offset:offset + n].view(shape)
        offset += n
    assert offset == flat.numel()
    state.update(fx['buffers'])
    return state


def tiny_config(fx, version, *opts):
    """Our config for the fixture's tiny architecture."""
    arch = json.loads(fx['arch'])
    key = 'MODEL.SWIN' if version == 'v1' else 'MODEL.SWINV2'
    return load_config(None, [
        'MODEL.TYPE', 'swin' if version == 'v1' else 'swinv2', 'DATA.IMG_SIZE', str(arch['img_size']),
        'MODEL.DROP_PATH_RATE', '0.0', f'{key}.EMBED_DIM', str(arch['embed_dim']),
        f'{key}.DEPTHS', str(arch['depths']), f'{key}.NUM_HEADS', str(arch['num_heads']),
        f'{key}.WINDOW_SIZE', str(arch['window_size']), f'{key}.MLP_RATIO', str(arch['mlp_ratio']),
        f'{key}.APE', str(arch['ape']), *(['MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', '[0, 0, 0]'] if version == 'v2'
                                          else []), *opts])


def tiny_simmim(version='v1', norm_target=False, patch=47):
    fx = fixture(f'model_{version}.pt')
    config = tiny_config(fx, version, 'MODEL.SIMMIM.NORM_TARGET.ENABLE', str(norm_target),
                         'MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE', str(patch))
    return models.build_model(config, is_pretrain=True), fx


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize('version', ['v1', 'v2'])
@pytest.mark.parametrize('case', ['plain', 'norm47', 'norm5'])
def test_loss_equals_official(version, case):
    """Same weights (the official state dict, buffers included), input and mask: the official loss to 1e-5."""
    fx = fixture(f'model_{version}.pt')
    want = json.loads(fx['losses'])[case]
    model, _ = tiny_simmim(version, want['norm_target'], want['patch_size'])
    assert isinstance(model, SimMIM) and model.encoder_stride == json.loads(fx['arch'])['encoder_stride']
    model.load_state_dict(official_state_dict(fx), strict=True)
    model.eval()
    with torch.no_grad():
        loss = model(fx['x'].float(), fx['mask'].long())
    assert loss.shape == () and abs(loss.item() - want['loss']) < 1e-5, (loss.item(), want)


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_encoder_output_equals_official(version):
    """The encoder's last-stage map (mask token, position embedding, shifted windows, merging, final norm)."""
    model, fx = tiny_simmim(version)
    model.load_state_dict(official_state_dict(fx), strict=True)
    model.eval()
    with torch.no_grad():
        z = model.encoder(fx['x'].float(), fx['mask'].long())
    assert z.shape == fx['z'].shape == (2, 16, 3, 3)
    torch.testing.assert_close(z, fx['z'], rtol=0, atol=1e-5)


def test_official_pretrain_models_have_the_official_state_dict():
    """The two official pre-training configs: our state dict is the official one without its derived buffers."""
    groups = json.load(open(os.path.join(FIXTURES, 'groups.json')))
    for key in ('pretrain_swin', 'pretrain_swinv2'):
        with torch.device('meta'):
            model = models.build_model(load_config(os.path.join(ROOT, SIMMIM_CONFIGS[key])), is_pretrain=True)
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        official = groups[key]['state_dict_shapes']
        derived = {k for k in official if k.rsplit('.', 1)[-1] in DERIVED_BUFFERS}
        assert ours == {k: v for k, v in official.items() if k not in derived}
        assert model.encoder_stride == 32 and ours['decoder.0.weight'] == [3072, 1024, 1, 1]
        assert model.encoder.num_classes == 0 and 'encoder.head.weight' not in ours


def test_rpe_mlp_checkpoints_load():
    """Released official SwinV2 SimMIM checkpoints name the bias MLP rpe_mlp; they load (renamed as upstream)."""
    model, fx = tiny_simmim('v2')
    state = {k.replace('.cpb_mlp.', '.rpe_mlp.'): v for k, v in official_state_dict(fx).items()}
    assert any('.rpe_mlp.' in k for k in state)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.encoder.layers[0].blocks[0].attn.cpb_mlp[0].weight,
                       official_state_dict(fx)['encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight'])


def test_loss_is_the_mean_l1_over_masked_pixels():
    model, fx = tiny_simmim('v1')
    model.load_state_dict(official_state_dict(fx))
    model.eval()
    x, mask = fx['x'].float(), fx['mask'].long()
    with torch.no_grad():
        rec = model.decoder(model.encoder(x, mask))  # (B, 3, 48, 48)
        pixel_mask = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).bool()  # (B, 48, 48)
        want = (x - rec).abs().mean(1)[pixel_mask].mean()  # mean over channels, then over masked pixels
        assert model(x, mask).item() == pytest.approx(want.item(), rel=1e-5)
        assert model(x, torch.zeros_like(mask)).item() == 0.0  # nothing masked, nothing to reconstruct


def test_any_input_size_and_gradients():
    """Sizes that are no multiple of the stride (the official encoder asserts a square img_size input)."""
    model, _ = tiny_simmim('v2', norm_target=True, patch=5)
    x = torch.randn(2, 3, 50, 70)
    mask = (torch.rand(2, 13, 18) < 0.6).long()  # ceil(50 / 4) x ceil(70 / 4) patches
    loss = model(x, mask)
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.mask_token.grad.abs().sum() > 0
    assert model.decoder[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r'expected \(2, 13, 18\)'):
        model(x, mask[:, :12])


def test_gradients_keep_the_parameters_layout():
    """DDP buckets expect each gradient in its parameter's strides (else a warning per step); the decoder's 1x1
    conv gets a channels-last weight gradient when fed the encoder's channels-last view."""
    model, _ = tiny_simmim('v1')
    model(torch.randn(2, 3, 48, 48), (torch.rand(2, 12, 12) < 0.6).long()).backward()
    assert all(p.grad.stride() == p.stride() for p in model.parameters() if p.grad is not None)


def test_bf16_autocast_loss_close_to_fp32():
    model, fx = tiny_simmim('v1', norm_target=True)
    model.load_state_dict(official_state_dict(fx))
    model.eval()
    x, mask = fx['x'].float(), fx['mask'].long()
    with torch.no_grad():
        fp32 = model(x, mask)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            bf16 = model(x, mask)
    assert bf16.dtype == torch.float32 and bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


def test_bad_norm_target_patch_size_is_an_error():
    with pytest.raises(ValueError, match='NORM_TARGET.PATCH_SIZE'):
        tiny_simmim('v1', norm_target=True, patch=4)


# ----------------------------------------------------------------------------- masks and transform

def test_mask_generator_equals_official():
    fx = fixture('masks.pt')
    for key, args in json.loads(fx['masks']).items():
        np.random.seed(int(key[len('seed'):]))
        mask = MaskGenerator(*args)()
        assert torch.equal(torch.from_numpy(mask.astype(np.uint8)), fx[key]), key


@pytest.mark.parametrize('size, mask_patch, patch, ratio', [(192, 32, 4, 0.6), (224, 32, 4, 0.75), (64, 16, 4, 0.5),
                                                             (48, 12, 2, 0.1), (32, 8, 4, 1.0), (32, 8, 4, 0.0)])
def test_mask_counts_and_upsampling(size, mask_patch, patch, ratio):
    gen = MaskGenerator(size, mask_patch, patch, ratio)
    cells, scale = size // mask_patch, mask_patch // patch
    for seed in range(5):
        np.random.seed(seed)
        mask = gen()
        assert mask.shape == (size // patch, size // patch) and set(np.unique(mask)) <= {0, 1}
        blocks = mask.reshape(cells, scale, cells, scale)
        assert (blocks == blocks[:, :1, :, :1]).all()  # each cell is one constant scale x scale block
        assert int(blocks[:, 0, :, 0].sum()) == math.ceil(cells * cells * ratio)


@pytest.mark.parametrize('args, match', [((192, 30, 4, 0.6), 'multiple of DATA.MASK_PATCH_SIZE'),
                                         ((192, 32, 5, 0.6), 'multiple of the model'),
                                         ((192, 32, 4, 1.5), 'MASK_RATIO')])
def test_mask_generator_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        MaskGenerator(*args)


def test_transform_crop_scale_ratio_and_outputs():
    config = load_config(os.path.join(ROOT, SIMMIM_CONFIGS['pretrain_swinv2']))
    t = SimMIMTransform(config)
    crop = t.transform_img.transforms[0]
    assert isinstance(crop, transforms.RandomResizedCrop) and crop.size == (192, 192)
    assert (crop.scale, crop.ratio) == (CROP_SCALE, CROP_RATIO) == ((0.67, 1.0), (3 / 4, 4 / 3))
    assert isinstance(t.transform_img.transforms[1], transforms.RandomHorizontalFlip)
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    for _ in range(50):  # the crops torchvision draws with these parameters cover 67-100 % of the image
        i, j, h, w = crop.get_params(img, crop.scale, crop.ratio)
        assert 0.67 * 300 * 400 - 1000 <= h * w <= 300 * 400 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    x, mask = t(img)
    assert x.shape == (3, 192, 192) and x.dtype == torch.float32 and mask.shape == (48, 48)
    assert int(mask.sum()) == math.ceil(36 * 0.6) * 64


# ----------------------------------------------------------------------------- loader

@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    from helpers import write_digits_folder
    return write_digits_folder(tmp_path_factory.mktemp('digits'), classes=3, train_per_class=6, val_per_class=1)


def simmim_loader_config(path, *opts):
    return load_config(None, ['MODEL.TYPE', 'swinv2', 'DATA.DATA_PATH', path, 'DATA.IMG_SIZE', '32',
                              'DATA.MASK_PATCH_SIZE', '8', 'DATA.BATCH_SIZE', '4', 'DATA.NUM_WORKERS', '0', *opts])


def batches(loader, epoch=0):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_loader_batches_and_exact_resume(digits):
    config = simmim_loader_config(os.path.join(digits, 'train'))
    loader = data.build_loader(config, simmim=True, is_pretrain=True)
    assert loader.drop_last and len(loader) == 18 // 4
    out = batches(loader)
    img, mask, target = out[0]
    assert img.shape == (4, 3, 32, 32) and img.dtype == torch.float32
    assert mask.shape == (4, 8, 8) and mask.dtype == torch.int64 and (mask.sum((1, 2)) == 10 * 4).all()
    assert target.shape == (4,) and target.dtype == torch.int64
    # crops and masks are functions of (SEED, epoch, index): the same epoch again, and the rest of the epoch
    # from a loader over the remaining sample keys (a mid-epoch resume), give identical batches
    again = batches(loader)
    assert all(torch.equal(a, b) for x, y in zip(out, again) for a, b in zip(x, y))
    rest = torch.utils.data.DataLoader(loader.dataset, sampler=list(loader.sampler)[2 * 4:], batch_size=4,
                                       drop_last=True, collate_fn=loader.collate_fn)
    assert all(torch.equal(a, b) for x, y in zip(out[2:], list(rest)) for a, b in zip(x, y))
    other = batches(loader, epoch=1)
    assert not torch.equal(other[0][1], out[0][1]) or not torch.equal(other[0][0], out[0][0])


def test_loader_shards_ranks_exactly(digits, monkeypatch):
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(data.simmim, 'dist_info', lambda rank=rank: (rank, 2))
        loader = data.build_loader(simmim_loader_config(os.path.join(digits, 'train'), 'DATA.BATCH_SIZE', '2'),
                                   simmim=True, is_pretrain=True)
        loader.sampler.set_epoch(0)
        seen.append([int(i) for i in loader.sampler])
    assert len(seen[0]) == len(seen[1]) == 9 and sorted(seen[0] + seen[1]) == list(range(18))


def test_loader_zip_mode(digits, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import pack_zip
    pack_zip.main([digits, str(tmp_path), '--no-progress'])
    config = simmim_loader_config(str(tmp_path), 'DATA.ZIP_MODE', 'True', 'DATA.CACHE_MODE', 'full')
    loader = data.build_loader(config, simmim=True, is_pretrain=True)
    assert isinstance(loader.dataset, data.ZipImageDataset) and len(loader.dataset) == 18
    img, mask, _ = next(iter(loader))
    assert img.shape == (4, 3, 32, 32) and mask.shape == (4, 8, 8)


def test_loader_errors(digits, tmp_path):
    with pytest.raises(data.DatasetLayoutError, match='DATA.DATA_PATH'):
        data.build_loader(simmim_loader_config(''), simmim=True, is_pretrain=True)
    with pytest.raises(ValueError, match='MASK_PATCH_SIZE'):
        data.build_loader(simmim_loader_config(os.path.join(digits, 'train'), 'DATA.MASK_PATCH_SIZE', '12'),
                          simmim=True, is_pretrain=True)
    with pytest.raises(data.DatasetLayoutError, match='fewer than DATA.BATCH_SIZE'):
        data.build_loader(simmim_loader_config(os.path.join(digits, 'train'), 'DATA.BATCH_SIZE', '64'),
                          simmim=True, is_pretrain=True)


def test_finetune_loader_is_the_classification_one(digits):
    config = load_config(None, ['DATA.DATA_PATH', digits, 'DATA.IMG_SIZE', '32', 'DATA.NUM_WORKERS', '0',
                                'MODEL.NUM_CLASSES', '3', 'DATA.BATCH_SIZE', '2'])
    out = data.build_loader(config, simmim=True, is_pretrain=False)
    assert len(out) == 5 and len(out[0]) == 18 and len(out[1]) == 3


# ----------------------------------------------------------------------------- optimizer and schedule

RUNS = ['finetune_swin', 'finetune_swinv2', 'pretrain_swin', 'pretrain_swinv2', 'finetune_tiny_ape']


def official_run(key):
    """Our config, model and optimizer for one run of groups.json (same linear scaling: batch 128 x 8)."""
    entry = json.load(open(os.path.join(FIXTURES, 'groups.json')))[key]
    run = entry['run']
    cfg = os.path.join(ROOT, 'configs', 'simmim', run['cfg']) if run['cfg'] else None
    config = load_config(cfg, run['opts'] + ['DATA.BATCH_SIZE', str(run['batch_size'])])
    config = apply_linear_scaling(config, run['world_size'])
    is_pretrain = key.startswith('pretrain')
    with torch.device('meta'):  # names and shapes are all that matter here
        model = models.build_model(config, is_pretrain=is_pretrain)
    optimizer = build_optimizer(config, model, simmim=True, is_pretrain=is_pretrain)
    return entry, config, optimizer


@pytest.mark.parametrize('key', RUNS)
def test_param_groups_equal_official(key):
    """Group names, order, weight decay, lr_scale, lr and member names equal the official build_optimizer's."""
    entry, config, optimizer = official_run(key)
    ours = [(g.get('group_name'), g['weight_decay'], g.get('lr_scale'), g['lr'], sorted(g['param_names']))
            for g in optimizer.param_groups]
    official = [(g['group_name'], g['weight_decay'], g['lr_scale'], g['lr'], sorted(g['params']))
                for g in entry['groups']]
    if key.startswith('pretrain'):  # official pre-training groups have no name or scale; lr = AdamW's default
        official = [(None, wd, None, config.TRAIN.BASE_LR, names) for _, wd, _, _, names in official]
        # the official quirk kept (see SimMIM.no_weight_decay_keywords): prefixed keywords match nothing
        decayed = official[0][4]
        assert 'encoder.mask_token' in official[1][4] and 'encoder.absolute_pos_embed' not in decayed
        assert any('relative_position_bias_table' in n or 'cpb_mlp' in n for n in decayed)
    assert ours == official


@pytest.mark.parametrize('key', RUNS)
def test_every_groups_lr_at_every_update_equals_official(key):
    """WARMUP_LR and MIN_LR unscaled, each group's base BASE_LR * lr_scale (timm 0.4.12), cosine and multistep."""
    entry, config, optimizer = official_run(key)
    lrs = fixture('lrs.pt')
    want = lrs[key][:, lrs[key + '.column_of_group']]  # (1 + updates + 1, groups)
    scheduler = build_scheduler(config, optimizer, entry['n_iter_per_epoch'])
    rows = [[g['lr'] for g in optimizer.param_groups]]
    for t in range(want.shape[0] - 1):
        scheduler.step_update(t)
        rows.append([g['lr'] for g in optimizer.param_groups])
    got = torch.tensor(rows, dtype=torch.float64)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_mask_token_gets_no_weight_decay_and_pretraining_ignores_layer_decay():
    config = load_config(None, ['MODEL.SWIN.EMBED_DIM', '8', 'MODEL.SWIN.DEPTHS', '[1, 1]', 'MODEL.SWIN.NUM_HEADS',
                                '[1, 1]', 'DATA.IMG_SIZE', '32', 'TRAIN.LAYER_DECAY', '0.5'])
    model = models.build_model(config, is_pretrain=True)
    assert 'encoder.mask_token' in model.no_weight_decay()
    optimizer = build_optimizer(config, model, simmim=True, is_pretrain=True)
    assert len(optimizer.param_groups) == 2 and all('lr_scale' not in g for g in optimizer.param_groups)
    no_decay = [n for g in optimizer.param_groups if g['weight_decay'] == 0.0 for n in g['param_names']]
    assert 'encoder.mask_token' in no_decay and 'decoder.0.bias' in no_decay
    assert 'decoder.0.weight' not in no_decay


# ----------------------------------------------------------------------------- configs and entry points

def test_official_configs_load_unchanged():
    for key, path in SIMMIM_CONFIGS.items():
        config = load_config(os.path.join(ROOT, path))
        assert config.MODEL.NAME == f'simmim_{key.split("_")[0]}' and config.TAG in path
        assert (config.DATA.MASK_PATCH_SIZE, config.DATA.MASK_RATIO) == (32, 0.6)
    assert load_config(os.path.join(ROOT, SIMMIM_CONFIGS['pretrain_swinv2'])).MODEL.SIMMIM.NORM_TARGET.ENABLE
    assert load_config(os.path.join(ROOT, SIMMIM_CONFIGS['finetune_swinv2'])).TRAIN.LAYER_DECAY == 0.75
    assert load_config(os.path.join(ROOT, SIMMIM_CONFIGS['pretrain_swin'])).TRAIN.LR_SCHEDULER.MULTISTEPS == [700]


@pytest.mark.parametrize('argv, amp', [([], True), (['--enable-amp'], True), (['--disable-amp'], False),
                                       (['--enable-amp', '--disable-amp'], False),
                                       (['--disable-amp', '--enable-amp'], True)])
def test_official_flags_parse(argv, amp, monkeypatch):
    import main
    from config import get_config
    from main_simmim_pt import simmim_argv
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    line = ['--cfg', SIMMIM_CONFIGS['pretrain_swinv2'], '--data-path', '/data/train', '--batch-size', '128',
            '--accumulation-steps', '2', '--use-checkpoint', '--output', '/tmp/o', '--tag', 't', *argv]
    config = get_config(main.parse_args(simmim_argv(line)))
    assert config.AMP_ENABLE is amp
    assert (config.DATA.DATA_PATH, config.DATA.BATCH_SIZE, config.TRAIN.ACCUMULATION_STEPS) == ('/data/train', 128, 2)
    assert config.TRAIN.USE_CHECKPOINT and config.OUTPUT == '/tmp/o/simmim_pretrain/t'


@pytest.mark.parametrize('script', ['main_simmim_pt.py', 'main_simmim_ft.py'])
def test_entry_point_help(script):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), '--help'], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and '--cfg' in out.stdout and '--pretrained' in out.stdout
