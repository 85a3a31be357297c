"""Image datasets: class folders, zip archives with map files (optionally cached in memory), ImageNet-22K maps.

All datasets share one reading path (``ImageDataset.__getitem__``): decode to RGB, apply the transform, and
handle unreadable files by the dataset's ``on_broken`` policy:

- ``'substitute'`` (training): warn naming the file, count it, and return the next readable sample instead, so
  that batches stay full (timm's Mixup needs even batches; DDP ranks need the same number of steps).
- ``'drop'`` (validation): warn, count, and return ``None``; ``SkipNoneCollate`` drops it from the batch, so
  accuracy is computed over readable images only, each counted once.
- ``'error'`` (``DATA.STRICT_IMAGES``): raise ``BrokenImageError``.

The count lives in a shared-memory tensor (``BrokenImageCounter``) created in the main process, so DataLoader
workers (fork or spawn) add to the same number that the engine reads.

Training samplers yield ``SampleKey``s (``data.seeding``); for such a key the dataset runs the random transform
under ``seeded_rngs(key)``, so a sample's augmentation is a function of (seed, epoch, index, draw) alone. A plain
int index keeps the process's own random state (evaluation).

Layer: above ``data.seeding``; the samplers, transforms and loaders build on these sources.
"""
from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import logging
import os
import struct
import sys
import time
import zipfile
import zlib
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from config import ConfigError
from utils.distributed import dist_info

from .seeding import SampleKey, seeded_rngs

logger = logging.getLogger(__name__)

Sample = Tuple[str, int]

# Errors that mean "this file is not a readable image" (PIL raises all of these for damaged files).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, zipfile.BadZipFile,
                 Image.DecompressionBombError, KeyError)
# How many following samples a training dataset tries in place of an unreadable one before giving up.
MAX_SUBSTITUTE_TRIES = 64
BROKEN_POLICIES = ('substitute', 'drop', 'error')
# scan_class_folder logs progress (rank 0) at most this often; a folder scanned faster than this logs nothing.
SCAN_PROGRESS_SECONDS = 5.0


class DatasetLayoutError(ValueError):
    """A dataset folder, archive or map file that cannot be used; the message names it."""


class SourceDependencyError(ConfigError):
    """A package that a ``DATA.DATASET`` source needs is missing or broken; the message names it and the fix. A
    ConfigError, so main.py prints it as one line and exits 2."""


def import_optional(module: str, pip_name: str, setting: str, fix: str, error: type = ConfigError) -> Any:
    """Import ``module`` or raise ``error`` naming the ``setting`` that needs it, the pip command and ``fix``."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install (OSError, AttributeError...)
        raise error(f"{setting} needs the package {pip_name!r} ({type(e).__name__}: {e}); install it with "
                    f"'pip install {pip_name}' {fix}") from e


def require_source(module: str, pip_name: str, dataset: str) -> Any:
    """Import ``module`` or raise ``SourceDependencyError`` naming ``DATA.DATASET`` and the pip command."""
    return import_optional(module, pip_name, f"DATA.DATASET {dataset!r}",
                           "(an optional extra, in requirements-dev.txt)", SourceDependencyError)


class BrokenImageError(RuntimeError):
    """An unreadable image while ``DATA.STRICT_IMAGES`` is set."""


class BrokenImageCounter:
    """A count of unreadable images shared by the main process and its DataLoader workers.

    One slot per process in a shared-memory tensor (slot 0: the main process, 1 + worker id: a worker), so
    increments need no lock, and it works with fork and spawn workers alike. Read and reset it in the main
    process between epochs.
    """

    SLOTS = 257  # main process + 256 workers (more workers share slots, which is still safe enough for counts)

    def __init__(self) -> None:
        self._counts = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()

    def add(self, n: int = 1) -> None:
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else 1 + info.id % (self.SLOTS - 1)
        self._counts[slot] += n

    @property
    def value(self) -> int:
        return int(self._counts.sum())

    def reset(self) -> int:
        """Set the count to 0 and return what it was."""
        old = self.value
        self._counts.zero_()
        return old


# ----------------------------------------------------------------------------- decoding

_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
_ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa', 'La')


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit/32-bit integer images are scaled to 8 bits (PIL's own convert clips them to white); images with
    transparency are composited onto white rather than having the alpha dropped (which often leaves black).
    """
    if img.mode == 'RGB':
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.int64)
        if img.mode != 'I' or arr.max(initial=0) > 255:  # 16-bit data: full range is 0..65535
            arr = np.clip(arr, 0, 65535) // 257
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), 'L').convert('RGB')
    if img.mode == 'F':
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), 'L').convert('RGB')
    if img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')
    if img.mode in _ALPHA_MODES:
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img.convert('RGB')  # L, 1, P, CMYK, YCbCr, LAB, HSV, ...


