"""Swin-MoE (``models.swin_moe``, ``models.moe``): logits and auxiliary loss equal the official
``SwinTransformerMoE`` over Tutel (fixtures in tests/fixtures/swin_moe, made by running the official code on
1 and 2 gloo processes), the routing rules, and the training rules."""
from __future__ import annotations

import glob
import os
import re

import pytest
import torch
import torch.multiprocessing as mp

from config import load_config
from models.moe import CosineTopKGate
from models.swin_moe import SwinTransformerMoE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'swin_moe')
ONE_PROCESS = ['top1_1p', 'cosine_top2_1p']
TWO_PROCESSES = ['top1_2p', 'cosine_top2_2p', 'top2_4e_2p', 'shared_2p']


def load_fixture(run: str, rank: int) -> dict:
    return torch.load(os.path.join(FIXTURES, f'{run}.rank{rank}.pt'), weights_only=True)


def official_model(fixture: dict) -> SwinTransformerMoE:
    """Our model with the fixture's constructor arguments and its official state dict (float16 -> float32)."""
    model = SwinTransformerMoE(**fixture['kwargs']).eval()
    state = {k: v.float() if v.is_floating_point() else v for k, v in fixture['state_dict'].items()}
    model.load_state_dict(state)
    return model


def check_against_official(run: str, rank: int) -> None:
    fixture = load_fixture(run, rank)
    model = official_model(fixture)
    with torch.no_grad():
        logits = model(fixture['x'].float())
        l_aux = model.aux_loss()
    torch.testing.assert_close(logits, fixture['logits'], rtol=0, atol=1e-5)
    torch.testing.assert_close(l_aux.float(), fixture['l_aux'], rtol=0, atol=1e-6)


@pytest.mark.parametrize('run', ONE_PROCESS)
def test_logits_and_aux_loss_equal_official_on_one_process(run):
    check_against_official(run, 0)


def _two_process_worker(rank: int, world: int, init_file: str, runs: list, failures) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        for run in runs:
            try:
                check_against_official(run, rank)
            except AssertionError as e:
                failures.append(f'{run} rank {rank}: {e}')
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_logits_and_aux_loss_equal_official_on_two_processes(tmp_path):
    failures = mp.Manager().list()
    mp.spawn(_two_process_worker, args=(2, str(tmp_path / 'pg'), TWO_PROCESSES, failures), nprocs=2)
    assert not list(failures), '\n'.join(failures)


SWINMOE_CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', 'swinmoe', '*.yaml')))


def test_the_eleven_official_swinmoe_configs_are_here():
    assert len(SWINMOE_CONFIGS) == 11


@pytest.mark.parametrize('cfg_file', SWINMOE_CONFIGS, ids=os.path.basename)
def test_swinmoe_config_loads_and_builds(cfg_file, monkeypatch):
    """Each official file loads unchanged and builds (meta device) with the world size its name gives, with
    that many experts in all; the dense baselines build without MoE blocks."""
    import models
    import models.moe
    config = load_config(cfg_file)
    stem = os.path.splitext(os.path.basename(cfg_file))[0]
    assert config.MODEL.TYPE == 'swin_moe' and config.MODEL.NAME == stem
    found = re.search(r'(\d+)expert_(\d+)gpu', stem)
    experts, world = (int(found.group(1)), int(found.group(2))) if found else (None, 1)
    monkeypatch.setattr(models.moe, 'world_info', lambda group=None: (0, world))
    with torch.device('meta'):
        model = models.build_model(config)
    moe = model.moe_layers()
    m = config.MODEL.SWIN_MOE
    assert len(moe) == sum(len([b for b in blocks if b >= 0]) for blocks in m.MOE_BLOCKS)
    if experts is None:
        assert not moe
        return
    assert all(layer._moe_layer.num_experts == experts for layer in moe)
    assert model._ddp_params_and_buffers_to_ignore and all(
        '_moe_layer.experts.' in n for n in model._ddp_params_and_buffers_to_ignore)
    assert isinstance(moe[0]._moe_layer.gates[0], CosineTopKGate) == ('cosine' in stem)
