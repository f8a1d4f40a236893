"""Datasets: where the images come from and how they are handed to the harness.

A dataset is a :class:`Dataset` registered by name through the ``epbench_datasets`` hook
(the built-in ones are ``mnist-5k``, ``mnist`` and ``fashion-mnist``). ``load`` returns a
:class:`Split` of flat float32 images in [0, 1] (pixels / 255, no normalisation) and int64
labels. File-based datasets are searched for in, in order: the ``data_dir`` argument
(``--data-dir``), ``$EPBENCH_DATA`` (its ``<name>`` subfolder, then itself), the per-user
cache (``$XDG_CACHE_HOME/epbench/<name>``, default ``~/.cache/epbench/<name>``), then any
system folder the dataset knows of.

This module is imported when the plugins load: it must stay cheap (NumPy is imported lazily).
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from typing import Any

from epbench.errors import DatasetError

#: environment variable naming a folder that holds datasets (one subfolder per dataset)
DATA_ENV = "EPBENCH_DATA"

__all__ = [
    "DATA_ENV",
    "Dataset",
    "DatasetError",
    "Inspection",
    "Split",
    "cache_dir",
    "epoch_order",
    "get_dataset",
    "list_datasets",
    "load_dataset",
    "one_hot",
    "shuffled",
]


@dataclasses.dataclass(eq=False)
class Split:
    """A train/test split. Built-in datasets give ``x_*`` as (N, 784) float32 in [0, 1]
    and ``y_*`` as (N,) int64 labels 0-9; ``source`` says where the data came from."""

    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    source: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if len(x) != len(y):
                raise DatasetError(f"{self.name or 'dataset'}: {len(x)} {part} images but {len(y)} {part} labels")

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)

    def __repr__(self) -> str:
        shape = getattr(self.x_train, "shape", None)
        return (f"Split(name={self.name!r}, n_train={self.n_train}, n_test={self.n_test}, "
                f"x_shape={shape}, source={self.source!r})")


#: the verdicts of :meth:`Dataset.inspect`
STATUSES = {
    "ok": "sound, and verified to be this dataset",
    "unverified": "not verified to be the published data (a subset, say, or a dataset without checks)",
    "bad": "corrupt or malformed (the note says which file and how)",
    "other dataset": "sound, but the content of another dataset",
}


@dataclasses.dataclass
class Inspection:
    """What :meth:`Dataset.inspect` found: sizes when known, a ``status`` (a key of
    :data:`STATUSES`) and a one-line ``note`` saying what was checked or what is wrong."""

    n_train: int | None = None
    n_test: int | None = None
    status: str = "ok"
    note: str = ""


class Dataset(ABC):
    """Base class of a dataset. Subclasses set ``name`` and ``description`` and implement
    :meth:`locate` and :meth:`load` (and, for ``epbench data``, :meth:`inspect`)."""

    name: str = ""
    description: str = ""
    n_classes: int = 10

    @abstractmethod
    def locate(self, data_dir: str | None = None) -> str:
        """Where the data is; raise :class:`DatasetError` (one line: where it looked and how
        to get the data) when it is not found."""

    @abstractmethod
    def load(self, data_dir: str | None = None) -> Split:
        """Read the data into a :class:`Split`."""

    def inspect(self, location: str) -> "Inspection":
        """A cheap look at the data found at ``location`` (for ``epbench data``): its sizes and
        whether it is sound and really this dataset. The default checks nothing."""
        return Inspection(status="unverified", note="no checks defined for this dataset")

    def info(self, data_dir: str | None = None) -> dict:
        """A summary: name, description, found, status (``missing`` when not found, else the
        :class:`Inspection`'s), location, reason (why missing, or the inspection's note),
        n_train and n_test when known."""
        out: dict = {"name": self.name, "description": self.description}
        try:
            location = self.locate(data_dir)
        except DatasetError as exc:
            out.update(found=False, status="missing", reason=str(exc))
            return out
        out.update(found=True, location=location)
        try:
            seen = self.inspect(location)
        except DatasetError as exc:
            seen = Inspection(status="bad", note=str(exc))
        out.update(status=seen.status, reason=seen.note)
        if seen.n_train is not None:
            out.update(n_train=seen.n_train, n_test=seen.n_test)
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def cache_dir(name: str | None = None) -> str:
    """The per-user cache: ``$XDG_CACHE_HOME/epbench[/<name>]`` (default ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(root, "epbench")
    return os.path.join(path, name) if name else path


def list_datasets() -> dict:
    """Every registered dataset, by name."""
    from epbench.plugins import registry

    return dict(registry().datasets)


def get_dataset(name: str) -> Dataset:
    """The registered dataset ``name`` (built in or from a plugin)."""
    from epbench.plugins import registry

    return registry().dataset(name)


def load_dataset(name: str, data_dir: str | None = None) -> Split:
    """Load the registered dataset ``name``."""
    split = get_dataset(name).load(data_dir)
    if not split.name:
        split.name = name
    return split


def one_hot(labels, n_classes: int = 10):
    """(N,) integer labels -> (N, n_classes) float32 one-hot rows."""
    import numpy as np

    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DatasetError(f"one_hot: expected a 1-D array of labels, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetError(f"one_hot: labels must lie in 0..{n_classes - 1}, "
                           f"got {labels.min()}..{labels.max()}")
    out = np.zeros((labels.size, n_classes), dtype=np.float32)
    out[np.arange(labels.size), labels.astype(np.int64)] = 1.0
    return out


def epoch_order(n: int, seed) -> Any:
    """The order in which to visit ``n`` examples: ``numpy.random.default_rng(seed).permutation(n)``."""
    import numpy as np

    return np.random.default_rng(seed).permutation(n)


def shuffled(split_or_arrays, seed):
    """Shuffle with :func:`epoch_order`: a :class:`Split` gets its training set shuffled
    (the test set is left as is); a tuple/list of equal-length arrays is permuted together;
    a single array is permuted."""
    import numpy as np

    if isinstance(split_or_arrays, Split):
        s = split_or_arrays
        order = epoch_order(s.n_train, seed)
        return dataclasses.replace(s, x_train=s.x_train[order], y_train=s.y_train[order])
    if isinstance(split_or_arrays, (tuple, list)):
        arrays = [np.asarray(a) for a in split_or_arrays]
        lengths = {len(a) for a in arrays}
        if len(lengths) > 1:
            raise DatasetError(f"shuffled: arrays have different lengths {sorted(lengths)}")
        order = epoch_order(lengths.pop() if lengths else 0, seed)
        return tuple(a[order] for a in arrays)
    array = np.asarray(split_or_arrays)
    return array[epoch_order(len(array), seed)]
