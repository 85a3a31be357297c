"""Fault injection: kills, preemption signals, damaged and malicious files, odd images, fuzzed configs.

Every fault must end in one of: an exact resume, a fallback to an older checkpoint, a skipped-and-counted input,
or a clean one-line error (exit code 2) - never a traceback from deep inside and never code run from a file.

Training runs use a one-block-per-stage Swin (embed dim 16, window 4, 32 px) on 48 scikit-learn digit images
in subprocesses with OMP_NUM_THREADS=1. The counts (kills survived, files rejected, inputs fuzzed) are printed
at the end of the pytest run by the terminal-summary hook in tests/conftest.py.
"""
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import subprocess_env, torchrun_worker_pids, write_digits_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join('swin_tiny_patch4_window7_224', 'default')  # <OUTPUT>/<MODEL.NAME>/<TAG>
TINY = ['DATA.DATASET', 'folder', 'MODEL.SWIN.EMBED_DIM', '16', 'MODEL.SWIN.DEPTHS', '[1,1]',
        'MODEL.SWIN.NUM_HEADS', '[1,2]', 'MODEL.SWIN.WINDOW_SIZE', '4', 'DATA.IMG_SIZE', '32',
        'MODEL.NUM_CLASSES', '4', 'DATA.NUM_WORKERS', '0']
# Default augmentation (RandAugment, Mixup/CutMix, random erasing, drop path) stays on: the resumed run must
# reproduce the torch, numpy and python RNG streams, not just the weights.
RUN = ['DETERMINISTIC', 'True', 'PRINT_FREQ', '1', 'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.EPOCHS', '3']
BATCH = 8  # 32 training images -> 4 updates per epoch, 12 in the run
TRAIN_LINE = 'Train: ['
PREEMPTED_EXIT_CODE = 143


def _count(request, key, n=1):
    """Add to the suite's counters (printed by tests/conftest.py's pytest_terminal_summary)."""
    counts = request.config.__dict__.setdefault('_fault_counts', {})
    counts[key] = counts.get(key, 0) + n


# ----------------------------------------------------------------------------- data and runs

@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """train/ (32 images) and val/ (16 images): 4 digit classes as 32 px RGB PNGs."""
    return write_digits_folder(tmp_path_factory.mktemp('digits'), 4, 8, 4)


def _env():
    return subprocess_env()


def _cmd(data, out, extra=()):
    return [sys.executable, 'main.py', '--data-path', data, '--output', out, '--batch-size', str(BATCH),
            '--device', 'cpu', '--disable_amp', '--opts', *TINY, *RUN, *extra]


def _run(cmd, timeout=180):
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _interrupt(cmd, sig, after_lines, delay=0.0, timeout=180, group=False):
    """Start ``cmd``, send ``sig`` once ``after_lines`` training log lines appeared (plus ``delay`` s); with
    ``group`` to its whole process group, DataLoader workers included, as a terminal sends Ctrl-C.

    Returns (exit code, output, whether the signal reached a running process).
    """
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=group)
    seen, lines, sent = 0, [], False
    deadline = time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if TRAIN_LINE in line:
                seen += 1
                if seen == after_lines:
                    time.sleep(delay)
                    if proc.poll() is None:
                        if group:
                            os.killpg(proc.pid, sig)
                        else:
                            proc.send_signal(sig)
                        sent = True
                    break
            if time.time() > deadline:
                break
        rest, _ = proc.communicate(timeout=timeout)
        lines.append(rest or '')
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, ''.join(lines), sent


def _state(run_dir):
    """Final weights and the per-epoch logged validation results of a run."""
    weights = torch.load(os.path.join(run_dir, 'ckpt_epoch_2.pth'), weights_only=True)['model']
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        metrics = [json.loads(line) for line in f]
    return weights, [(m['epoch'], m['val_acc1'], m['val_acc5'], m['val_loss']) for m in metrics]


