"""Swin-MoE (``models.swin_moe``, ``models.moe``): logits and auxiliary loss equal the official
``SwinTransformerMoE`` over Tutel (fixtures in tests/fixtures/swin_moe, made by running the official code on
1 and 2 gloo processes), the routing rules, and the training rules."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from models.swin_moe import SwinTransformerMoE

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
