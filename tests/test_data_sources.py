"""DATA.DATASET hf and wds: the same images as a class folder, a Hugging Face copy and WebDataset shards.

The images are JPEGs of real photographs: crops of scikit-image's photographs, one photograph a class (where
scikit-image is missing, scikit-learn's digits, upscaled; requirements-dev.txt installs scikit-image). One
checkpoint must evaluate to the same numbers from every copy; an interrupted run must resume to the same weights
and per-epoch validation as a straight run.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import run_side_by_side, subprocess_env, write_digits_folder, write_photo_jpeg_folder

datasets = pytest.importorskip('datasets')

from config import ConfigError, load_config, validate_config  # noqa: E402
from data import DatasetLayoutError, build_dataset, build_loader  # noqa: E402
from data.datasets import SourceDependencyError, require_source  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join('swin_tiny_patch4_window7_224', 'default')
CLASSES = 4
TINY = ['MODEL.SWIN.EMBED_DIM', '16', 'MODEL.SWIN.DEPTHS', '[1,1]', 'MODEL.SWIN.NUM_HEADS', '[1,2]',
        'MODEL.SWIN.WINDOW_SIZE', '4', 'DATA.IMG_SIZE', '64', 'MODEL.NUM_CLASSES', str(CLASSES)]
RUN = ['DETERMINISTIC', 'True', 'PRINT_FREQ', '1', 'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.EPOCHS', '3',
       'DATA.NUM_WORKERS', '2']
BATCH = 8  # 32 training images -> 4 updates per epoch


# ----------------------------------------------------------------------------- the images

def write_jpeg_folder(root, train_per_class=8, val_per_class=4):
    """``root/{train,val}/<class>/<i>.jpg``: JPEG photographs (72 x 56 px crops, a class a photograph); without
    scikit-image, 64 px RGB JPEGs of the first digits of each class."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return write_digits_folder(root, CLASSES, train_per_class, val_per_class, size=64, colour=True, ext='jpg')
    return write_photo_jpeg_folder(root, train_per_class, val_per_class)


