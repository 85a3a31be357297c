"""SimMIM end to end through the official command lines (issue 12): the four official configs, unchanged, run a
few updates on CPU (pre-training, then the fine-tune from that checkpoint with ``--pretrained``), and a
two-process ``torchrun`` pre-training killed mid-run resumes to the uninterrupted run's weights.

Subprocesses with one compute thread each; the official models are Swin-B / SwinV2-B, so the data is a handful
of 32 px digits (resized to 192 / 224 px by the transforms) and each run is one short epoch.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import run_side_by_side, subprocess_env, write_digits_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs', 'simmim')
# (pre-training config, fine-tune config) per version, as the official repository pairs them.
OFFICIAL = {
    'swin': ('simmim_pretrain__swin_base__img192_window6__800ep.yaml',
             'simmim_finetune__swin_base__img224_window7__800ep.yaml'),
    'swinv2': ('simmim_pretrain__swinv2_base__img192_window12__800ep.yaml',
               'simmim_finetune__swinv2_base__img224_window14__800ep.yaml'),
}


def _run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _only(folder, suffix='.pth'):
    names = sorted(n for n in os.listdir(folder) if n.startswith('ckpt_epoch_') and n.endswith(suffix))
    assert names, os.listdir(folder)
    return os.path.join(folder, names[-1])


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """train/ 4 images, val/ 2 images (2 classes): two updates of batch 2 per pre-training epoch."""
    return write_digits_folder(tmp_path_factory.mktemp('simmim_digits'), 2, 2, 1)


@pytest.mark.slow
def test_official_configs_pretrain_then_finetune_on_cpu(digits, tmp_path):
    """``main_simmim_pt.py --cfg <official>`` then ``main_simmim_ft.py --cfg <official> --pretrained <it>``, for
    Swin and SwinV2 side by side: the files unchanged, only the run length shortened by ``--opts`` (one epoch, no
    warmup to clip)."""
    versions = sorted(OFFICIAL)
    short = ['TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0', 'PRINT_FREQ', '1', 'DATA.NUM_WORKERS', '0']
    pretrain = [[sys.executable, 'main_simmim_pt.py', '--cfg', os.path.join(CONFIGS, OFFICIAL[version][0]),
                 '--data-path', os.path.join(digits, 'train'), '--batch-size', '2', '--output',
                 str(tmp_path / version / 'pt'), '--device', 'cpu', '--opts', *short] for version in versions]
    checkpoints = []
    for version, pt in zip(versions, run_side_by_side(pretrain, ROOT)):
        assert 'Train: [0/1][1/2]' in _ok(pt).stdout + pt.stderr and 'bfloat16 autocast' in pt.stdout + pt.stderr
        checkpoint = _only(str(tmp_path / version / 'pt' / 'simmim_pretrain' / OFFICIAL[version][0][:-5]))
        saved = torch.load(checkpoint, weights_only=True)
        assert 'encoder.mask_token' in saved['model'] and 'decoder.0.weight' in saved['model']
        assert all(torch.isfinite(t).all() for t in saved['model'].values() if t.is_floating_point())
        checkpoints.append(checkpoint)

    finetune = [[sys.executable, 'main_simmim_ft.py', '--cfg', os.path.join(CONFIGS, OFFICIAL[version][1]),
                 '--data-path', digits, '--batch-size', '2', '--output', str(tmp_path / version / 'ft'), '--device',
                 'cpu', '--pretrained', checkpoint, '--opts', *short]
                for version, checkpoint in zip(versions, checkpoints)]
    for version, ft in zip(versions, run_side_by_side(finetune, ROOT)):
        text = _ok(ft).stdout + ft.stderr
        assert 'SimMIM checkpoint: encoder weights taken' in text
        assert 'Train: [0/1][1/2]' in text and ' * Acc@1 ' in text
        if version == 'swin':  # 192 / window 6 -> 224 / window 7: the tables were resized the official way
            assert 'relative_position_bias_table' in text


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='kills the torchrun process group')
def test_torchrun_pretraining_resumes_after_a_kill(tmp_path):
    """Two-process SimMIM pre-training (the demo's small Swin, fp32, deterministic, mid-epoch saves after every
    update) SIGKILLed mid-epoch resumes through auto-resume to the uninterrupted run's final weights."""
    data = write_digits_folder(tmp_path / 'data', 4, 8, 1)
    cfg = os.path.join(ROOT, 'configs', 'demo', 'simmim_pretrain_digits_32.yaml')
    opts = ['DETERMINISTIC', 'True', 'TRAIN.EPOCHS', '2', 'TRAIN.SAVE_EVERY_STEPS', '1', 'PRINT_FREQ', '1',
            'DATA.NUM_WORKERS', '0', 'MODEL.SWIN.DEPTHS', '[1,1,1]', 'MODEL.SWIN.EMBED_DIM', '16',
            'MODEL.SWIN.NUM_HEADS', '[1,2,4]']

    def command(out):  # 32 images, batch 4 per rank: 4 updates per epoch
        return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                str(32000 + os.getpid() % 1000), 'main_simmim_pt.py', '--cfg', cfg, '--data-path',
                os.path.join(data, 'train'), '--batch-size', '4', '--output', out, '--device', 'cpu', '--opts',
                *opts]

    reference, interrupted = str(tmp_path / 'reference'), str(tmp_path / 'interrupted')
    _ok(_run(command(reference)))
    proc = subprocess.Popen(command(interrupted), cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, seen = [], 0
    try:
        for line in proc.stdout:
            lines.append(line)
            seen += 'Train: [' in line
            if seen == 6:  # the second update of epoch 1 (rank 0 logs every update)
                time.sleep(0.2)
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert seen == 6, ''.join(lines)[-3000:]
    run_dir = os.path.join(interrupted, 'simmim_pretrain_digits_32', 'default')
    assert 'ckpt_last.pth' in os.listdir(run_dir)
    resumed = _ok(_run(command(interrupted)))
    assert 'auto-resume: ' in resumed.stdout + resumed.stderr
    final = torch.load(os.path.join(run_dir, 'ckpt_epoch_1.pth'), weights_only=True)['model']
    reference_file = os.path.join(reference, 'simmim_pretrain_digits_32', 'default', 'ckpt_epoch_1.pth')
    expected = torch.load(reference_file, weights_only=True)['model']
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), f"{key} differs after the resume"
