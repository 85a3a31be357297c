"""Swin-MLP (MODEL.TYPE swin_mlp): official logits and FLOPs (fixtures made by the official code,
tests/fixtures/swin_mlp/README.md), any input size, fine-tune loading, FUSED_LAYERNORM, the device path."""
import json
import logging
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import models
from config import ConfigError, load_config
from models import SwinMLP, load_pretrained, set_fast_paths
from models.build import layer_norm_class
from models.window_ops import ReferenceWindows, WindowGeometry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'swin_mlp')
with open(os.path.join(FIXTURES, 'official.json')) as _f:
    OFFICIAL = json.load(_f)


def fixture_case(name):
    tensors = load_file(os.path.join(FIXTURES, f'{name}.safetensors'))
    state = {k[len('model.'):]: v for k, v in tensors.items() if k.startswith('model.')}
    return OFFICIAL['cases'][name]['kwargs'], state, tensors['input'], tensors['logits']


@pytest.fixture
def fast_paths_restored():
    yield
    set_fast_paths(True)


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'official-path'])
@pytest.mark.parametrize('name', ['small', 'small_w7'])
def test_official_checkpoint_gives_official_logits_and_flops(name, fast, fast_paths_restored):
    kwargs, state, x, expected = fixture_case(name)
    set_fast_paths(fast)
    model = SwinMLP(**kwargs).eval()
    result = model.load_state_dict(state)  # strict: the official names and shapes, nothing missing or extra
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert model.flops() == OFFICIAL['cases'][name]['flops']


def test_build_model_from_config_matches_the_fixture():
    kwargs, state, x, expected = fixture_case('small')
    config = load_config(None, [
        'MODEL.TYPE', 'swin_mlp', 'DATA.IMG_SIZE', '64', 'MODEL.NUM_CLASSES', '10', 'MODEL.DROP_PATH_RATE', '0.0',
        'MODEL.SWIN_MLP.EMBED_DIM', '16', 'MODEL.SWIN_MLP.DEPTHS', '[2,2,2]', 'MODEL.SWIN_MLP.NUM_HEADS', '[2,4,8]',
        'MODEL.SWIN_MLP.WINDOW_SIZE', '4', 'MODEL.SWIN_MLP.MLP_RATIO', '2.0', 'MODEL.SWIN_MLP.APE', 'True'])
    model = models.build_model(config).eval()
    assert isinstance(model, SwinMLP)
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('name', sorted(OFFICIAL['zoo']))
def test_official_configs_build_with_the_official_flops_and_parameters(name):
    config = load_config(os.path.join(ROOT, 'configs', 'swinmlp', f'{name}.yaml'))
    with torch.device('meta'):
        model = models.build_model(config)
    assert model.flops() == OFFICIAL['zoo'][name]['flops']
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL['zoo'][name]['params']


@pytest.mark.parametrize('hw,window,shift', [((16, 16), (4, 4), (2, 2)), ((13, 10), (4, 4), (2, 2)),
                                             ((9, 7), (7, 7), (3, 3)), ((11, 6), (4, 4), (2, 0))])