def folder_to_hf(folder, out):
    """The class folder as a DatasetDict (train, val) saved with ``save_to_disk``: image bytes + ClassLabel."""
    classes = sorted(os.listdir(os.path.join(folder, 'train')))
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=classes)})
    splits = {}
    for split in ('train', 'val'):
        images, labels = [], []
        for c, name in enumerate(classes):
            for file in sorted(os.listdir(os.path.join(folder, split, name))):
                images.append(os.path.join(folder, split, name, file))
                labels.append(c)
        splits[split] = datasets.Dataset.from_dict({'image': images, 'label': labels}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return str(out)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_jpeg_folder(tmp_path_factory.mktemp('folder'))


@pytest.fixture(scope='module')
def hf_copy(folder, tmp_path_factory):
    return folder_to_hf(folder, tmp_path_factory.mktemp('hf') / 'images')


def _config(path, kind, *opts):
    return load_config(opts=['DATA.DATA_PATH', path, 'DATA.DATASET', kind, 'DATA.BATCH_SIZE', str(BATCH), *TINY,
                             'DATA.NUM_WORKERS', '0', *opts])


# ----------------------------------------------------------------------------- runs in subprocesses

def _cmd(path, kind, out, *extra):
    return [sys.executable, 'main.py', '--data-path', path, '--output', out, '--batch-size', str(BATCH),
            '--device', 'cpu', '--disable_amp', '--opts', 'DATA.DATASET', kind, *TINY, *RUN, *extra]


def _run(cmd, timeout=300):
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _interrupt_after(cmd, updates, timeout=300, sig=signal.SIGINT):
    """Start ``cmd``, signal its process group (workers included; SIGINT: a terminal's Ctrl-C) after ``updates``
    training log lines."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines, seen = [], 0
    try:
        for line in proc.stdout:
            lines.append(line)
            if 'Train: [' in line:
                seen += 1
                if seen == updates:
                    os.killpg(proc.pid, sig)
                    break
        rest, _ = proc.communicate(timeout=timeout)
        lines.append(rest or '')
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, ''.join(lines)


def _final_state(out):
    run_dir = os.path.join(out, MODEL_DIR)
    weights = torch.load(os.path.join(run_dir, 'ckpt_epoch_2.pth'), weights_only=True)['model']
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        metrics = [json.loads(line) for line in f]
    return weights, [(m['epoch'], m['val_acc1'], m['val_acc5'], m['val_loss']) for m in metrics]


def assert_interrupted_run_resumes_exactly(path, kind, tmp_path, extra=(), sig=signal.SIGINT):
    """Ctrl-C (or SIGKILL, with a checkpoint after every update) inside epoch 1, then the same command: same
    weights and per-epoch validation numbers as a straight run."""
    if sig == signal.SIGKILL:
        extra = (*extra, 'TRAIN.SAVE_EVERY_STEPS', '1')
    straight = str(tmp_path / 'straight')
    out = str(tmp_path / 'interrupted')
    code, text = _interrupt_after(_cmd(path, kind, out, *extra), 6, sig=sig)
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL), text[-3000:]
    saved = torch.load(os.path.join(out, MODEL_DIR, 'ckpt_last.pth'), weights_only=True)
    assert saved['epoch'] == 0 and 0 < saved['step'] < 4, (saved['epoch'], saved['step'])  # mid-epoch, as test_faults
    # the resumed and the straight run side by side (one compute thread each: two cores do both at once; not
    # beside the interrupted run, whose signal must land mid-epoch)
    for result in run_side_by_side([_cmd(path, kind, out, *extra), _cmd(path, kind, straight, *extra)], ROOT, 300):
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    weights, metrics = _final_state(out)
    ref_weights, ref_metrics = _final_state(straight)
    assert metrics == ref_metrics
    for key in ref_weights:
        assert torch.equal(weights[key], ref_weights[key]), f"{key} differs after the resume"
    return ref_metrics


def _eval_numbers(checkpoint, *runs):
    """(Acc@1, Acc@5, loss) of ``--eval --resume checkpoint`` from the official `` * Acc@1`` line, for each run
    ``(path, kind, out, *extra)``; the runs go side by side."""
    commands = [[sys.executable, 'main.py', '--data-path', path, '--output', out, '--batch-size', '5', '--device',
                 'cpu', '--disable_amp', '--eval', '--resume', checkpoint, '--opts', 'DATA.DATASET', kind, *TINY,
                 'DATA.NUM_WORKERS', '2', *extra] for path, kind, out, *extra in runs]
    numbers = []
    for result in run_side_by_side(commands, ROOT, timeout=300):
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        line = next(line for line in (result.stdout + result.stderr).splitlines() if ' * Acc@1 ' in line)
        words = line.split(' * Acc@1 ')[1].split()
        numbers.append((float(words[0]), float(words[2]), float(words[4])))
    return numbers


# ----------------------------------------------------------------------------- DATA.DATASET hf

def test_hf_dataset_reads_the_folders_images_and_labels(folder, hf_copy):
    from_folder, n_folder = build_dataset(False, _config(folder, 'folder'))
    from_hf, n_hf = build_dataset(False, _config(hf_copy, 'hf'))
    assert n_folder == n_hf == CLASSES and len(from_folder) == len(from_hf) == 16
    assert from_hf.targets == from_folder.targets
    for i in range(len(from_hf)):
        with open(from_folder.read(i), 'rb') as f:
            assert from_hf.read(i) == f.read()  # the stored JPEG bytes themselves, for the fast / gpu loaders
        x_hf, y_hf = from_hf[i]
        x_folder, y_folder = from_folder[i]
        assert y_hf == y_folder and torch.equal(x_hf, x_folder)


def test_hf_loaders_torch_and_fast_give_the_folders_batches(folder, hf_copy):
    for loader in ('torch', 'fast'):
        batches = []
        for path, kind in ((folder, 'folder'), (hf_copy, 'hf')):
            _, _, train, val, _ = build_loader(_config(path, kind, 'DATA.LOADER', loader))
            train.sampler.set_epoch(1)
            batches.append([tuple(b) for b in (next(iter(train)), next(iter(val)))])
        for (x, y), (x2, y2) in zip(*batches):
            assert torch.equal(y, y2) and torch.equal(x, x2), loader


def test_hf_bad_layouts_and_columns_are_clear_errors(hf_copy, tmp_path):
    with pytest.raises(DatasetLayoutError, match="no split 'test'.*'train', 'val'"):
        build_dataset(False, _config(hf_copy, 'hf', 'DATA.VAL_SPLIT', 'test'))
    with pytest.raises(DatasetLayoutError, match="no column 'img'.*DATA.HF_IMAGE_COLUMN"):
        build_dataset(False, _config(hf_copy, 'hf', 'DATA.HF_IMAGE_COLUMN', 'img'))
    with pytest.raises(DatasetLayoutError, match="not an Image feature"):
        build_dataset(False, _config(hf_copy, 'hf', 'DATA.HF_IMAGE_COLUMN', 'label'))
    with pytest.raises(DatasetLayoutError, match="not a folder written by DatasetDict.save_to_disk"):
        build_dataset(False, _config(str(tmp_path), 'hf'))
    with pytest.raises(ConfigError, match='DATA.ZIP_MODE'):
        validate_config(_config(hf_copy, 'hf', 'DATA.ZIP_MODE', 'True'))


def test_hf_other_column_names_and_a_broken_image(folder, tmp_path):
    """Columns named by DATA.HF_*_COLUMN; a damaged image is skipped and counted (validation: dropped)."""
    rows = {'picture': [], 'cls': []}
    for c, name in enumerate(sorted(os.listdir(os.path.join(folder, 'val')))):
        for file in sorted(os.listdir(os.path.join(folder, 'val', name))):
            with open(os.path.join(folder, 'val', name, file), 'rb') as f:
                rows['picture'].append({'bytes': f.read(), 'path': None})
            rows['cls'].append(c)
    rows['picture'][3] = {'bytes': rows['picture'][3]['bytes'][:200], 'path': None}  # a truncated JPEG
    features = datasets.Features({'picture': datasets.Image(), 'cls': datasets.Value('int64')})
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({'train': split, 'val': split}).save_to_disk(str(tmp_path / 'hf'))
    config = _config(str(tmp_path / 'hf'), 'hf', 'DATA.HF_IMAGE_COLUMN', 'picture', 'DATA.HF_LABEL_COLUMN', 'cls')
    _, val, _, loader, _ = build_loader(config)
    seen = sum(len(y) for _, y in loader)
    assert seen == 15 and val.broken_images.value == 1
    train, _ = build_dataset(True, config)
    assert train[3][1] == train.targets[4] and train.broken_images.value == 1  # the next readable one instead


def test_missing_package_is_a_one_line_error_naming_the_pip_command():
    with pytest.raises(SourceDependencyError, match="DATA.DATASET 'hf' needs the package 'nopackage_xyz'.*"
                                                    "'pip install nopackage_xyz'"):
        require_source('nopackage_xyz', 'nopackage_xyz', 'hf')
    assert issubclass(SourceDependencyError, ConfigError)  # main.py prints ConfigErrors as one line, exit 2


@pytest.mark.slow
def test_hf_resume_is_exact_and_one_checkpoint_evaluates_alike_from_folder_and_hf(folder, hf_copy, tmp_path):
    """Ctrl-C mid-epoch from the HF copy (2 workers) resumes exactly; its final checkpoint then evaluates to the
    same Acc@1, Acc@5 and loss from the folder and from the HF copy, with the torch and the fast loader."""
    metrics = assert_interrupted_run_resumes_exactly(hf_copy, 'hf', tmp_path)
    assert len(metrics) == 3
    checkpoint = os.path.join(str(tmp_path / 'straight'), MODEL_DIR, 'ckpt_epoch_2.pth')
    loaders = ('torch', 'fast')
    numbers = _eval_numbers(checkpoint, *[(path, kind, str(tmp_path / f'eval-{kind}-{loader}'), 'DATA.LOADER',
                                           loader) for loader in loaders
                                          for path, kind in ((folder, 'folder'), (hf_copy, 'hf'))])
    acc1 = {}
    for loader, from_folder, from_hf in zip(loaders, numbers[::2], numbers[1::2]):
        assert from_folder == from_hf, loader
        acc1[loader] = from_folder[0]
    assert acc1['torch'] == pytest.approx(metrics[-1][1])  # what the run itself measured on its last epoch


# ----------------------------------------------------------------------------- DATA.DATASET wds

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import pack_wds  # noqa: E402
from data.samplers import loader_from  # noqa: E402
from data.wds import EpochLayout, WdsDataset, WdsEvalSampler, WdsShardError, WdsTrainSampler  # noqa: E402


@pytest.fixture(scope='module')
def shards(folder, tmp_path_factory):
    """The folder packed by scripts/pack_wds.py: 7 train shards of <= 5 samples, 4 val shards."""
    out = str(tmp_path_factory.mktemp('wds'))
    assert pack_wds.main([folder, out, '--samples', '5', '--no-progress']) == 0
    return out


class RecordingWds(WdsDataset):
    """Yields the sample's key in place of the image (what the tests collect)."""

    def __getitem__(self, key):
        return self.load(key)[2]


def _keys(shards, rank, world, workers, epoch=0, skip=0, split='train', batch=4, streams=None):
    streams = max(1, workers) if streams is None else streams
    ds = RecordingWds(shards, split, split == 'train', CLASSES, rank, world, batch, streams, 0, 8)
    sampler = WdsTrainSampler(ds)
    sampler.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=batch, num_workers=workers,
                                         collate_fn=list)
    return [k for b in loader_from(loader, skip) for k in b]