def _assert_same_run(run_dir, reference):
    weights, metrics = _state(run_dir)
    ref_weights, ref_metrics = reference
    assert metrics == ref_metrics
    assert weights.keys() == ref_weights.keys()
    for key in ref_weights:
        assert torch.equal(weights[key], ref_weights[key]), f"{key} differs after resume"


@pytest.fixture(scope='module')
def reference(digits, tmp_path_factory):
    """The uninterrupted run: final weights and logged accuracies."""
    out = str(tmp_path_factory.mktemp('reference'))
    _ok(_run(_cmd(digits, out)))
    return _state(os.path.join(out, MODEL_DIR))


@pytest.fixture(scope='module')
def reference_two_workers(digits, tmp_path_factory):
    """The uninterrupted run with two data workers."""
    out = str(tmp_path_factory.mktemp('reference_two_workers'))
    _ok(_run(_cmd(digits, out, ['DATA.NUM_WORKERS', '2'])))
    return _state(os.path.join(out, MODEL_DIR))


# ----------------------------------------------------------------------------- kill, preemption

@pytest.mark.slow
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_sigkill_at_random_steps_then_resume_matches_uninterrupted(seed, digits, reference, tmp_path, request):
    """SIGKILL at random points (twice per seed, mid-epoch saves after every update); auto-resume is exact."""
    rng = random.Random(seed)
    out = str(tmp_path)
    cmd = _cmd(digits, out, ['TRAIN.SAVE_EVERY_STEPS', '1'])
    for _ in range(2):
        code, text, sent = _interrupt(cmd, signal.SIGKILL, rng.randint(1, 5), delay=rng.uniform(0.0, 0.3))
        if sent:
            assert code == -signal.SIGKILL, text[-2000:]
            _count(request, 'kills survived')
    result = _ok(_run(cmd))
    assert 'auto-resume: ' in result.stdout or 'resumed from' in result.stdout or not sent
    run_dir = os.path.join(out, MODEL_DIR)
    _assert_same_run(run_dir, reference)
    assert not [n for n in os.listdir(run_dir) if '.tmp.' in n], "a killed save left its temp file behind"


@pytest.mark.slow
@pytest.mark.parametrize('sig,after', [(signal.SIGTERM, 2), (signal.SIGUSR1, 6)])
def test_preemption_signal_saves_exits_143_and_resumes_exactly(sig, after, digits, reference, tmp_path, request):
    """SIGTERM/SIGUSR1: the step finishes, ckpt_last.pth is written (no SAVE_EVERY_STEPS needed), exit 143."""
    out = str(tmp_path)
    cmd = _cmd(digits, out)
    code, text, sent = _interrupt(cmd, sig, after)
    assert sent
    assert code == PREEMPTED_EXIT_CODE, text[-3000:]
    assert 'preempted' in text and 'the same command resumes from it' in text
    run_dir = os.path.join(out, MODEL_DIR)
    saved = torch.load(os.path.join(run_dir, 'ckpt_last.pth'), weights_only=True)
    assert (saved['epoch'], saved['step']) > (-1, 0)
    assert saved['data_order']['seed'] == 0 and saved['rng']['world_size'] == 1
    result = _ok(_run(cmd))
    assert 'resumed from' in result.stdout
    _assert_same_run(run_dir, reference)
    _count(request, 'kills survived')


@pytest.mark.slow
@pytest.mark.parametrize('workers,persistent', [(0, 'True'), (2, 'True'), (2, 'False')],
                         ids=['workers0', 'workers2-persistent', 'workers2'])
