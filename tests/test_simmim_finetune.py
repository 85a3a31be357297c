"""Fine-tuning from a SimMIM checkpoint (``models.load_pretrained`` / ``--pretrained``) against the official
``utils_simmim.load_pretrained`` (tests/fixtures/simmim_ft, made by its make_official_fixtures.py with the
official code and SciPy 1.13, whose interp2d the official table resize calls)."""
import os

import pytest
import torch

import models
from config import load_config
from models.pretrained import geometric_resize_relative_position_bias_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'simmim_ft')
# the fine-tune architectures of make_official_fixtures.py (RUNS), in our config's terms
ARCH = {
    'v1': ['MODEL.TYPE', 'swin', 'DATA.IMG_SIZE', '224', 'MODEL.SWIN.EMBED_DIM', '4', 'MODEL.SWIN.DEPTHS', '[2, 2, 2]',
           'MODEL.SWIN.NUM_HEADS', '[1, 2, 2]', 'MODEL.SWIN.WINDOW_SIZE', '7', 'MODEL.SWIN.MLP_RATIO', '2.0',
           'MODEL.SWIN.APE', 'False'],
    'v2': ['MODEL.TYPE', 'swinv2', 'DATA.IMG_SIZE', '224', 'MODEL.SWINV2.EMBED_DIM', '4',
           'MODEL.SWINV2.DEPTHS', '[2, 2, 2, 2]', 'MODEL.SWINV2.NUM_HEADS', '[1, 1, 2, 2]',
           'MODEL.SWINV2.WINDOW_SIZE', '14', 'MODEL.SWINV2.MLP_RATIO', '2.0', 'MODEL.SWINV2.APE', 'False',
           'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', '[12, 12, 12, 6]'],
}


def fixture(version):
    return torch.load(os.path.join(FIXTURES, f'{version}.pt'), weights_only=True)


def finetune_model(version):
    config = load_config(None, ARCH[version] + ['MODEL.NUM_CLASSES', '10', 'MODEL.DROP_PATH_RATE', '0.0'])
    return models.build_model(config)


def with_derived_buffers(checkpoint):
    """The fixture checkpoint with stand-ins for the derived buffers it was saved without (a real one has
    them: ``attn_mask`` in shifted blocks, ``relative_position_index`` everywhere) at the pre-training size."""
    state = dict(checkpoint['model'])
    for key in list(state):
        if key.endswith('attn.qkv.weight'):
            block = key[:-len('attn.qkv.weight')]
            state[block + 'attn.relative_position_index'] = torch.zeros(144, 144, dtype=torch.long)
            state[block + 'attn_mask'] = torch.full((4, 144, 144), -100.0)
    return {'model': state}


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_simmim_checkpoint_loads_as_the_official_finetune(version, tmp_path):
    fx = fixture(version)
    assert fx['unexpected'] == ['mask_token']  # upstream left only the mask token over
    assert [k for k in fx['missing'] if not k.endswith(('relative_position_index', 'attn_mask',
                                                         'relative_coords_table'))] == ['head.weight', 'head.bias']
    path = tmp_path / 'simmim.pth'
    torch.save(with_derived_buffers(fx['checkpoint']), path)  # through the file path, as --pretrained
    torch.manual_seed(0)
    model = finetune_model(version)
    head = model.head.weight.detach().clone()
    result = models.load_pretrained(model, str(path))
    ours = model.state_dict()
    assert set(fx['official']) <= set(ours)
    for key, expected in fx['official'].items():
        torch.testing.assert_close(ours[key], expected, rtol=0, atol=1e-5, msg=key)
    assert result['reinitialized'] == ['head.weight', 'head.bias']
    assert torch.equal(model.head.weight, head)  # the fresh head is kept, as upstream
    tables = [k for k in fx['official'] if k.endswith('relative_position_bias_table')]
    assert sorted(result['adapted']) == sorted(tables)
    assert (len(tables) == 6) == (version == 'v1')  # V2 has no tables: its cpb_mlp is renamed and loaded
    if version == 'v2':
        assert any('cpb_mlp' in k for k in fx['official'])
        assert not any('cpb_mlp' in k for k in fx['checkpoint']['model'])


