"""config.py: official defaults, file/BASE/--opts merging, official flags, errors, save/round trip, scaling."""
import argparse
import os

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import config as C
from config import (ConfigError, apply_linear_scaling, config_to_dict, get_config, get_defaults, load_config,
                    save_config, validate_config)

# Official defaults (microsoft/Swin-Transformer config.py), key -> value.
OFFICIAL = {
    'BASE': [''],
    'DATA.BATCH_SIZE': 128, 'DATA.DATA_PATH': '', 'DATA.DATASET': 'imagenet', 'DATA.IMG_SIZE': 224,
    'DATA.INTERPOLATION': 'bicubic', 'DATA.ZIP_MODE': False, 'DATA.CACHE_MODE': 'part', 'DATA.PIN_MEMORY': True,
    'DATA.NUM_WORKERS': 8,
    'MODEL.TYPE': 'swin', 'MODEL.NAME': 'swin_tiny_patch4_window7_224', 'MODEL.PRETRAINED': '', 'MODEL.RESUME': '',
    'MODEL.NUM_CLASSES': 1000, 'MODEL.DROP_RATE': 0.0, 'MODEL.DROP_PATH_RATE': 0.1, 'MODEL.LABEL_SMOOTHING': 0.1,
    'MODEL.SWIN.PATCH_SIZE': 4, 'MODEL.SWIN.IN_CHANS': 3, 'MODEL.SWIN.EMBED_DIM': 96,
    'MODEL.SWIN.DEPTHS': [2, 2, 6, 2], 'MODEL.SWIN.NUM_HEADS': [3, 6, 12, 24], 'MODEL.SWIN.WINDOW_SIZE': 7,
    'MODEL.SWIN.MLP_RATIO': 4.0, 'MODEL.SWIN.QKV_BIAS': True, 'MODEL.SWIN.QK_SCALE': None, 'MODEL.SWIN.APE': False,
    'MODEL.SWIN.PATCH_NORM': True,
    'MODEL.SWINV2.PATCH_SIZE': 4, 'MODEL.SWINV2.IN_CHANS': 3, 'MODEL.SWINV2.EMBED_DIM': 96,
    'MODEL.SWINV2.DEPTHS': [2, 2, 6, 2], 'MODEL.SWINV2.NUM_HEADS': [3, 6, 12, 24], 'MODEL.SWINV2.WINDOW_SIZE': 7,
    'MODEL.SWINV2.MLP_RATIO': 4.0, 'MODEL.SWINV2.QKV_BIAS': True, 'MODEL.SWINV2.APE': False,
    'MODEL.SWINV2.PATCH_NORM': True, 'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES': [0, 0, 0, 0],
    'MODEL.SWIN_MOE.MOE_BLOCKS': [[-1], [-1], [-1], [-1]], 'MODEL.SWIN_MOE.CAPACITY_FACTOR': 1.25,
    'MODEL.SWIN_MOE.AUX_LOSS_WEIGHT': 0.01, 'MODEL.SWIN_MLP.WINDOW_SIZE': 7,
    'TRAIN.START_EPOCH': 0, 'TRAIN.EPOCHS': 300, 'TRAIN.WARMUP_EPOCHS': 20, 'TRAIN.WEIGHT_DECAY': 0.05,
    'TRAIN.BASE_LR': 5e-4, 'TRAIN.WARMUP_LR': 5e-7, 'TRAIN.MIN_LR': 5e-6, 'TRAIN.CLIP_GRAD': 5.0,
    'TRAIN.AUTO_RESUME': True, 'TRAIN.ACCUMULATION_STEPS': 1, 'TRAIN.USE_CHECKPOINT': False,
    'TRAIN.LR_SCHEDULER.NAME': 'cosine', 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS': 30, 'TRAIN.LR_SCHEDULER.DECAY_RATE': 0.1,
    'TRAIN.LR_SCHEDULER.WARMUP_PREFIX': True, 'TRAIN.LR_SCHEDULER.GAMMA': 0.1, 'TRAIN.LR_SCHEDULER.MULTISTEPS': [],
    'TRAIN.OPTIMIZER.NAME': 'adamw', 'TRAIN.OPTIMIZER.EPS': 1e-8, 'TRAIN.OPTIMIZER.BETAS': (0.9, 0.999),
    'TRAIN.OPTIMIZER.MOMENTUM': 0.9, 'TRAIN.LAYER_DECAY': 1.0, 'TRAIN.MOE.SAVE_MASTER': False,
    'AUG.COLOR_JITTER': 0.4, 'AUG.AUTO_AUGMENT': 'rand-m9-mstd0.5-inc1', 'AUG.REPROB': 0.25, 'AUG.REMODE': 'pixel',
    'AUG.RECOUNT': 1, 'AUG.MIXUP': 0.8, 'AUG.CUTMIX': 1.0, 'AUG.CUTMIX_MINMAX': None, 'AUG.MIXUP_PROB': 1.0,
    'AUG.MIXUP_SWITCH_PROB': 0.5, 'AUG.MIXUP_MODE': 'batch',
    'TEST.CROP': True, 'TEST.SEQUENTIAL': False, 'TEST.SHUFFLE': False,
    'AMP_ENABLE': True, 'AMP_OPT_LEVEL': '', 'OUTPUT': '', 'TAG': 'default', 'SAVE_FREQ': 1, 'PRINT_FREQ': 10,
    'SEED': 0, 'EVAL_MODE': False, 'THROUGHPUT_MODE': False, 'LOCAL_RANK': 0, 'FUSED_WINDOW_PROCESS': False,
    'FUSED_LAYERNORM': False,
}
ALL_KEYS = C._all_keys(C._C)