def _all_keys(shards, split):
    return [k for s in pack_wds.read_index(shards, split) for k, _ in pack_wds.iter_shard(s['url'])]


@pytest.mark.parametrize('world,streams,batch', [(1, 1, 4), (2, 2, 4), (3, 2, 3), (2, 3, 5), (4, 1, 2)])
def test_epoch_layout_covers_each_sample_once(world, streams, batch):
    counts = [5, 7, 1, 9, 4]
    for train in (True, False):
        covered = []
        for rank in range(world):
            layout = EpochLayout(counts, [3, 0, 4, 1, 2], rank, world, batch, streams, train)
            places = {layout.locate(p) for p in range(layout.start, layout.start + layout.length)}
            assert len(places) == layout.length  # position -> (stream, place) is one to one
            for s in range(streams):
                assert {t for st, t in places if st == s} == set(range(layout.stream_lengths[s]))
                for shard, skip, take in layout.pieces(s):
                    covered += [(shard, i) for i in range(skip, skip + take)]
        if train:
            per_rank = (sum(counts) // (world * batch)) * batch
            assert len(covered) == world * per_rank
        else:
            assert sorted(covered) == [(s, i) for s, n in enumerate(counts) for i in range(n)]
        assert len(set(covered)) == len(covered)


def test_wds_each_sample_once_per_epoch_over_ranks_and_workers_and_a_pure_order(shards):
    everything = sorted(_all_keys(shards, 'train'))
    assert len(everything) == 32
    epochs = []
    for epoch in (0, 1):
        per_rank = [_keys(shards, r, 2, 2, epoch) for r in range(2)]
        assert [len(k) for k in per_rank] == [16, 16]
        assert sorted(per_rank[0] + per_rank[1]) == everything
        assert per_rank == [_keys(shards, r, 2, 2, epoch) for r in range(2)]  # a pure function of (seed, epoch)
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]
    assert _keys(shards, 0, 1, 0) == _keys(shards, 0, 1, 0)


