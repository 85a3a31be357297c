"""Data pipeline: datasets (folder, zip with each cache mode, 22K map), transforms, samplers, broken images."""
import collections
import json
import logging
import os
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import data.build
from config import load_config
from data import (BrokenImageError, DatasetLayoutError, DistributedEvalSampler, RepeatAugSampler,
                  build_dataset, build_loader, build_transform, eval_shard_indices)
from data.samplers import ShardShuffleSampler, part_cache_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import pack_zip  # noqa: E402

# (PIL mode, extension): every mode the loader must turn into RGB, in JPEG and PNG.
FORMATS = [('RGB', 'jpg'), ('L', 'png'), ('P', 'png'), ('RGBA', 'png'), ('LA', 'png'), ('CMYK', 'jpg'),
           ('I;16', 'png'), ('RGB', 'png'), ('L', 'jpg')]
SIZES = [(40, 30), (64, 64), (24, 50), (33, 47)]


def write_image(path, mode, size, seed):
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == 'I;16':
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'RGB')
        img = img.convert('P') if mode == 'P' else img.convert(mode)
    img.save(path)


def make_split(root, split, counts, start=0):
    """counts: {class_name: n}; writes mixed modes and sizes; returns {relative path: class name}."""
    made, k = {}, start
    for cls, n in counts.items():
        os.makedirs(os.path.join(root, split, cls), exist_ok=True)
        for i in range(n):
            mode, ext = FORMATS[k % len(FORMATS)]
            rel = f"{cls}/img{i}.{ext}"
            write_image(os.path.join(root, split, rel), mode, SIZES[k % len(SIZES)], seed=k)
            made[rel] = cls
            k += 1
    return made


@pytest.fixture
def folder(tmp_path):
    """3 classes; train 4 + 4 + 4, val 3 + 2 + 2 (7: not divisible by 2)."""
    make_split(tmp_path, 'train', {'cat': 4, 'dog': 4, 'eel': 4})
    make_split(tmp_path, 'val', {'cat': 3, 'dog': 2, 'eel': 2}, start=5)
    return tmp_path


def cfg(path, *opts):
    # DATA.LOADER torch: these tests check the torch loader's float tensors (auto trains on fast above 32 px)
    return load_config(None, ['DATA.DATA_PATH', str(path), 'DATA.IMG_SIZE', '32', 'DATA.NUM_WORKERS', '0',
                              'MODEL.NUM_CLASSES', '3', 'DATA.BATCH_SIZE', '2', 'DATA.LOADER', 'torch', *opts])


def drain(loader):
    images, targets = [], []
    for x, y in loader:
        images.append(x)
        targets.append(y)
    return torch.cat(images), torch.cat(targets)


def fake_ranks(monkeypatch, rank, world):
    monkeypatch.setattr(data.build, 'dist_info', lambda: (rank, world))


# ----------------------------------------------------------------------------- folders

@pytest.mark.parametrize('kind', ['imagenet', 'folder'])
def test_folder_loader(folder, kind):
    config = cfg(folder, 'DATA.DATASET', kind)
    ds_train, ds_val, dl_train, dl_val, mixup_fn = build_loader(config)
    assert len(ds_train) == 12 and len(ds_val) == 7
    assert ds_train.classes == ['cat', 'dog', 'eel'] and ds_val.class_to_idx == ds_train.class_to_idx
    x, y = drain(dl_val)
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 2, 2]
    assert isinstance(dl_train.sampler, torch.utils.data.DistributedSampler)
    assert dl_train.sampler.seed == config.SEED and dl_train.drop_last and not dl_train.persistent_workers
    batches = list(dl_train)
    assert len(batches) == 6 and all(b[0].shape == (2, 3, 32, 32) for b in batches)
    assert mixup_fn is not None and mixup_fn.num_classes == 3


def test_train_transform_larger_size_and_class_labels(folder):
    config = cfg(folder, 'DATA.IMG_SIZE', '40')
    ds, n = build_dataset(True, config)
    assert n == 3
    x, y = ds[5]
    assert x.shape == (3, 40, 40) and y == ds.class_to_idx['dog']


def test_val_classes_must_be_known_to_train(folder):
    make_split(folder, 'val', {'fox': 1})
    with pytest.raises(DatasetLayoutError, match='fox'):
        build_loader(cfg(folder, 'MODEL.NUM_CLASSES', '4'))