def test_ctrl_c_mid_epoch_saves_exits_130_and_resumes_exactly(workers, persistent, digits, tmp_path, request):
    """Ctrl-C to the process group mid-epoch (RandAugment, erasing, Mixup on): the update finishes,
    ckpt_last.pth is written, one line says how to resume, exit 130; the rerun's per-epoch validation accuracy
    and loss, and its final weights, equal the uninterrupted run's with the same data workers."""
    extra = ['DATA.NUM_WORKERS', str(workers), 'DATA.PERSISTENT_WORKERS', persistent]
    # the straight run with the same number of workers (whether they persist does not change a batch)
    reference = request.getfixturevalue('reference' if workers == 0 else 'reference_two_workers')
    out = str(tmp_path / 'interrupted')
    cmd = _cmd(digits, out, extra)
    code, text, sent = _interrupt(cmd, signal.SIGINT, 6, group=True)
    assert sent
    assert code == 130, text[-3000:]
    assert 'Traceback' not in text and 'KeyboardInterrupt' not in text, text[-3000:]
    assert 'Ctrl-C: finishing the current update' in text
    assert f"--resume {os.path.join(out, MODEL_DIR, 'ckpt_last.pth')}" in text and '(exit code 130)' in text
    run_dir = os.path.join(out, MODEL_DIR)
    saved = torch.load(os.path.join(run_dir, 'ckpt_last.pth'), weights_only=True)
    assert saved['epoch'] == 0 and 0 < saved['step'] < 4, (saved['epoch'], saved['step'])  # inside epoch 1
    _ok(_run(cmd))
    _assert_same_run(run_dir, reference)
    _count(request, 'kills survived')


def test_second_ctrl_c_stops_at_once():
    from utils.preemption import PreemptionGuard
    # the handler in force before (default_int_handler; SIG_IGN where the suite runs as a background job, whose
    # SIGINT the shell ignores) is what the guard gives back
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.received == 'SIGINT' and guard.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; it must raise before this ends
    assert signal.getsignal(signal.SIGINT) is before


def _agree_worker(rank, world, port, results):
    import torch.distributed as dist

    from utils.preemption import PreemptionGuard
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        with PreemptionGuard() as guard:
            first = guard.agreed_stop()  # nobody signalled yet
            if rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # caught: only sets the flag
            dist.barrier()
            second = guard.agreed_stop()
        results[rank] = (first, second, guard.received)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_stop_decision_is_agreed_by_all_ranks():
    """Only rank 1 gets SIGTERM; both ranks decide to stop at the same check (no rank left in a collective)."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    port = 20000 + os.getpid() % 20000
    mp.spawn(_agree_worker, args=(2, port, results), nprocs=2, join=True)
    assert results[0][:2] == (False, True) and results[1][:2] == (False, True)
    assert results[1][2] == 'SIGTERM' and results[0][2] == 'a stop signal on another rank'


def test_preemption_guard_restores_handlers_and_ignores_nothing_else():
    from utils.preemption import PreemptionGuard
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.agreed_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.requested and guard.received == 'SIGUSR1' and guard.agreed_stop()
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- damaged checkpoints

def _tiny_config(extra=()):
    from config import load_config
    return load_config(opts=[*TINY, *extra])


@pytest.fixture(scope='module')
def real_checkpoint(tmp_path_factory):
    """A checkpoint as the engine writes it (model, AdamW state after one step, scheduler, RNG)."""
    import models
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer
    from utils.checkpoint import TrainState, build_checkpoint, gather_rng_states, save_checkpoint_file
    config = _tiny_config()
    model = models.build_model(config)
    optimizer = build_optimizer(config, model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler = build_scheduler(config, optimizer, 4)
    path = str(tmp_path_factory.mktemp('ckpt') / 'ckpt_epoch_0.pth')
    state = TrainState(model, optimizer, scheduler, epoch=1)
    save_checkpoint_file(build_checkpoint(state, {}, rng=gather_rng_states()), path)
    return path


def _restore_into_fresh(path):
    import models
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer
    from utils.checkpoint import TrainState, load_checkpoint_file, restore_training_state
    config = _tiny_config()
    model = models.build_model(config)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, 4)
    state = TrainState(model, optimizer, scheduler)
    restore_training_state(load_checkpoint_file(path), state, path=path)
    return state.epoch, state.update, state.max_accuracy


def test_truncated_and_bit_flipped_checkpoints_load_or_fail_cleanly(real_checkpoint, tmp_path, request):
    """Random truncation points and random byte flips: a clean CheckpointError naming the file, or a load."""
    from utils.checkpoint import CheckpointError
    blob = open(real_checkpoint, 'rb').read()
    rng = random.Random(7)
    damaged = []
    for cut in sorted(rng.sample(range(len(blob)), 12)) + [0, 1, len(blob) - 1]:
        damaged.append(blob[:cut])
    for _ in range(20):
        data = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        damaged.append(bytes(data))
    rejected = 0
    for i, data in enumerate(damaged):
        path = str(tmp_path / f'damaged_{i}.pth')
        with open(path, 'wb') as f:
            f.write(data)
        try:
            _restore_into_fresh(path)
        except CheckpointError as e:
            message = str(e)
            # one line, except the load-mismatch report, which lists the tensors one per line after it
            first, *rest = message.split('\n')
            assert path in first and (not rest or 'does not match the model' in first), message
            rejected += 1
    assert rejected >= 15  # every truncation at least
    _count(request, 'files rejected', rejected)


def test_auto_resume_falls_back_past_truncated_newest(real_checkpoint, tmp_path, request):
    from utils.checkpoint import auto_resume
    blob = open(real_checkpoint, 'rb').read()
    (tmp_path / 'ckpt_epoch_0.pth').write_bytes(blob)
    (tmp_path / 'ckpt_epoch_1.pth').write_bytes(blob[:len(blob) // 3])  # killed mid-copy by a foreign tool
    (tmp_path / 'ckpt_last.pth').write_bytes(b'')
    (tmp_path / '.ckpt_last.pth.tmp.999999').write_bytes(blob[:100])  # a save killed half-way
    path, checkpoint = auto_resume(str(tmp_path))
    assert path == str(tmp_path / 'ckpt_epoch_0.pth') and checkpoint['epoch'] == 0
    from utils.checkpoint import remove_stale_temp_files
    assert remove_stale_temp_files(str(tmp_path)) == ['.ckpt_last.pth.tmp.999999']
    _count(request, 'files rejected', 2)


def _main(args, capsys):
    """main.main in this process; argparse's own errors (SystemExit 2 + usage) count as an exit code."""
    import main
    try:
        code = main.main(args)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err