def test_wds_resume_mid_epoch_continues_the_same_order(shards):
    for workers in (0, 2):
        full = _keys(shards, 1, 2, workers, epoch=3)
        for skip in (1, 2, 3):
            assert _keys(shards, 1, 2, workers, epoch=3, skip=skip) == full[skip * 4:], (workers, skip)
    # Fewer workers than streams (a capped DATA.NUM_WORKERS) give the same order: workers share the streams.
    assert _keys(shards, 0, 1, 1, streams=3) == _keys(shards, 0, 1, 0, streams=3) == _keys(shards, 0, 1, 2, streams=3)


def test_wds_validation_reads_every_sample_once_without_padding(shards):
    everything = sorted(_all_keys(shards, 'val'))
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            ds = RecordingWds(shards, 'val', False, CLASSES, rank, world, 3, 2, 0, 8)
            loader = torch.utils.data.DataLoader(ds, sampler=WdsEvalSampler(ds), batch_size=3, num_workers=2,
                                                 collate_fn=list)
            seen += [k for b in loader for k in b]
        assert sorted(seen) == everything, world


def test_wds_gives_the_folders_images_and_labels(folder, shards):
    """Validation from the shards: the same (image, label) pairs as the folder, torch and fast loaders."""
    for loader in ('torch', 'fast'):
        pairs = []
        for path, kind in ((folder, 'folder'), (shards, 'wds')):
            _, _, _, val, _ = build_loader(_config(path, kind, 'DATA.LOADER', loader))
            batches = [tuple(batch) for batch in val]
            images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            pairs.append(sorted((images[i].flatten().tolist(), int(labels[i])) for i in range(len(labels))))
        assert len(pairs[0]) == 16 and pairs[0] == pairs[1], loader


def test_shards_written_with_webdataset_tarwriter_read_alike(folder, shards, tmp_path):
    """Shards written by webdataset's own TarWriter, indexed by pack_wds.py --index-only: the same samples."""
    wds = pytest.importorskip('webdataset')
    classes = sorted(os.listdir(os.path.join(folder, 'val')))
    with wds.TarWriter(str(tmp_path / 'val-000000.tar')) as sink:
        for c, name in enumerate(classes):
            for file in sorted(os.listdir(os.path.join(folder, 'val', name))):
                with open(os.path.join(folder, 'val', name, file), 'rb') as f:
                    sink.write({'__key__': f'{name}_{file[:-4]}', 'jpg': f.read(), 'cls': c})
    assert pack_wds.main(['--index-only', str(tmp_path), '--splits', 'val', '--no-progress']) == 0
    config = _config(str(tmp_path), 'wds')
    ours, _ = build_dataset(False, _config(shards, 'wds'))
    theirs, _ = build_dataset(False, config)
    assert len(theirs) == 16
    mine = sorted((ours[i][0].flatten().tolist(), ours[i][1]) for i in range(len(ours)))
    other = sorted((theirs[i][0].flatten().tolist(), theirs[i][1]) for i in range(len(theirs)))
    assert mine == other


def _copy_shards(shards, out):
    import shutil
    shutil.copytree(shards, out)
    return str(out)


