"""Swin V1/V2 models: parity with timm, any input size, fine-tune loading, FLOPs, parameter counts, errors."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.models import swin_transformer as timm_v1
from timm.models import swin_transformer_v2 as timm_v2
from torch.utils.flop_counter import FlopCounterMode

from config import load_config
from models import SwinTransformer, SwinTransformerV2, build_model, load_pretrained
from models.convert import timm_to_official, torchvision_to_official
from models.pretrained import imagenet22k_to_1k_indices

TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 8))
FAST_PATHS_ON = pytest.mark.usefixtures('fast_paths_on')  # tests of the fast paths themselves (conftest.py)


def randomize(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (norms included) so that every parameter matters to the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if 'norm' in name and name.endswith('weight') else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * std + offset)
    return model


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = fused


def assert_same_logits(ours: torch.nn.Module, ref: torch.nn.Module, size: int) -> None:
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = ref(x)
        for fused in (True, False):
            set_fused(ours, fused)
            assert (ours(x) - expected).abs().max().item() < 1e-5, f'fused={fused}'


@pytest.mark.parametrize('arch', [TINY, SMALL], ids=['tiny', 'small'])
@pytest.mark.parametrize('size,window', [(224, 7), (256, 8), (384, 12)])
def test_v1_matches_timm(arch, size, window):
    ours = randomize(SwinTransformer(img_size=size, window_size=window, num_classes=10, **arch)).eval()
    ref = timm_v1.SwinTransformer(img_size=size, window_size=window, num_classes=10, **arch).eval()
    ref.load_state_dict(timm_v1.checkpoint_filter_fn(ours.state_dict(), ref))
    assert_same_logits(ours, ref, size)


@pytest.mark.parametrize('arch', [TINY, SMALL], ids=['tiny', 'small'])
@pytest.mark.parametrize('size,window', [(224, 7), (256, 8), (384, 12)])
def test_v2_matches_timm(arch, size, window):
    pretrained = (window - 4,) * 4 if size == 384 else (0,) * 4  # exercise the pretrained-window path too
    ours = randomize(SwinTransformerV2(img_size=size, window_size=window, num_classes=10,
                                       pretrained_window_sizes=pretrained, **arch)).eval()
    ref = timm_v2.SwinTransformerV2(img_size=size, window_size=window, num_classes=10,
                                    pretrained_window_sizes=pretrained, **arch).eval()
    ref.load_state_dict(timm_v2.checkpoint_filter_fn(ours.state_dict(), ref))
    assert_same_logits(ours, ref, size)


@FAST_PATHS_ON
def test_fused_and_plain_paths_equal_in_training_with_grads():
    model = randomize(SwinTransformer(img_size=64, window_size=4, num_classes=5, drop_path_rate=0., **SMALL))
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for fused in (True, False):
        set_fused(model, fused)
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_official_checkpoint_buffers_are_accepted():
    model = SwinTransformer(img_size=64, window_size=4, num_classes=5, **SMALL)
    state = model.state_dict()
    state['layers.0.blocks.0.attn.relative_position_index'] = model.layers[0].blocks[0].attn.relative_position_index
    state['layers.0.blocks.1.attn_mask'] = torch.zeros(16, 16, 16)
    model.load_state_dict(state)  # strict: derived buffers in the file are dropped
    assert 'attn_mask' not in ''.join(model.state_dict())


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('h,w', [(250, 170), (97, 131), (224, 224)])
def test_any_input_size_forward_backward(cls, h, w):
    model = cls(img_size=224, window_size=7, num_classes=4, **SMALL)
    x = torch.randn(2, 3, h, w, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 4)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # documented stage shapes: ceil(H / 4 / 2**i), embed_dim * 2**i channels
    feats = model.forward_backbone(x.detach())
    for i, f in enumerate(feats):
        rows, cols = math.ceil(h / 4), math.ceil(w / 4)
        for _ in range(i):
            rows, cols = math.ceil(rows / 2), math.ceil(cols / 2)
        assert f.shape == (2, 32 * 2 ** i, rows, cols)


@FAST_PATHS_ON
def test_masks_are_built_once_per_size():
    model = SwinTransformer(img_size=64, window_size=4, num_classes=3, **SMALL).eval()
    block = model.layers[0].blocks[1]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        geometry = dict(block._geometry._cache)
        model(torch.randn(1, 3, 64, 64))
        assert block._geometry._cache == geometry and len(geometry) == 1
        model(torch.randn(1, 3, 80, 48))
        assert len(block._geometry._cache) == 2


@FAST_PATHS_ON
def test_eval_bias_cache_follows_weight_updates():
    model = randomize(SwinTransformer(img_size=64, window_size=4, num_classes=3, **SMALL)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        table = model.layers[0].blocks[1].attn.relative_position_bias_table
        table.add_(torch.randn_like(table))  # not a constant: softmax ignores a shift
        after = model(x)
    assert not torch.allclose(before, after)


def test_gradient_checkpointing_same_grads():
    model = randomize(SwinTransformer(img_size=64, window_size=4, num_classes=3, drop_path_rate=0., **SMALL))
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(plain, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_window_larger_than_map_shrinks_and_does_not_shift():
    model = SwinTransformer(img_size=64, window_size=7, num_classes=3, **SMALL)  # stages 16, 8, 4, 2
    last = model.layers[3].blocks[0]
    assert model.layers[0].blocks[1].shift_size == (3, 3)
    assert last.window_size == (2, 2) and last.shift_size == (0, 0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


# --------------------------------------------------------------------------- fine-tune loading
def test_load_pretrained_224_w7_into_384_w12():
    src = randomize(SwinTransformer(img_size=224, window_size=7, num_classes=1000, ape=True, **SMALL))
    dst = SwinTransformer(img_size=384, window_size=12, num_classes=1000, ape=True, **SMALL)
    report = load_pretrained(dst, {'model': src.state_dict()})
    for name in ('layers.0.blocks.0.attn.relative_position_bias_table', 'layers.2.blocks.0.attn.relative_position_bias_table'):
        table = src.state_dict()[name]
        heads = table.shape[1]
        grid = table.permute(1, 0).reshape(1, heads, 13, 13)
        expected = F.interpolate(grid, size=(23, 23), mode='bicubic').reshape(heads, -1).permute(1, 0)
        assert torch.allclose(dst.state_dict()[name], expected, atol=1e-6)
        assert name in report['adapted']
    assert dst.absolute_pos_embed.shape == (1, 96 * 96, 32)
    assert torch.equal(dst.head.weight, src.head.weight)
    assert dst(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_load_pretrained_v2_256_w8_into_384_w12():
    src = randomize(SwinTransformerV2(img_size=256, window_size=8, num_classes=10, **SMALL))
    dst = SwinTransformerV2(img_size=384, window_size=12, num_classes=10, pretrained_window_sizes=(8, 8, 8, 8), **SMALL)
    load_pretrained(dst, src.state_dict())
    assert torch.equal(dst.layers[1].blocks[0].attn.cpb_mlp[0].weight, src.layers[1].blocks[0].attn.cpb_mlp[0].weight)
    # coordinates normalised by the pre-training window: 11 / 7 * 8 before the log
    coords = dst.layers[0].blocks[0].attn.relative_coords_table
    expected = math.log2(11 / 7 * 8 + 1) / 3
    assert abs(coords.max().item() - expected) < 1e-6
    assert dst(torch.randn(1, 3, 384, 384)).shape == (1, 10)


def test_load_pretrained_22k_head_mapped_to_1k_and_other_heads_reinitialised(caplog):
    src = randomize(SwinTransformer(img_size=64, window_size=4, num_classes=21841, **SMALL))
    dst = SwinTransformer(img_size=64, window_size=4, num_classes=1000, **SMALL)
    load_pretrained(dst, src.state_dict())
    index = imagenet22k_to_1k_indices()
    assert index.numel() == 1000 and index.unique().numel() == 1000
    assert torch.equal(dst.head.weight, src.head.weight[index])
    other = SwinTransformer(img_size=64, window_size=4, num_classes=7, **SMALL)
    report = load_pretrained(other, src.state_dict())
    assert report['reinitialized'] == ['head.weight', 'head.bias']
    assert other.head.weight.abs().sum() == 0
    assert 're-initialised' in caplog.text


def test_load_pretrained_rejects_other_architecture():
    src = SwinTransformer(img_size=64, window_size=4, num_classes=3, **SMALL)
    other_depth = SwinTransformer(img_size=64, window_size=4, num_classes=3, embed_dim=32,
                                  depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8))
    with pytest.raises(ValueError, match='missing|unexpected'):
        load_pretrained(other_depth, src.state_dict())
    wider = SwinTransformer(img_size=64, window_size=4, num_classes=3, embed_dim=64,
                            depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 8))
    with pytest.raises(ValueError, match='patch_embed|shape'):
        load_pretrained(wider, src.state_dict())
    with pytest.raises(ValueError, match='missing'):
        load_pretrained(src, SwinTransformerV2(img_size=64, window_size=4, num_classes=3, **SMALL).state_dict())


# --------------------------------------------------------------------------- converters
def test_convert_timm_and_torchvision_weights():
    x = torch.randn(1, 3, 224, 224)
    tm = randomize(timm.create_model('swin_tiny_patch4_window7_224', num_classes=10)).eval()
    ours = SwinTransformer(num_classes=10).eval()
    ours.load_state_dict(timm_to_official(tm.state_dict()))
    tv = randomize(torchvision.models.swin_t(num_classes=10)).eval()
    ours_tv = SwinTransformer(num_classes=10).eval()
    ours_tv.load_state_dict(torchvision_to_official(tv.state_dict()))
    tv2 = randomize(torchvision.models.swin_v2_t(num_classes=10)).eval()
    ours_tv2 = SwinTransformerV2(img_size=256, window_size=8, num_classes=10).eval()
    ours_tv2.load_state_dict(torchvision_to_official(tv2.state_dict()))
    x2 = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert (ours(x) - tm(x)).abs().max() < 1e-5
        assert (ours_tv(x) - tv(x)).abs().max() < 1e-5
        assert (ours_tv2(x2) - tv2(x2)).abs().max() < 1e-5


# --------------------------------------------------------------------------- FLOPs and parameters
@pytest.mark.parametrize('name,size,window,arch,gflops,mparams', [
    ('T', 224, 7, (96, (2, 2, 6, 2), (3, 6, 12, 24)), 4.49, 28.29),
    ('S', 224, 7, (96, (2, 2, 18, 2), (3, 6, 12, 24)), 8.75, 49.61),
    ('B', 224, 7, (128, (2, 2, 18, 2), (4, 8, 16, 32)), 15.44, 87.77),
    ('B384', 384, 12, (128, (2, 2, 18, 2), (4, 8, 16, 32)), 47.11, 87.90),
    ('L', 224, 7, (192, (2, 2, 18, 2), (6, 12, 24, 48)), 34.49, 196.53),
    ('L384', 384, 12, (192, (2, 2, 18, 2), (6, 12, 24, 48)), 103.95, 196.74),
])
def test_official_flops_and_params(name, size, window, arch, gflops, mparams):
    with torch.device('meta'):
        model = SwinTransformer(img_size=size, window_size=window, embed_dim=arch[0], depths=arch[1],
                                num_heads=arch[2])
    assert abs(model.flops() / 1e9 - gflops) / gflops < 0.005
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - mparams) < 0.005


def test_flops_agree_with_torch_flop_counter():
    model = SwinTransformer(img_size=224, window_size=7, num_classes=1000, fused_attn=False).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, 224, 224))
    # the counter counts 2 FLOPs per multiply-add of matmuls/convs only; flops() counts multiply-adds plus
    # LayerNorm elements (and the official final-norm term), so half the counter is slightly smaller
    ratio = counter.get_total_flops() / 2 / model.flops()
    assert 0.995 < ratio < 1.0, ratio


def test_build_model_from_config_honours_num_classes():
    cfg = load_config(None, ['MODEL.NUM_CLASSES', '37', 'DATA.IMG_SIZE', '64', 'MODEL.SWIN.WINDOW_SIZE', '4',
                             'MODEL.SWIN.EMBED_DIM', '32', 'MODEL.SWIN.NUM_HEADS', '[2, 2, 4, 8]'])
    model = build_model(cfg)
    assert isinstance(model, SwinTransformer) and model.head.out_features == 37
    cfg2 = load_config(None, ['MODEL.TYPE', 'swinv2', 'DATA.IMG_SIZE', '64', 'MODEL.SWINV2.WINDOW_SIZE', '4'])
    assert isinstance(build_model(cfg2), SwinTransformerV2)


def test_no_weight_decay_names():
    v1 = SwinTransformer(img_size=64, window_size=4, **SMALL)
    v2 = SwinTransformerV2(img_size=64, window_size=4, **SMALL)
    assert v1.no_weight_decay() == {'absolute_pos_embed'}
    assert 'relative_position_bias_table' in v1.no_weight_decay_keywords()
    assert {'cpb_mlp', 'logit_scale'} <= v2.no_weight_decay_keywords()


# --------------------------------------------------------------------------- bad input
def test_clear_errors_on_bad_input():
    model = SwinTransformer(img_size=64, window_size=4, num_classes=3, **SMALL)
    with pytest.raises(ValueError, match='3-channel.*2'):
        model(torch.randn(1, 2, 64, 64))
    with pytest.raises(ValueError, match='window_size'):
        SwinTransformer(window_size=0)
    with pytest.raises(ValueError, match='patch_size'):
        SwinTransformer(patch_size=0)
    with pytest.raises(ValueError, match='heads'):
        SwinTransformer(embed_dim=100, num_heads=(3, 6, 12, 24))
    with pytest.raises(ValueError, match='same|equal length'):
        SwinTransformer(depths=(2, 2, 6), num_heads=(3, 6, 12, 24))
    with pytest.raises(TypeError, match='unexpected keyword'):
        SwinTransformer(windowsize=7)
    with pytest.raises(RuntimeError, match='size mismatch|Missing|Unexpected'):
        model.load_state_dict(SwinTransformerV2(img_size=64, window_size=4, num_classes=3, **SMALL).state_dict())


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_torch_compile_has_no_graph_breaks(cls):
    import torch._dynamo as dynamo
    model = randomize(cls(img_size=64, window_size=4, num_classes=5, drop_path_rate=0., **SMALL))
    x = torch.randn(2, 3, 60, 70)  # padding path included
    for training in (False, True):
        dynamo.reset()
        model.train(training)
        with torch.set_grad_enabled(training):
            explained = dynamo.explain(model)(x)
            assert explained.graph_break_count == 0, explained.break_reasons
            compiled = torch.compile(model, backend='aot_eager')
            assert torch.allclose(compiled(x), model(x), atol=1e-5)


@FAST_PATHS_ON
@pytest.mark.parametrize('chunked', [False, True])
def test_chunked_mlp_matches_plain_and_gradchecks(monkeypatch, chunked):
    import models.mlp as mlp_module
    from models.mlp import Mlp, _ChunkedMlp, chunk_rows
    # Swin-T's first stage at batch 8 is chunked on the CPU only
    assert chunk_rows(25088, 384, 4, torch.device('cpu')) < 25088 == chunk_rows(25088, 384, 4, torch.device('cuda'))
    if chunked:  # force chunks of 3 rows (the last one shorter)
        monkeypatch.setattr(mlp_module, 'WHOLE_BYTES', 0)
        monkeypatch.setattr(mlp_module, 'CHUNK_BYTES', 1)
        monkeypatch.setattr(mlp_module, 'MIN_CHUNK_ROWS', 3)
    torch.manual_seed(0)
    mlp, norm = Mlp(8, 32), randomize(torch.nn.LayerNorm(8))
    x = torch.randn(4, 5, 8, requires_grad=True)
    g = torch.randn(4, 5, 8)
    params = [x] + list(mlp.parameters()) + list(norm.parameters())

    def grads(out):
        out.backward(g)
        result = [p.grad.clone() if p.grad is not None else None for p in params]
        for p in params:
            p.grad = None
        return result

    pairs = [(mlp(x, norm), mlp.fc2(F.gelu(mlp.fc1(norm(x))))), (mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))))]
    for lean, plain in pairs:
        assert torch.allclose(lean, plain, atol=1e-6)
        for a, b in zip(grads(lean), grads(plain)):
            assert (a is None) == (b is None)
            assert a is None or torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(mlp(x, norm), mlp.fc2(F.gelu(mlp.fc1(norm(x)))), atol=1e-6)
    xd = torch.randn(7, 6, dtype=torch.double, requires_grad=True)
    nd, fc1, fc2 = torch.nn.LayerNorm(6).double(), torch.nn.Linear(6, 12).double(), torch.nn.Linear(12, 6).double()
    for normed in (True, False):
        assert torch.autograd.gradcheck(
            lambda *t: _ChunkedMlp.apply(t[0], normed, t[1], t[2], 1e-5, *t[3:], 3, torch.double, False),
            (xd, nd.weight, nd.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = mlp(x, norm)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and mlp.fc2.weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32 and norm.weight.grad is not None


@FAST_PATHS_ON
def test_the_chunked_mlp_backward_casts_no_hidden_gradient_and_no_weight():
    """Under bf16 autocast the backward sums the bias gradients in bf16 (as F.linear's backward does) instead of
    copying the 4C-wide gradient to fp32 first, and reuses the forward's bf16 weights instead of casting again."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from models.mlp import Mlp

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.sum.dim_IntList) and \
                    (kwargs or {}).get('dtype') == torch.float32:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    mlp, norm = Mlp(8, 32), torch.nn.LayerNorm(8)
    x = torch.randn(6, 8, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = mlp(x, norm)
        plain = mlp.fc2(F.gelu(mlp.fc1(norm(x))))
    casts = Casts()
    with casts:
        out.float().sum().backward()
    assert (6, 32) not in casts.shapes and casts.shapes.count((32, 8)) == 1
    assert casts.shapes.count((8, 32)) == 1  # the two weight gradients' fp32 casts only
    lean = [mlp.fc1.bias.grad.clone(), mlp.fc2.bias.grad.clone()]
    mlp.zero_grad()
    plain.float().sum().backward()
    assert torch.equal(lean[1], mlp.fc2.bias.grad) and torch.allclose(lean[0], mlp.fc1.bias.grad, rtol=1e-2)


@FAST_PATHS_ON
@pytest.mark.parametrize('size', [(14, 14), (11, 9)])  # a permutation, and one with padded slots
def test_window_partition_and_reverse_gradients_match_index_select(size):
    from models.window_ops import WindowGeometry
    h, w = size
    geometry = WindowGeometry(h, w, (7, 7), (3, 3), torch.device('cpu'))
    x = torch.randn(2, h * w, 4, dtype=torch.double, requires_grad=True)
    windows = geometry.partition(x)
    assert torch.equal(geometry.reverse(windows, 2), x)
    assert torch.autograd.gradcheck(lambda t: geometry.reverse(geometry.partition(t) * 2.0, 2), (x,))
    g = torch.randn_like(windows)
    (grad,) = torch.autograd.grad(windows, x, g)
    padded = torch.cat([x, x.new_zeros(2, 1, 4)], 1) if geometry.padded else x
    (expected,) = torch.autograd.grad(padded.index_select(1, geometry.gather_index).view_as(windows), x, g)
    assert torch.equal(grad, expected)


@FAST_PATHS_ON
def test_upcast_linear_is_a_bf16_gemm_through_fp32_kernels(monkeypatch):
    import models.lowp as lowp
    monkeypatch.setattr(lowp, 'cpu_native', lambda dtype: False)
    torch.manual_seed(0)
    layer = lowp.Linear(16, 8)
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    out.backward(g.bfloat16())
    ours = [out, x.grad, layer.weight.grad, layer.bias.grad]
    # reference: bf16-rounded operands, fp32 accumulation, result rounded to bf16 (autograd through the casts)
    x2 = x.detach().clone().requires_grad_()
    w2, b2 = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    bf = torch.bfloat16
    ref = F.linear(x2.to(bf).float(), w2.to(bf).float(), b2.to(bf).float()).to(bf)
    ref.backward(g.bfloat16())
    for a, b in zip(ours, [ref, x2.grad, w2.grad, b2.grad]):
        assert a.dtype == b.dtype
        # the same arithmetic; summation order may flip a rare last bf16 bit
        assert (a == b).float().mean() > 0.95 and torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-6)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # PyTorch's own bf16 kernel agrees to bf16 precision
        native = F.linear(x, layer.weight, layer.bias)
    assert native.dtype == out.dtype and torch.allclose(native.float(), out.float(), rtol=2e-2, atol=2e-2)
    monkeypatch.setattr(lowp, 'cpu_native', lambda dtype: True)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # native CPUs keep PyTorch's path
        assert torch.equal(layer(x), native)
    assert not lowp.upcast_dtype(torch.float32, torch.device('cpu'))
    assert not lowp.upcast_dtype(torch.bfloat16, torch.device('cuda'))


