"""optimizer.py: no-weight-decay groups, frozen parameters, layer decay, the optimizer choices."""
import sys

import pytest
import torch
from torch import nn

from config import ConfigError, get_defaults, load_config
from optimizer import build_optimizer, layer_id, no_decay_names, param_groups, stage_depths


class _Attn(nn.Module):
    def __init__(self, dim, heads, v2=False):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if v2:
            self.logit_scale = nn.Parameter(torch.zeros(heads, 1, 1))
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, heads, bias=False))
        else:
            self.relative_position_bias_table = nn.Parameter(torch.zeros(9, heads))


class _Block(nn.Module):
    def __init__(self, dim, heads, v2=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attn(dim, heads, v2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class _Merge(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)


class _Stage(nn.Module):
    def __init__(self, dim, depth, heads, last, v2=False):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim, heads, v2) for _ in range(depth))
        self.downsample = None if last else _Merge(dim)


class TinySwin(nn.Module):
    """A stand-in with the official parameter names (patch_embed, absolute_pos_embed, layers.i.blocks.j, ...)."""

    def __init__(self, depths=(1, 2), dim=8, v2=False, with_methods=True):
        super().__init__()
        self.v2 = v2
        self.with_methods = with_methods
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 2, 2)
        self.patch_embed.norm = nn.LayerNorm(dim)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, dim))
        self.layers = nn.ModuleList(_Stage(dim * 2 ** i, d, 2, i == len(depths) - 1, v2)
                                    for i, d in enumerate(depths))
        self.norm = nn.LayerNorm(dim * 2 ** (len(depths) - 1))
        self.head = nn.Linear(dim * 2 ** (len(depths) - 1), 5)

    def no_weight_decay(self):
        return {'absolute_pos_embed'} if self.with_methods else set()

    def no_weight_decay_keywords(self):
        if not self.with_methods:
            return set()
        return {'cpb_mlp', 'logit_scale', 'relative_position_bias_table'} if self.v2 else \
            {'relative_position_bias_table'}