def test_wds_damaged_samples_are_skipped_and_counted(shards, tmp_path):
    """A bad JPEG and a sample without .cls: training substitutes and counts, validation drops and counts."""
    import tarfile
    root = _copy_shards(shards, tmp_path / 'damaged')
    index = pack_wds.read_index(root, 'val')
    url = index[0]['url']
    with tarfile.open(url) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(url, 'w', format=tarfile.USTAR_FORMAT) as tar:
        for n, (m, data) in enumerate(members):
            if n == 0:
                data = data[:100]  # a truncated JPEG
            if n == 3:
                continue  # sample 1 loses its .cls
            m.size = len(data)
            tar.addfile(m, __import__('io').BytesIO(data))
    pack_wds.index_only(root, 'val', progress=False)
    total, problems = pack_wds.verify(root, 'val', progress=False)
    assert total == 16 and len(problems) == 2, problems
    _, val, _, loader, _ = build_loader(_config(root, 'wds'))
    assert sum(len(y) for _, y in loader) == 14 and val.broken_images.value == 2
    train = WdsDataset(root, 'val', True, CLASSES, 0, 1, 4, 1, 0, 0, on_broken='substitute')
    sampler = WdsTrainSampler(train)
    got = [train.load(k) for k in sampler]
    assert len(got) == 16 and train.broken_images.value >= 2


def test_wds_missing_or_truncated_shard_is_a_clear_error(shards, tmp_path):
    root = _copy_shards(shards, tmp_path / 'broken')
    url = pack_wds.read_index(root, 'train')[2]['url']
    with open(url, 'rb') as f:
        data = f.read()
    with open(url, 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(WdsShardError, match=f"shard {url} has {len(data) // 2} bytes, its index says {len(data)}"):
        build_dataset(True, _config(root, 'wds'))
    # Without sizes in the index (e.g. counted from remote shards) the shard is named when it is reached.
    path = os.path.join(root, 'train.index.json')
    with open(path) as f:
        index = json.load(f)
    for s in index['shards']:
        s['bytes'] = None
    with open(path, 'w') as f:
        json.dump(index, f)
    dataset, _ = build_dataset(True, _config(root, 'wds'))
    sampler = WdsTrainSampler(dataset)
    with pytest.raises(WdsShardError, match=f"shard {url}"):
        for key in sampler:
            dataset[key]
    _, problems = pack_wds.verify(root, 'train', progress=False)
    assert any(url in p for p in problems)
    os.remove(url)
    with pytest.raises(WdsShardError, match=f"1 WebDataset shards are missing, e.g. \\['{url}'\\]"):
        build_dataset(True, _config(root, 'wds'))
    with pytest.raises(DatasetLayoutError, match='index not found.*pack_wds.py --index-only'):
        build_dataset(False, _config(str(tmp_path), 'wds'))


# ----------------------------------------------------------------------------- the tar reader (data.wds.iter_tar)

def _tar_bytes(fmt, members, pax_headers=None):
    """A tar archive in ``fmt`` written by ``tarfile``: members (name, data or None for a directory, or
    ('->', target) for a symlink)."""
    import io
    import tarfile
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode='w', format=fmt, pax_headers=pax_headers) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000.5  # a float: pax writes it as a record
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _tarfile_reads(data):
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(data), mode='r|') as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


class _Trickle:
    """A non-seekable stream whose reads return at most ``n`` bytes (as a pipe may)."""

    def __init__(self, data, n):
        self.data, self.pos, self.n = data, 0, n

    def read(self, size):
        out = self.data[self.pos:self.pos + min(size, self.n)]
        self.pos += len(out)
        return out


TAR_MEMBERS = [
    ('dir', None),
    ('dir/a.jpg', b'\xff\xd8' + bytes(range(256)) * 7),
    ('dir/a.cls', b'3'),
    ('dir/empty.txt', b''),
    ('dir/block.bin', b'x' * 1024),  # a size that is a multiple of the block: no padding
    ('link', ('->', 'dir/a.jpg')),
    ('deep/' + 'p' * 90 + '/' + 'n' * 60 + '.jpg', b'long name'),  # > 100 characters: ustar prefix, GNU or pax
    ('caf\u00e9/\u00e9t\u00e9.cls', b'1'),  # not ASCII: a pax path record (GNU and ustar keep the raw UTF-8)
]


@pytest.mark.parametrize('fmt', ['USTAR_FORMAT', 'GNU_FORMAT', 'PAX_FORMAT'])
def test_tar_reader_reads_what_tarfile_reads(fmt):
    import tarfile
    from data.wds import iter_tar
    members = TAR_MEMBERS
    data = _tar_bytes(getattr(tarfile, fmt), members, pax_headers={'comment': 'global'})
    expected = _tarfile_reads(data)
    assert [n for n, _ in expected] == [n for n, d in members if isinstance(d, bytes)]
    import io
    assert list(iter_tar(io.BytesIO(data))) == expected
    assert list(iter_tar(_Trickle(data, 700))) == expected  # short reads (pipes) are completed
    # keep(name) False: the member is skipped, its name still given (the sample grouping needs it)
    assert list(iter_tar(io.BytesIO(data), keep=lambda n: n.endswith('.cls'))) == [
        (n, d if n.endswith('.cls') else None) for n, d in expected]


