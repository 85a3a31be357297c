"""Experiment trackers (utils/trackers.py): TensorBoard, wandb and MLflow get the same scalars on rank 0; the run
ids are kept in the checkpoint, so a resumed run logs to the same MLflow run and the same wandb run; an enabled
tracker whose package is missing is a one-line start-up error.

The wandb and MLflow tests need the packages (``pip install wandb mlflow-skinny``) and skip without them. MLflow's
local file store (``file:`` URI) is used as it needs no server or database; MLflow 3 refuses it unless
``MLFLOW_ALLOW_FILE_STORE=true``. wandb runs in offline mode (``WANDB_MODE=offline``): nothing leaves the machine.
"""
import glob
import json
import os
import sys

import pytest
import torch
from helpers import write_digits_folder

from config import ConfigError, load_config

TINY = ['DATA.DATASET', 'folder', 'MODEL.SWIN.EMBED_DIM', '16', 'MODEL.SWIN.DEPTHS', '[1,1]',
        'MODEL.SWIN.NUM_HEADS', '[1,2]', 'MODEL.SWIN.WINDOW_SIZE', '4', 'DATA.IMG_SIZE', '32',
        'MODEL.NUM_CLASSES', '4', 'DATA.NUM_WORKERS', '0', 'MODEL.DROP_PATH_RATE', '0.0',
        'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0', 'AUG.AUTO_AUGMENT', 'none', 'AUG.REPROB', '0.0',
        'AUG.COLOR_JITTER', '0.0', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.BASE_LR', '0.02', 'PRINT_FREQ', '1']
MODEL_DIR = os.path.join('swin_tiny_patch4_window7_224', 'default')  # <OUTPUT>/<MODEL.NAME>/<TAG>
BATCH = 16  # 64 training images: 4 updates an epoch, each logged (PRINT_FREQ 1)


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp('digits'), 4, 16, 8)


def _main(args, capsys=None):
    import main
    code = main.main(args)
    err = capsys.readouterr().err if capsys is not None else ''
    return code, err


def _train(digits, out, epochs, *opts):
    return ['--data-path', digits, '--output', str(out), '--batch-size', str(BATCH), '--device', 'cpu',
            '--disable_amp', '--opts', *TINY, 'TRAIN.EPOCHS', str(epochs), *opts]


def _tracker_runs(run_dir, name):
    return torch.load(os.path.join(run_dir, name), weights_only=True).get('tracker_runs')


# ----------------------------------------------------------------------------- config and start-up errors

def test_logger_keys_default_off_and_are_validated():
    config = load_config()
    assert not config.LOGGER.WANDB.ENABLE and not config.LOGGER.MLFLOW.ENABLE
    load_config(opts=['LOGGER.WANDB.MODE', 'offline', 'LOGGER.MLFLOW.TRACKING_URI', 'file:///tmp/x'])
    with pytest.raises(ConfigError, match=r"LOGGER.WANDB.MODE = 'ofline' is not one of"):
        load_config(opts=['LOGGER.WANDB.MODE', 'ofline'])
    with pytest.raises(ConfigError, match=r"LOGGER.WANDB.PROJECT 'team/swin' may not contain /"):
        load_config(opts=['LOGGER.WANDB.ENABLE', 'True', 'LOGGER.WANDB.PROJECT', 'team/swin'])
    with pytest.raises(ConfigError, match=r"unknown config key 'LOGGER.MLFLOW.EXPERIMENT_NAME'"):
        load_config(opts=['LOGGER.MLFLOW.EXPERIMENT_NAME', 'x'])