@FAST_PATHS_ON
@pytest.mark.parametrize('v2', [False, True])
def test_bf16_autocast_with_and_without_upcast_agree(monkeypatch, v2):
    import models.lowp as lowp
    torch.manual_seed(0)
    cls = SwinTransformerV2 if v2 else SwinTransformer
    model = randomize(cls(img_size=32, window_size=4, num_classes=10, drop_path_rate=0.0, **SMALL))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    results = {}
    for native in (False, True):
        monkeypatch.setattr(lowp, 'cpu_native', lambda dtype, native=native: native)
        model.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            infer = model.eval()(x)
        model.train()
        assert out.dtype == infer.dtype == torch.bfloat16
        results[native] = (out.float(), infer.float(), [p.grad.clone() for p in model.parameters()])
    scale = reference.abs().max().item()
    for native in (False, True):  # both within bf16 precision of the fp32 model
        for out in results[native][:2]:
            assert (out - reference).abs().max().item() < 0.03 * scale
    grads_up, grads_native = results[False][2], results[True][2]
    total_diff = sum((a - b).norm() ** 2 for a, b in zip(grads_up, grads_native)) ** 0.5
    total = sum(b.norm() ** 2 for b in grads_native) ** 0.5
    assert total_diff < 0.05 * total


@FAST_PATHS_ON
def test_block_recomputing_attention_input_gives_identical_gradients():
    torch.manual_seed(0)
    model = randomize(SwinTransformer(img_size=32, window_size=4, num_classes=10, drop_path_rate=0.0, **SMALL))
    block = model.layers[0].blocks[1]  # a shifted block
    calls = []
    block.norm1.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 64, SMALL['embed_dim'], requires_grad=True)
    g = torch.randn(2, 64, SMALL['embed_dim'])
    grads = {}
    for recompute in (False, True):
        calls.clear()
        block.zero_grad()
        x.grad = None
        block(x, (8, 8), recompute_norm=recompute).backward(g)
        grads[recompute] = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
        assert len(calls) == (2 if recompute else 1)  # the norm ran again in backward
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)