def test_tar_reader_numbers_and_damage():
    import io
    import tarfile
    from data.wds import TarFormatError, iter_tar, tar_number
    assert tar_number(b'0000017\x00') == 15 and tar_number(b'       \x00') == 0
    assert tar_number(b'\x80' + (2 ** 40).to_bytes(11, 'big')) == 2 ** 40  # GNU base-256 (> 8 GiB members)
    assert tar_number(b'\xff' * 12) == -1
    with pytest.raises(TarFormatError, match='invalid number'):
        tar_number(b'12x4\x00')
    members = [(f'k{i}.jpg', bytes([i]) * (300 + i)) for i in range(3)]
    data = _tar_bytes(tarfile.USTAR_FORMAT, members)
    # ends at a member boundary, no end-of-archive blocks: the members so far (the index count catches a short shard)
    cut = 3 * 512 * 2  # three (header + one data block) members
    assert [n for n, _ in iter_tar(io.BytesIO(data[:cut]))] == ['k0.jpg', 'k1.jpg', 'k2.jpg']
    with pytest.raises(TarFormatError, match='cut short'):
        list(iter_tar(io.BytesIO(data[:512 * 3 + 100])))  # the second member's data cut
    with pytest.raises(TarFormatError, match='truncated header'):
        list(iter_tar(io.BytesIO(data[:512 * 2 + 200])))
    with pytest.raises(TarFormatError, match='empty file'):
        list(iter_tar(io.BytesIO(b'')))
    bad = bytearray(data)
    bad[1024 + 10] ^= 0x41  # the second header's name: its checksum no longer matches
    assert [n for n, _ in _tarfile_reads(bytes(bad))] == ['k0.jpg']  # tarfile's stream mode stops quietly there
    with pytest.raises(TarFormatError, match='bad header checksum at byte 1024'):
        list(iter_tar(io.BytesIO(bytes(bad))))  # ours: a damaged shard


def test_iter_shard_skips_samples_and_parts_without_reading_them(shards):
    """Reading from sample ``skip`` with only some extensions: the same samples and bytes as reading it all,
    from a local file (seeks past the rest) and through a pipe (reads and drops it)."""
    from data.wds import MemberSpan, ShardFiles, iter_shard
    for entry in pack_wds.read_index(shards, 'train')[:2]:
        full = list(iter_shard(entry['url']))
        assert len(full) == entry['samples'] and all(set(p) == {'jpg', 'cls'} for _, p in full)
        for url in (entry['url'], f"pipe:cat {entry['url']}"):
            for skip in (0, 2, entry['samples']):
                assert list(iter_shard(url, ('cls',), skip)) == [(k, {'cls': p['cls']}) for k, p in full[skip:]]
                assert list(iter_shard(url, None, skip)) == full[skip:]
                # Deferred images: spans in a local file (read when served), bytes through a pipe; the same samples.
                lazy = list(iter_shard(url, None, skip, defer=('jpg',)))
                spans = [p['jpg'] for _, p in lazy if isinstance(p['jpg'], MemberSpan)]
                assert len(spans) == (0 if url.startswith('pipe:') else len(lazy))
                assert all(isinstance(p['cls'], bytes) for _, p in lazy)
                assert [ShardFiles().resolve(raw) for raw in lazy] == full[skip:]


