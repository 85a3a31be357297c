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


# ----------------------------------------------------------------------------- training with torchrun

TINY_MOE = ['MODEL.TYPE', 'swin_moe', 'MODEL.NAME', 'moe_tiny', 'MODEL.NUM_CLASSES', '4',
            'MODEL.SWIN_MOE.EMBED_DIM', '16', 'MODEL.SWIN_MOE.DEPTHS', '[2, 2]', 'MODEL.SWIN_MOE.NUM_HEADS', '[2, 4]',
            'MODEL.SWIN_MOE.WINDOW_SIZE', '4', 'MODEL.SWIN_MOE.MLP_RATIO', '2.0',
            'MODEL.SWIN_MOE.MOE_BLOCKS', '[[1], [1]]', 'MODEL.SWIN_MOE.PRETRAINED_WINDOW_SIZES', '[0, 0]',
            'TRAIN.EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.KEEP_CHECKPOINTS', '0', 'TRAIN.CLIP_GRAD', '5.0',
            'DATA.NUM_WORKERS', '0', 'SEED', '3',
            'PRINT_FREQ', '1']  # with several processes the stop check runs every PRINT_FREQ updates: mid-epoch here


def _train_cmd(data: str, out: str, nproc: int, *extra: str) -> list:
    import socket
    import sys
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    launcher = ['-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', str(port)] \
        if nproc > 1 else []
    return [sys.executable, *launcher, os.path.join(ROOT, 'main.py'), '--cfg',
            os.path.join(ROOT, 'configs', 'demo', 'swin_demo_digits_32.yaml'), '--data-path', data, '--output', out,
            '--device', 'cpu', '--batch-size', '8', *extra, '--opts', *TINY_MOE]


def _train(data: str, out: str, nproc: int, *extra: str):
    import subprocess

    from helpers import subprocess_env
    return subprocess.run(_train_cmd(data, out, nproc, *extra), cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)


