"""``DATA.DATASET hf``: a Hugging Face dataset (the ``datasets`` package, an optional extra) as a random-access source.

``DATA.DATA_PATH`` is a folder written by ``DatasetDict.save_to_disk`` (the split is ``DATA.TRAIN_SPLIT`` /
``DATA.VAL_SPLIT``) or, on a machine that is online, a dataset name for ``datasets.load_dataset``. The images are
in the ``DATA.HF_IMAGE_COLUMN`` column (an ``Image`` feature), the integer labels in ``DATA.HF_LABEL_COLUMN``.

The dataset is an ``ImageDataset`` like the folder one: the same samplers (so the same exact resume and exact
validation), the same broken-image policy and counter. ``read`` hands out the encoded bytes the ``Image``
feature stores (the fast and gpu loaders decode those themselves), or the file path it points to.

Layer: over ``data.datasets``, under the samplers.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional

from .datasets import DatasetLayoutError, ImageDataset, require_source


def load_split(path: str, split: str) -> Any:
    """The ``datasets.Dataset`` of split ``split``: from a ``save_to_disk`` folder, else by name (online)."""
    datasets = require_source('datasets', 'datasets', 'hf')
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as e:
            raise DatasetLayoutError(f"{path} is not a folder written by DatasetDict.save_to_disk: {e}") from None
        if not isinstance(loaded, datasets.DatasetDict):
            raise DatasetLayoutError(f"{path} holds one Dataset, not a DatasetDict of splits; save it as "
                                     f"DatasetDict({{'train': ..., 'val': ...}}).save_to_disk({path!r})")
        if split not in loaded:
            raise DatasetLayoutError(f"{path} has no split {split!r} (it has {sorted(loaded)}); set "
                                     f"DATA.TRAIN_SPLIT / DATA.VAL_SPLIT")
        return loaded[split]
    if os.path.exists(path) or os.path.isabs(path):
        raise DatasetLayoutError(f"DATA.DATA_PATH {path} is not a folder written by DatasetDict.save_to_disk")
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as e:  # offline, unknown name, unknown split: say which
        raise DatasetLayoutError(f"cannot load the Hugging Face dataset {path!r} split {split!r}: "
                                 f"{type(e).__name__}: {e}") from None


class HFImageDataset(ImageDataset):
    """One split of a Hugging Face dataset: an ``Image`` column and an integer label column."""

    def __init__(self, path: str, split: str, transform: Optional[Callable] = None, on_broken: str = 'substitute',
                 image_column: str = 'image', label_column: str = 'label') -> None:
        datasets = require_source('datasets', 'datasets', 'hf')
        data = load_split(path, split)
        where = f"{path}[{split}]"
        for key, column in (('DATA.HF_IMAGE_COLUMN', image_column), ('DATA.HF_LABEL_COLUMN', label_column)):
            if column not in data.column_names:
                raise DatasetLayoutError(f"{where} has no column {column!r} ({key}); its columns are "
                                         f"{data.column_names}")
        if not isinstance(data.features[image_column], datasets.Image):
            raise DatasetLayoutError(f"{where}: column {image_column!r} is a {data.features[image_column]}, not "
                                     f"an Image feature (DATA.HF_IMAGE_COLUMN)")
        label_feature = data.features[label_column]
        # Undecoded: the row gives {'bytes', 'path'}, so the loaders get the file's own bytes (no PIL round trip).
        self.data = data.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        try:
            labels = [int(v) for v in data.data.column(label_column).to_pylist()]
        except (TypeError, ValueError) as e:
            raise DatasetLayoutError(f"{where}: column {label_column!r} does not hold integer labels: {e}") from None
        samples: List = [(f"{where}#{i}", label) for i, label in enumerate(labels)]
        self.class_names: Optional[List[str]] = list(label_feature.names) if hasattr(label_feature, 'names') else None
        self.path, self.split = path, split
        super().__init__(samples, transform, on_broken, description=where)

    @property
    def num_classes(self) -> int:
        """The ``ClassLabel`` feature's class count where the label column has one, else the largest label + 1."""
        return len(self.class_names) if self.class_names is not None else max(self.targets) + 1

    @property
    def class_to_idx(self) -> Optional[Dict[str, int]]:
        return None if self.class_names is None else {name: i for i, name in enumerate(self.class_names)}

    def read(self, index: int) -> Any:
        cell = self.data[index][self.image_column]
        if cell.get('bytes'):
            return cell['bytes']
        if cell.get('path'):
            return cell['path']
        raise ValueError(f"row {index} of {self.description} has neither image bytes nor a path")