def test_deferred_image_of_a_shard_cut_after_listing_is_an_error_naming_it(shards, tmp_path):
    from data.wds import ShardFiles, iter_shard
    root = _copy_shards(shards, tmp_path / 'cut')
    url = pack_wds.read_index(root, 'train')[0]['url']
    lazy = list(iter_shard(url, None, 0, defer=('jpg',)))
    files = ShardFiles()
    assert files.resolve(lazy[-1])[1]['jpg'][:2] == b'\xff\xd8'
    last = lazy[-1][1]['jpg']
    with open(url, 'r+b') as f:
        f.truncate(last.offset + last.size // 2)
    with pytest.raises(WdsShardError, match=f"shard {url} ends inside a member"):
        files.resolve(lazy[-1])
    os.remove(url)
    with pytest.raises(WdsShardError, match=f"shard {url} cannot be read"):
        ShardFiles().resolve(lazy[0])


def test_wds_shard_with_a_bad_header_is_an_error_naming_it(shards, tmp_path):
    root = _copy_shards(shards, tmp_path / 'badheader')
    url = pack_wds.read_index(root, 'val')[0]['url']
    with open(url, 'rb') as f:
        data = bytearray(f.read())
    second = 512 + -(-int(data[124:136].split(b'\0')[0].strip(), 8) // 512) * 512  # the second member's header
    data[second + 3] ^= 0x20
    with open(url, 'wb') as f:
        f.write(bytes(data))
    dataset, _ = build_dataset(False, _config(root, 'wds'))  # the size is right: found when reached
    with pytest.raises(WdsShardError, match=f"shard {url} cannot be read to its end .*bad header checksum"):
        for i in range(len(dataset)):
            dataset[i]


def test_wds_brace_pattern_and_config_checks(shards):
    dataset, _ = build_dataset(False, _config(shards, 'wds', 'DATA.VAL_SPLIT', 'val-{000000..000001}.tar'))
    assert len(dataset) == 10 and len(dataset.urls) == 2
    with pytest.raises(ConfigError, match='DATA.REPEATED_AUG'):
        validate_config(_config(shards, 'wds', 'DATA.REPEATED_AUG', '3'))
    with pytest.raises(ConfigError, match='DATA.ZIP_MODE'):
        validate_config(_config(shards, 'wds', 'DATA.ZIP_MODE', 'True'))


PROBE = r'''
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch
torch.distributed.init_process_group('gloo')
import data.build
from config import load_config
from data import build_loader
from data.wds import WdsDataset

data.build.available_cpus = lambda: 4  # 2 workers per rank even on a 2-core test machine (no cap)

class Recording(WdsDataset):
    def __getitem__(self, key):
        image, label, name = self.load(key)
        return image, label, name

config = load_config(opts=sys.argv[2:])
_, _, train, val, _ = build_loader(config)
train.dataset.__class__ = val.dataset.__class__ = Recording
seen = {}
for epoch in (0, 1):
    train.sampler.set_epoch(epoch)
    seen[f'train{epoch}'] = [k for batch in train for k in batch[2]]
seen['val'] = [k for batch in val for k in batch[2]]
seen['workers'] = train.num_workers
with open(os.path.join(sys.argv[1], f'rank{torch.distributed.get_rank()}.json'), 'w') as f:
    json.dump(seen, f)
torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
def test_torchrun_two_ranks_two_workers_see_each_sample_once_per_epoch(shards, tmp_path):
    probe = tmp_path / 'probe.py'
    probe.write_text(PROBE)
    opts = ['DATA.DATA_PATH', shards, 'DATA.DATASET', 'wds', 'DATA.BATCH_SIZE', '4', 'DATA.NUM_WORKERS', '2',
            'DATA.LOADER', 'torch',  # the probe's dataset yields keys beside the images: the torch collate
            *TINY]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29513',
           str(probe), str(tmp_path), *opts]
    env = dict(subprocess_env(), OMP_NUM_THREADS='1')
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    assert [r['workers'] for r in ranks] == [2, 2]
    train_keys, val_keys = sorted(_all_keys(shards, 'train')), sorted(_all_keys(shards, 'val'))
    for epoch in (0, 1):
        per_rank = [r[f'train{epoch}'] for r in ranks]
        assert [len(k) for k in per_rank] == [16, 16]  # the same number of updates on both ranks
        assert sorted(per_rank[0] + per_rank[1]) == train_keys
    assert ranks[0]['train0'] != ranks[0]['train1']
    assert sorted(ranks[0]['val'] + ranks[1]['val']) == val_keys


@pytest.mark.slow
def test_wds_resume_is_exact_and_one_checkpoint_evaluates_alike_from_folder_shards_and_hf(folder, shards, hf_copy,
                                                                                          tmp_path):
    """Ctrl-C mid-epoch from the shards (2 workers, shuffle buffer on) resumes exactly; the final checkpoint
    evaluates to the same Acc@1, Acc@5 and loss from the folder, the shards and the HF copy."""
    metrics = assert_interrupted_run_resumes_exactly(shards, 'wds', tmp_path, ('DATA.WDS_SHUFFLE', '6'))
    checkpoint = os.path.join(str(tmp_path / 'straight'), MODEL_DIR, 'ckpt_epoch_2.pth')
    sources = ((folder, 'folder'), (shards, 'wds'), (hf_copy, 'hf'))
    numbers = _eval_numbers(checkpoint, *[(path, kind, str(tmp_path / f'eval-{kind}')) for path, kind in sources])
    results = {kind: figures for (_, kind), figures in zip(sources, numbers)}
    assert results['folder'] == results['wds'] == results['hf']
    assert results['wds'][0] == pytest.approx(metrics[-1][1])


def test_simmim_pretraining_reads_hf_and_wds(hf_copy, shards):
    """SimMIM pre-training batches [images, masks, targets] from the training split of either source."""
    from data import build_loader_simmim
    for path, kind in ((hf_copy, 'hf'), (shards, 'wds')):
        config = _config(path, kind, 'DATA.MASK_PATCH_SIZE', '16')
        loader = build_loader_simmim(config)
        loader.sampler.set_epoch(0)
        images, masks, targets = next(iter(loader))
        assert images.shape == (BATCH, 3, 64, 64) and masks.shape[0] == BATCH and len(targets) == BATCH, kind
        assert len(loader) == 4, kind


@pytest.mark.parametrize('kind,module', [('wds', 'webdataset'), ('hf', 'datasets')])
def test_main_without_the_package_prints_one_line_naming_it(kind, module, shards, hf_copy, tmp_path, capsys,
                                                            monkeypatch):
    import main
    monkeypatch.setitem(sys.modules, module, None)  # import of it now raises ImportError
    path = shards if kind == 'wds' else hf_copy
    code = main.main(['--data-path', path, '--output', str(tmp_path), '--batch-size', str(BATCH), '--device', 'cpu',
                      '--disable_amp', '--eval', '--opts', 'DATA.DATASET', kind, *TINY, 'DATA.NUM_WORKERS', '0'])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert f"DATA.DATASET '{kind}' needs the package '{module}'" in err[0] and f"'pip install {module}'" in err[0]


def test_wds_reads_through_a_pipe_command(shards, tmp_path):
    """DATA.DATA_PATH 'pipe:<command with {}>' (how S3 / GCS are read): the same samples; a failing command for
    a shard is an error naming it."""
    piped, _ = build_dataset(False, _config(f"pipe:cat {shards}/{{}}", 'wds'))
    local, _ = build_dataset(False, _config(shards, 'wds'))
    assert len(piped) == len(local) == 16
    for i in range(16):
        assert piped.load(i)[1:] == local.load(i)[1:]
    root = _copy_shards(shards, tmp_path / 'gone')
    url = pack_wds.read_index(root, 'val')[1]['url']
    os.remove(url)
    piped, _ = build_dataset(False, _config(f"pipe:cat {root}/{{}}", 'wds'))  # not checked before: not local
    with pytest.raises(WdsShardError, match=f"shard pipe:cat {url}"):
        for i in range(16):
            piped[i]
    with pytest.raises(DatasetLayoutError, match="needs '{}'"):
        build_dataset(False, _config(f"pipe:cat {shards}", 'wds'))


def test_benchmark_data_times_every_source(folder):
    result = _run([sys.executable, 'scripts/benchmark_data.py', '--data-path', os.path.join(folder, 'train'),
                   '--sources', 'folder', 'zip', 'wds', 'hf', '--workers', '0', '--rounds', '1', '--epochs', '1',
                   '--batch-size', '8', '--img-size', '64'])
    tables = result.stdout.split('## train sources: ')[1:]
    assert [t.split(' (')[0] for t in tables] == ['images/s per worker',
                                                 'images per CPU-second of a worker'], result.stdout
    for table in tables:  # wall rate, then the CPU time of the worker (here the main process: 0 workers)
        rows = [line for line in table.splitlines()
                if line.startswith('| ') and 'source' not in line and '---' not in line]
        assert [r.split('|')[1].strip() for r in rows] == ['folder', 'zip', 'wds', 'hf'], result.stdout
        cells = [cell.split() for r in rows for cell in r.strip('| ').split('|')[1:]]
        assert all(float(c[0]) > 0 for c in cells), result.stdout
        ratios = [c[1] for c in cells if len(c) > 1]  # '(1.02x)': zip, wds, hf over the folder, 2 loaders
        assert len(ratios) == 3 * 2 and all(float(x.strip('()x')) > 0 for x in ratios), result.stdout


def test_benchmark_data_paired_times_folder_and_wds_on_the_same_samples(folder):
    result = _run([sys.executable, 'scripts/benchmark_data.py', '--data-path', os.path.join(folder, 'train'),
                   '--paired', '--rounds', '2', '--batch-size', '8', '--img-size', '64'])
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
            for line in result.stdout.splitlines() if line.startswith(('| torch', '| fast'))}
    assert set(rows) == {'torch', 'fast'}, result.stdout
    for folder_ms, wds_ms, ratio, rounds in rows.values():
        assert float(folder_ms) > 0 and float(wds_ms) > 0 and float(ratio.rstrip('x')) > 0, result.stdout
        assert len(rounds.split()) == 2, result.stdout


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['wds', 'hf'])
def test_sigkill_mid_epoch_then_the_same_command_resumes_exactly(kind, shards, hf_copy, tmp_path):
    assert_interrupted_run_resumes_exactly(shards if kind == 'wds' else hf_copy, kind, tmp_path,
                                           sig=signal.SIGKILL)