def _get(config, key):
    for part in key.split('.'):
        config = config[part]
    return config


def _write(path, data):
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return str(path)


def _args(**kw):
    """An argparse.Namespace with every official flag, unset unless given."""
    flags = dict(cfg=None, opts=None, batch_size=None, data_path=None, zip=False, cache_mode=None, pretrained=None,
                 resume=None, accumulation_steps=None, use_checkpoint=False, disable_amp=False, amp_opt_level=None,
                 output=None, tag=None, eval=False, throughput=False, fused_window_process=False,
                 fused_layernorm=False, optim=None, local_rank=None)
    flags.update(kw)
    return argparse.Namespace(**flags)


# ----------------------------------------------------------------------------- defaults

@pytest.mark.parametrize('key', sorted(OFFICIAL))
def test_defaults_are_official(key):
    value = _get(get_defaults(), key)
    assert value == OFFICIAL[key] and type(value) is type(OFFICIAL[key])


def test_defaults_validate_and_are_a_copy():
    a = get_defaults()
    a.TRAIN.EPOCHS = 1
    assert get_defaults().TRAIN.EPOCHS == 300
    validate_config(get_defaults())
    config = load_config()
    assert config.is_frozen() and config_to_dict(config) == config_to_dict(get_defaults())


# ----------------------------------------------------------------------------- files, BASE, opts

def test_file_and_base_inheritance(tmp_path):
    (tmp_path / 'sub').mkdir()
    _write(tmp_path / 'root.yaml', {'TRAIN': {'EPOCHS': 50, 'BASE_LR': 1e-3}, 'MODEL': {'NAME': 'root'}})
    _write(tmp_path / 'sub' / 'mid.yaml', {'BASE': ['../root.yaml'], 'TRAIN': {'EPOCHS': 60}, 'DATA': {'IMG_SIZE': 64}})
    child = _write(tmp_path / 'sub' / 'child.yaml', {'BASE': ['mid.yaml'], 'MODEL': {'NAME': 'child'}})
    config = load_config(child)
    assert config.TRAIN.EPOCHS == 60 and config.TRAIN.BASE_LR == 1e-3  # mid overrides root
    assert config.MODEL.NAME == 'child' and config.DATA.IMG_SIZE == 64
    assert config.TRAIN.WARMUP_EPOCHS == 20  # untouched default


def test_base_cycle_and_missing_base_are_errors(tmp_path):
    a = _write(tmp_path / 'a.yaml', {'BASE': ['b.yaml']})
    _write(tmp_path / 'b.yaml', {'BASE': ['a.yaml']})
    with pytest.raises(ConfigError, match='includes itself'):
        load_config(a)
    c = _write(tmp_path / 'c.yaml', {'BASE': ['nope.yaml']})
    with pytest.raises(ConfigError, match='nope.yaml'):
        load_config(c)
    with pytest.raises(ConfigError, match='not found'):
        load_config(str(tmp_path / 'missing.yaml'))


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match='not valid YAML'):
        load_config(_write(tmp_path / 'bad.yaml', 'TRAIN: [1, 2\n'))
    with pytest.raises(ConfigError, match='mapping'):
        load_config(_write(tmp_path / 'list.yaml', '- 1\n- 2\n'))
    assert load_config(_write(tmp_path / 'empty.yaml', '')).TRAIN.EPOCHS == 300