JPEG_SOI = b'\xff\xd8'  # a JPEG file's first two bytes


def is_jpeg(data: bytes) -> bool:
    return data[:2] == JPEG_SOI


def read_bytes(source: Any) -> bytes:
    """A path or bytes (what ``ImageDataset.read`` returns) -> the encoded bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    with open(source, 'rb') as f:
        return f.read()


NPY_MAGIC = b'\x93NUMPY'  # a .npy file's first bytes
ARRAY_EXTENSIONS = ('.npy',)  # (H, W, C) uint8 arrays: any channel count (scan_class_folder lists them too)
# The PIL mode an image of each channel count is converted to; more channels come only from .npy arrays.
CHANNEL_MODES = {1: 'L', 2: 'LA', 3: 'RGB', 4: 'RGBA'}


class ChannelError(ValueError):
    """An image that cannot give the channel count asked for (a ValueError: a broken sample for the loaders)."""


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode as ``CHANNEL_MODES[channels]``: RGB through ``to_rgb``; grey ('L') from ``to_rgb``'s RGB
    (so 16-bit and palette images are scaled and composited as for RGB) unless it is 'L' already; 'LA' / 'RGBA'
    keep an image's alpha (opaque where it has none)."""
    if channels == 3:
        return to_rgb(img)
    mode = CHANNEL_MODES.get(channels)
    if mode is None:
        raise ChannelError(f"a {img.mode} image has at most 4 channels, {channels} were asked for: store "
                           f"{channels}-channel images as .npy arrays (H, W, {channels}) of uint8")
    if img.mode == mode:
        return img
    if mode == 'L':
        return to_rgb(img).convert('L')
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == 'F':
        return to_rgb(img).convert(mode)
    return img.convert(mode)


