"""Multi-label (issue 21): ``DATA.LABELS csv``, ``TRAIN.LOSS bce``, mAP / F1 validation, ckpt_best by mAP, predict.py.

Data: scikit-learn's digits 0-5 as 32 px PNGs with several labels each: 'even', 'above_2' and the digit itself
(8 classes), in ``train.csv`` / ``val.csv`` (a header row) with ``classes.txt``.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import subprocess_env
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score
from torch.utils.data import DataLoader, TensorDataset

import engine
from config import ConfigError, load_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ['even', 'above_2'] + [f'digit_{d}' for d in range(6)]
TINY = ['DATA.LABELS', 'csv', 'TRAIN.LOSS', 'bce', 'DATA.DATASET', 'folder', 'MODEL.SWIN.EMBED_DIM', '16',
        'MODEL.SWIN.DEPTHS', '[1,1]', 'MODEL.SWIN.NUM_HEADS', '[1,2]', 'MODEL.SWIN.WINDOW_SIZE', '4',
        'DATA.IMG_SIZE', '32', 'MODEL.NUM_CLASSES', str(len(CLASSES)), 'DATA.NUM_WORKERS', '0',
        'MODEL.DROP_PATH_RATE', '0.0']
PLAIN = ['AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0', 'AUG.AUTO_AUGMENT', 'none', 'AUG.REPROB', '0.0',
         'AUG.COLOR_JITTER', '0.0', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.BASE_LR', '0.02', 'PRINT_FREQ', '2',
         'MODEL.LABEL_SMOOTHING', '0.0', 'TRAIN.LR_SCHEDULER.NAME', 'step', 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '100']


def labels_of(digit: int):
    return [0] * (digit % 2 == 0) + [1] * (digit > 2) + [2 + digit]


def write_multilabel_digits(root, train_per_digit=16, val_per_digit=8, drop_val=1):
    """images/<i>.png, train.csv, val.csv (val minus ``drop_val`` images: an odd count), classes.txt."""
    from sklearn.datasets import load_digits
    d = load_digits()
    os.makedirs(os.path.join(root, 'images'), exist_ok=True)
    rows = {'train': [], 'val': []}
    counts = {}
    for i, (img, digit) in enumerate(zip(d.images, d.target)):
        if digit > 5:
            continue
        n = counts.get(digit, 0)
        if n >= train_per_digit + val_per_digit:
            continue
        counts[digit] = n + 1
        pixels = (img / 16.0 * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert('RGB').save(
            os.path.join(root, 'images', f'{i}.png'))
        rows['train' if n < train_per_digit else 'val'].append((f'images/{i}.png', labels_of(int(digit))))
    rows['val'] = rows['val'][:len(rows['val']) - drop_val]
    for split, entries in rows.items():
        with open(os.path.join(root, f'{split}.csv'), 'w') as f:
            f.write('path,labels\n' + ''.join(f"{p},{' '.join(map(str, ids))}\n" for p, ids in entries))
    with open(os.path.join(root, 'classes.txt'), 'w') as f:
        f.write('\n'.join(CLASSES) + '\n')
    return str(root), rows


@pytest.fixture(scope='module')
def ml_digits(tmp_path_factory):
    return write_multilabel_digits(tmp_path_factory.mktemp('mldigits'))


def _config(root, *opts):
    return load_config(opts=['DATA.DATA_PATH', root, 'DATA.BATCH_SIZE', '8', 'DEVICE', 'cpu', *TINY, *PLAIN, *opts])


# ----------------------------------------------------------------------------- the CSV format

def test_csv_rows_header_quoting_empty_labels_and_errors(tmp_path):
    from data.datasets import DatasetLayoutError, MultiLabelCsvDataset, read_label_csv
    (tmp_path / 'a.png').write_bytes(b'')
    (tmp_path / 'b,c.png').write_bytes(b'')
    (tmp_path / 'train.csv').write_text('image,tags\na.png,3 1 3\n\n"b,c.png",\n')
    assert read_label_csv(str(tmp_path / 'train.csv'), 4) == [('a.png', (1, 3)), ('b,c.png', ())]
    (tmp_path / 'plain.csv').write_text('a.png,0\n')  # no header
    assert read_label_csv(str(tmp_path / 'plain.csv'), 4) == [('a.png', (0,))]
    dataset = MultiLabelCsvDataset(str(tmp_path), 'train.csv', 4)
    assert dataset.target(0).tolist() == [0.0, 1.0, 0.0, 1.0] and dataset.target(1).tolist() == [0.0] * 4
    assert dataset.num_classes == 4 and dataset.label_counts() == [0, 1, 0, 1]
    for text, message in [('a.png,1\nb.png,4\n', r'train.csv:2: class id 4 out of range \[0, 4\).*b\.png'),
                          ('a.png,1\nb.png,x\n', r'train.csv:2: class ids must be integers'),
                          ('a.png,1,2\n', r'train.csv:1: expected 2 fields'),
                          ('a.png,-1\n', r'class id -1 out of range'),
                          ('path,labels\n', r'lists no images')]:
        (tmp_path / 'train.csv').write_text(text)
        with pytest.raises(DatasetLayoutError, match=message):
            read_label_csv(str(tmp_path / 'train.csv'), 4)
    (tmp_path / 'train.csv').write_text('a.png,1\nmissing.png,2\n')
    with pytest.raises(DatasetLayoutError, match=r"1 images that are not under .*missing\.png"):
        MultiLabelCsvDataset(str(tmp_path), 'train.csv', 4)
    (tmp_path / 'train.csv').write_text('a.png,1\n')
    (tmp_path / 'classes.txt').write_text('x\ny\n')
    with pytest.raises(DatasetLayoutError, match='names 2 classes but MODEL.NUM_CLASSES is 4'):
        MultiLabelCsvDataset(str(tmp_path), 'train.csv', 4)


@pytest.mark.parametrize('opts, message', [
    (['TRAIN.LOSS', 'ce'], 'set TRAIN.LOSS bce'),
    (['DATA.DATASET', 'wds'], "DATA.DATASET 'wds' has labels of its own"),
    (['DATA.ZIP_MODE', 'True'], r'DATA.ZIP_MODE \(--zip\)'),
    (['TEST.THRESHOLD', '1.0'], r'TEST.THRESHOLD must be in \(0, 1\)'),
    (['TRAIN.LOSS', 'focal'], r"TRAIN.LOSS = 'focal' is not one of \['ce', 'bce'\]"),
    (['DATA.LABELS', 'json'], r"DATA.LABELS = 'json' is not one of"),
])
def test_impossible_combinations_are_named(opts, message):
    with pytest.raises(ConfigError, match=message):
        load_config(opts=['DATA.LABELS', 'csv', 'TRAIN.LOSS', 'bce', *opts])


def test_simmim_pretraining_with_multi_label_is_refused():
    config = load_config(opts=['DATA.LABELS', 'csv', 'TRAIN.LOSS', 'bce'])
    with pytest.raises(ConfigError, match='SimMIM pre-training uses no labels'):
        validate_config(config, pretrain=True)
    validate_config(load_config(opts=['TRAIN.LOSS', 'bce']), pretrain=False)  # bce alone is fine


# ----------------------------------------------------------------------------- losses and Mixup

def test_criteria_are_chosen_in_one_place(ml_digits):
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
    from data import build_mixup
    root, _ = ml_digits
    multi = _config(root, 'MODEL.LABEL_SMOOTHING', '0.2')
    loss = engine.build_criterion(multi, None)
    assert isinstance(loss, BinaryCrossEntropy) and loss.smooth_dense and loss.smoothing == 0.2
    logits, hot = torch.randn(4, 8), (torch.rand(4, 8) > 0.5).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, hot * 0.8 + 0.1)
    assert torch.allclose(loss(logits, hot), expected)  # multi-hot smoothed towards 0.5
    single = load_config(opts=['TRAIN.LOSS', 'bce', 'MODEL.NUM_CLASSES', '4'])
    mixup = build_mixup(single)
    assert isinstance(engine.build_criterion(single, mixup), BinaryCrossEntropy)
    assert engine.build_criterion(single, mixup).smoothing == 0.0  # the smoothing is in Mixup's targets
    assert isinstance(engine.build_criterion(load_config(), mixup), SoftTargetCrossEntropy)  # official
    # single-label BCE without Mixup: class ids one-hot with timm's smoothing (on 1 - s + s/C, off s/C)
    plain = load_config(opts=['TRAIN.LOSS', 'bce', 'MODEL.NUM_CLASSES', '4', 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0'])
    ids = torch.tensor([0, 3, 1, 2])
    soft = torch.full((4, 4), 0.025).scatter_(1, ids[:, None], 0.925)
    assert torch.allclose(engine.build_criterion(plain, None)(logits[:, :4], ids),
                          torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :4], soft))


def test_mixup_mixes_multi_hot_targets(ml_digits):
    from data import build_mixup
    root, _ = ml_digits
    config = _config(root, 'AUG.MIXUP', '0.8', 'AUG.CUTMIX', '0.0', 'MODEL.LABEL_SMOOTHING', '0.1')
    mixup = build_mixup(config)
    hot = (torch.rand(6, 8) > 0.5).float()
    images = torch.rand(6, 3, 8, 8)
    mixed_images, mixed = mixup(images.clone(), hot)
    smooth = hot * 0.9 + 0.05
    # the image mix tells lambda: x' = lam * x + (1 - lam) * x.flip(0)
    lam = ((mixed_images - images.flip(0)) / (images - images.flip(0))).flatten()[0].item()
    assert torch.allclose(mixed, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-5)


# ----------------------------------------------------------------------------- metrics

def _random_case(n=41, c=7, seed=0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < 0.3).astype(np.float32)
    targets[:, -1] = 0  # a class without positives: sklearn and timm count it 0
    logits = rng.normal(size=(n, c)).round(1).astype(np.float32)  # rounded: many tied scores
    return torch.from_numpy(logits), torch.from_numpy(targets)


def _sklearn(logits, targets, threshold=0.5):
    import warnings
    y, s = targets.numpy().astype(int), logits.double().numpy()
    pred = (torch.sigmoid(logits) >= threshold).numpy().astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the class without positives
        return (100 * average_precision_score(y, s, average='macro'), 100 * f1_score(y, pred, average='micro'),
                100 * f1_score(y, pred, average='macro'))


@pytest.mark.parametrize('threshold', [0.5, 0.3])
def test_scores_equal_scikit_learn(threshold):
    logits, targets = _random_case()
    got = engine.multi_label_scores(logits, targets, threshold)
    assert got[:3] == pytest.approx(_sklearn(logits, targets, threshold), abs=1e-9)
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), targets.double()).item()
    assert got.loss == pytest.approx(expected_loss, rel=1e-5)


def _fixed_model(logits):
    from helpers import fixed_logits_model
    return fixed_logits_model(logits)


def _images(n):
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()


def test_validate_reports_map_and_f1_whatever_the_batching(caplog):
    logits, targets = _random_case()
    config = load_config(opts=['DATA.LABELS', 'csv', 'TRAIN.LOSS', 'bce', 'MODEL.NUM_CLASSES', '7', 'PRINT_FREQ', '2'])
    expected = _sklearn(logits, targets)
    for batch_size in (1, 5, 41):
        loader = DataLoader(TensorDataset(_images(41), targets), batch_size=batch_size)
        with caplog.at_level('INFO', logger='swin'):
            got = engine.validate(config, loader, _fixed_model(logits), engine.Precision(torch.device('cpu')))
        assert isinstance(got, engine.MultiLabelScores) and got[:3] == pytest.approx(expected, abs=1e-9)
    assert caplog.records[-1].getMessage() == (f" * mAP {got.mAP:.3f} F1 micro {got.f1_micro:.3f} macro "
                                               f"{got.f1_macro:.3f} loss {got.loss:.4f}")


def _two_rank_worker(rank, init_file, out_path):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        logits, targets = _random_case()
        shard, batch_size = (slice(0, 29), 4) if rank == 0 else (slice(29, 41), 5)  # 29 + 12: uneven
        batches = list(DataLoader(TensorDataset(_images(41)[shard], targets[shard]), batch_size=batch_size))
        if rank == 1:
            batches.insert(1, (_images(0), targets[:0]))  # a batch whose images were all unreadable
        config = load_config(opts=['DATA.LABELS', 'csv', 'TRAIN.LOSS', 'bce', 'MODEL.NUM_CLASSES', '7'])
        got = engine.validate(config, batches, _fixed_model(logits), engine.Precision(torch.device('cpu')))
        with open(f'{out_path}.{rank}', 'w') as f:
            json.dump(list(got), f)
    finally:
        dist.destroy_process_group()


def test_validate_is_exact_over_two_ranks_with_uneven_shards(tmp_path):
    mp.spawn(_two_rank_worker, args=(str(tmp_path / 'pg'), str(tmp_path / 'out')), nprocs=2, join=True)
    logits, targets = _random_case()
    expected = _sklearn(logits, targets)
    for rank in (0, 1):
        with open(tmp_path / f'out.{rank}') as f:
            got = json.load(f)
        assert got[:3] == pytest.approx(expected, abs=1e-9), rank


# ----------------------------------------------------------------------------- the loaders

@pytest.mark.parametrize('loader_kind', ['torch', 'fast', 'gpu'])
def test_every_loader_gives_multi_hot_targets_with_exact_coverage_and_resume(ml_digits, loader_kind):
    from data import batch_to_device, build_loader, loader_from
    root, rows = ml_digits
    config = _config(root, 'DATA.LOADER', loader_kind, 'DATA.IMG_SIZE', '48')  # fast / gpu: sizes > 32
    dataset_train, dataset_val, loader_train, loader_val, _ = build_loader(config)
    hot = {p: torch.zeros(len(CLASSES)).index_fill_(0, torch.tensor(ids), 1.0) for p, ids in rows['train']}
    loader_train.sampler.set_epoch(1)
    order = [int(i) for i in loader_train.sampler]
    assert sorted(order) == list(range(len(dataset_train)))  # each image once per epoch
    batches = [batch_to_device(b, torch.device('cpu'))[1] for b in loader_train]
    seen = torch.cat(batches)
    assert seen.dtype == torch.float32 and seen.shape == (len(order), len(CLASSES))
    assert torch.equal(seen, torch.stack([hot[dataset_train.samples[i][0]] for i in order]))
    rest = [batch_to_device(b, torch.device('cpu'))[1] for b in loader_from(loader_train, 3, seed=0)]
    assert torch.equal(torch.cat(rest), seen[3 * 8:])  # a mid-epoch resume continues with the same targets
    val = torch.cat([batch_to_device(b, torch.device('cpu'))[1] for b in loader_val])
    assert val.shape == (len(rows['val']), len(CLASSES)) and val.sum(1).min() >= 1


# ----------------------------------------------------------------------------- end to end

def _main(args, nproc=1):
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port',
                               str(29700 + os.getpid() % 500)] if nproc > 1 else []) + ['main.py'] + args
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _eval_line(text):
    return next(line for line in text.splitlines() if ' * mAP ' in line).split(' * ', 1)[1]


@pytest.mark.slow
def test_multi_label_run_learns_keeps_best_by_map_evaluates_exactly_and_predicts(ml_digits, tmp_path):
    root, rows = ml_digits
    out = str(tmp_path / 'out')
    common = ['--data-path', root, '--output', out, '--batch-size', '16', '--device', 'cpu', '--disable_amp']
    _main([*common, '--opts', *TINY, *PLAIN, 'TRAIN.EPOCHS', '15', 'DETERMINISTIC', 'True'])
    run_dir = os.path.join(out, 'swin_tiny_patch4_window7_224', 'default')
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        metrics = [json.loads(line) for line in f]
    assert {'val_mAP', 'val_f1_micro', 'val_f1_macro', 'val_loss'} <= set(metrics[-1])
    assert 'val_acc1' not in metrics[-1]
    # chance: a model that ranks at random gets each class's prevalence as its AP
    val_targets = np.array([[c in ids for c in range(len(CLASSES))] for _, ids in rows['val']])
    chance = 100 * val_targets.mean(0).mean()
    best = max(m['val_mAP'] for m in metrics)
    assert best > chance + 20 and best > metrics[0]['val_mAP'] + 8, (best, chance, metrics)  # measured: 54 vs 25
    checkpoint = torch.load(os.path.join(run_dir, 'ckpt_best.pth'), weights_only=True)
    assert checkpoint['max_accuracy'] == pytest.approx(best)
    assert checkpoint['epoch'] == max(metrics, key=lambda m: m['val_mAP'])['epoch']
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(run_dir)
    events.Reload()
    assert {'val/mAP', 'val/f1_micro', 'val/f1_macro', 'val/loss'} <= set(events.Tags()['scalars'])
    # --eval of ckpt_best: one process, and two (an odd val count: 24 + 23 images) give the same line
    evaluate = ['--data-path', root, '--output', str(tmp_path / 'eval'), '--batch-size', '5', '--device', 'cpu',
                '--disable_amp', '--eval', '--resume', os.path.join(run_dir, 'ckpt_best.pth'), '--opts', *TINY]
    one = _eval_line(_main(evaluate).stdout + '')
    two = _eval_line(_main(evaluate, nproc=2).stdout)
    assert one == two and one.startswith(f"mAP {best:.3f} ")
    # predict.py: the classes above the threshold, named from classes.txt
    image = os.path.join(root, rows['val'][0][0])
    result = subprocess.run([sys.executable, 'scripts/predict.py', '--resume', os.path.join(run_dir, 'ckpt_best.pth'),
                             '--data-path', root, '--threshold', '0.5', image], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"{image}: ")
    shown = line.split(': ', 1)[1]
    assert shown.startswith('(no label >= 0.50)') or all(name.rsplit(' ', 1)[0] in CLASSES
                                                            for name in shown.split(', '))


def test_predict_lists_the_labels_above_the_threshold(ml_digits, tmp_path):
    """predict.predict on a multi-label config: every class with sigmoid >= threshold, most likely first."""
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import predict
    root, rows = ml_digits
    config = _config(root)
    table = torch.tensor([[4.0, -3.0, 0.5, -0.2, 2.0, -9.0, 0.0, -1.0]])

    class Const(torch.nn.Module):
        def forward(self, images):
            return table.expand(images.shape[0], -1)
    paths = [os.path.join(root, p) for p, _ in rows['val'][:2]]
    got = predict.predict(Const(), config, paths, threshold=0.5)
    assert [[label for label, _ in r] for r in got] == [[0, 4, 2, 6]] * 2  # sigmoid(0) = 0.5 counts
    assert predict.read_class_names(None, root, config) == CLASSES


@pytest.mark.slow
def test_bce_trains_a_single_label_run(tmp_path):
    """TRAIN.LOSS bce (timm's --bce-loss) on a single-label class folder: learns above chance (25%). Measured
    here: BCE first learns the class prior (train loss 0.562 = the entropy of p = 1/4, val top-1 25% for ~15
    epochs, where CE is at 53% after 8), then the digits (40-53% from epoch 16 on)."""
    from helpers import write_digits_folder
    data = write_digits_folder(tmp_path / 'digits', 4, 16, 8)
    out = str(tmp_path / 'out')
    tiny = [x for x in TINY[4:]]
    tiny[tiny.index('MODEL.NUM_CLASSES') + 1] = '4'
    result = _main(['--data-path', data, '--output', out, '--batch-size', '16', '--device', 'cpu', '--disable_amp',
                    '--opts', 'TRAIN.LOSS', 'bce', *tiny, *PLAIN, 'TRAIN.EPOCHS', '30', 'DETERMINISTIC', 'True'])
    with open(os.path.join(out, 'swin_tiny_patch4_window7_224', 'default', 'metrics.jsonl')) as f:
        metrics = [json.loads(line) for line in f]
    assert max(m['val_acc1'] for m in metrics) > 40.0, [m['val_acc1'] for m in metrics]
    assert ' * Acc@1 ' in result.stdout


def test_an_old_timm_without_multi_label_support_is_one_clear_error(monkeypatch):
    import data.build as build

    class OldMixup:  # timm's Mixup before its multi_label keyword
        def __init__(self, mixup_alpha=1.0, num_classes=1000):
            pass
    build.check_timm_multi_label()  # this venv's timm has it
    monkeypatch.setattr(build, 'Mixup', OldMixup)
    with pytest.raises(ConfigError, match='pip install -U timm'):
        build.check_timm_multi_label()
