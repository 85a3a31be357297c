"""Every YAML under configs/ loads, and its model builds (on the meta device: no memory, no init cost)."""
import glob
import os

import json

import pytest
import torch

from config import MODEL_SECTIONS, load_config
from helpers import swin_parameter_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/swinmoe/ (experts spread over 8-64 processes) is checked in test_swin_moe.py
CONFIGS = sorted(rel for rel in (os.path.relpath(p, ROOT) for p in glob.glob(
    os.path.join(ROOT, 'configs', '**', '*.yaml'), recursive=True)) if not rel.startswith('configs/swinmoe/'))

# Official parameter counts (millions) of the 1K-class models, from the official model zoo.
PARAMS_M = {
    'configs/swin/swin_tiny_patch4_window7_224.yaml': 28.29,
    'configs/swin/swin_small_patch4_window7_224.yaml': 49.61,
    'configs/swin/swin_base_patch4_window7_224.yaml': 87.77,
    'configs/swin/swin_large_patch4_window7_224.yaml': 196.53,
    'configs/swin/swin_base_patch4_window12_384.yaml': 87.90,
    'configs/swin/swin_large_patch4_window12_384.yaml': 196.74,
    'configs/swin/swin_base_patch4_window12_384_finetune.yaml': 87.90,
    'configs/swin/swin_base_patch4_window12_384_22kto1k_finetune.yaml': 87.90,
    'configs/swin/swin_large_patch4_window12_384_22kto1k_finetune.yaml': 196.74,
}
# Swin-MLP: the official model's exact counts, computed by running the official code (tests/fixtures/swin_mlp)
with open(os.path.join(ROOT, 'tests', 'fixtures', 'swin_mlp', 'official.json')) as _f:
    SWIN_MLP_PARAMS = {f'configs/swinmlp/{name}.yaml': z['params'] for name, z in json.load(_f)['zoo'].items()}

# Architecture fields per file, written out here from the official YAML files (microsoft/Swin-Transformer
# configs/), the official model zoo (the 384 px evaluation-only V1 files), the SwinV2 paper (H, G) and our demo
# configs' comments: (MODEL.TYPE, EMBED_DIM, DEPTHS, NUM_HEADS, WINDOW_SIZE, DATA.IMG_SIZE, MODEL.NUM_CLASSES,
# SWINV2.PRETRAINED_WINDOW_SIZES). A file that drifts from its official architecture fails here.
T, S = ('swin', 96, (2, 2, 6, 2), (3, 6, 12, 24)), ('swin', 96, (2, 2, 18, 2), (3, 6, 12, 24))
B, L = ('swin', 128, (2, 2, 18, 2), (4, 8, 16, 32)), ('swin', 192, (2, 2, 18, 2), (6, 12, 24, 48))
NO_PRE, PRE = (0, 0, 0, 0), (12, 12, 12, 6)


def _v2(arch):
    return ('swinv2',) + arch[1:]