def decode_array(data: bytes, channels: int) -> Any:
    """A .npy file's (H, W, C) or (H, W) uint8 array: a PIL image for 1-4 channels (``CHANNEL_MODES``), else
    the array itself (H, W, C); another channel count or dtype than asked for is a ``ChannelError``."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.dtype != np.uint8:
        raise ChannelError(f"a .npy image must be a (H, W, C) or (H, W) uint8 array, got shape {array.shape} "
                           f"dtype {array.dtype}")
    if array.shape[2] != channels:
        raise ChannelError(f"a .npy image of {array.shape[2]} channels (shape {array.shape}), "
                           f"{channels} were asked for")
    if channels in CHANNEL_MODES:
        return Image.fromarray(array[:, :, 0] if channels == 1 else array, CHANNEL_MODES[channels])
    return np.ascontiguousarray(array)


def decode_image(data: Any, channels: int = 3) -> Any:
    """Open a path, file object or bytes, decode it fully (so truncation fails here) and return RGB, or with
    ``channels`` another count: a PIL image in ``CHANNEL_MODES[channels]`` (1: grey, 2: grey + alpha, 4: RGBA),
    or for more channels the (H, W, C) uint8 array of a .npy file (``decode_array``)."""
    if isinstance(data, (str, os.PathLike)) and str(data).endswith(ARRAY_EXTENSIONS):
        data = read_bytes(data)
    if isinstance(data, (bytes, bytearray, memoryview)):
        if bytes(data[:6]) == NPY_MAGIC:
            return decode_array(bytes(data), channels)
        data = io.BytesIO(data)
    with Image.open(data) as img:
        img.load()
        return to_rgb(img) if channels == 3 else to_channels(img, channels)


def image_channels(img: Any) -> int:
    """The channel count of what ``decode_image`` returned (a PIL image or an (H, W, C) array)."""
    return len(img.getbands()) if isinstance(img, Image.Image) else int(img.shape[2])


# ----------------------------------------------------------------------------- base dataset

class ImageDataset(Dataset):
    """Base class: ``samples`` is a list of (key, label); subclasses implement ``read(index) -> bytes|path``."""

    # Channels the images are decoded with (``decode_image``): build_dataset sets the model's MODEL.*.IN_CHANS.
    channels = 3

    def __init__(self, samples: List[Sample], transform: Optional[Callable] = None,
                 on_broken: str = 'substitute', description: str = '') -> None:
        if on_broken not in BROKEN_POLICIES:
            raise ValueError(f"on_broken must be one of {BROKEN_POLICIES}, got {on_broken!r}")
        if not samples:
            raise DatasetLayoutError(f"{description or type(self).__name__}: no images found")
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.transform = transform
        self.on_broken = on_broken
        self.description = description
        self.broken_images = BrokenImageCounter()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        """Classes implied by the labels: the largest label + 1."""
        return max(self.targets) + 1

    def read(self, index: int) -> Any:
        """A path, file object or bytes for sample ``index``."""
        raise NotImplementedError

    def name_of(self, index: int) -> str:
        """The file name used in warnings and errors."""
        return self.samples[index][0]

    def target(self, index: int) -> Any:
        """What the loaders get as sample ``index``'s label: its class id here (multi-label: a multi-hot vector)."""
        return self.samples[index][1]

    def _load(self, index: int) -> Any:
        return decode_image(self.read(index), self.channels)

    def _broken(self, index: int, exc: BaseException) -> None:
        if self.on_broken == 'error':
            raise BrokenImageError(f"unreadable image {self.name_of(index)}: {type(exc).__name__}: {exc} "
                                   f"(set DATA.STRICT_IMAGES False to skip such files)") from exc
        self.broken_images.add()
        logger.warning("skipping unreadable image %s: %s: %s", self.name_of(index), type(exc).__name__, exc)

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        """Sample ``index`` transformed; a ``SampleKey`` seeds the transform from its (seed, epoch, index, draw).

        An unreadable file's substitute (the next readable index) is transformed under the requested key's
        seeds, so it is as reproducible as any other sample.
        """
        if not isinstance(index, int):  # numpy / torch integer scalars are fine, anything else is a mistake
            try:
                index = int(index.__index__())
            except AttributeError:
                raise TypeError(f"{type(self).__name__} index must be an int or a SampleKey, got "
                                f"{type(index).__name__} {index!r}") from None
        tries = 1 if self.on_broken != 'substitute' else min(len(self), MAX_SUBSTITUTE_TRIES)
        # A transform with ``takes_encoded`` (DATA.LOADER fast / gpu, data.fast) decodes the file itself in its
        # ``decode`` step, which may draw random numbers first (the crop picks the JPEG's DCT scale), so it runs
        # under the key's generators, seeded afresh for each substitute.
        encoded = getattr(self.transform, 'takes_encoded', False)
        for attempt in range(tries):
            i = (index + attempt) % len(self)
            seeded = isinstance(index, SampleKey) and self.transform is not None
            with seeded_rngs(index) if seeded else contextlib.nullcontext():
                try:
                    img = self.transform.decode(self.read(i)) if encoded else self._load(i)
                except DECODE_ERRORS as exc:
                    self._broken(i, exc)
                    continue
                if self.transform is not None:
                    img = self.transform(img)
            return img, self.target(i)
        if self.on_broken == 'drop':
            return None
        raise BrokenImageError(f"{tries} consecutive unreadable images starting at {self.name_of(index)} in "
                               f"{self.description}; the data looks damaged")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, {len(self)} images, {self.num_classes} classes)"


class SkipNoneCollate:
    """Collate that drops ``None`` samples (unreadable images under the 'drop' policy).

    A batch whose every image was dropped becomes empty tensors of shape (0, C, H, W) and (0,).
    """

    def __init__(self, img_size: Any, channels: int = 3) -> None:
        self.img_size = img_size  # an int (square) or (height, width)
        self.channels = channels

    def __call__(self, batch: Sequence[Optional[Tuple[torch.Tensor, int]]]) -> Any:
        kept = [s for s in batch if s is not None]
        if not kept:
            h, w = self.img_size if isinstance(self.img_size, (tuple, list)) else (self.img_size,) * 2
            return torch.empty(0, self.channels, h, w), torch.empty(0, dtype=torch.long)
        return default_collate(kept)


# ----------------------------------------------------------------------------- class folders