@pytest.mark.parametrize('key,module', [('LOGGER.WANDB.ENABLE', 'wandb'), ('LOGGER.MLFLOW.ENABLE', 'mlflow')])
def test_missing_package_is_one_line_before_any_output(key, module, digits, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec and import both fail
    out = tmp_path / 'out'
    code, err = _main(_train(digits, out, 1, key, 'True'), capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {key} is True but the {module} package is not installed") and \
        f"pip install {module}" in lines[0], lines[0]
    assert not out.exists()  # stopped before the output folder was made
    # --eval logs to no tracker, so it does not need the package
    from utils.trackers import check_tracker_packages
    check_tracker_packages(load_config(opts=[key, 'True', 'EVAL_MODE', 'True']))


# ----------------------------------------------------------------------------- MLflow

@pytest.mark.slow  # three / two short training runs
def test_resumed_run_logs_to_the_same_mlflow_run_as_tensorboard_does(digits, tmp_path, monkeypatch, caplog):
    """SIGTERM after update 2 of 8 (exit 143, the MLflow run KILLED), then the same command resumes from
    ckpt_last: one MLflow run holding every update's and epoch's metrics (read back with MlflowClient), the
    resolved config as params, the same scalars as TensorBoard; a third part with a raised TRAIN.EPOCHS goes on
    in the same run and keeps the first value of the changed param (MLflow params cannot change)."""
    pytest.importorskip('mlflow')
    import signal

    import engine
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')
    uri = (tmp_path / 'mlruns').as_uri()
    out = tmp_path / 'out'
    run_dir = os.path.join(out, MODEL_DIR)
    opts = ('LOGGER.MLFLOW.ENABLE', 'True', 'LOGGER.MLFLOW.TRACKING_URI', uri, 'LOGGER.MLFLOW.EXPERIMENT', 'digits')

    record, updates = engine.TrainLog.record, []

    def record_then_signal(self, *args):
        record(self, *args)
        updates.append(self.state.global_update)
        if len(updates) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the engine's PreemptionGuard: it saves, then stops
    with monkeypatch.context() as patch:
        patch.setattr(engine.TrainLog, 'record', record_then_signal)
        assert _main(_train(digits, out, 2, *opts))[0] == 143
    run_id = _tracker_runs(run_dir, 'ckpt_last.pth')['mlflow']
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == 'KILLED'
    assert [m.step for m in client.get_metric_history(run_id, 'train/loss')] == [1, 2]

    assert _main(_train(digits, out, 2, *opts))[0] == 0  # resumes mid-epoch 0, from update 2
    assert _tracker_runs(run_dir, 'ckpt_epoch_1.pth')['mlflow'] == run_id
    experiment = client.get_experiment_by_name('digits')
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]  # no second run
    run = client.get_run(run_id)
    assert run.info.status == 'FINISHED' and run.info.run_name == 'swin_tiny_patch4_window7_224/default'
    assert run.data.params['MODEL.SWIN.EMBED_DIM'] == '16' and run.data.params['TRAIN.EPOCHS'] == '2'
    steps = {key: [m.step for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}
    assert steps['train/loss'] == [1, 2, 3, 4, 5, 6, 7, 8]  # 4 updates an epoch: both parts, none twice
    assert steps['val/acc1'] == [0, 1] and steps['val/loss'] == [0, 1]
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        val_acc1 = [json.loads(line)['val_acc1'] for line in f]
    assert [m.value for m in client.get_metric_history(run_id, 'val/acc1')] == pytest.approx(val_acc1)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(run_dir)
    events.Reload()
    assert set(events.Tags()['scalars']) == set(run.data.metrics)  # the same scalars...
    for key in run.data.metrics:  # ... at the same steps, with the same values (TensorBoard keeps float32)
        tb = sorted((e.step, e.value) for e in events.Scalars(key))
        ml = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in tb] == [s for s, _ in ml], key
        assert [v for _, v in tb] == pytest.approx([v for _, v in ml], rel=1e-6), key

    with caplog.at_level('WARNING'):
        assert _main(_train(digits, out, 3, *opts))[0] == 0
    assert f"mlflow: run {run_id} keeps its first value of 1 changed config keys" in caplog.text
    assert [m.step for m in client.get_metric_history(run_id, 'train/loss')] == list(range(1, 13))
    assert client.get_run(run_id).data.params['TRAIN.EPOCHS'] == '2'


def test_a_tracking_uri_mlflow_cannot_use_is_one_line(digits, tmp_path, capsys):
    pytest.importorskip('mlflow')
    code, err = _main(_train(digits, tmp_path / 'out', 1, 'LOGGER.MLFLOW.ENABLE', 'True',
                             'LOGGER.MLFLOW.TRACKING_URI', 'nosuchscheme://host/x'), capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: LOGGER.MLFLOW.TRACKING_URI 'nosuchscheme://host/x': MLflow cannot use it: ")


def test_a_checkpoint_run_missing_from_the_tracking_store_starts_a_new_run(tmp_path, monkeypatch, caplog):
    """A resume whose MLflow run is not in this store (e.g. LOGGER.MLFLOW.TRACKING_URI changed): a warning and a
    new run, not a crash; a run that is there is continued with the params it lacks added."""
    pytest.importorskip('mlflow')
    from mlflow.tracking import MlflowClient

    from utils.trackers import start_trackers
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')
    uri = (tmp_path / 'mlruns').as_uri()
    config = load_config(opts=['LOGGER.MLFLOW.ENABLE', 'True', 'LOGGER.MLFLOW.TRACKING_URI', uri,
                               'TENSORBOARD', 'False', 'OUTPUT', str(tmp_path / 'out')])
    with caplog.at_level('WARNING'):
        trackers = start_trackers(config, True, {'mlflow': '0123456789abcdef0123456789abcdef'})
    assert "mlflow: the checkpoint's run 0123456789abcdef0123456789abcdef is not at" in caplog.text
    run_id = trackers.run_ids()['mlflow']
    assert run_id != '0123456789abcdef0123456789abcdef'
    trackers.log({'train/loss': 2.0}, 7)
    trackers.close()
    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, 'train/loss')] == [(7, 2.0)]
    assert client.get_run(run_id).info.status == 'FINISHED'
    assert start_trackers(config, False).run_ids() == {}  # other ranks: no trackers