ARCH = {
    **{f'configs/swin/swin_{name}_patch4_window7_224{x}.yaml': (*arch, 7, 224, classes, None)
       for name, arch in (('tiny', T), ('small', S), ('base', B), ('large', L))
       for x, classes in (('', 1000), ('_22k', 21841), ('_22kto1k_finetune', 1000))},
    **{f'configs/swin/swin_{name}_patch4_window12_384{x}.yaml': (*arch, 12, 384, 1000, None)
       for name, arch in (('base', B), ('large', L)) for x in ('', '_22kto1k_finetune')},
    'configs/swin/swin_base_patch4_window12_384_finetune.yaml': (*B, 12, 384, 1000, None),
    **{f'configs/swinv2/swinv2_{name}_patch4_window{w}_256.yaml': (*_v2(arch), w, 256, 1000, NO_PRE)
       for name, arch in (('tiny', T), ('small', S), ('base', B)) for w in (8, 16)},
    **{f'configs/swinv2/swinv2_{name}_patch4_window12_192_22k.yaml': (*_v2(arch), 12, 192, 21841, NO_PRE)
       for name, arch in (('base', B), ('large', L))},
    **{f'configs/swinv2/swinv2_{name}_patch4_window12to{w}_192to{size}_22kto1k_ft.yaml':
       (*_v2(arch), w, size, 1000, PRE)
       for name, arch in (('base', B), ('large', L)) for w, size in ((16, 256), (24, 384))},
    'configs/swinv2/swinv2_huge_patch4_window12_192_22k.yaml':
        ('swinv2', 352, (2, 2, 18, 2), (11, 22, 44, 88), 12, 192, 21841, NO_PRE),
    'configs/swinv2/swinv2_giant_patch4_window12_192_22k.yaml':
        ('swinv2', 512, (2, 2, 42, 4), (16, 32, 64, 128), 12, 192, 21841, NO_PRE),
    'configs/swinmlp/swin_mlp_base_patch4_window7_224.yaml': ('swin_mlp', *B[1:], 7, 224, 1000, None),
    **{f'configs/swinmlp/swin_mlp_tiny_c{c}_patch4_window8_256.yaml':
       ('swin_mlp', 96, (2, 2, 6, 2), tuple(96 // c * 2 ** i for i in range(4)), 8, 256, 1000, None)
       for c in (6, 12, 24)},  # C{c}: {c} channels per head
    'configs/simmim/simmim_pretrain__swin_base__img192_window6__800ep.yaml': (*B, 6, 192, 1000, None),
    'configs/simmim/simmim_finetune__swin_base__img224_window7__800ep.yaml': (*B, 7, 224, 1000, None),
    'configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml': (*_v2(B), 12, 192, 1000, NO_PRE),
    'configs/simmim/simmim_finetune__swinv2_base__img224_window14__800ep.yaml': (*_v2(B), 14, 224, 1000, PRE),
    **{f'configs/demo/{name}.yaml': ('swin', 48, (2, 2, 2), (2, 4, 8), w, size, 10, None)
       for name, w, size in (('swin_demo_digits_32', 4, 32), ('swin_demo_digits_48_ft', 6, 48),
                             ('simmim_pretrain_digits_32', 4, 32), ('simmim_finetune_digits_32', 4, 32))},
}
ARCH['configs/demo/simmim_pretrain_digits_32.yaml'] = ARCH['configs/demo/simmim_pretrain_digits_32.yaml'][:6] + \
    (1000, None)  # pre-training: no classes given (the head is not used)

# Official parameter counts (millions) of the SwinV2 1K models, as the official model zoo rounds them.
V2_PARAMS_M = {'tiny': 28, 'small': 50, 'base': 88}


def test_closed_form_gives_the_official_counts():
    """The formula against the published sizes: Swin-T/S/B/L at 224 and B/L at 384 to 0.01M, SwinV2-T/S/B
    (windows 8 and 16) to the zoo's whole millions, SwinV2-H/G to the paper's 658M / 3.0B."""
    for cfg_file, millions in PARAMS_M.items():
        count = swin_parameter_count(*ARCH[cfg_file][:6], 1000)
        assert abs(count / 1e6 - millions) < 0.005, (cfg_file, count)
    for name, millions in V2_PARAMS_M.items():
        for w in (8, 16):
            count = swin_parameter_count(*ARCH[f'configs/swinv2/swinv2_{name}_patch4_window{w}_256.yaml'][:6], 1000)
            assert round(count / 1e6) == millions, (name, w, count)
    assert swin_parameter_count('swin', 96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224, 1000) == 28_288_354
    for name, millions in (('huge', 658.0), ('giant', 3001.9)):
        arch = ARCH[f'configs/swinv2/swinv2_{name}_patch4_window12_192_22k.yaml']
        assert abs(swin_parameter_count(*arch[:6], 1000) / 1e6 - millions) < 0.05, name


def test_every_config_has_an_architecture_row():
    assert sorted(ARCH) == CONFIGS


OFFICIAL_VARIANTS = [
    *(f'swin/swin_{s}_patch4_window7_224{x}.yaml' for s in ('tiny', 'small', 'base', 'large')
      for x in ('', '_22k', '_22kto1k_finetune')),
    *(f'swin/swin_{s}_patch4_window12_384{x}.yaml' for s in ('base', 'large') for x in ('', '_22kto1k_finetune')),
    'swin/swin_base_patch4_window12_384_finetune.yaml',
    *(f'swinmlp/swin_mlp_{s}.yaml' for s in ('base_patch4_window7_224', 'tiny_c6_patch4_window8_256',
                                             'tiny_c12_patch4_window8_256', 'tiny_c24_patch4_window8_256')),
    *(f'swinv2/swinv2_{s}_patch4_window{w}_256.yaml' for s in ('tiny', 'small', 'base') for w in (8, 16)),
    *(f'swinv2/swinv2_{s}_patch4_window12_192_22k.yaml' for s in ('base', 'large')),
    *(f'swinv2/swinv2_{s}_patch4_window12to{w}_192to{i}_22kto1k_ft.yaml' for s in ('base', 'large')
      for w, i in ((16, 256), (24, 384))),
]


def test_zoo_has_every_official_variant():
    missing = [v for v in OFFICIAL_VARIANTS if f'configs/{v}' not in CONFIGS]
    assert not missing, missing


@pytest.mark.parametrize('cfg_file', CONFIGS)
def test_config_loads_and_model_builds(cfg_file):
    import models
    config = load_config(os.path.join(ROOT, cfg_file))
    stem = os.path.splitext(os.path.basename(cfg_file))[0]
    if cfg_file.startswith('configs/swin'):  # official files: the run name is the file name
        assert config.MODEL.NAME == stem
    if not cfg_file.startswith(('configs/demo/', 'configs/simmim/')):  # the official zoo (SimMIM's: test_simmim.py)
        arch = config.MODEL[MODEL_SECTIONS[config.MODEL.TYPE]]
        assert f'window{arch.WINDOW_SIZE}' in stem or f'to{arch.WINDOW_SIZE}_' in stem
        assert str(config.DATA.IMG_SIZE) in stem
        if '22k' in stem and 'kto1k' not in stem:
            assert config.DATA.DATASET == 'imagenet22K' and config.TRAIN.EPOCHS == 90
            assert config.MODEL.NUM_CLASSES == 21841  # our loader does not overwrite it as the official one does
        else:
            assert config.DATA.DATASET == 'imagenet' and config.MODEL.NUM_CLASSES == 1000
        if 'finetune' in stem or stem.endswith('_ft'):
            assert (config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS, config.TRAIN.BASE_LR) == (30, 5, 2e-5)
            assert config.TRAIN.WEIGHT_DECAY == 1e-8

    model_type, embed_dim, depths, heads, window, img_size, classes, pretrained_windows = ARCH[cfg_file]
    arch = config.MODEL[MODEL_SECTIONS[config.MODEL.TYPE]]
    assert (config.MODEL.TYPE, arch.EMBED_DIM, tuple(arch.DEPTHS), tuple(arch.NUM_HEADS), arch.WINDOW_SIZE,
            config.DATA.IMG_SIZE, config.MODEL.NUM_CLASSES) == ARCH[cfg_file][:7]
    assert (arch.PATCH_SIZE, arch.IN_CHANS, arch.MLP_RATIO, arch.APE) == (4, 3, 4.0, False)
    if model_type == 'swinv2':
        assert tuple(arch.PRETRAINED_WINDOW_SIZES) == pretrained_windows

    with torch.device('meta'):
        model = models.build_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == swin_parameter_count(model_type, embed_dim, depths, heads, window, img_size, classes)
    if cfg_file in PARAMS_M:
        assert abs(n_params / 1e6 - PARAMS_M[cfg_file]) < 0.01, n_params
    if cfg_file in SWIN_MLP_PARAMS:
        assert n_params == SWIN_MLP_PARAMS[cfg_file]