def test_opts_override_the_file(tmp_path):
    f = _write(tmp_path / 'x.yaml', {'TRAIN': {'EPOCHS': 50}, 'MODEL': {'SWIN': {'DEPTHS': [2, 2, 2, 2]}}})
    config = load_config(f, ['TRAIN.EPOCHS', '27', 'MODEL.SWIN.DEPTHS', '[1, 1, 1, 1]', 'MODEL.NAME', 'abc',
                             'TRAIN.OPTIMIZER.BETAS', '(0.8, 0.9)', 'AUG.CUTMIX_MINMAX', '[0.2, 0.8]'])
    assert config.TRAIN.EPOCHS == 27 and config.MODEL.SWIN.DEPTHS == [1, 1, 1, 1] and config.MODEL.NAME == 'abc'
    assert config.TRAIN.OPTIMIZER.BETAS == (0.8, 0.9) and config.AUG.CUTMIX_MINMAX == [0.2, 0.8]
    with pytest.raises(ConfigError, match='odd number'):
        load_config(None, ['TRAIN.EPOCHS'])


def test_official_yaml_quirks_load(tmp_path):
    """Official files write 1e-8 (a string to YAML 1.1) and comments after values."""
    f = _write(tmp_path / 'ft.yaml', 'TRAIN:\n  WEIGHT_DECAY: 1e-8\n  BASE_LR: 2e-05\n  MIN_LR: 1.25e-6 # c\n')
    config = load_config(f)
    assert config.TRAIN.WEIGHT_DECAY == 1e-8 and config.TRAIN.BASE_LR == 2e-5 and config.TRAIN.MIN_LR == 1.25e-6


# ----------------------------------------------------------------------------- unknown keys and types

def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    f = _write(tmp_path / 'typo.yaml', {'TRAIN': {'EPOHCS': 3}})
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert 'TRAIN.EPOHCS' in msg and 'typo.yaml' in msg and 'TRAIN.EPOCHS' in msg


def test_unknown_key_in_opts_names_it():
    with pytest.raises(ConfigError, match=r"MODEL\.SWIN\.WINDOWSIZE.*--opts.*MODEL\.SWIN\.WINDOW_SIZE"):
        load_config(None, ['MODEL.SWIN.WINDOWSIZE', '12'])
    with pytest.raises(ConfigError, match='NOPE'):
        load_config(None, ['NOPE', '1'])


@pytest.mark.parametrize('opts, match', [
    (['TRAIN.EPOCHS', 'abc'], r'TRAIN\.EPOCHS must be of type int.*abc'),
    (['TRAIN.EPOCHS', '3.5'], r'TRAIN\.EPOCHS must be of type int'),
    (['TRAIN.BASE_LR', 'True'], r'TRAIN\.BASE_LR must be of type float'),
    (['MODEL.SWIN', '3'], r'MODEL\.SWIN is a section'),
    (['TRAIN.EPOCHS', 'None'], r'TRAIN\.EPOCHS must be of type int.*None'),
    (['MODEL.SWIN.DEPTHS', "[2, 'a', 2, 2]"], r'MODEL\.SWIN\.DEPTHS must hold int'),
    (['TRAIN.OPTIMIZER.BETAS', '[0.9]'], r'BETAS needs 2'),
    (['TRAIN.LR_SCHEDULER.MULTISTEPS', "['x']"], r'MULTISTEPS must hold numbers'),
    (['MODEL.SWIN.QK_SCALE', "'big'"], r'QK_SCALE'),
    (['AUG.CUTMIX_MINMAX', '0.5'], r'CUTMIX_MINMAX'),
    # yacs compares with the current value: None first would let a string in (found by the fuzz test)
    (['DATA.BATCH_SIZE', 'None', 'DATA.BATCH_SIZE', "''"], r'DATA\.BATCH_SIZE must be of type int'),
])
def test_type_errors_name_the_key(opts, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, opts)


def test_type_error_in_file_names_file(tmp_path):
    f = _write(tmp_path / 't.yaml', {'DATA': {'BATCH_SIZE': 'many'}})
    with pytest.raises(ConfigError, match=r't\.yaml.*DATA\.BATCH_SIZE'):
        load_config(f)
    f = _write(tmp_path / 'n.yaml', 'DATA:\n  DATA_PATH:\n')  # an empty YAML value is None
    with pytest.raises(ConfigError, match=r'DATA\.DATA_PATH.*None'):
        load_config(f)