class Bare(nn.Module):
    """No no_weight_decay methods at all."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))
        self.table = nn.Parameter(torch.zeros(5, 2))


def _config(*opts):
    return load_config(None, list(opts))


def _split(model, **kw):
    groups = param_groups(model, 0.05, **kw)
    decay = {n for g in groups if g['weight_decay'] > 0 for n in g['param_names']}
    no_decay = {n for g in groups if g['weight_decay'] == 0 for n in g['param_names']}
    return decay, no_decay


def test_no_weight_decay_rules_v1():
    model = TinySwin()
    decay, no_decay = _split(model)
    all_names = {n for n, _ in model.named_parameters()}
    assert decay | no_decay == all_names and not decay & no_decay
    assert decay == {
        'patch_embed.proj.weight', 'head.weight', 'layers.0.downsample.reduction.weight',
        *{f'layers.{i}.blocks.{j}.{m}.weight' for i, d in enumerate((1, 2)) for j in range(d)
          for m in ('attn.qkv', 'attn.proj', 'mlp.0', 'mlp.2')},
    }
    assert 'absolute_pos_embed' in no_decay  # 3-D, but named by no_weight_decay()
    assert 'layers.1.blocks.1.attn.relative_position_bias_table' in no_decay  # 2-D, keyword
    assert 'patch_embed.proj.bias' in no_decay and 'layers.0.downsample.norm.weight' in no_decay


def test_no_weight_decay_rules_v2_keywords():
    decay, no_decay = _split(TinySwin(v2=True))
    assert 'layers.0.blocks.0.attn.cpb_mlp.2.weight' in no_decay  # 2-D, no bias: only the keyword skips it
    assert 'layers.0.blocks.0.attn.cpb_mlp.0.weight' in no_decay
    assert 'layers.1.blocks.0.attn.logit_scale' in no_decay
    assert not any('cpb_mlp' in n or 'logit_scale' in n for n in decay)


def test_model_without_methods_uses_shape_and_bias_rules():
    decay, no_decay = _split(Bare())
    assert decay == {'fc.weight', 'table'}
    assert no_decay == {'fc.bias', 'scale'}
    decay, no_decay = _split(TinySwin(with_methods=False))
    assert 'absolute_pos_embed' in decay and 'layers.0.blocks.0.attn.relative_position_bias_table' in decay


def test_frozen_parameters_are_left_out():
    model = TinySwin()
    model.patch_embed.requires_grad_(False)
    model.head.weight.requires_grad_(False)
    opt = build_optimizer(_config(), model)
    in_opt = {id(p) for g in opt.param_groups for p in g['params']}
    for name, p in model.named_parameters():
        assert (id(p) in in_opt) == p.requires_grad, name


def test_adamw_settings_and_groups():
    model = TinySwin()
    config = _config('TRAIN.BASE_LR', '0.002', 'TRAIN.WEIGHT_DECAY', '0.1', 'TRAIN.OPTIMIZER.EPS', '1e-6',
                     'TRAIN.OPTIMIZER.BETAS', '(0.8, 0.99)')
    opt = build_optimizer(config, model)
    assert type(opt) is torch.optim.AdamW
    assert [g['weight_decay'] for g in opt.param_groups] == [0.1, 0.0]  # official order: decay, no decay
    for g in opt.param_groups:
        assert g['lr'] == 0.002 and g['eps'] == 1e-6 and tuple(g['betas']) == (0.8, 0.99)
        assert 'lr_scale' not in g
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))


def test_weight_decay_applies_only_to_decay_group():
    """With zero gradients AdamW changes a parameter only through decoupled weight decay."""
    model = TinySwin()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opt = build_optimizer(_config('TRAIN.BASE_LR', '0.1', 'TRAIN.WEIGHT_DECAY', '0.5'), model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    no_decay = set(no_decay_names(model))
    for name, p in model.named_parameters():
        expected = 1.0 if name in no_decay else 1.0 - 0.1 * 0.5
        assert torch.allclose(p, torch.full_like(p, expected)), name


def test_sgd_is_nesterov_with_momentum():
    opt = build_optimizer(_config('TRAIN.OPTIMIZER.NAME', 'sgd', 'TRAIN.OPTIMIZER.MOMENTUM', '0.8'), TinySwin())
    assert type(opt) is torch.optim.SGD
    for g in opt.param_groups:
        assert g['nesterov'] is True and g['momentum'] == 0.8 and g['lr'] == 5e-4


@pytest.mark.parametrize('name', ['fused_adam', 'fused_lamb'])
def test_apex_optimizers_without_apex_say_so(monkeypatch, name):
    monkeypatch.setitem(sys.modules, 'apex', None)  # makes `import apex...` raise ImportError
    monkeypatch.setitem(sys.modules, 'apex.optimizers', None)
    with pytest.raises(ImportError, match=r'apex.*adamw'):
        build_optimizer(_config('TRAIN.OPTIMIZER.NAME', name), TinySwin())


def test_unknown_optimizer_names_the_choices():
    config = get_defaults()
    config.TRAIN.OPTIMIZER.NAME = 'adam'
    with pytest.raises(ConfigError, match=r"'adam'.*adamw.*sgd.*fused_adam.*fused_lamb"):
        build_optimizer(config, TinySwin())


def test_no_trainable_parameters_is_an_error():
    model = TinySwin().requires_grad_(False)
    with pytest.raises(ValueError, match='no trainable parameters'):
        build_optimizer(_config(), model)


def test_layer_ids_follow_the_official_scheme():
    depths = [2, 2, 6, 2]
    assert layer_id('patch_embed.proj.weight', depths) == 0
    assert layer_id('mask_token', depths) == 0
    assert layer_id('absolute_pos_embed', depths) == 13  # official get_swin_layer: not an embedding, the last layer
    assert layer_id('layers.0.blocks.0.norm1.weight', depths) == 1
    assert layer_id('layers.0.blocks.1.attn.qkv.weight', depths) == 2
    assert layer_id('layers.0.downsample.reduction.weight', depths) == 2  # last block of stage 0
    assert layer_id('layers.1.blocks.0.mlp.fc1.weight', depths) == 3
    assert layer_id('layers.2.blocks.5.mlp.fc1.weight', depths) == 10
    assert layer_id('layers.2.downsample.norm.weight', depths) == 10
    assert layer_id('layers.3.blocks.1.norm2.bias', depths) == 12
    assert layer_id('norm.weight', depths) == 13 and layer_id('head.bias', depths) == 13
    assert layer_id('module.layers.1.blocks.1.attn.proj.weight', depths) == 4  # DDP prefix


def test_layer_decay_groups_scales_and_lrs():
    model = TinySwin(depths=(1, 2))
    assert stage_depths(model) == [1, 2]
    config = _config('TRAIN.LAYER_DECAY', '0.5', 'TRAIN.BASE_LR', '0.01')
    opt = build_optimizer(config, model)
    top = 1 + 2 + 1
    by_name = {}
    for g in opt.param_groups:
        assert g['lr'] == pytest.approx(0.01 * g['lr_scale'], rel=1e-15)  # the group's schedule base
        for n in g['param_names']:
            by_name[n] = g
    assert by_name['patch_embed.proj.weight']['lr_scale'] == 0.5 ** top
    assert by_name['absolute_pos_embed']['lr_scale'] == 1.0  # official: the last layer
    assert by_name['layers.0.blocks.0.attn.qkv.weight']['lr_scale'] == 0.5 ** 3
    assert by_name['layers.0.downsample.reduction.weight']['lr_scale'] == 0.5 ** 3
    assert by_name['layers.1.blocks.1.mlp.0.weight']['lr_scale'] == 0.5 ** 1
    assert by_name['head.weight']['lr_scale'] == 1.0 and by_name['norm.weight']['lr_scale'] == 1.0
    # decay and no-decay are still separated within a layer
    assert by_name['layers.0.blocks.0.attn.qkv.weight']['weight_decay'] == 0.05
    assert by_name['layers.0.blocks.0.attn.qkv.bias']['weight_decay'] == 0.0
    assert len(opt.param_groups) == 2 * (top + 1)


def test_layer_decay_one_gives_the_two_official_groups():
    groups = param_groups(TinySwin(), 0.05, layer_decay=1.0)
    assert len(groups) == 2 and all('lr_scale' not in g for g in groups)
    with pytest.raises(ValueError, match='layer_decay'):
        param_groups(TinySwin(), 0.05, layer_decay=0.0)


def test_wrapped_model_names_match():
    class Wrapper(nn.Module):  # like DDP: the model under .module, no forwarded methods
        def __init__(self, m):
            super().__init__()
            self.module = m

    inner = TinySwin()
    _, plain = _split(inner)
    _, wrapped = _split(Wrapper(inner))
    assert wrapped == {'module.' + n for n in plain}


def test_optimizer_state_dict_round_trip(tmp_path):
    model = TinySwin()
    config = _config('TRAIN.LAYER_DECAY', '0.75')
    opt = build_optimizer(config, model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / 'opt.pt')
    model2 = TinySwin()
    opt2 = build_optimizer(config, model2)
    for p in model2.parameters():  # other moments and step counts than the saved ones, to be replaced
        p.grad = torch.randn_like(p)
    opt2.step()
    opt2.step()
    opt2.load_state_dict(torch.load(tmp_path / 'opt.pt', weights_only=True))
    assert [g['lr_scale'] for g in opt2.param_groups] == [g['lr_scale'] for g in opt.param_groups]
    params = [p for g in opt.param_groups for p in g['params']]
    params2 = [p for g in opt2.param_groups for p in g['params']]
    assert len(params) == len(params2) > 0
    for p, p2 in zip(params, params2):
        assert opt2.state[p2].keys() == opt.state[p].keys() == {'step', 'exp_avg', 'exp_avg_sq'}
        for key in ('step', 'exp_avg', 'exp_avg_sq'):
            assert torch.equal(opt2.state[p2][key], opt.state[p][key]), key
    # the restored optimizer takes the next step the original takes
    model2.load_state_dict(model.state_dict())
    grads = [torch.randn_like(p) for p in params]
    for group_params, g in ((params, grads), (params2, grads)):
        for p, grad in zip(group_params, g):
            p.grad = grad.clone()
    opt.step()
    opt2.step()
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)


def test_swin_tiny_group_sizes():
    """Official Swin-T: 53 tensors with weight decay, 120 without."""
    import models
    config = load_config('configs/swin/swin_tiny_patch4_window7_224.yaml')
    with torch.device('meta'):  # names and shapes only
        model = models.build_model(config)
    groups = param_groups(model, config.TRAIN.WEIGHT_DECAY)
    assert [len(g['params']) for g in groups] == [53, 120]
    ld = param_groups(model, 0.05, layer_decay=0.9)
    assert {round(g['lr_scale'], 12) for g in ld} == {round(0.9 ** i, 12) for i in range(14)}


def test_swinv2_keywords_on_real_model():
    import models
    config = load_config('configs/swinv2/swinv2_tiny_patch4_window8_256.yaml')
    with torch.device('meta'):  # names and shapes only
        model = models.build_model(config)
    decay, no_decay = _split(model)
    assert any('cpb_mlp' in n for n in no_decay) and any('logit_scale' in n for n in no_decay)
    assert not any('cpb_mlp' in n or 'logit_scale' in n or n.endswith('.bias') for n in decay)
    assert all(dict(model.named_parameters())[n].ndim > 1 for n in decay)