def test_geometric_resize_matches_interp2d_on_the_fixture_tables():
    """The resize itself (RectBivariateSpline in place of the removed interp2d), table by table."""
    fx = fixture('v1')
    for key, expected in fx['official'].items():
        if key.endswith('relative_position_bias_table'):
            source = fx['checkpoint']['model']['encoder.' + key]  # (11*11, nH) at window 6
            ours = geometric_resize_relative_position_bias_table(source, 13)  # (13*13, nH) at window 7
            torch.testing.assert_close(ours.float(), expected, rtol=0, atol=1e-5, msg=key)


def test_simmim_checkpoint_of_another_width_is_an_error_naming_the_key():
    fx = fixture('v1')
    state = dict(fx['checkpoint']['model'])
    state['encoder.patch_embed.proj.weight'] = torch.zeros(8, 3, 4, 4)
    with pytest.raises(ValueError, match=r'^patch_embed.proj.weight: checkpoint shape \(8, 3, 4, 4\)'):
        models.load_pretrained(finetune_model('v1'), {'model': state})


def test_our_simmim_state_dict_loads_into_the_finetune_model():
    """Our own pre-training model's state dict (official names) loads into the fine-tune model."""
    pt_config = load_config(None, ARCH['v1'] + ['MODEL.SWIN.WINDOW_SIZE', '6', 'DATA.IMG_SIZE', '192'])
    pt_model = models.build_model(pt_config, is_pretrain=True)
    model = finetune_model('v1')
    result = models.load_pretrained(model, {'model': pt_model.state_dict()})
    assert result['reinitialized'] == ['head.weight', 'head.bias']
    torch.testing.assert_close(model.patch_embed.proj.weight, pt_model.encoder.patch_embed.proj.weight)


def test_odd_batch_is_fine_for_simmim_pretraining_but_not_for_mixup_classification(monkeypatch):
    """SimMIM pre-training has no Mixup (the official pre-training configs leave AUG.MIXUP at 0.8 unused), so
    an odd batch is valid there; classification with Mixup keeps the even-batch error."""
    import main
    from config import ConfigError, get_config
    from main_simmim_pt import simmim_argv
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    pt = ['--cfg', 'configs/simmim/simmim_pretrain__swin_base__img192_window6__800ep.yaml', '--data-path', '/d',
          '--batch-size', '3']
    config = get_config(main.parse_args(simmim_argv(pt)), pretrain=True)
    assert config.DATA.BATCH_SIZE == 3 and config.AUG.MIXUP > 0
    ft = ['--cfg', 'configs/simmim/simmim_finetune__swin_base__img224_window7__800ep.yaml', '--data-path', '/d',
          '--batch-size', '3']
    with pytest.raises(ConfigError, match='must be even for Mixup'):
        get_config(main.parse_args(simmim_argv(ft)))


@pytest.mark.slow
def test_simmim_demo_pretrains_reconstructs_and_finetunes(tmp_path):
    """scripts/simmim_demo.py, shortened: the PNG is written, the masked-pixel loss falls, a top-1 is printed."""
    import re
    import subprocess
    import sys

    from helpers import subprocess_env
    out = tmp_path / 'out'
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'simmim_demo.py'), '--data-path',
                          str(tmp_path / 'data'), '--output', str(out), '--pretrain-epochs', '3',
                          '--finetune-epochs', '1'], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / 'simmim_reconstruction.png').stat().st_size > 10_000
    first, last = map(float, re.search(r'pre-training loss: ([\d.]+) \(epoch 0\) -> ([\d.]+) \(epoch 2\)',
                                       run.stdout).groups())
    assert last < first
    per_epoch = re.findall(r'epoch +\d+: ([\d.]+)', run.stdout)
    assert len(per_epoch) == 3
    acc1 = float(re.search(r'fine-tune top-1: +([\d.]+)%', run.stdout).group(1))
    # the printed top-1 is the fine-tuned model's over the 359 validation digits (a plain loop here)
    from helpers import folder_images, plain_accuracy
    cfg = os.path.join(ROOT, 'configs', 'demo', 'simmim_finetune_digits_32.yaml')
    weights = torch.load(out / 'simmim_finetune_digits_32' / 'default' / 'ckpt_last.pth', weights_only=True)['model']
    plain1, _, _, n = plain_accuracy(weights, [], folder_images(str(tmp_path / 'data' / 'val')), cfg)
    assert n == 359 and f'{acc1:.2f}' == f'{plain1:.2f}', (acc1, plain1)
    assert 'SimMIM checkpoint: encoder weights taken' in run.stdout  # the fine-tune loaded the pre-training