def test_nan_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r'TRAIN\.BASE_LR is NaN'):
        load_config(_write(tmp_path / 'nan.yaml', 'TRAIN:\n  BASE_LR: .nan\n'))


def test_clip_grad_may_be_none():
    assert load_config(None, ['TRAIN.CLIP_GRAD', 'None']).TRAIN.CLIP_GRAD is None


# ----------------------------------------------------------------------------- validate_config

@pytest.mark.parametrize('opts, match', [
    (['MODEL.SWIN.DEPTHS', '[2, 2, 6]'], r'DEPTHS \[2, 2, 6\] and MODEL\.SWIN\.NUM_HEADS'),
    (['MODEL.TYPE', 'swinv2', 'MODEL.SWINV2.NUM_HEADS', '[3, 6]'], r'MODEL\.SWINV2\.DEPTHS'),
    (['MODEL.TYPE', 'swinv2', 'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', '[12, 12]'], 'PRETRAINED_WINDOW_SIZES'),
    (['DATA.BATCH_SIZE', '0'], r'DATA\.BATCH_SIZE must be >= 1'),
    (['DATA.IMG_SIZE', '0'], r'DATA\.IMG_SIZE must be >= 1'),
    (['MODEL.SWIN.EMBED_DIM', '0'], r'MODEL\.SWIN\.EMBED_DIM must be >= 1'),
    (['MODEL.SWIN.WINDOW_SIZE', '0'], r'WINDOW_SIZE must be >= 1'),
    (['MODEL.SWIN.DEPTHS', '[2, 0, 6, 2]'], 'DEPTHS and NUM_HEADS must be >= 1'),
    (['MODEL.SWIN.EMBED_DIM', '100'], 'not divisible'),
    (['TRAIN.EPOCHS', '0'], r'TRAIN\.EPOCHS must be >= 1'),
    (['TRAIN.WARMUP_EPOCHS', '400'], 'exceeds'),
    (['TRAIN.BASE_LR', '-0.1'], r'TRAIN\.BASE_LR must be >= 0'),
    (['MODEL.DROP_PATH_RATE', '1.5'], r'in \[0, 1\]'),
    (['TRAIN.LAYER_DECAY', '0.0'], 'LAYER_DECAY'),
    (['DATA.BATCH_SIZE', '7', 'AUG.MIXUP_MODE', 'pair'], r'DATA\.BATCH_SIZE = 7 must be even'),
    (['DATA.BATCH_SIZE', '7', 'AUG.MIXUP_MODE', 'elem'], 'must be even'),
    (['MODEL.TYPE', 'swin_mixer'], r"MODEL\.TYPE = 'swin_mixer' is not one of \['swin', 'swinv2', 'swin_mlp', 'swin_moe'\]"),
    (['MODEL.TYPE', 'swin_moe', 'MODEL.SWIN_MOE.MOE_BLOCKS', '[[1], [1]]'], r'MOE_BLOCKS needs one list'),
    (['MODEL.TYPE', 'swin_moe', 'MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS', '0'], r'NUM_LOCAL_EXPERTS must not be 0'),
    (['MODEL.TYPE', 'swin_moe', 'MODEL.SWIN_MOE.TOP_VALUE', '0'], r'TOP_VALUE .* must be >= 1'),
    (['MODEL.TYPE', 'swin_moe', 'MODEL.SWIN_MOE.GATE_NOISE', '0.0'], r'GATE_NOISE must be > 0'),
    (['MODEL.TYPE', 'swin_moe', 'TRAIN.FSDP.ENABLE', 'True'], r'TRAIN\.FSDP\.ENABLE is not supported with MODEL'),
    (['TRAIN.OPTIMIZER.NAME', 'adam'], r"\['adamw', 'sgd', 'fused_adam', 'fused_lamb'\]"),
    (['TRAIN.LR_SCHEDULER.NAME', 'poly'], r"\['cosine', 'linear', 'step', 'multistep'\]"),
    (['DATA.DATASET', 'cifar'], r"\['imagenet', 'imagenet22K', 'folder', 'wds', 'hf'\]"),
    (['DATA.CACHE_MODE', 'all'], r"\['no', 'part', 'full'\]"),
    (['AUG.MIXUP_MODE', 'row'], r"\['batch', 'pair', 'elem'\]"),
])
def test_validate_config_errors(opts, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, opts)


