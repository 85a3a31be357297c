"""config.LEGACY_KEYS: official keys accepted and ignored, logged once per key when set to another value."""
import argparse
import logging
import os
import re
import subprocess

import config as C
from config import LEGACY_KEYS, get_config, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def legacy_lines(caplog) -> list:
    return [r.getMessage() for r in caplog.records if 'accepted and ignored' in r.getMessage()]


def test_the_legacy_keys_are_the_official_unread_ones():
    assert sorted(LEGACY_KEYS) == ['ENABLE_AMP', 'FUSED_WINDOW_PROCESS', 'LOCAL_RANK']  # FUSED_LAYERNORM is read (models.build)
    defaults = C.get_defaults()
    for key in LEGACY_KEYS:
        C._get(defaults, key)  # a key of the defaults
    # nothing outside config.py reads them (as config.<...>.KEY): a reader would make the entry a lie
    files = subprocess.run(['git', 'ls-files', '*.py'], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for path in files:
        if path == 'config.py' or path.startswith('tests/'):
            continue
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        for key in LEGACY_KEYS:
            assert not re.search(r'\.' + key.rsplit('.', 1)[-1] + r'\b', text), f'{path} reads {key}'


def test_a_non_default_value_is_logged_once_per_key(caplog, tmp_path):
    cfg = tmp_path / 'legacy.yaml'
    cfg.write_text('ENABLE_AMP: True\nFUSED_LAYERNORM: True\n')
    with caplog.at_level(logging.WARNING, logger='config'):
        config = load_config(str(cfg), ['FUSED_LAYERNORM', 'True',
                                        'FUSED_WINDOW_PROCESS', 'False'])  # the default: nothing to say
    assert config.ENABLE_AMP and config.FUSED_LAYERNORM  # accepted as given
    lines = legacy_lines(caplog)
    assert len(lines) == 1, lines  # file and --opts: one line
    assert sum('ENABLE_AMP = True' in line for line in lines) == 1
    assert not any('FUSED_LAYERNORM' in line for line in lines)  # a key with a meaning now (models.build)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='config'):
        load_config(None, ['MODEL.SWIN_MOE.TOP_VALUE', '2', 'TRAIN.MOE.SAVE_MASTER', 'True'])  # read: not legacy
    assert legacy_lines(caplog) == []


def test_get_config_notes_the_file_and_opts_not_the_launcher(caplog, monkeypatch):
    """main collects the lines as notes (logged on rank 0 once the log exists); without notes they are logged."""
    monkeypatch.setenv('LOCAL_RANK', '1')
    args = argparse.Namespace(cfg=None, opts=['LOCAL_RANK', '5'], fused_window_process=True)
    notes = []
    with caplog.at_level(logging.WARNING, logger='config'):
        config = get_config(args, notes)
    assert config.LOCAL_RANK == 1 and config.FUSED_WINDOW_PROCESS  # torchrun's rank wins, as before
    assert [line.split(' = ')[0] for line in notes] == ['config key LOCAL_RANK'] and legacy_lines(caplog) == []
    with caplog.at_level(logging.WARNING, logger='config'):
        get_config(args)
    assert [line.split(' = ')[0] for line in legacy_lines(caplog)] == ['config key LOCAL_RANK']
    caplog.clear()
    notes.clear()
    with caplog.at_level(logging.WARNING, logger='config'):
        get_config(argparse.Namespace(cfg=None, opts=None, fused_layernorm=True), notes)
    assert notes == [] and legacy_lines(caplog) == []  # the official flag, documented in --help as accepted only