def _train_until(data: str, out: str, line: str, stop) -> tuple:
    """The 2-process torchrun run, and ``stop(launcher)`` once rank 0 logged ``line``; (exit code, output)."""
    import subprocess

    from helpers import subprocess_env
    proc = subprocess.Popen(_train_cmd(data, out, 2), cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for text in proc.stdout:
            lines.append(text)
            if line in text:
                stop(proc)
                break
        rest, _ = proc.communicate(timeout=120)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert line in ''.join(lines), ''.join(lines)[-3000:]
    return proc.returncode, ''.join(lines)


def _sigkill_all(proc) -> None:
    """SIGKILL to the workers and the launcher: the machine lost (torchrun starts workers in their own sessions,
    so they are found by their parent)."""
    import signal

    from helpers import torchrun_worker_pids
    for pid in torchrun_worker_pids(proc.pid).values():
        os.kill(pid, signal.SIGKILL)
    proc.kill()


def _rank_weights(run_dir: str, name: str) -> list:
    return [torch.load(os.path.join(run_dir, f'{name}.rank{r}'), weights_only=True)['model'] for r in (0, 1)]


def _differing(a: dict, b: dict) -> list:
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
@pytest.mark.skipif(not __import__('sys').platform.startswith('linux'), reason='reads /proc to find the workers')
def test_torchrun_trains_experts_per_rank_and_resumes_exactly(tmp_path, capsys):
    """2 CPU processes, one expert each: per-rank files <name>.pth.rank<r>; after training the experts differ
    between the ranks and everything else is equal. The same command stopped mid-epoch by SIGTERM to the torchrun
    launcher (both ranks save ckpt_last.pth.rank<r>), run again (auto-resume, mid-epoch), SIGKILLed with rank 1's
    newest file lost (both ranks go back to the newest epoch both hold) and run again ends with the straight run's
    weights on both ranks; one process cannot resume it."""
    import signal

    from helpers import write_digits_folder
    data = write_digits_folder(tmp_path / 'digits')
    straight = str(tmp_path / 'straight')
    result = _train(data, straight, 2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = os.path.join(straight, 'moe_tiny', 'default')
    names = sorted(os.listdir(run_dir))
    assert {f'ckpt_epoch_{e}.pth.rank{r}' for e in range(3) for r in (0, 1)} <= set(names)
    assert not [n for n in names if n.endswith('.pth')]
    final = _rank_weights(run_dir, 'ckpt_epoch_2.pth')
    experts = [k for k in final[0] if '_moe_layer.experts.' in k]
    assert len(experts) == 8  # 2 MoE blocks x fc1/fc2 weights and biases
    assert not [k for k in experts if torch.equal(final[0][k], final[1][k])]
    assert not [k for k in final[0] if k not in experts and not torch.equal(final[0][k], final[1][k])]

    # SIGTERM to the launcher after update 1 of epoch 1: it passes the signal on; both ranks stop mid-epoch
    out = str(tmp_path / 'interrupted')
    stopped_dir = os.path.join(out, 'moe_tiny', 'default')
    code, text = _train_until(data, out, 'Train: [1/3][0/4]', lambda proc: proc.send_signal(signal.SIGTERM))
    assert code != 0 and 'preempted (SIGTERM)' in text, text[-3000:]
    last = os.path.join(stopped_dir, 'ckpt_last.pth')
    assert f"checkpoint saved ({last}.rank0 .. .rank1, one per rank)" in text and f"--resume {last})" in text
    saved = [torch.load(f'{last}.rank{r}', weights_only=True) for r in (0, 1)]
    assert [(c['epoch'], c['rng']['world_size']) for c in saved] == [(0, 2), (0, 2)]
    step = saved[0]['step']
    assert 0 < step < 4 and saved[1]['step'] == step, [c['step'] for c in saved]  # inside epoch 1, both ranks
    assert not os.path.exists(last)

    # the same command: auto-resume mid-epoch; SIGKILL to everything after update 1 of epoch 2
    code, text = _train_until(data, out, 'Train: [2/3][0/4]', _sigkill_all)
    assert f"resumed from {last}.rank0: starting at epoch 1, update {step}" in text, text[-3000:]
    after_epoch_1 = _rank_weights(stopped_dir, 'ckpt_epoch_1.pth')  # the resumed epoch 1 is the straight one
    for r, weights in enumerate(_rank_weights(run_dir, 'ckpt_epoch_1.pth')):
        assert not _differing(weights, after_epoch_1[r])
    # rank 1 "died before it wrote epoch 1": its newest file is epoch 0's, so both ranks go back there
    for name in ('ckpt_epoch_1.pth.rank1', 'ckpt_last.pth.rank1'):
        os.remove(os.path.join(stopped_dir, name))
    result = _train(data, out, 2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'every rank resumes from epoch 0 done, 0 updates into the next' in result.stdout + result.stderr
    assert 'starting at epoch 1' in result.stdout
    for r, weights in enumerate(_rank_weights(stopped_dir, 'ckpt_epoch_2.pth')):
        assert not _differing(final[r], weights)

    # one process cannot resume it (in this process: no interpreter to start)
    code, err = _main_here(_train_cmd(data, str(tmp_path / 'one'), 1, '--resume',
                                      os.path.join(run_dir, 'ckpt_epoch_1.pth'))[2:], capsys)
    assert code == 2 and 'resume it with 2 processes' in err, err


def _main_here(args: list, capsys) -> tuple:
    """main.main in this process: (exit code, stdout + stderr)."""
    import main
    code = main.main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_eval_reads_this_ranks_file_for_pretrained_and_resume(tmp_path, capsys):
    """``--eval --pretrained <name>.pth`` and ``--eval --resume <name>.pth`` of a Swin-MoE run read this rank's
    ``<name>.pth.rank0`` (one process); a missing one is a clean error naming it."""
    import models
    from helpers import parse_eval_line, write_digits_folder
    data = write_digits_folder(tmp_path / 'digits', 4, 2, 4)
    weights = models.build_model(load_config(None, ['DATA.IMG_SIZE', '32', *TINY_MOE])).state_dict()
    name = str(tmp_path / 'moe.pth')
    torch.save({'model': weights, 'rng': {'world_size': 1, 'per_rank': []}}, name + '.rank0')
    accuracies = []
    for flag, said in (('--pretrained', f"loaded pretrained weights from {name} ({name}.rank0)"),
                       ('--resume', f"loaded weights from {name}.rank0")):
        code, text = _main_here(_train_cmd(data, str(tmp_path / flag[2:]), 1, '--eval', flag, name)[2:], capsys)
        assert code == 0 and said in text, text[-3000:]
        accuracies.append(parse_eval_line(text))
    assert accuracies[0] == accuracies[1]
    code, text = _main_here(_train_cmd(data, str(tmp_path / 'none'), 1, '--eval', '--pretrained',
                                       str(tmp_path / 'none.pth'))[2:], capsys)
    assert code == 2 and f"Swin-MoE reads {tmp_path / 'none.pth'}.rank0, which is not there" in text, text[-3000:]


# ----------------------------------------------------------------------------- training rules (one process)

def test_weight_decay_follows_the_official_moe_rules():
    """Official set_weight_decay with the MoE model's keywords: expert weights decay; expert biases, the cosine
    router (projector, similarity matrix, temperature) and cpb_mlp do not; the frozen fc2 bias (MLP_FC2_BIAS
    False) is in no group."""
    import models
    from optimizer import build_optimizer
    config = load_config(os.path.join(ROOT, 'configs', 'swinmoe',
                                      'swin_moe_small_patch4_window12_192_cosine_router_32expert_32gpu_22k.yaml'),
                         ['MODEL.SWIN_MOE.DEPTHS', '[2, 2, 2, 2]', 'MODEL.SWIN_MOE.MOE_BLOCKS', '[[-1], [-1], [1], [1]]',
                          'MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS', '1'])
    model = models.build_model(config)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g['weight_decay']: {names[id(p)] for p in g['params']} for g in build_optimizer(config, model).param_groups}
    prefix = 'layers.2.blocks.1.mlp._moe_layer.'
    assert {prefix + 'experts.batched_fc1_w', prefix + 'experts.batched_fc2_w'} <= groups[config.TRAIN.WEIGHT_DECAY]
    assert {prefix + n for n in ('experts.batched_fc1_bias', 'gates.0.cosine_projector.weight',
                                 'gates.0.cosine_projector.bias', 'gates.0.sim_matrix', 'gates.0.temperature')} \
        <= groups[0.0]
    assert prefix + 'experts.batched_fc2_bias' not in set().union(*groups.values())
    assert not model.layers[2].blocks[1].mlp._moe_layer.experts.batched_fc2_bias.requires_grad


def test_training_forward_adds_gate_noise_and_the_aux_loss_has_gradients():
    """Training mode: gate noise changes the routing between calls (eval is deterministic); the weighted
    auxiliary loss reaches the router's weights."""
    torch.manual_seed(0)
    model = SwinTransformerMoE(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                               mlp_ratio=2.0, pretrained_window_sizes=(0, 0), moe_blocks=((1,), (0, 1)),
                               num_local_experts=4, gate_noise=5.0, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    first = model(x)
    assert not torch.equal(first, model(x))
    model.aux_loss().backward()
    gate = model.layers[0].blocks[1].mlp._moe_layer.gates[0].wg.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_a_checkpoint_with_another_expert_count_is_refused():
    fixture = load_fixture('top1_1p', 0)
    model = SwinTransformerMoE(**dict(fixture['kwargs'], num_local_experts=4))
    with pytest.raises((ValueError, RuntimeError), match='experts in all'):
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in fixture['state_dict'].items()})


def test_checkpoint_names_follow_the_official_per_rank_layout(tmp_path):
    import torch as _torch

    from utils.checkpoint import CheckpointError, Checkpointer
    from utils.distributed import DistInfo

    def checkpointer(rank, world, *opts):
        config = load_config(None, ['MODEL.TYPE', 'swin_moe', 'OUTPUT', str(tmp_path), *opts])
        return Checkpointer(config, DistInfo(rank, world, rank, _torch.device('cpu')))
    assert checkpointer(1, 2).rank_file('/x/ckpt_epoch_3.pth') == '/x/ckpt_epoch_3.pth.rank1'
    assert checkpointer(1, 2, 'TRAIN.MOE.SAVE_MASTER', 'True').rank_file('/x/a.pth') == '/x/a.pth.global'
    assert checkpointer(0, 1).rank_file('/x/other.bin') == '/x/other.bin'  # not <name>.pth: as given
    for r in (0, 1):
        (tmp_path / f'ckpt_epoch_0.pth.rank{r}').write_bytes(b'')
    with pytest.raises(CheckpointError, match=r'saved per rank by 2 processes.*resume with 2 processes'):
        checkpointer(2, 3).rank_file(str(tmp_path / 'ckpt_epoch_0.pth'))


def _per_rank_find(tmp_path, world, monkeypatch, *opts):
    """``Checkpointer.find()`` of ``world`` Swin-MoE ranks over ``tmp_path``, each in its own thread; the
    checkpoint module's all-gather is a barrier between the threads (the collective's semantics, no process
    group). Returns each rank's (path, epoch, step) or None."""
    import threading

    import utils.checkpoint
    from utils.checkpoint import Checkpointer
    from utils.distributed import DistInfo
    slots, here = [None] * world, threading.local()
    barrier = threading.Barrier(world, timeout=30)

    def gather(obj):
        slots[here.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out
    monkeypatch.setattr(utils.checkpoint, 'all_gather_objects', gather)
    config = load_config(None, ['MODEL.TYPE', 'swin_moe', 'OUTPUT', str(tmp_path), *opts])
    checkpointers = [Checkpointer(config, DistInfo(r, world, r, torch.device('cpu'))) for r in range(world)]
    found, errors = [None] * world, []

    def rank_main(rank):
        here.rank = rank
        try:
            path = checkpointers[rank].find()
            checkpoint = checkpointers[rank]._found[1]
            found[rank] = None if path is None else (os.path.basename(path), checkpoint['epoch'], checkpoint['step'])
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            barrier.abort()
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return found


def _rank_checkpoint(path, epoch, step):
    torch.save({'model': {}, 'epoch': epoch, 'step': step, 'rng': {'world_size': 2, 'per_rank': []}}, path)


def test_auto_resume_ranks_agree_on_the_newest_position_every_rank_can_load(tmp_path, monkeypatch):
    """Rank 0 wrote epoch 1 and a mid-epoch ckpt_last after it; rank 1 was killed before its ckpt_last and its
    epoch-1 file is damaged: both ranks resume from epoch 0, the newest position both can load."""
    for r in (0, 1):
        _rank_checkpoint(tmp_path / f'ckpt_epoch_0.pth.rank{r}', 0, 0)
        _rank_checkpoint(tmp_path / f'ckpt_epoch_1.pth.rank{r}', 1, 0)
    _rank_checkpoint(tmp_path / 'ckpt_last.pth.rank0', 1, 2)
    (tmp_path / 'ckpt_epoch_1.pth.rank1').write_bytes(b'truncated')
    assert _per_rank_find(tmp_path, 2, monkeypatch) == [('ckpt_epoch_0.pth.rank0', 0, 0),
                                                        ('ckpt_epoch_0.pth.rank1', 0, 0)]
    # both intact: the mid-epoch file that only rank 0 has is still not taken
    _rank_checkpoint(tmp_path / 'ckpt_epoch_1.pth.rank1', 1, 0)
    assert _per_rank_find(tmp_path, 2, monkeypatch) == [('ckpt_epoch_1.pth.rank0', 1, 0),
                                                        ('ckpt_epoch_1.pth.rank1', 1, 0)]
    _rank_checkpoint(tmp_path / 'ckpt_last.pth.rank1', 1, 2)
    assert _per_rank_find(tmp_path, 2, monkeypatch) == [('ckpt_last.pth.rank0', 1, 2), ('ckpt_last.pth.rank1', 1, 2)]
    # a rank with nothing readable: every rank starts fresh
    for name in ('ckpt_epoch_0.pth.rank1', 'ckpt_epoch_1.pth.rank1', 'ckpt_last.pth.rank1'):
        os.remove(tmp_path / name)
    assert _per_rank_find(tmp_path, 2, monkeypatch) == [None, None]


def test_pretrained_reads_this_ranks_file_as_the_official_load_pretrained(tmp_path):
    """``--pretrained <name>.pth`` for Swin-MoE (one process, one expert world): rank 0 reads
    ``<name>.pth.rank0``, merged with ``<name>.pth.master`` when present (the official zero-redundancy layout:
    experts in the rank file, the shared weights in the master), or ``<name>.pth.global`` with SAVE_MASTER;
    the V1 fine-tune rules apply (another class count: head re-initialised); missing files are named."""
    import models
    from utils.checkpoint import CheckpointError, read_pretrained
    opts = ['MODEL.TYPE', 'swin_moe', 'DATA.IMG_SIZE', '32', *TINY_MOE[2:TINY_MOE.index('TRAIN.EPOCHS')]]
    torch.manual_seed(0)
    source = models.build_model(load_config(None, opts))
    weights = source.state_dict()
    torch.save({'model': weights, 'rng': {'world_size': 1, 'per_rank': []}}, tmp_path / 'pre.pth.rank0')
    experts = set(source.expert_parameter_names())
    torch.save({'model': {k: v for k, v in weights.items() if k in experts}}, tmp_path / 'split.pth.rank0')
    torch.save({'model': {k: v for k, v in weights.items() if k not in experts}}, tmp_path / 'split.pth.master')
    torch.save({'model': weights}, tmp_path / 'one.pth.global')
    for name, extra in (('pre', []), ('split', []), ('one', ['TRAIN.MOE.SAVE_MASTER', 'True'])):
        config = load_config(None, [*opts, 'MODEL.NUM_CLASSES', '3', *extra])
        target = models.build_model(config)
        checkpoint, read = read_pretrained(config, str(tmp_path / f'{name}.pth'), 0)
        assert read.startswith(str(tmp_path / f'{name}.pth.'))
        assert models.load_pretrained(target, checkpoint)['reinitialized'] == ['head.weight', 'head.bias']
        loaded = target.state_dict()
        assert not [k for k in weights if not k.startswith('head.') and not torch.equal(weights[k], loaded[k])]
        assert not loaded['head.weight'].any()
    config = load_config(None, opts)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / 'none.pth.rank0'))):
        read_pretrained(config, str(tmp_path / 'none.pth'), 0)
    with pytest.raises(CheckpointError, match=r'pre.pth.rank1.*there are .*pre.pth.rank0 .. .rank0, saved by 1'):
        read_pretrained(config, str(tmp_path / 'pre.pth'), 1)