def scan_class_folder(root: str, class_to_idx: Optional[Dict[str, int]] = None
                      ) -> Tuple[List[Sample], Dict[str, int]]:
    """``root/<class>/**/<image>`` -> (sorted samples, class_to_idx). Missing root or empty class: error.

    With ``class_to_idx`` given (the training split's), every class folder here must be one of its classes.
    """
    if not os.path.isdir(root):
        raise DatasetLayoutError(f"split folder not found: {root} (expected <DATA.DATA_PATH>/<split>/<class>/"
                                 f"<image>; check DATA.DATA_PATH, DATA.TRAIN_SPLIT / DATA.VAL_SPLIT)")
    try:
        classes, found = find_classes(root)
    except FileNotFoundError as e:
        raise DatasetLayoutError(f"{root}: {e}") from None
    if class_to_idx is not None:
        unknown = sorted(set(classes) - set(class_to_idx))
        if unknown:
            raise DatasetLayoutError(f"{root} has class folders that the training split lacks: {unknown[:10]}")
        missing = sorted(set(class_to_idx) - set(classes))
        if missing:
            logger.warning("%s lacks %d of the training classes (e.g. %s)", root, len(missing), missing[:5])
        found = {c: class_to_idx[c] for c in classes}
    samples = _scan_classes(root, found)
    return samples, (class_to_idx if class_to_idx is not None else found)


def _scan_classes(root: str, class_to_idx: Dict[str, int]) -> List[Sample]:
    """torchvision's ``make_dataset`` one class at a time (same order), logging progress on rank 0.

    ``make_dataset`` over all classes at once has no progress hook, and an ImageNet-sized folder on a network
    disk can take minutes; a line every ``SCAN_PROGRESS_SECONDS`` says it is alive. Small folders log nothing.
    """
    report = dist_info()[0] == 0
    classes = sorted(class_to_idx)
    samples: List[Sample] = []
    empty = []
    start = last = time.monotonic()
    reported = False
    for done, name in enumerate(classes, 1):
        found = make_dataset(root, {name: class_to_idx[name]}, extensions=IMG_EXTENSIONS + ARRAY_EXTENSIONS,
                             allow_empty=True)
        if not found:
            empty.append(name)
        samples.extend(found)
        now = time.monotonic()
        if report and now - last >= SCAN_PROGRESS_SECONDS:
            logger.info("scanning %s: %d / %d classes, %d images so far, %.1f s", root, done, len(classes),
                        len(samples), now - start)
            last, reported = now, True
    if empty:
        raise DatasetLayoutError(f"{root}: {len(empty)} class folders hold no image files "
                                 f"({', '.join(IMG_EXTENSIONS + ARRAY_EXTENSIONS)}): {empty[:10]}; remove them or add images")
    if reported:
        logger.info("scanned %s: %d classes, %d images in %.1f s", root, len(classes), len(samples),
                    time.monotonic() - start)
    return samples


