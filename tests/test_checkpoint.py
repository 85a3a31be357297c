"""utils.checkpoint: atomic writes, auto-resume order and fallback, unsafe files refused, pruning, export."""
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from utils import checkpoint as ckpt


def _state(epoch: int, step: int = 0) -> dict:
    model = nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, float(epoch))
    state = ckpt.TrainState(model, epoch=epoch + 1, update=step, max_accuracy=10.0 * epoch)
    return ckpt.build_checkpoint(state, {'TRAIN': {'EPOCHS': 5}}, rng=ckpt.gather_rng_states())


class _Marker:
    """Unpickling this would create a file: the test checks that it never happens."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_saved_checkpoint_loads_with_weights_only(tmp_path):
    path = str(tmp_path / 'ckpt_epoch_0.pth')
    ckpt.save_checkpoint_file(_state(0), path)
    loaded = torch.load(path, weights_only=True)  # the plain torch call, no allow-listing
    assert set(loaded) >= {'model', 'optimizer', 'lr_scheduler', 'scaler', 'ema', 'epoch', 'step',
                           'max_accuracy', 'config', 'rng'}
    assert isinstance(loaded['config'], dict) and loaded['rng']['world_size'] == 1


def test_atomic_save_leaves_no_temp_and_keeps_old_file_on_error(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt_last.pth')
    ckpt.save_checkpoint_file(_state(1), path)
    assert os.listdir(tmp_path) == ['ckpt_last.pth']
    before = open(path, 'rb').read()

    def full_disk(obj, f, *a, **k):
        f.write(b'partial bytes')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(ckpt.CheckpointSaveError, match='No space left.*previous ckpt_last.pth is intact'):
        ckpt.save_checkpoint_file(_state(2), path)
    assert os.listdir(tmp_path) == ['ckpt_last.pth']  # temp file removed
    assert open(path, 'rb').read() == before


def test_auto_resume_picks_highest_epoch_not_newest_mtime(tmp_path):
    for epoch in (3, 10, 2):
        ckpt.save_checkpoint_file(_state(epoch), str(tmp_path / f'ckpt_epoch_{epoch}.pth'))
    old = 1_000_000_000
    os.utime(tmp_path / 'ckpt_epoch_10.pth', (old, old))  # the highest epoch is the oldest file
    path, state = ckpt.auto_resume(str(tmp_path))
    assert path.endswith('ckpt_epoch_10.pth') and state['epoch'] == 10


def test_truncated_newest_falls_back_to_previous(tmp_path, caplog):
    for epoch in (0, 1):
        ckpt.save_checkpoint_file(_state(epoch), str(tmp_path / f'ckpt_epoch_{epoch}.pth'))
    newest = tmp_path / 'ckpt_epoch_1.pth'
    data = newest.read_bytes()
    newest.write_bytes(data[:len(data) // 2])
    with caplog.at_level('WARNING'):
        path, state = ckpt.auto_resume(str(tmp_path))
    assert path.endswith('ckpt_epoch_0.pth') and state['epoch'] == 0
    assert 'ckpt_epoch_1.pth' in caplog.text and 'truncated' in caplog.text


def test_mid_epoch_last_wins_only_when_further(tmp_path):
    ckpt.save_checkpoint_file(_state(1), str(tmp_path / 'ckpt_epoch_1.pth'))
    ckpt.save_checkpoint_file(_state(1, step=4), str(tmp_path / 'ckpt_last.pth'))
    path, state = ckpt.auto_resume(str(tmp_path))
    assert path.endswith('ckpt_last.pth') and (state['epoch'], state['step']) == (1, 4)
    ckpt.save_checkpoint_file(_state(2), str(tmp_path / 'ckpt_epoch_2.pth'))
    path, _ = ckpt.auto_resume(str(tmp_path))
    assert path.endswith('ckpt_epoch_2.pth')


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'pwned'
    path = str(tmp_path / 'ckpt_epoch_5.pth')
    torch.save({'model': {}, 'payload': _Marker(str(marker))}, path)
    with pytest.raises(ckpt.UnsafeCheckpointError) as info:
        ckpt.load_checkpoint_file(path)
    assert path in str(info.value) and 'TRUST_CHECKPOINTS' in str(info.value) and '--trust-checkpoint' in str(info.value)
    with pytest.raises(ckpt.UnsafeCheckpointError):
        ckpt.auto_resume(str(tmp_path))  # auto-resume refuses too, rather than silently skipping
    assert not marker.exists()


def test_keep_k_pruning_keeps_best_and_last(tmp_path):
    manager = ckpt.CheckpointManager(str(tmp_path), keep=2)
    for epoch in range(5):
        manager.save_epoch(_state(epoch), epoch, is_best=(epoch == 1))
    names = sorted(os.listdir(tmp_path))
    assert names == ['ckpt_best.pth', 'ckpt_epoch_3.pth', 'ckpt_epoch_4.pth', 'ckpt_last.pth']
    assert ckpt.load_checkpoint_file(str(tmp_path / 'ckpt_best.pth'))['epoch'] == 1
    assert ckpt.load_checkpoint_file(str(tmp_path / 'ckpt_last.pth'))['epoch'] == 4


def test_safetensors_export_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    path = str(tmp_path / 'model.safetensors')
    ckpt.export_safetensors(model.state_dict(), path, metadata={'format': 'pt'})
    loaded = ckpt.load_checkpoint_file(path)
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype


def test_rng_state_round_trip():
    state = ckpt.capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    ckpt.restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_restore_training_state_strict_and_complete(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    checkpoint = ckpt.build_checkpoint(ckpt.TrainState(model, optimizer, epoch=5, max_accuracy=55.0), {})
    assert (checkpoint['epoch'], checkpoint['step']) == (4, 0)  # the official meaning: last completed epoch
    path = str(tmp_path / 'c.pth')
    ckpt.save_checkpoint_file(checkpoint, path)
    other = nn.Linear(3, 2)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    restored = ckpt.TrainState(other, other_opt)
    ckpt.restore_training_state(ckpt.load_checkpoint_file(path), restored)
    assert (restored.epoch, restored.update, restored.max_accuracy) == (5, 0, 55.0)
    assert torch.equal(other.weight, model.weight)
    assert other_opt.state_dict()['state'][0]['step'] == 1
    with pytest.raises(ckpt.CheckpointError, match='does not match the model'):
        ckpt.load_model_state(nn.Linear(3, 3, bias=False), ckpt.load_checkpoint_file(path), path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match='not found: .*nope.pth'):
        ckpt.load_checkpoint_file(str(tmp_path / 'nope.pth'))