def test_eval_mode_does_not_read_train(folder):
    os.rename(folder / 'train', folder / 'elsewhere')
    ds_train, ds_val, dl_train, dl_val, _ = build_loader(cfg(folder, 'EVAL_MODE', 'True'))
    assert ds_train is None and dl_train is None and len(ds_val) == 7


def test_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match='split folder not found'):
        build_dataset(True, cfg(tmp_path))
    make_split(tmp_path, 'train', {'a': 2, 'b': 2})
    os.makedirs(tmp_path / 'train' / 'empty')
    with pytest.raises(DatasetLayoutError, match='empty'):
        build_dataset(True, cfg(tmp_path))


def test_batch_larger_than_train_split_is_an_error(folder):
    with pytest.raises(DatasetLayoutError, match='DATA.BATCH_SIZE'):
        build_loader(cfg(folder, 'DATA.BATCH_SIZE', '13', 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0'))


# ----------------------------------------------------------------------------- class count

def test_more_classes_than_model_is_an_error(folder):
    config = cfg(folder, 'MODEL.NUM_CLASSES', '2')
    with pytest.raises(DatasetLayoutError) as err:
        build_loader(config)
    msg = str(err.value)
    assert '3 classes' in msg and 'MODEL.NUM_CLASSES is 2' in msg and '--opts MODEL.NUM_CLASSES 3' in msg
    assert config.MODEL.NUM_CLASSES == 2


def test_fewer_classes_than_model_warns(folder, caplog):
    config = cfg(folder, 'MODEL.NUM_CLASSES', '5')
    with caplog.at_level(logging.WARNING, logger='data.build'):
        _, n = build_dataset(True, config)
    assert n == 3 and config.MODEL.NUM_CLASSES == 5
    assert 'fewer than MODEL.NUM_CLASSES = 5' in caplog.text


# ----------------------------------------------------------------------------- zip

@pytest.fixture
def zipped(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('zipped')
    pack_zip.main([str(folder), str(out), '--no-progress'])
    return folder, out


def test_pack_zip_round_trip(zipped):
    folder, out = zipped
    for split in ('train', 'val'):
        labels = {}
        with open(out / f'{split}_map.txt') as f:
            for line in f:
                path, label = line.rstrip('\n').split('\t')
                labels[path] = int(label)
        on_disk = {os.path.relpath(os.path.join(d, f), folder / split).replace(os.sep, '/')
                   for d, _, files in os.walk(folder / split) for f in files}
        assert set(labels) == on_disk
        assert all(labels[p] == ['cat', 'dog', 'eel'].index(p.split('/')[0]) for p in labels)
        with zipfile.ZipFile(out / f'{split}.zip') as z:
            assert set(z.namelist()) == on_disk
            for p in on_disk:
                assert z.read(p) == (folder / split / p).read_bytes()


@pytest.mark.parametrize('cache_mode', ['no', 'part', 'full'])
def test_zip_dataset_cache_modes(zipped, cache_mode):
    folder, out = zipped
    config = cfg(out, 'DATA.ZIP_MODE', 'True', 'DATA.CACHE_MODE', cache_mode)
    ds_train, ds_val, dl_train, dl_val, _ = build_loader(config)
    ref_train, _ = build_dataset(True, cfg(folder))
    assert len(ds_train) == 12 and len(ds_val) == 7
    # Same images with the same labels as the folder they were packed from.
    ref = {os.path.relpath(p, folder / 'train').replace(os.sep, '/'): y for p, y in ref_train.samples}
    assert dict(ds_train.samples) == ref
    assert len(ds_train.cache) == (0 if cache_mode == 'no' else 12)
    x, y = drain(dl_val)
    assert x.shape == (7, 3, 32, 32) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 2, 2]
    x, y = next(iter(dl_train))
    assert x.shape == (2, 3, 32, 32)


def test_zip_part_cache_holds_only_this_ranks_share(zipped, monkeypatch):
    _, out = zipped
    fake_ranks(monkeypatch, 1, 2)
    config = cfg(out, 'DATA.ZIP_MODE', 'True', 'DATA.CACHE_MODE', 'part', 'DATA.BATCH_SIZE', '1', 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0')
    ds_train, ds_val, dl_train, dl_val, _ = build_loader(config)
    assert sorted(ds_train.cache) == part_cache_shard(12, 2, 1) == [1, 3, 5, 7, 9, 11]
    assert isinstance(dl_train.sampler, ShardShuffleSampler)
    assert set(dl_train.sampler) <= set(ds_train.cache) and len(dl_train.sampler) == 6
    # The val cache is exactly what this rank's eval sampler reads.
    assert sorted(ds_val.cache) == sorted(dl_val.sampler.indices) == [1, 3, 5]


def test_zip_cached_bytes_match_archive(zipped):
    _, out = zipped
    ds = data.ZipImageDataset(str(out / 'val.zip'), str(out / 'val_map.txt'), cache_indices=[0, 2])
    with zipfile.ZipFile(out / 'val.zip') as z:
        assert ds.cache[2] == z.read(ds.samples[2][0])
    assert ds[0][0].mode == 'RGB' and ds[1][0].mode == 'RGB'  # cached and uncached read alike


def test_zip_layout_errors(zipped):
    _, out = zipped
    os.remove(out / 'val_map.txt')
    with pytest.raises(DatasetLayoutError, match='map file not found'):
        build_dataset(False, cfg(out, 'DATA.ZIP_MODE', 'True'))
    with open(out / 'val_map.txt', 'w') as f:
        f.write("cat/img0.jpg\t-1\n")
    with pytest.raises(DatasetLayoutError, match='label out of range'):
        build_dataset(False, cfg(out, 'DATA.ZIP_MODE', 'True'))
    with open(out / 'val_map.txt', 'w') as f:
        f.write("cat/nope.jpg\t0\n")
    with pytest.raises(DatasetLayoutError, match='not in'):
        build_dataset(False, cfg(out, 'DATA.ZIP_MODE', 'True'))
    with open(out / 'val_map.txt', 'w') as f:
        f.write("cat/img0.jpg 0\n")
    with pytest.raises(DatasetLayoutError, match=r'val_map.txt:1'):
        build_dataset(False, cfg(out, 'DATA.ZIP_MODE', 'True'))


# ----------------------------------------------------------------------------- ImageNet-22K

def test_imagenet22k_map(tmp_path):
    made = make_split(tmp_path, 'imgs', {'n01': 2, 'n02': 3})
    entries = [[f"imgs/{p}", 0 if c == 'n01' else 21840] for p, c in made.items()]
    for name in data.build.IMAGENET22K_MAPS.values():
        (tmp_path / name).write_text(json.dumps(entries))
    config = cfg(tmp_path, 'DATA.DATASET', 'imagenet22K', 'MODEL.NUM_CLASSES', '21841')
    ds_train, ds_val, dl_train, dl_val, mixup_fn = build_loader(config)
    assert len(ds_train) == 5 and ds_val.num_classes == 21841
    x, y = drain(dl_val)
    assert x.shape == (5, 3, 32, 32) and sorted(y.tolist()) == [0, 0, 21840, 21840, 21840]
    with pytest.raises(DatasetLayoutError, match='--opts MODEL.NUM_CLASSES 21841'):
        build_dataset(False, cfg(tmp_path, 'DATA.DATASET', 'imagenet22K', 'MODEL.NUM_CLASSES', '1000'))
    entries[0][1] = 21841
    (tmp_path / data.build.IMAGENET22K_MAPS[False]).write_text(json.dumps(entries))
    with pytest.raises(DatasetLayoutError, match='label out of range'):
        build_dataset(False, config)


# ----------------------------------------------------------------------------- transforms and Mixup

@pytest.mark.parametrize('crop', [True, False])
def test_eval_transform_sizes(crop):
    config = cfg('', 'TEST.CROP', str(crop), 'DATA.IMG_SIZE', '48')
    tf = build_transform(False, config)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == (['Resize', 'CenterCrop'] if crop else ['Resize']) + ['ToTensor', 'Normalize']
    assert tf.transforms[0].size == (54 if crop else (48, 48))  # int(256 / 224 * 48) = 54
    for w, h in [(100, 60), (30, 90), (48, 48)]:
        img = Image.fromarray(np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8))
        out = tf(img)
        assert out.shape == (3, 48, 48)
        assert torch.equal(out, tf(img))  # deterministic


def test_eval_crop_keeps_aspect_and_plain_resize_does_not():
    img = Image.new('RGB', (96, 48))
    img.paste((255, 0, 0), (0, 0, 24, 48))  # red left quarter: outside the center crop
    crop = build_transform(False, cfg('', 'TEST.CROP', 'True'))(img)
    plain = build_transform(False, cfg('', 'TEST.CROP', 'False'))(img)
    assert crop[0].max() < 0 < plain[0, :, 0].min()


def test_train_transform_small_images_use_padded_random_crop():
    tf = build_transform(True, cfg(''))
    assert type(tf.transforms[0]).__name__ == 'RandomCrop' and tf.transforms[0].padding == 4
    assert tf(Image.new('RGB', (20, 20))).shape == (3, 32, 32)
    tf = build_transform(True, cfg('', 'DATA.IMG_SIZE', '48'))
    assert 'RandomResizedCrop' in type(tf.transforms[0]).__name__
    assert tf(Image.new('RGB', (70, 30))).shape == (3, 48, 48)


@pytest.mark.parametrize('policy', ['rand-m9-mstd0.5-inc1', 'original'])
def test_posterize_to_zero_bits_does_not_crash(policy):
    # Pillow >= 13 rejects posterize(bits=0), which RandAugment reaches at magnitude 10.
    tf = build_transform(True, cfg('', 'AUG.AUTO_AUGMENT', policy))
    aug = next(t for t in tf.transforms if hasattr(t, 'ops') or hasattr(t, 'policy'))
    ops = aug.ops if hasattr(aug, 'ops') else [op for sub in aug.policy for op in sub]
    posterize = [op for op in ops if op.name.startswith('Posterize')]
    assert posterize
    img = Image.new('RGB', (8, 8), (200, 100, 50))
    for op in posterize:
        out = op.aug_fn(img, 0, **op.kwargs)
        assert np.asarray(out).max() == 0 and out.size == img.size


def test_mixup_soft_targets():
    mixup_fn = data.build_mixup(cfg(''))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    x2, t = mixup_fn(x, y)
    assert x2.shape == x.shape and t.shape == (4, 3)
    assert torch.allclose(t.sum(1), torch.ones(4)) and t.min() >= 0.1 / 3 - 1e-6
    assert data.build_mixup(cfg('', 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0')) is None


# ----------------------------------------------------------------------------- image modes

@pytest.mark.parametrize('mode,ext', FORMATS)
def test_every_mode_decodes_to_rgb(tmp_path, mode, ext):
    path = tmp_path / f"x.{ext}"
    write_image(path, mode, (20, 10), seed=1)
    img = data.decode_image(str(path))
    assert img.mode == 'RGB' and img.size == (20, 10)


def test_sixteen_bit_is_scaled_and_alpha_composited_on_white():
    img = data.to_rgb(Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)))
    assert np.asarray(img)[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    clear = Image.new('RGBA', (2, 2), (0, 0, 0, 0))
    assert np.asarray(data.to_rgb(clear)).min() == 255


# ----------------------------------------------------------------------------- broken images

@pytest.fixture
def broken(folder):
    good = (folder / 'val' / 'cat' / 'img0.jpg').read_bytes()
    (folder / 'val' / 'dog' / 'truncated.jpg').write_bytes(good[:len(good) // 2])
    (folder / 'val' / 'eel' / 'garbage.png').write_bytes(b'not an image at all')
    (folder / 'train' / 'cat' / 'garbage.jpg').write_bytes(b'nope')
    return folder


def test_broken_images_skipped_and_counted(broken, caplog):
    config = cfg(broken, 'DATA.BATCH_SIZE', '1', 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0')  # batch 1: no sample is left out by drop_last
    with caplog.at_level(logging.WARNING, logger='data.datasets'):
        ds_train, ds_val, dl_train, dl_val, _ = build_loader(config)
        x, y = drain(dl_val)
    assert len(ds_val) == 9 and x.shape[0] == 7  # the two broken files are dropped, each good one counted once
    assert 'truncated.jpg' in caplog.text and 'garbage.png' in caplog.text
    assert data.broken_count(dl_val) == 2 and data.pop_broken_count(dl_val) == 2 and data.broken_count(dl_val) == 0
    # Training: a broken file is replaced by the next readable sample, so every batch is full.
    bad = next(i for i, (p, _) in enumerate(ds_train.samples) if p.endswith('garbage.jpg'))
    img, label = ds_train[bad]
    assert img.shape == (3, 32, 32) and (ds_train.samples[bad + 1][1] == label)
    batches = list(dl_train)
    assert len(batches) == 13 and all(b[0].shape == (1, 3, 32, 32) for b in batches)
    assert data.pop_broken_count(dl_train) == 2  # once from the direct call, once in the epoch


def test_all_broken_batch_is_empty(broken):
    ds = data.ImageFolderDataset(str(broken / 'val'), build_transform(False, cfg(broken)), on_broken='drop')
    idx = [i for i, (p, _) in enumerate(ds.samples) if 'truncated' in p or 'garbage' in p]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=idx,
                                         collate_fn=data.datasets.SkipNoneCollate(32))
    x, y = next(iter(loader))
    assert x.shape == (0, 3, 32, 32) and y.shape == (0,)


def test_strict_images_is_an_error(broken):
    _, _, _, dl_val, _ = build_loader(cfg(broken, 'DATA.STRICT_IMAGES', 'True'))
    with pytest.raises(BrokenImageError, match=r'(truncated\.jpg|garbage\.png).*STRICT_IMAGES'):
        drain(dl_val)


@pytest.mark.slow
def test_broken_count_across_worker_processes(broken):
    _, _, dl_train, dl_val, _ = build_loader(cfg(broken, 'DATA.NUM_WORKERS', '2', 'DATA.BATCH_SIZE', '1', 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0'))
    assert dl_val.persistent_workers and dl_val.prefetch_factor == 2
    for epoch in range(2):
        x, _ = drain(dl_val)
        assert x.shape[0] == 7 and data.pop_broken_count(dl_val) == 2
    assert sum(b[0].shape[0] for b in dl_train) == 13 and data.pop_broken_count(dl_train) == 1


# ----------------------------------------------------------------------------- samplers

@pytest.mark.parametrize('contiguous', [False, True])
@pytest.mark.parametrize('shuffle', [False, True])
def test_eval_sampler_counts_every_image_once(contiguous, shuffle):
    shards = [list(DistributedEvalSampler(7, num_replicas=2, rank=r, contiguous=contiguous, shuffle=shuffle))
              for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))
    assert sorted(len(s) for s in shards) == [3, 4]
    if contiguous and not shuffle:
        assert shards == [[0, 1, 2, 3], [4, 5, 6]]


def test_eval_sampler_more_ranks_than_images():
    with pytest.raises(DatasetLayoutError, match='3 ranks but only 2 validation images'):
        eval_shard_indices(2, 3, 0)


@pytest.mark.parametrize('sequential', ['False', 'True'])
def test_val_loaders_over_two_ranks(folder, monkeypatch, sequential):
    seen = []
    for rank in range(2):
        fake_ranks(monkeypatch, rank, 2)
        _, ds_val, _, dl_val, _ = build_loader(cfg(folder, 'TEST.SEQUENTIAL', sequential, 'EVAL_MODE', 'True'))
        x, y = drain(dl_val)
        seen += [ds_val.samples[i][0] for i in dl_val.sampler]
        assert x.shape[0] == len(dl_val.sampler)
    assert sorted(seen) == sorted(p for p, _ in ds_val.samples)


def test_repeated_aug_sampler():
    shards = [RepeatAugSampler(10, num_replicas=2, rank=r, repeats=3, seed=0) for r in range(2)]
    lists = [list(s) for s in shards]
    assert [len(x) for x in lists] == [5, 5] == [len(s) for s in shards]
    counts = collections.Counter(lists[0] + lists[1])
    assert max(counts.values()) <= 3 and len(counts) >= 10 // 3
    # Copies of one image go to different ranks.
    first = lists[0][0]
    assert first in lists[1]
    shards[0].set_epoch(1)
    assert list(shards[0]) != lists[0]


def test_repeated_aug_in_loader(folder):
    _, _, dl_train, _, _ = build_loader(cfg(folder, 'DATA.REPEATED_AUG', '3'))
    assert isinstance(dl_train.sampler, RepeatAugSampler) and len(dl_train) == 6


def test_shard_shuffle_sampler_reshuffles_per_epoch():
    s = ShardShuffleSampler([1, 3, 5, 7, 9], length=4, seed=0)
    a = list(s)
    assert len(a) == 4 and set(a) <= {1, 3, 5, 7, 9}
    orders = set()
    for epoch in range(5):
        s.set_epoch(epoch)
        orders.add(tuple(s))
    assert len(orders) > 1


# ----------------------------------------------------------------------------- scripts

def test_crop_scale_and_flip_are_configurable():
    from config import load_config
    from torchvision import transforms as T
    default = data.build_transform(True, load_config(None, ['DATA.IMG_SIZE', '64']))
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in default.transforms)
    config = load_config(None, ['DATA.IMG_SIZE', '64', 'AUG.HFLIP', '0.0', 'AUG.RRC_SCALE', '[0.7, 1.0]'])
    custom = data.build_transform(True, config)
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in custom.transforms)
    assert tuple(custom.transforms[0].scale) == (0.7, 1.0)
