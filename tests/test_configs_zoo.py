"""Every YAML under configs/ loads, and its model builds (on the meta device: no memory, no init cost)."""
import glob
import os

import pytest
import torch

from config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'configs', '**', '*.yaml'),
                                                             recursive=True))

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

OFFICIAL_VARIANTS = [
    *(f'swin/swin_{s}_patch4_window7_224{x}.yaml' for s in ('tiny', 'small', 'base', 'large')
      for x in ('', '_22k', '_22kto1k_finetune')),
    *(f'swin/swin_{s}_patch4_window12_384{x}.yaml' for s in ('base', 'large') for x in ('', '_22kto1k_finetune')),
    'swin/swin_base_patch4_window12_384_finetune.yaml',
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
        arch = config.MODEL.SWIN if config.MODEL.TYPE == 'swin' else config.MODEL.SWINV2
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

    with torch.device('meta'):
        model = models.build_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 0
    if cfg_file in PARAMS_M:
        assert abs(n_params / 1e6 - PARAMS_M[cfg_file]) < 0.01, n_params