def test_odd_batch_needs_mixup_off():
    with pytest.raises(ConfigError, match='must be even'):  # timm's Mixup pairs images in batch mode too
        load_config(None, ['DATA.BATCH_SIZE', '7'])
    assert load_config(None, ['DATA.BATCH_SIZE', '7', 'EVAL_MODE', 'True']).DATA.BATCH_SIZE == 7  # no Mixup in eval
    assert load_config(None, ['DATA.BATCH_SIZE', '7', 'AUG.MIXUP_MODE', 'pair', 'AUG.MIXUP', '0.0',
                              'AUG.CUTMIX', '0.0']).DATA.BATCH_SIZE == 7


# ----------------------------------------------------------------------------- get_config (official flags)

def test_get_config_applies_every_official_flag(tmp_path, monkeypatch):
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    f = _write(tmp_path / 'm.yaml', {'MODEL': {'NAME': 'my_swin'}, 'DATA': {'BATCH_SIZE': 32}})
    args = _args(cfg=f, opts=['DATA.BATCH_SIZE', '16', 'TRAIN.EPOCHS', '25'], batch_size=64, data_path='/data',
                 zip=True, cache_mode='full', pretrained='p.pth', resume='r.pth', accumulation_steps=2,
                 use_checkpoint=True, disable_amp=True, amp_opt_level='O1', output=str(tmp_path / 'out'),
                 tag='run1', eval=True, throughput=True, fused_window_process=True, fused_layernorm=True,
                 optim='sgd', local_rank=3)
    config = get_config(args)
    assert config.DATA.BATCH_SIZE == 64  # flag > opts > file
    assert config.TRAIN.EPOCHS == 25
    assert (config.DATA.DATA_PATH, config.DATA.ZIP_MODE, config.DATA.CACHE_MODE) == ('/data', True, 'full')
    assert (config.MODEL.PRETRAINED, config.MODEL.RESUME) == ('p.pth', 'r.pth')
    assert config.TRAIN.ACCUMULATION_STEPS == 2 and config.TRAIN.USE_CHECKPOINT is True
    assert config.AMP_ENABLE is False and config.AMP_OPT_LEVEL == 'O1'
    assert config.EVAL_MODE and config.THROUGHPUT_MODE and config.FUSED_WINDOW_PROCESS and config.FUSED_LAYERNORM
    assert config.TRAIN.OPTIMIZER.NAME == 'sgd' and config.LOCAL_RANK == 3
    assert config.OUTPUT == os.path.join(str(tmp_path / 'out'), 'my_swin', 'run1')
    assert config.is_frozen()


def test_get_config_defaults_and_env_rank(monkeypatch):
    monkeypatch.setenv('LOCAL_RANK', '2')
    config = get_config(_args())
    assert config.OUTPUT == os.path.join('output', 'swin_tiny_patch4_window7_224', 'default')
    assert config.LOCAL_RANK == 2 and config.AMP_ENABLE is True and config.DATA.BATCH_SIZE == 128
    assert get_config(_args(amp_opt_level='O0')).AMP_ENABLE is False


def test_get_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match='TRAIN.EPOHCS'):
        get_config(_args(opts=['TRAIN.EPOHCS', '1']))
    with pytest.raises(ConfigError, match="'lamb' is not one of"):
        get_config(_args(optim='lamb'))


# ----------------------------------------------------------------------------- save / dict / scaling

def test_save_config_round_trip(tmp_path):
    config = load_config(None, ['MODEL.TYPE', 'swinv2', 'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', '[12, 12, 12, 6]',
                                'TRAIN.LR_SCHEDULER.MULTISTEPS', '[10, 20]', 'TRAIN.OPTIMIZER.BETAS', '(0.8, 0.95)',
                                'MODEL.NAME', 'x: y', 'TAG', '', 'TRAIN.CLIP_GRAD', 'None', 'TRAIN.BASE_LR', '1e-8'])
    path = str(tmp_path / 'deep' / 'config.yaml')
    save_config(config, path)
    assert not os.path.exists(path + '.tmp')
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(config)
    assert again.TRAIN.OPTIMIZER.BETAS == (0.8, 0.95) and again.TRAIN.CLIP_GRAD is None


def test_config_to_dict_loads_with_weights_only(tmp_path):
    config = load_config(None, ['TRAIN.OPTIMIZER.BETAS', '(0.8, 0.95)'])
    d = config_to_dict(config)
    assert type(d) is dict and type(d['TRAIN']) is dict
    torch.save({'config': d}, tmp_path / 'c.pt')
    back = torch.load(tmp_path / 'c.pt', weights_only=True)['config']
    assert back == d and back['TRAIN']['OPTIMIZER']['BETAS'] == [0.8, 0.95]
    assert back['MODEL']['SWIN']['QK_SCALE'] is None