class ImageFolderDataset(ImageDataset):
    """ImageFolder layout: ``root/<class>/<image>``, classes sorted by name -> labels 0..C-1."""

    def __init__(self, root: str, transform: Optional[Callable] = None, on_broken: str = 'substitute',
                 class_to_idx: Optional[Dict[str, int]] = None) -> None:
        samples, self.class_to_idx = scan_class_folder(root, class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        self.root = root
        super().__init__(samples, transform, on_broken, description=root)

    @property
    def num_classes(self) -> int:
        return len(self.class_to_idx)

    def read(self, index: int) -> str:
        return self.samples[index][0]


# ----------------------------------------------------------------------------- zip + map file

def read_map_file(map_path: str) -> List[Sample]:
    """Lines ``relative/path<TAB>label`` -> samples; blank lines are skipped, anything else malformed is an error."""
    if not os.path.isfile(map_path):
        raise DatasetLayoutError(f"map file not found: {map_path} (expected lines 'relative/path<TAB>label'; "
                                 f"scripts/pack_zip.py writes it)")
    samples = []
    with open(map_path, encoding='utf-8') as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip('\r\n')
            if not line.strip():
                continue
            parts = line.split('\t')
            try:
                if len(parts) != 2:
                    raise ValueError
                samples.append((parts[0], int(parts[1])))
            except ValueError:
                raise DatasetLayoutError(f"{map_path}:{line_no}: expected 'relative/path<TAB>label', "
                                         f"got {line!r}") from None
    if not samples:
        raise DatasetLayoutError(f"map file {map_path} lists no images")
    return samples


class ZipImageDataset(ImageDataset):
    """Images in one zip archive, labels from a map file; members optionally cached in memory.

    The archive is opened lazily once per process (each DataLoader worker gets its own handle).
    ``cache_indices``: the samples whose raw bytes are read into memory at construction ('part' caching
    passes this rank's share, 'full' caching all of them, None none).
    """

    def __init__(self, zip_path: str, map_path: str, transform: Optional[Callable] = None,
                 on_broken: str = 'substitute', cache_indices: Optional[Iterable[int]] = None) -> None:
        if not os.path.isfile(zip_path):
            raise DatasetLayoutError(f"zip archive not found: {zip_path} (DATA.ZIP_MODE expects "
                                     f"<DATA.DATA_PATH>/<split>.zip and <split>_map.txt)")
        samples = read_map_file(map_path)
        self.zip_path = zip_path
        self.map_path = map_path
        self._zip: Optional[zipfile.ZipFile] = None
        self._zip_pid: Optional[int] = None
        try:
            names = set(self._archive().namelist())
        except zipfile.BadZipFile as e:
            raise DatasetLayoutError(f"{zip_path} is not a readable zip archive: {e}") from None
        missing = [p for p, _ in samples if p not in names]
        if missing:
            raise DatasetLayoutError(f"{map_path} lists {len(missing)} files that are not in {zip_path}, "
                                     f"e.g. {missing[:3]}")
        super().__init__(samples, transform, on_broken, description=zip_path)
        self.cache: Dict[int, bytes] = {}
        if cache_indices is not None:
            self.fill_cache(cache_indices)

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.zip_path)
            self._zip_pid = os.getpid()
        return self._zip

    def fill_cache(self, indices: Iterable[int]) -> None:
        """Read the raw bytes of samples ``indices`` into memory (decoding still happens per access)."""
        indices = list(indices)
        archive = self._archive()
        step = max(1, len(indices) // 10)
        # A bar on an interactive terminal, on rank 0 only (every rank fills its own cache at the same time).
        from tqdm import tqdm
        quiet = not sys.stderr.isatty() or dist_info()[0] != 0
        for n, i in enumerate(tqdm(indices, desc=f'caching {os.path.basename(self.zip_path)}', unit='img',
                                   disable=quiet, leave=False)):
            if n % step == 0:
                logger.info("caching %s: %d / %d", self.zip_path, n, len(indices))
            try:
                self.cache[i] = archive.read(self.samples[i][0])
            except DECODE_ERRORS as exc:  # leave it to __getitem__, which applies the broken-image policy
                logger.warning("could not cache %s: %s", self.name_of(i), exc)
        logger.info("cached %d of %d images of %s", len(self.cache), len(self), self.zip_path)

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state['_zip'] = None  # a ZipFile handle does not cross process boundaries
        state['_zip_pid'] = None
        return state

    def name_of(self, index: int) -> str:
        return f"{self.zip_path}:{self.samples[index][0]}"

    def read(self, index: int) -> bytes:
        cached = self.cache.get(index)
        return cached if cached is not None else self._archive().read(self.samples[index][0])


# ----------------------------------------------------------------------------- ImageNet-22K

IMAGENET22K_CLASSES = 21841


def read_22k_map(map_path: str) -> List[Sample]:
    """The official ImageNet-22K map: a JSON list of ``[relative_path, label]``; tab lines are accepted too."""
    if not os.path.isfile(map_path):
        raise DatasetLayoutError(f"ImageNet-22K map file not found: {map_path}")
    with open(map_path, encoding='utf-8') as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if head != '[':
            return read_map_file(map_path)
        f.seek(0)
        try:
            entries = json.load(f)
            samples = [(str(p), int(label)) for p, label in entries]
        except (ValueError, TypeError) as e:
            raise DatasetLayoutError(f"{map_path}: expected a JSON list of [path, label] pairs: {e}") from None
    if not samples:
        raise DatasetLayoutError(f"map file {map_path} lists no images")
    return samples


class ImageNet22KDataset(ImageDataset):
    """ImageNet-22K from a map file; image paths are relative to ``root``; 21841 classes."""

    def __init__(self, root: str, map_file: str, transform: Optional[Callable] = None,
                 on_broken: str = 'substitute') -> None:
        self.root = root
        super().__init__(read_22k_map(os.path.join(root, map_file)), transform, on_broken,
                         description=os.path.join(root, map_file))

    @property
    def num_classes(self) -> int:
        return IMAGENET22K_CLASSES

    def name_of(self, index: int) -> str:
        return os.path.join(self.root, self.samples[index][0])

    def read(self, index: int) -> str:
        return self.name_of(index)


# ----------------------------------------------------------------------------- multi-label: CSV label files

CLASS_NAMES_FILE = 'classes.txt'  # <DATA_PATH>/classes.txt: optional class names, one per line, line i = class i
MultiLabelSample = Tuple[str, Tuple[int, ...]]


def _class_ids(field: str) -> Optional[Tuple[int, ...]]:
    """``'3 0 7'`` -> (0, 3, 7) (sorted, repeats dropped); '' -> () (an image with no label); None if a word is not
    an integer."""
    try:
        return tuple(sorted({int(word) for word in field.split()}))
    except ValueError:
        return None


def read_label_csv(csv_path: str, num_classes: int) -> List[MultiLabelSample]:
    """``<split>.csv`` -> samples ``(relative path, class ids)``. Each row is ``path,ids`` where ids are class ids
    in [0, ``num_classes``) separated by spaces (none: an image without any of the classes). A first row whose
    second field is not integers (``path,labels``) is a header and skipped; blank lines are skipped. A row with
    another field count, a word that is not an id or an id out of range is an error naming the file, line and
    row. Read with the ``csv`` module, so a path holding a comma can be quoted."""
    if not os.path.isfile(csv_path):
        raise DatasetLayoutError(f"label file not found: {csv_path} (DATA.LABELS csv expects "
                                 f"<DATA.DATA_PATH>/<split>.csv with rows 'relative/path,<class ids separated by "
                                 f"spaces>'; see docs/DATA.md)")
    samples: List[MultiLabelSample] = []
    with open(csv_path, newline='', encoding='utf-8') as f:
        reader = csv.reader(f)
        first_row = True
        for row in reader:
            where = f"{csv_path}:{reader.line_num}"
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 2:
                raise DatasetLayoutError(f"{where}: expected 2 fields 'relative/path,<class ids separated by "
                                         f"spaces>', got {len(row)}: {row!r}")
            path, ids = row[0].strip(), _class_ids(row[1])
            header, first_row = first_row and ids is None, False
            if header:
                continue
            if ids is None:
                raise DatasetLayoutError(f"{where}: class ids must be integers separated by spaces, got {row[1]!r} "
                                         f"(row {row!r})")
            bad = [i for i in ids if not 0 <= i < num_classes]
            if bad:
                raise DatasetLayoutError(f"{where}: class id {bad[0]} out of range [0, {num_classes}) "
                                         f"(MODEL.NUM_CLASSES) in row {row!r}")
            if not path:
                raise DatasetLayoutError(f"{where}: empty image path in row {row!r}")
            samples.append((path, ids))
    if not samples:
        raise DatasetLayoutError(f"label file {csv_path} lists no images")
    return samples


def read_class_names(path: str) -> List[str]:
    """A class names file: one name per line (blank lines skipped), in class id order."""
    with open(path, encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip()]


class MultiLabelCsvDataset(ImageDataset):
    """Images under ``root`` with several labels each from ``root/<csv_name>`` (``read_label_csv``): the target
    of a sample is a float32 multi-hot vector of ``num_classes`` (the loaders stack them to (B, C)). Class names
    come from ``root/classes.txt`` when it exists (``classes``; its line count must be ``num_classes``)."""

    def __init__(self, root: str, csv_name: str, num_classes: int, transform: Optional[Callable] = None,
                 on_broken: str = 'substitute') -> None:
        self.root, self.csv_path, self.class_count = root, os.path.join(root, csv_name), num_classes
        samples = read_label_csv(self.csv_path, num_classes)
        missing = [p for p, _ in samples if not os.path.isfile(os.path.join(root, p))]
        if missing:
            raise DatasetLayoutError(f"{self.csv_path} lists {len(missing)} images that are not under {root}, e.g. "
                                     f"{missing[:3]} (paths are relative to DATA.DATA_PATH)")
        names_path = os.path.join(root, CLASS_NAMES_FILE)
        self.classes: Optional[List[str]] = read_class_names(names_path) if os.path.isfile(names_path) else None
        if self.classes is not None and len(self.classes) != num_classes:
            raise DatasetLayoutError(f"{names_path} names {len(self.classes)} classes but MODEL.NUM_CLASSES is "
                                     f"{num_classes}; give one name per class id, one per line")
        super().__init__(samples, transform, on_broken, description=self.csv_path)

    @property
    def num_classes(self) -> int:
        return self.class_count

    def name_of(self, index: int) -> str:
        return os.path.join(self.root, self.samples[index][0])

    def read(self, index: int) -> str:
        return self.name_of(index)

    def target(self, index: int) -> torch.Tensor:
        hot = torch.zeros(self.class_count, dtype=torch.float32)  # (C,)
        hot[list(self.samples[index][1])] = 1.0
        return hot

    def label_counts(self) -> List[int]:
        """Images per class (how many rows name each class id)."""
        counts = [0] * self.class_count
        for _, ids in self.samples:
            for i in ids:
                counts[i] += 1
        return counts