def test_padded_shift_windows_are_the_same_on_both_paths_and_invert(hw, window, shift):
    """The gather-index geometry and the official pad/partition agree window for window, for window multiples
    (the official layout: window - shift rows/columns of zeros before, shift after) and for any other size."""
    h, w = hw
    x = torch.randn(2, h * w, 3)
    fast = WindowGeometry(h, w, window, shift, x.device, shift_by_padding=True)
    ref = ReferenceWindows(h, w, window, shift, x.device, shift_by_padding=True)
    assert fast.mask is None and ref.mask is None  # padding glues nothing together
    windows = fast.partition(x)
    torch.testing.assert_close(windows, ref.partition(x), rtol=0, atol=0)
    torch.testing.assert_close(fast.reverse(windows, 2), x, rtol=0, atol=0)
    torch.testing.assert_close(ref.reverse(windows, 2), x, rtol=0, atol=0)
    if h % window[0] == 0 and w % window[1] == 0 and shift[0] and shift[1]:
        # official: F.pad by (ws - s, s) on each side: one more window per row and column
        assert windows.shape[0] == 2 * (h // window[0] + 1) * (w // window[1] + 1)
        first = windows[0].view(window[0], window[1], 3)
        assert first[:window[0] - shift[0]].abs().sum() == 0  # the top padding
        torch.testing.assert_close(first[window[0] - shift[0]:, window[1] - shift[1]:],
                                   x[0].view(h, w, 3)[:shift[0], :shift[1]], rtol=0, atol=0)


@pytest.mark.parametrize('size', [(64, 64), (70, 50), (33, 97)])
def test_any_input_size_runs_and_both_paths_agree(size, fast_paths_restored):
    kwargs, state, _, _ = fixture_case('small')
    x = torch.randn(2, 3, *size)
    outs = []
    for fast in (True, False):
        set_fast_paths(fast)
        model = SwinMLP(**kwargs).eval()
        model.load_state_dict(state)
        with torch.no_grad():
            outs.append(model(x))
        maps = model.forward_backbone(x)
        h, w = -(-size[0] // 4), -(-size[1] // 4)
        for i, m in enumerate(maps):
            assert tuple(m.shape) == (2, 16 * 2 ** i, h, w)
            h, w = -(-h // 2), -(-w // 2)
    assert outs[0].shape == (2, 10) and torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_trains_with_and_without_activation_checkpointing():
    kwargs, state, x, _ = fixture_case('small')
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SwinMLP(**kwargs, use_checkpoint=checkpointing)
        model.load_state_dict(state)
        model(x).logsumexp(1).sum().backward()
        grads.append(model.layers[0].blocks[1].spatial_mlp.weight.grad.clone())
        assert all(p.grad is not None for p in model.parameters())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_pretrained_fine_tune_loading(caplog):
    """Another head is re-initialised (logged), APE is resized; another window (spatial_mlp shape) is an error
    naming the key: a token-mixing matrix of another window has no resize."""
    kwargs, state, x, _ = fixture_case('small')
    model = SwinMLP(**{**kwargs, 'num_classes': 3})
    with caplog.at_level(logging.INFO):
        load_pretrained(model, {'model': state})
    assert 'classes' in caplog.text
    torch.testing.assert_close(model.layers[0].blocks[1].spatial_mlp.weight,
                               state['layers.0.blocks.1.spatial_mlp.weight'])
    bigger = SwinMLP(**{**kwargs, 'img_size': 128})  # same windows, 2x the APE grid
    load_pretrained(bigger, {'model': state})
    assert bigger.absolute_pos_embed.shape == (1, 32 * 32, 16)
    other_window = SwinMLP(**{**kwargs, 'window_size': 8})
    with pytest.raises(ValueError, match=r'spatial_mlp\.(weight|bias).*cannot be resized.*WINDOW_SIZE'):
        load_pretrained(other_window, {'model': state})


def test_config_errors_name_the_swin_mlp_keys():
    with pytest.raises(ConfigError, match=r'MODEL\.SWIN_MLP\.NUM_HEADS'):
        load_config(None, ['MODEL.TYPE', 'swin_mlp', 'MODEL.SWIN_MLP.NUM_HEADS', '[5,6,12,24]'])
    with pytest.raises(ConfigError, match=r'MODEL\.SWIN_MLP\.DEPTHS'):
        load_config(None, ['MODEL.TYPE', 'swin_mlp', 'MODEL.SWIN_MLP.DEPTHS', '[2,2,6]'])
    with pytest.raises(ConfigError, match=r'MODEL\.SWIN_MLP\.WINDOW_SIZE'):
        load_config(None, ['MODEL.TYPE', 'swin_mlp', 'MODEL.SWIN_MLP.WINDOW_SIZE', '0'])


def test_simmim_pretraining_refuses_swin_mlp():
    config = load_config(None, ['MODEL.TYPE', 'swin_mlp'])
    with pytest.raises(ValueError, match='swin_mlp'):
        models.build_model(config, is_pretrain=True)


# ----------------------------------------------------------------------------- FUSED_LAYERNORM

def _apex_importable() -> bool:
    try:
        import apex.normalization  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_apex_importable(), reason='apex is installed: the fallback does not run')
@pytest.mark.parametrize('model_type', ['swin', 'swinv2', 'swin_mlp'])
def test_fused_layernorm_without_apex_is_torch_layernorm_with_one_log_line(model_type, caplog):
    config = load_config(None, ['MODEL.TYPE', model_type, 'FUSED_LAYERNORM', 'True'])
    with caplog.at_level(logging.WARNING, logger='models.build'), torch.device('meta'):
        model = models.build_model(config)
    lines = [r.getMessage() for r in caplog.records if 'FUSED_LAYERNORM' in r.getMessage()]
    assert len(lines) == 1 and 'apex is not installed' in lines[0], lines
    norms = [m for m in model.modules() if 'Norm' in type(m).__name__]
    assert norms and all(type(m) is nn.LayerNorm for m in norms)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='models.build'), torch.device('meta'):
        models.build_model(load_config(None, ['MODEL.TYPE', model_type]))  # flag off: nothing said
    assert not [r for r in caplog.records if 'FUSED_LAYERNORM' in r.getMessage()]


def test_fused_layernorm_uses_apex_for_every_layernorm_with_torch_parity():
    apex_normalization = pytest.importorskip('apex.normalization')
    assert layer_norm_class(True) is apex_normalization.FusedLayerNorm
    kwargs, state, x, _ = fixture_case('small')
    plain = SwinMLP(**kwargs).eval()
    fused = SwinMLP(**kwargs, norm_layer=layer_norm_class(True)).eval()
    plain.load_state_dict(state)
    fused.load_state_dict(state)  # FusedLayerNorm has the same weight/bias names
    assert not any(type(m) is nn.LayerNorm for m in fused.modules())
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    with torch.no_grad():
        torch.testing.assert_close(fused.to(device)(x.to(device)).cpu(), plain(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the device path

@pytest.mark.fake_cuda
def test_forward_under_cuda_autocast_fp16_and_bf16_on_fake_cuda():
    """Swin-MLP-T (C24, 256) on fake CUDA: logits in the autocast dtype on the device, no host read; the second
    forward (cached window geometry) copies nothing blocking."""
    from fake_cuda import DEVICE, DeviceOps, fake_cuda, on_fake_cuda
    with fake_cuda():
        model = on_fake_cuda(lambda: SwinMLP(img_size=256, window_size=8, embed_dim=96, depths=(2, 2, 6, 2),
                                             num_heads=(4, 8, 16, 32)))
        x = torch.empty(4, 3, 256, 256, device=DEVICE)
        counts = []
        for dtype in (torch.float16, torch.bfloat16):
            with DeviceOps() as ops, torch.autocast('cuda', dtype=dtype):
                logits = model(x)
            assert logits.shape == (4, 1000) and logits.dtype == dtype and logits.device == DEVICE
            assert not ops.host_reads, ops.report()
            counts.append(ops)
    first, second = counts
    assert all('models/window_ops.py' in c for c in first.blocking_copies), first.report()
    assert not second.blocking_copies, second.report()
    assert second.total > 50, second.report()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_official_logits_on_cuda_fp32_and_under_bf16_autocast(monkeypatch):
    """On a real GPU (scripts/gpu_check.sh): fp32 (TF32 off) gives the official logits; bf16 autocast stays
    within bf16's rounding of them."""
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    kwargs, state, x, expected = fixture_case('small')
    model = SwinMLP(**kwargs).eval()
    model.load_state_dict(state)
    model, x = model.cuda(), x.cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(x).cpu(), expected, rtol=0, atol=1e-4)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            low = model(x).float().cpu()
    assert ((low - expected).norm() / expected.norm()).item() < 2e-2