@pytest.mark.parametrize('batch, world, accum, factor', [(128, 8, 1, 2.0), (128, 8, 2, 4.0), (64, 1, 1, 0.125),
                                                         (32, 4, 4, 1.0)])
def test_apply_linear_scaling(batch, world, accum, factor):
    config = load_config(None, ['DATA.BATCH_SIZE', str(batch), 'TRAIN.ACCUMULATION_STEPS', str(accum)])
    scaled = apply_linear_scaling(config, world)
    assert scaled.TRAIN.BASE_LR == pytest.approx(5e-4 * factor, rel=1e-15)
    assert scaled.TRAIN.WARMUP_LR == pytest.approx(5e-7 * factor, rel=1e-15)
    assert scaled.TRAIN.MIN_LR == pytest.approx(5e-6 * factor, rel=1e-15)
    assert config.TRAIN.BASE_LR == 5e-4  # the input is not changed
    assert scaled.is_frozen() and scaled.TRAIN.WEIGHT_DECAY == config.TRAIN.WEIGHT_DECAY


# ----------------------------------------------------------------------------- fuzz

_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.one_of(st.integers(-3, 30), st.floats(-2, 2), st.text(max_size=3)), max_size=5),
    st.lists(st.lists(st.integers(-1, 3), max_size=2), max_size=4),
    st.dictionaries(st.sampled_from(['A', 'EPOCHS', 'X']), st.integers(0, 3), max_size=2),
)
_keys = st.one_of(st.sampled_from(ALL_KEYS), st.sampled_from(ALL_KEYS).map(lambda k: k + '_X'),
                  st.sampled_from(['MODEL', 'TRAIN.OPTIMIZER', 'DATA']))


def _like(default):
    """Values of the default's own type (and, for numbers, around it), so that many fuzzed configs load."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(max(-1, default - 3), default + 3)
    if isinstance(default, float):
        return st.floats(0.0, max(1.0, 2 * default))
    if isinstance(default, str):
        return st.sampled_from([default, default.upper(), '', 'x'])
    if isinstance(default, (list, tuple)) and default:
        return st.lists(_like(default[0]), min_size=len(default), max_size=len(default))
    return st.just(default)


_typed_pairs = st.sampled_from(ALL_KEYS).flatmap(lambda k: st.tuples(st.just(k), _like(_get(get_defaults(), k))))


def _nest(pairs):
    """{'A.B': v} -> {'A': {'B': v}}; a later key that collides with an earlier value replaces it."""
    out = {}
    for key, value in pairs:
        node = out
        *parents, leaf = key.split('.')
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return out


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.one_of(st.tuples(_keys, _values), _typed_pairs), min_size=1, max_size=4))
def test_fuzz_random_config_loads_or_raises_config_error(tmp_path, pairs):
    pairs = [(k, v) for k, v in pairs if k != 'BASE']  # BASE names files; tested above
    if not pairs:
        return
    f = tmp_path / 'fuzz.yaml'
    nested = _nest(pairs)
    f.write_text(yaml.safe_dump(nested))
    try:
        config = load_config(str(f))
    except ConfigError:
        pass
    else:
        validate_config(config)
        _assert_defaults_plus(config, _leaves(nested))
    opts = []
    for k, v in pairs:
        opts += [k, repr(v)]
    try:
        config = load_config(None, opts)
    except ConfigError:
        pass
    else:
        _assert_defaults_plus(config, _leaves(_nest(pairs)))


def _leaves(nested, prefix=''):
    """{'A': {'B': v}} -> {'A.B': v} (an empty mapping sets nothing)."""
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f'{prefix}{key}.'))
        else:
            out[prefix + key] = value
    return out


def _same(a, b):
    """Equal values of the same kind (a list and a tuple with the same items are the same)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _assert_defaults_plus(config, given):
    """A config that loaded holds exactly the values given and the defaults everywhere else."""
    defaults = config_to_dict(get_defaults())
    loaded = config_to_dict(config)
    for key in ALL_KEYS:
        want = given[key] if key in given else _dotted(defaults, key)
        assert _same(_dotted(loaded, key), want), (key, _dotted(loaded, key), want)
    assert set(given) <= set(ALL_KEYS), set(given) - set(ALL_KEYS)


def _dotted(tree, key):
    for part in key.split('.'):
        tree = tree[part]
    return tree