def _assert_clean_error(code, err, *words):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert 'Traceback' not in err, err
    if lines and lines[0].startswith('usage: '):  # argparse: e.g. a value like -1e+16 or --o taken for a flag
        assert ': error: ' in err, err  # argparse's own reason after its usage text
    else:
        assert len(lines) == 1 and lines[0].startswith('error: '), err
    for word in words:
        assert word in err, err


def _eval_args(digits, out, *extra):
    return ['--data-path', digits, '--output', out, '--batch-size', str(BATCH), '--device', 'cpu',
            '--disable_amp', '--eval', *extra, '--opts', *TINY]


def test_truncated_resume_file_is_a_clean_error(digits, real_checkpoint, tmp_path, capsys, request):
    bad = tmp_path / 'cut.pth'
    bad.write_bytes(open(real_checkpoint, 'rb').read()[:5000])
    code, err = _main(_eval_args(digits, str(tmp_path / 'o'), '--resume', str(bad)), capsys)
    _assert_clean_error(code, err, str(bad), 'corrupt or truncated')
    _count(request, 'files rejected')


# ----------------------------------------------------------------------------- untrusted and official files

class _Payload:
    """Unpickling this object calls open(marker, 'w'): proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def _malicious(tmp_path, name='evil.pth'):
    marker = str(tmp_path / 'PWNED')
    path = str(tmp_path / name)
    torch.save({'model': {'w': torch.zeros(1)}, 'epoch': 0, 'extra': _Payload(marker)}, path)
    return path, marker


def test_malicious_pickle_refused_everywhere(digits, tmp_path, capsys, request):
    """As --resume (eval and train), --pretrained, an auto-resume file and via the API: refused, nothing runs."""
    from utils.checkpoint import UnsafeCheckpointError, auto_resume, load_checkpoint_file
    path, marker = _malicious(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match='TRUST_CHECKPOINTS'):
        load_checkpoint_file(path)
    out = str(tmp_path / 'o')
    for extra in (['--resume', path], ['--pretrained', path]):
        code, err = _main(_eval_args(digits, out, *extra), capsys)
        _assert_clean_error(code, err, path, 'refusing')
        assert not os.path.exists(marker)
    run_dir = tmp_path / 'auto'
    run_dir.mkdir()
    os.link(path, run_dir / 'ckpt_epoch_3.pth')
    with pytest.raises(UnsafeCheckpointError):
        auto_resume(str(run_dir))
    train = ['--data-path', digits, '--output', out, '--batch-size', str(BATCH), '--device', 'cpu',
             '--disable_amp', '--resume', path, '--opts', *TINY, 'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0']
    code, err = _main(train, capsys)
    _assert_clean_error(code, err, 'refusing')
    assert not os.path.exists(marker), "code from an untrusted checkpoint ran"
    _count(request, 'files rejected', 5)
    # The documented opt-in really unpickles (so the refusal above is what kept the payload from running).
    load_checkpoint_file(path, trust=True)
    assert os.path.exists(marker)


def test_official_shaped_checkpoint_loads_without_opt_in(digits, tmp_path, capsys):
    """{'model': ..., 'optimizer': {...}, 'lr_scheduler': {...}, 'epoch': int, 'max_accuracy': float}."""
    import models
    from utils.checkpoint import load_checkpoint_file
    model = models.build_model(_tiny_config())
    official = {'model': model.state_dict(), 'epoch': 299, 'max_accuracy': 81.2,
                'optimizer': {'state': {}, 'param_groups': [{'lr': 5e-6, 'weight_decay': 0.05, 'params': [0, 1]}]},
                'lr_scheduler': {'t_initial': 300, 'base_values': [1e-3]}}
    path = str(tmp_path / 'swin_tiny_official.pth')
    torch.save(official, path)
    loaded = load_checkpoint_file(path)
    assert loaded['epoch'] == 299 and loaded['optimizer']['param_groups'][0]['lr'] == 5e-6
    fresh = models.build_model(_tiny_config())
    models.load_pretrained(fresh, path)
    for key, value in model.state_dict().items():
        if key.endswith(('relative_position_index', 'attn_mask')):
            continue
        assert torch.equal(fresh.state_dict()[key], value), key
    code, err = _main(_eval_args(digits, str(tmp_path / 'o'), '--resume', path), capsys)
    assert code == 0, err
    # Export of the weights to safetensors (also scripts/export.py --safetensors) and reading them back.
    from utils.checkpoint import export_safetensors
    export_safetensors(model.state_dict(), str(tmp_path / 'w.safetensors'))
    assert set(load_checkpoint_file(str(tmp_path / 'w.safetensors'))) == set(model.state_dict())


def test_old_checkpoint_with_pickled_config_needs_the_opt_in(tmp_path, request):
    """Old official files stored the yacs config object: refused by default, loaded with --trust-checkpoint."""
    from yacs.config import CfgNode
    from utils.checkpoint import UnsafeCheckpointError, load_checkpoint_file
    path = str(tmp_path / 'old.pth')
    torch.save({'model': {'w': torch.ones(2)}, 'config': CfgNode({'A': 1})}, path)
    with pytest.raises(UnsafeCheckpointError, match='--trust-checkpoint'):
        load_checkpoint_file(path)
    assert load_checkpoint_file(path, trust=True)['config'].A == 1
    _count(request, 'files rejected')


# ----------------------------------------------------------------------------- out of disk

def test_out_of_disk_keeps_previous_checkpoint(real_checkpoint, tmp_path, monkeypatch):
    import utils.checkpoint as ckpt
    target = str(tmp_path / 'ckpt_last.pth')
    ckpt.save_checkpoint_file({'model': {'w': torch.ones(3)}, 'epoch': 1}, target)
    before = open(target, 'rb').read()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b'x' * 1000)  # part of the file reaches the disk, then the disk is full
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(ckpt.torch, 'save', full_disk)
    with pytest.raises(ckpt.CheckpointSaveError, match='No space left on device.*previous ckpt_last.pth is intact'):
        ckpt.save_checkpoint_file({'model': {'w': torch.zeros(3)}, 'epoch': 2}, target)
    assert open(target, 'rb').read() == before
    assert os.listdir(tmp_path) == ['ckpt_last.pth']  # no temp file left
    monkeypatch.undo()
    assert ckpt.load_checkpoint_file(target)['epoch'] == 1


def test_out_of_disk_during_training_keeps_going_and_keeps_files(digits, tmp_path, capsys, monkeypatch):
    """The epoch-1 save fails with ENOSPC: logged, training ends normally, epoch 0's file stays loadable."""
    import utils.checkpoint as ckpt
    real_save = ckpt.save_checkpoint_file

    def save(obj, path):
        if path.endswith('ckpt_epoch_1.pth'):
            raise ckpt.CheckpointSaveError(f"could not write checkpoint {path}: No space left on device")
        real_save(obj, path)
    monkeypatch.setattr(ckpt, 'save_checkpoint_file', save)
    args = ['--data-path', digits, '--output', str(tmp_path), '--batch-size', str(BATCH), '--device', 'cpu',
            '--disable_amp', '--opts', *TINY, 'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '0']
    code, err = _main(args, capsys)
    assert code == 0, err
    run_dir = tmp_path / MODEL_DIR
    log = open(run_dir / 'log_rank0.txt').read()
    assert 'checkpoint not saved' in log and 'No space left on device' in log
    assert ckpt.load_checkpoint_file(str(run_dir / 'ckpt_epoch_0.pth'))['epoch'] == 0
    assert not (run_dir / 'ckpt_epoch_1.pth').exists()


# ----------------------------------------------------------------------------- broken and odd images

def _odd_images(folder):
    """Unreadable files (returned count) and readable odd modes, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new('RGB', (32, 32), (200, 10, 10)).save(buf, 'JPEG')
    (folder / 'truncated.jpg').write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    (folder / 'empty.jpg').write_bytes(b'')
    (folder / 'text.jpg').write_text('this is not an image\n')
    Image.new('CMYK', (32, 32), (0, 255, 255, 0)).save(folder / 'cmyk.jpg')
    Image.fromarray(np.full((32, 32), 60000, dtype=np.uint16)).save(folder / 'sixteen.png')
    palette = Image.new('P', (32, 32), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info['transparency'] = 0
    palette.save(folder / 'palette.png', transparency=0)
    return 3


def test_broken_and_odd_images_are_skipped_or_converted(tmp_path, request):
    import data
    n_broken = _odd_images(tmp_path / 'split' / 'c0')
    dataset = data.ImageFolderDataset(str(tmp_path / 'split'), transform=None, on_broken='drop')
    kept = {}
    for i in range(len(dataset)):
        item = dataset[i]
        if item is not None:
            kept[os.path.basename(dataset.name_of(i))] = item[0]
    assert set(kept) == {'cmyk.jpg', 'sixteen.png', 'palette.png'}
    assert all(img.mode == 'RGB' and img.size == (32, 32) for img in kept.values())
    assert kept['sixteen.png'].getpixel((0, 0)) == (233, 233, 233)  # scaled 60000/257, not clipped to white
    assert kept['palette.png'].getpixel((0, 0)) == (255, 0, 0)
    assert data.pop_broken_count(dataset) == n_broken
    _count(request, 'files rejected', n_broken)


def test_training_with_broken_images_counts_them(digits, tmp_path, capsys):
    import shutil

    import data
    root = tmp_path / 'data'
    shutil.copytree(digits, root)
    _odd_images(root / 'train' / 'digit0')
    _odd_images(root / 'val' / 'digit1')
    args = ['--data-path', str(root), '--output', str(tmp_path / 'o'), '--batch-size', str(BATCH), '--device',
            'cpu', '--disable_amp', '--opts', *TINY, 'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0']
    code, err = _main(args, capsys)
    assert code == 0, err
    log = open(tmp_path / 'o' / MODEL_DIR / 'log_rank0.txt').read()
    assert 'unreadable training images were skipped' in log
    assert 'Accuracy of the network on the 22 test images' in log  # 16 + 6 files; 3 are skipped in the count
    metrics = json.loads(open(tmp_path / 'o' / MODEL_DIR / 'metrics.jsonl').readline())
    # the logged accuracy is that of the 19 readable images (a plain loop over what the dataset decodes)
    from helpers import plain_accuracy
    val = data.ImageFolderDataset(str(root / 'val'), transform=None, on_broken='drop')
    readable = [item for item in (val[i] for i in range(len(val))) if item is not None]
    weights = torch.load(tmp_path / 'o' / MODEL_DIR / 'ckpt_epoch_0.pth', weights_only=True)['model']
    acc1, acc5, loss, n = plain_accuracy(weights, TINY, readable)
    assert n == 16 + 3  # the digits and the three odd but readable files
    assert metrics['val_acc1'] == pytest.approx(acc1, abs=1e-9) and metrics['val_acc5'] == pytest.approx(acc5)
    assert metrics['val_loss'] == pytest.approx(loss, abs=1e-4)
    skipped = int(log.split('unreadable training images were skipped')[0].rsplit('epoch 0: ', 1)[1])
    assert metrics['broken_images'] == skipped > 0


# ----------------------------------------------------------------------------- bad input

IMPOSSIBLE = [
    (['MODEL.SWIN.DEPTHS', '[2,2,2]', 'MODEL.SWIN.NUM_HEADS', '[1,2]'], 'NUM_HEADS'),
    (['DATA.IMG_SIZE', '0'], 'DATA.IMG_SIZE'),
    (['DATA.BATCH_SIZE', '-4'], 'DATA.BATCH_SIZE'),
    (['MODEL.SWIN.EMBED_DIM', '0'], 'EMBED_DIM'),
    (['DATA.BATCH_SIZE', '7', 'AUG.MIXUP', '0.8'], 'even'),
    (['TRAIN.OPTIMIZER.NAME', 'adamx'], "['adamw', 'sgd', "),
    (['TRAIN.EPOCHS', 'ten'], 'TRAIN.EPOCHS'),
    (['MODEL.SWIN.WINDOW_SIZE', '7.5'], 'WINDOW_SIZE'),
    (['TRAIN.NO_SUCH_KEY', '1'], 'TRAIN.NO_SUCH_KEY'),
    (['TRAIN.MAX_NONFINITE_STEPS', '0'], 'TRAIN.MAX_NONFINITE_STEPS'),
]


@pytest.mark.parametrize('opts,word', IMPOSSIBLE)
def test_impossible_configs_fail_before_training_naming_the_key(opts, word, tmp_path, capsys, request):
    code, err = _main(['--data-path', str(tmp_path), '--output', str(tmp_path), '--opts', *opts], capsys)
    _assert_clean_error(code, err, word)
    assert not os.listdir(tmp_path)  # nothing written: it failed before any set-up
    _count(request, 'inputs fuzzed')


def test_more_processes_than_validation_images_is_refused():
    from data import eval_shard_indices
    with pytest.raises(ValueError, match='4 ranks but only 3 validation images'):
        eval_shard_indices(3, 4, 0)


_KEYS = None


def _all_keys():
    global _KEYS
    if _KEYS is None:
        from config import get_defaults

        def walk(node, prefix=''):
            for k, v in node.items():
                yield from (walk(v, prefix + k + '.') if hasattr(v, 'items') else [prefix + k])
        _KEYS = sorted(walk(get_defaults()))
    return _KEYS


def _fuzz_strategies():
    from hypothesis import strategies as st
    keys = st.one_of(st.sampled_from(_all_keys()), st.text('ABCDEFGHIJ._xyz', min_size=1, max_size=12),
                     st.sampled_from(['MODEL', 'TRAIN.EMA', 'MODEL.SWIN.DEPTHS.0', '', '.', 'BASE']))
    values = st.one_of(
        st.integers(-10 ** 12, 10 ** 12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(['None', 'True', 'false', '[]', '[1,2]', '[1,[2]]', "['a']", '(1,', '{a: 1}', '', 'nan',
                         '-0', '1e400', '!!python/object:os.system', "__import__('os')", '[1,2,3,4,5,6]']),
        st.text(max_size=10))
    return st.lists(st.tuples(keys, values), min_size=1, max_size=3)


def test_config_fuzz_through_load_config(request):
    """Random keys and values: a valid config or one ConfigError line naming the problem, nothing else."""
    from hypothesis import HealthCheck, given, settings

    from config import ConfigError, load_config
    counted = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(_fuzz_strategies())
    def check(pairs):
        counted.append(1)
        opts = [x for pair in pairs for x in pair]
        try:
            load_config(opts=opts)
        except ConfigError as e:
            assert str(e) and '\n' not in str(e).strip(), str(e)
    check()
    _count(request, 'inputs fuzzed', len(counted))


def test_config_fuzz_through_main(tmp_path, capsys, request):
    """Fuzzed --opts through main.main: exit 2 with one 'error:' line (no data path is given, so even a valid
    config stops at the data check), never a traceback."""
    from hypothesis import HealthCheck, given, settings
    counted = []
    missing = str(tmp_path / 'no_data_here')

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(_fuzz_strategies())
    def check(pairs):
        counted.append(1)
        opts = [x for pair in pairs for x in pair]
        code, err = _main(['--data-path', missing, '--output', str(tmp_path / 'o'), '--device', 'cpu',
                           '--opts', *opts], capsys)
        _assert_clean_error(code, err)
    check()
    _count(request, 'inputs fuzzed', len(counted))


@pytest.mark.slow
def test_bad_opts_through_the_command_line(tmp_path, request):
    """The real process: exit code 2, one stderr line, no traceback, no output folder."""
    cases = [(['MODEL.SWIN.DEPTHS', '[2,2]', 'MODEL.SWIN.NUM_HEADS', '[3]'], 'same length'),
             (['DATA.BATCH_SIZE', '3', 'AUG.MIXUP', '0.8'], 'even'),
             (['TRAIN.OPTIMIZER.NAME', "'lion'"], "['adamw', 'sgd', ")]
    for opts, word in cases:
        result = _run([sys.executable, 'main.py', '--data-path', str(tmp_path), '--output', str(tmp_path / 'o'),
                       '--opts', *opts], timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and word in lines[0], result.stderr
        assert 'Traceback' not in result.stderr + result.stdout
        _count(request, 'inputs fuzzed')
    assert not os.path.exists(tmp_path / 'o')


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc to find the rank-1 worker')
def test_torchrun_sigterm_to_one_rank_stops_both_with_a_checkpoint(digits, tmp_path, request):
    """SIGTERM to rank 1 only: both ranks stop after the same update (no hang), rank 0 saves, exit 143 each."""
    out = str(tmp_path)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
           str(31000 + os.getpid() % 1000)] + _cmd(digits, out, ['DATA.BATCH_SIZE', '4'])[1:]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, seen = [], 0
    try:
        for line in proc.stdout:
            lines.append(line)
            seen += TRAIN_LINE in line
            if seen == 1:
                os.kill(torchrun_worker_pids(proc.pid)[1], signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = ''.join(lines)
    assert proc.returncode != 0 and 'exitcode  : 143' in text, text[-3000:]
    run_dir = os.path.join(out, MODEL_DIR)
    logs = [open(os.path.join(run_dir, f'log_rank{r}.txt')).read() for r in (0, 1)]
    import re
    where = r'stopping after (update \d+/\d+ of epoch \d+|epoch \d+)'
    stop1 = re.search('SIGTERM: ' + where, logs[1])
    stop0 = re.search('a stop signal on another rank: ' + where, logs[0])
    assert stop0 and stop1 and stop0.group(1) == stop1.group(1), logs  # the same point on both ranks
    saved = torch.load(os.path.join(run_dir, 'ckpt_last.pth'), weights_only=True)
    assert saved['rng']['world_size'] == 2 and (saved['epoch'], saved['step']) > (-1, 0)
    _count(request, 'kills survived')