# ----------------------------------------------------------------------------- wandb

@pytest.mark.slow  # three / two short training runs
def test_resumed_run_continues_the_same_wandb_run_offline(digits, tmp_path, monkeypatch):
    """WANDB_MODE=offline: the first part and the resumed part write run folders with the same id under
    <OUTPUT>/wandb, each with its part's last metrics; the config goes in as the run's config."""
    pytest.importorskip('wandb')
    for name, value in {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true', 'WANDB_CONSOLE': 'off',
                        'WANDB_CONFIG_DIR': str(tmp_path / 'wb_config'), 'WANDB_CACHE_DIR': str(tmp_path / 'wb_cache'),
                        'WANDB_DATA_DIR': str(tmp_path / 'wb_data')}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / 'out'
    run_dir = os.path.join(out, MODEL_DIR)
    opts = ('LOGGER.WANDB.ENABLE', 'True', 'LOGGER.WANDB.PROJECT', 'digits', 'TENSORBOARD', 'False')
    assert _main(_train(digits, out, 1, *opts))[0] == 0
    run_id = _tracker_runs(run_dir, 'ckpt_epoch_0.pth')['wandb']
    assert _main(_train(digits, out, 2, *opts))[0] == 0
    assert _tracker_runs(run_dir, 'ckpt_epoch_1.pth') == {'wandb': run_id}
    # Starting the trackers leaves Python's random (the augmentations draw from it) as it was
    import random

    from utils.trackers import start_trackers
    config = load_config(opts=[*opts, 'OUTPUT', str(tmp_path / 'rng')])
    random.seed(0)
    before = random.getstate()
    start_trackers(config, True).close()
    assert random.getstate() == before

    folders = sorted(glob.glob(os.path.join(run_dir, 'wandb', 'offline-run-*')))
    assert len(folders) == 2 and all(os.path.basename(f).split('-')[3] == run_id for f in folders), folders
    parts = [_wandb_records(os.path.join(folder, f'run-{run_id}.wandb')) for folder in folders]
    for part, epoch in zip(parts, (0, 1)):
        history = [r.history for r in part if r.WhichOneof('record_type') == 'history']
        rows = [{i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in h.item} for h in history]
        assert [r['update'] for r in rows if 'train/loss' in r] == [4 * epoch + u for u in (1, 2, 3, 4)]
        assert [r['epoch'] for r in rows if 'val/acc1' in r] == [epoch]
        assert {'train/loss', 'train/lr', 'train/grad_norm', 'train/throughput', 'val/acc1', 'val/acc5',
                'val/loss'} <= {k for r in rows for k in r}
        config = {u.key: json.loads(u.value_json) for r in part if r.WhichOneof('record_type') == 'config'
                  for u in r.config.update}
        assert config['MODEL']['SWIN']['EMBED_DIM'] == 16 and config['TRAIN']['EPOCHS'] == epoch + 1


def _wandb_records(path):
    """The protobuf records of a wandb run file (``run-<id>.wandb``): wandb's transaction log, in LevelDB's log
    format (32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type full/first/middle/last) after
    a 7-byte file header ``:W&B``, 0xBEE1, version 0. wandb no longer ships a Python reader for it (its Go core
    reads it), hence these lines."""
    import struct

    from wandb.proto import wandb_internal_pb2
    with open(path, 'rb') as f:
        data = f.read()
    assert struct.unpack('<4sHB', data[:7]) == (b':W&B', 0xBEE1, 0), data[:7]
    records, pos, block, pending = [], 7, 32768, b''
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's last bytes too few for a header are padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if kind == 0:
            break  # preallocated zeros
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or the last chunk of a split record
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records
